"""One scheduler per engine: a worker thread that owns the model and runs jobs in order.

Requests never touch the engine directly. They submit a `Job` (one or more segments, e.g. a
narrator's turns) and read its chunks back on the event loop. Because a single thread runs
every job of an engine, one job's audio can never end up in another's stream, and blocking
model work stays off the event loop. Engines that can decode several requests together
offer `synthesize_batch_stream`; the scheduler then groups waiting single-segment jobs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from lowvox.engines.base import AudioChunk, Engine, SynthesisRequest
from lowvox.errors import Cancelled, LowvoxError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ids = itertools.count(1)


class QueueFull(LowvoxError):
    """The engine's queue is at its bound; the client should retry later."""

    status_code = 429

    def __init__(self, engine: str, retry_after: int) -> None:
        super().__init__(f"the {engine} engine is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


class BatchEngine(Protocol):
    """What an engine offers to have concurrent requests decoded together."""

    max_batch_size: int

    def synthesize_batch_stream(
        self, requests: Sequence[SynthesisRequest], cancels: Sequence[threading.Event]
    ) -> Iterator[tuple[int, AudioChunk]]:
        """Yield (index into `requests`, chunk) pairs; each request's chunks in order."""
        ...


@dataclass(frozen=True)
class SegmentStart:
    """Marks where a job moves on to its next segment (narrator turns)."""

    index: int


class _Done:
    pass


_DONE = _Done()


@dataclass(eq=False)
class Job:
    """One client request: its segments run back to back, its chunks go to one consumer."""

    segments: list[SynthesisRequest]
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    tag: str = ""
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def _deliver(self, item: Any) -> None:
        # Called from the worker thread; the queue belongs to the event loop.
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def events(self) -> AsyncIterator[AudioChunk | SegmentStart]:
        """Chunks (and segment markers) as the worker produces them; raises on failure."""
        while True:
            item = await self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        async for item in self.events():
            if isinstance(item, AudioChunk):
                yield item


class Scheduler:
    """Owns one engine on one worker thread; jobs wait in a bounded FIFO queue."""

    def __init__(self, engine: Engine, max_queue: int = 32, name: str | None = None) -> None:
        self.engine = engine
        self.name = name or engine.name or type(engine).__name__
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            collections.deque()
        )
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._job_seconds = 2.0  # running mean of job wall time, for Retry-After
        self._thread = threading.Thread(target=self._work, name=f"lowvox-{self.name}", daemon=True)
        self._thread.start()

    # -- submitting ------------------------------------------------------------------

    def submit(
        self,
        segments: Sequence[SynthesisRequest],
        loop: asyncio.AbstractEventLoop | None = None,
        tag: str = "",
    ) -> Job:
        """Queue a job; raises `QueueFull` when `max_queue` jobs are already waiting."""
        loop = loop or asyncio.get_running_loop()
        with self._cond:
            if self._stopping:
                raise LowvoxError(f"the {self.name} engine is shutting down")
            self._drop_cancelled()
            if len(self._pending) >= self.max_queue:
                raise QueueFull(self.name, self.retry_after())
            job = Job(segments=list(segments), loop=loop, tag=tag)
            self._pending.append(job)
            self._cond.notify()
        return job

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the worker thread (model loading, latents): it owns the model."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise LowvoxError(f"the {self.name} engine is shutting down")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    def retry_after(self) -> int:
        return max(1, round(self._job_seconds * (len(self._pending) + 1)))

    def cancel_all(self) -> int:
        """Stop every running and waiting job; returns how many were stopped."""
        with self._cond:
            jobs = list(self._running) + list(self._pending)
        for job in jobs:
            job.cancel.set()
        with self._cond:
            self._cond.notify()
        return len(jobs)

    def cancel(self, tag: str) -> int:
        """Stop the running or waiting jobs submitted with `tag`; returns how many."""
        with self._cond:
            jobs = [j for j in (*self._running, *self._pending) if j.tag == tag]
            for job in jobs:
                job.cancel.set()
            self._cond.notify()
        return len(jobs)

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._running or self._pending)

    @property
    def queued(self) -> int:
        with self._cond:
            return sum(1 for j in self._pending if not j.cancel.is_set())

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.cancel_all()
        self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------------

    def _next_work(self) -> tuple[Callable[[], Any], concurrent.futures.Future] | list[Job] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._calls:
                    return self._calls.popleft()
                if self._pending:
                    return self._take_jobs()
                if self._stopping:
                    return None
                self._cond.wait()

    def _drop_cancelled(self) -> None:
        """Jobs cancelled while waiting leave the queue without running (lock held)."""
        for job in [j for j in self._pending if j.cancel.is_set()]:
            self._pending.remove(job)
            job._deliver(Cancelled("generation cancelled"))
            job.finished.set()

    def _take_jobs(self) -> list[Job]:
        first = self._pending.popleft()
        batch = [first]
        limit = int(getattr(self.engine, "max_batch_size", 1) or 1)
        if (
            limit > 1
            and hasattr(self.engine, "synthesize_batch_stream")
            and len(first.segments) == 1
        ):
            while self._pending and len(batch) < limit and len(self._pending[0].segments) == 1:
                batch.append(self._pending.popleft())
        self._running = batch
        return batch

    def _work(self) -> None:
        while True:
            work = self._next_work()
            if work is None:
                return
            if isinstance(work, tuple):
                fn, future = work
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to the awaiting caller
                        future.set_exception(e)
                continue
            t0 = time.monotonic()
            try:
                if len(work) == 1:
                    self._run_one(work[0])
                else:
                    self._run_batch(work)
            finally:
                with self._cond:
                    self._running = []
                for job in work:
                    job.finished.set()
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.monotonic() - t0)

    def _run_one(self, job: Job) -> None:
        job.started.set()
        try:
            for i, segment in enumerate(job.segments):
                job._deliver(SegmentStart(i))
                stream = self.engine.synthesize_stream(segment, job.cancel)
                try:
                    for chunk in stream:
                        if job.cancel.is_set():
                            break
                        job._deliver(chunk)
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
                if job.cancel.is_set():
                    raise Cancelled("generation cancelled")
        except BaseException as e:
            if not isinstance(e, LowvoxError):
                logger.exception("job %d on %s failed", job.id, self.name)
            job._deliver(e)
        else:
            job._deliver(_DONE)

    def _run_batch(self, jobs: list[Job]) -> None:
        engine: BatchEngine = self.engine  # type: ignore[assignment]
        for job in jobs:
            job.started.set()
            job._deliver(SegmentStart(0))
        try:
            stream = engine.synthesize_batch_stream(
                [j.segments[0] for j in jobs], [j.cancel for j in jobs]
            )
            for index, chunk in stream:
                job = jobs[index]
                if not job.cancel.is_set():
                    job._deliver(chunk)
                if all(j.cancel.is_set() for j in jobs):
                    break
        except BaseException as e:
            logger.exception("batch on %s failed", self.name)
            for job in jobs:
                job._deliver(e if isinstance(e, LowvoxError) else LowvoxError("synthesis failed"))
            return
        for job in jobs:
            job._deliver(Cancelled("generation cancelled") if job.cancel.is_set() else _DONE)
