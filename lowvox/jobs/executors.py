"""Where a job's sentences are spoken: this process's engines, or a Ray cluster.

The runner hands an executor one `Take` at a time (several in flight, up to
`concurrency`) and gets its audio back. The local executor submits takes to the engine's
scheduler at bulk priority, so a book fills the batch's free rows while interactive
requests still go first. The Ray executor (`lowvox.jobs.ray_executor`) sends them to
actors that each hold a loaded model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowvox.engines.base import Engine, SynthesisRequest
from lowvox.errors import LowvoxError

logger = logging.getLogger(__name__)

# How many engine restarts (reloads, runtime switches) one take outlives before its
# sentence fails: a bound, so an engine restarted in a loop cannot hold a job forever.
RESTARTS_PER_TAKE = 5


@dataclass(frozen=True)
class Take:
    """One attempt at one sentence: everything needed to speak it, anywhere."""

    job: str
    index: int
    text: str
    voice: str | None
    language: str
    speed: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)  # with this take's seed

    def request(self) -> SynthesisRequest:
        return SynthesisRequest(
            text=self.text,
            voice=self.voice,
            language=self.language,
            speed=self.speed,
            options=dict(self.options),
        )


def engine_request(engine: Engine, take: Take, max_chars: int | None = None) -> SynthesisRequest:
    """A take as `engine` will speak it, wherever it runs: the options it can use (clients'
    others are dropped, as for any request), validated once."""
    from lowvox.server.synthesis import usable_options

    wanted = dataclasses.replace(take.request(), options=usable_options(engine, take.options))
    return engine.validate(wanted, max_chars=max_chars)


def speak_take(engine: Engine, take: Take, max_chars: int | None = None) -> np.ndarray:
    """Speak a take on the calling thread (a test): validate, then collect the stream.
    The executors go through a scheduler instead."""
    request = engine_request(engine, take, max_chars)
    parts = [chunk.samples for chunk in engine.synthesize_stream(request)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


async def collect_audio(job: Any) -> np.ndarray:
    """All of a scheduler job's audio (float32 mono); the job is cancelled if this is."""
    parts: list[np.ndarray] = []
    try:
        async for chunk in job.chunks():
            parts.append(chunk.samples)
    finally:
        if not job.finished.is_set():
            job.cancel.set()
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


class Executor(ABC):
    """Speaks takes of one job's engine; `concurrency` takes may be in flight at once."""

    sample_rate: int
    concurrency: int = 1

    @abstractmethod
    async def start(self) -> None:
        """Load what is needed (engines, actors); sets `sample_rate` and `concurrency`."""

    @abstractmethod
    async def speak(self, take: Take, cancel: threading.Event | None = None) -> np.ndarray:
        """The take's audio (float32 mono at `sample_rate`). A `LowvoxError` is that
        sentence's own failure; other exceptions mean the executor itself is broken.
        `cancel` set (before or during) stops it with `Cancelled`."""

    async def validate(self, request: SynthesisRequest) -> SynthesisRequest:
        """Check a request the way the engine will (voices, language) before a job is
        stored; raises the engine's own 4xx errors."""
        raise NotImplementedError

    async def cancel(self, job: str) -> None:
        """Stop the job's takes in flight (they fail with `Cancelled`)."""

    async def close(self) -> None:
        """Give back what `start` took."""


class LocalExecutor(Executor):
    """This process's engine, through its scheduler, at bulk priority."""

    def __init__(self, hub: Any, engine: str | None = None) -> None:
        self.hub = hub  # lowvox.server.engines.EngineHub
        self.engine = engine
        self.max_chars = hub.settings.max_text_chars
        self._slot: Any = None

    async def start(self) -> None:
        self._slot = await self.hub.get(self.engine)
        self.sample_rate = self._slot.engine.sample_rate
        # Enough takes in flight to fill the batch's rows but the one the scheduler keeps
        # for interactive requests, and never most of the queue's bound.
        settings = self.hub.settings
        self.concurrency = max(1, min(settings.max_batch_size, settings.max_queue // 2) - 1)

    async def _current(self) -> Any:
        # The hub may have unloaded (keep-alive) or reloaded the engine meanwhile.
        self._slot = await self.hub.get(self.engine)
        self._slot.touch()
        return self._slot

    async def validate(self, request: SynthesisRequest) -> SynthesisRequest:
        slot = await self._current()
        return await asyncio.to_thread(slot.engine.validate, request, self.max_chars)

    async def speak(self, take: Take, cancel: threading.Event | None = None) -> np.ndarray:
        from lowvox.server.scheduler import Priority

        for attempt in range(RESTARTS_PER_TAKE + 1):
            slot = await self._current()
            try:
                request = await asyncio.to_thread(engine_request, slot.engine, take, self.max_chars)
                job = slot.scheduler.submit(
                    [request], tag=f"job:{take.job}", priority=Priority.BULK
                )
                # A stop that came while this take was being validated: `cancel` was set
                # before `cancel(job)` ran, which may have missed this just-submitted take.
                if cancel is not None and cancel.is_set():
                    job.cancel.set()
                return await collect_audio(job)
            except LowvoxError:
                # The engine was restarted under the take (a reload, a runtime switch, an
                # idle unload): not this sentence's failure, nor a stop of the job. The
                # take is spoken again, from the start, by the engine as it is now.
                stopped = cancel is not None and cancel.is_set()
                if not slot.retired or stopped or attempt == RESTARTS_PER_TAKE:
                    raise
                logger.info("job %s sentence %d: engine restarted; again", take.job, take.index)
        raise AssertionError("unreachable")

    async def cancel(self, job: str) -> None:
        if self._slot is not None:
            self._slot.scheduler.cancel(f"job:{job}")


def open_executor(settings: Any, hub: Any, engine: str | None = None) -> Executor:
    """The executor `settings.executor` names, for jobs of `engine`."""
    if settings.executor == "ray":
        from lowvox.jobs.ray_executor import RayExecutor

        return RayExecutor(settings, engine or settings.engine)
    return LocalExecutor(hub, engine)
