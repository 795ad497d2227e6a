"""Speaking a job's sentences on a Ray cluster: one actor per node (or GPU), each holding a
loaded engine and decoding several sentences together.

The head (the process running the job) keeps everything that matters: the job's SQLite
store, the seeds, the files. It sends `Take`s to the actors and gets float32 audio back.
Each actor owns its engine through the same `Scheduler` as a server does, so the takes it
holds share the engine's batch (continuous batching: XTTS decodes them together) and one
take's failure is that take's alone. A lost actor (killed, crashed, its node gone) costs
only the takes it held: it is replaced and they are sent again, a few times at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowvox.engines.base import SynthesisRequest
from lowvox.errors import Cancelled, LowvoxError
from lowvox.jobs.executors import Executor, Take, collect_audio, engine_request

logger = logging.getLogger(__name__)

# How often one take may lose its actor before it counts as that sentence's failure (a
# sentence that crashes its worker every time must not stall the book).
MAX_LOST = 3
# How often a take in flight looks at its cancel event (the runner's stop).
CANCEL_POLL_S = 0.1


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise LowvoxError(
            "the ray executor needs Ray: pip install lowvox[ray] (on every node)"
        ) from e
    return ray


# -- what travels between head and actors --------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """A `LowvoxError` raised on an actor, as plain data: pickling the exception itself
    would call its own `__init__` with its message (`UnknownVoice(message)`), garbling it."""

    module: str
    name: str
    message: str
    attrs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, error: LowvoxError) -> _Failure:
        attrs = {
            k: v for k, v in vars(error).items() if v is None or isinstance(v, str | int | float)
        }
        return cls(type(error).__module__, type(error).__qualname__, str(error), attrs)

    def error(self) -> LowvoxError:
        """The same exception class and message on this side (`Cancelled` stays
        `Cancelled`, a 404 stays a 404); a plain `LowvoxError` if the class is unknown."""
        try:
            kind = getattr(importlib.import_module(self.module), self.name)
        except (ImportError, AttributeError):
            kind = None
        if not (isinstance(kind, type) and issubclass(kind, LowvoxError)):
            return LowvoxError(self.message)
        error = kind.__new__(kind)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.attrs)
        return error


def _actor_settings(settings: Any, gpu: bool) -> dict[str, Any]:
    """The settings as JSON-able data for an actor to rebuild. A GPU actor sees only the GPU
    Ray gave it (as its cuda:0), whatever index the head named."""
    data = settings.model_dump(mode="json")
    if gpu:
        data["device"] = "cuda"
    return data


# -- the actor -------------------------------------------------------------------------------


class SpeakerActor:
    """One loaded engine on a Ray worker, behind a `Scheduler` (its owning thread and its
    continuous batch). An async actor: every take in flight is a coroutine waiting on the
    scheduler, so up to a batch's worth decode together."""

    def __init__(self, settings: dict[str, Any], engine: str) -> None:
        from lowvox.engines import create_engine
        from lowvox.server.scheduler import Scheduler
        from lowvox.settings import Settings

        self.settings = Settings(**settings)
        self.engine = create_engine(engine, self.settings)
        # No queue bound of its own: the head keeps at most a batch's worth in flight here.
        self.scheduler = Scheduler(self.engine, max_queue=1 << 20, name=engine)
        # Loaded on the scheduler's thread, which owns the engine from now on.
        self.scheduler.call(self.engine.load).result()
        self.capacity = self.scheduler.call(lambda: self.engine.open_batch().capacity).result()

    def ready(self) -> tuple[int, int]:
        """(sample rate, takes its batch holds at once)."""
        return self.engine.sample_rate, self.capacity

    def _request(self, take: Take) -> SynthesisRequest:
        """The take checked as `LocalExecutor` checks it: the same request, the same audio."""
        return engine_request(self.engine, take, self.settings.max_text_chars)

    async def validate(self, request: SynthesisRequest) -> SynthesisRequest | _Failure:
        try:
            checked = await asyncio.to_thread(
                self.engine.validate, request, self.settings.max_text_chars
            )
        except LowvoxError as e:
            return _Failure.of(e)
        # Only the normalised fields go back: an engine's own request (XTTS's token ids)
        # stays here.
        return SynthesisRequest(
            text=checked.text,
            voice=checked.voice,
            language=checked.language,
            speed=checked.speed,
            options=dict(checked.options),
        )

    async def speak(self, take: Take) -> np.ndarray | _Failure:
        """The take's audio, float32, or its failure as data (never raised: a raised
        `LowvoxError` would come back wrapped and garbled)."""
        from lowvox.server.scheduler import Priority

        try:
            request = await asyncio.to_thread(self._request, take)
            # Interactive priority: nothing else shares this engine, so a take may use
            # every row of the batch (bulk would keep one free for listeners).
            job = self.scheduler.submit(
                [request], tag=f"job:{take.job}", priority=Priority.INTERACTIVE
            )
            return await collect_audio(job)
        except LowvoxError as e:
            return _Failure.of(e)

    def cancel(self, job: str) -> int:
        return self.scheduler.cancel(f"job:{job}")


# -- the head --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    """One actor slot: its current actor, the takes in flight on it, its replacements."""

    index: int
    handle: Any
    capacity: int = 1
    busy: int = 0
    replaced: int = 0


class RayExecutor(Executor):
    """Speaks takes on `settings.ray_actors` Ray actors, each with `engine` loaded."""

    def __init__(self, settings: Any, engine: str) -> None:
        self.settings = settings
        self.engine = engine
        self.max_lost = MAX_LOST
        self._ray: Any = None
        self._actor_class: Any = None
        self._options: dict[str, Any] = {}
        self._actor_args: tuple[Any, ...] = ()
        self._workers: list[_Worker] = []
        self._owns_ray = False

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._workers:
            return
        ray = self._ray = _import_ray()
        if not ray.is_initialized():
            # Off the event loop (a local start takes seconds); in a thread Ray also leaves
            # the process's signal handlers (the server's) alone.
            await asyncio.to_thread(self._init_ray, ray)
        gpu = self._wants_gpu(ray)
        self._options = {
            "num_cpus": 1,
            "num_gpus": 1 if gpu else 0,
            "scheduling_strategy": "SPREAD",
            # Enough concurrent calls for a full batch plus validations and cancels.
            "max_concurrency": max(16, 4 * self.settings.max_batch_size),
        }
        self._actor_class = ray.remote(SpeakerActor)
        self._actor_args = (_actor_settings(self.settings, gpu), self.engine)
        self._workers = [_Worker(i, self._new_actor()) for i in range(self.settings.ray_actors)]
        try:
            ready = await asyncio.gather(*(w.handle.ready.remote() for w in self._workers))
        except ray.exceptions.RayError as e:
            await self.close()
            raise LowvoxError(f"the Ray actors could not load the {self.engine} engine: {e}") from e
        rates = {rate for rate, _ in ready}
        if len(rates) != 1:
            await self.close()
            raise LowvoxError(f"the Ray actors disagree on the sample rate: {sorted(rates)}")
        self.sample_rate = rates.pop()
        for worker, (_, capacity) in zip(self._workers, ready, strict=True):
            worker.capacity = capacity
        self.concurrency = sum(w.capacity for w in self._workers)
        logger.info(
            "ray executor: %d %s actor(s)%s, %d takes at once",
            len(self._workers), self.engine, " on GPUs" if gpu else "", self.concurrency,
        )  # fmt: skip

    def _init_ray(self, ray: Any) -> None:
        address = self.settings.ray_address
        try:
            if address is None:  # a cluster of this machine alone, for this process
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = "a local Ray" if address is None else f"the Ray cluster at {address!r}"
            raise LowvoxError(f"cannot start or reach {where}: {e}") from e
        self._owns_ray = True

    def _wants_gpu(self, ray: Any) -> bool:
        """One GPU per actor when the device asks for CUDA (or is "auto" on a cluster with
        GPUs), else one CPU. The cluster must have that for every actor now: an actor
        that does not fit would wait for ever (an autoscaler is not waited for)."""
        device = str(self.settings.device)
        have = ray.cluster_resources()
        gpus, cpus = int(have.get("GPU", 0)), int(have.get("CPU", 0))
        actors = self.settings.ray_actors
        gpu = not (device == "cpu" or (device == "auto" and gpus == 0))
        if gpu and gpus < actors:
            raise LowvoxError(
                f"ray_actors = {actors} asks for {actors} GPU(s) (device {device!r}) but the "
                f'Ray cluster has {gpus}; lower ray_actors or set device = "cpu"'
            )
        if cpus < actors:
            raise LowvoxError(
                f"ray_actors = {actors} needs a CPU per actor but the Ray cluster has {cpus}"
            )
        return gpu

    def _new_actor(self) -> Any:
        return self._actor_class.options(**self._options).remote(*self._actor_args)

    async def close(self) -> None:
        ray, workers = self._ray, self._workers
        self._workers = []
        if ray is None:
            return
        for worker in workers:
            try:
                ray.kill(worker.handle)
            except Exception as e:  # already gone: nothing to give back
                logger.debug("killing actor %d: %s", worker.index, e)
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)
            self._owns_ray = False

    # -- speaking --------------------------------------------------------------------------

    def _lost_errors(self) -> tuple[type[BaseException], ...]:
        """Errors that mean the actor (or its node) went away, not that the take failed."""
        e = self._ray.exceptions
        return (e.RayActorError, e.ObjectLostError, e.NodeDiedError, e.WorkerCrashedError)

    def _pick(self) -> _Worker:
        if not self._workers:
            raise RuntimeError("the ray executor is not started (or closed)")
        # The actor with the most room in its batch.
        return min(self._workers, key=lambda w: (w.busy / w.capacity, w.index))

    def _replace(self, worker: _Worker, lost: Any, why: BaseException) -> None:
        """A new actor in `worker`'s slot, once however many takes saw `lost` go (no await
        in here: the check and the swap happen together on the event loop)."""
        if worker.handle is not lost or not any(w is worker for w in self._workers):
            return
        logger.warning("ray actor %d lost (%s); starting another", worker.index, why)
        try:
            self._ray.kill(lost)  # an unreachable one may still hold its GPU
        except Exception as e:
            logger.debug("killing lost actor %d: %s", worker.index, e)
        worker.handle = self._new_actor()
        worker.replaced += 1

    async def _call(self, method: str, *args: Any, cancel: threading.Event | None = None) -> Any:
        """`method` on the least busy actor; sent again (up to `max_lost` times) when the
        actor is lost meanwhile, then `LowvoxError`. `cancel` set before or during stops
        it, there too, with `Cancelled`."""
        lost_errors = self._lost_errors()
        for attempt in range(self.max_lost + 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            worker = self._pick()
            handle = worker.handle
            worker.busy += 1
            ref = getattr(handle, method).remote(*args)
            try:
                return await _result(ref, cancel)
            except lost_errors as e:
                self._replace(worker, handle, e)
                if attempt == self.max_lost:
                    raise LowvoxError(
                        f"lost the Ray worker {attempt + 1} times while speaking this; "
                        f"last: {type(e).__name__}"
                    ) from e
            except (asyncio.CancelledError, Cancelled):
                with contextlib.suppress(Exception):  # stop it there too, if it is still there
                    self._ray.cancel(ref)
                raise
            finally:
                worker.busy -= 1
        raise AssertionError("unreachable")

    async def speak(self, take: Take, cancel: threading.Event | None = None) -> np.ndarray:
        result = await self._call("speak", take, cancel=cancel)
        if isinstance(result, _Failure):
            raise result.error()
        # Ray may hand back a read-only view of its object store.
        return np.array(result, dtype=np.float32, copy=True)

    async def validate(self, request: SynthesisRequest) -> SynthesisRequest:
        plain = SynthesisRequest(
            text=request.text,
            voice=request.voice,
            language=request.language,
            speed=request.speed,
            options=dict(request.options),
        )
        result = await self._call("validate", plain)
        if isinstance(result, _Failure):
            raise result.error()
        return result

    async def cancel(self, job: str) -> None:
        if not self._workers:
            return
        calls = [w.handle.cancel.remote(job) for w in self._workers]
        await asyncio.gather(*calls, return_exceptions=True)  # a lost actor holds nothing

    @property
    def replacements(self) -> int:
        """Actors started again after a loss, since `start`."""
        return sum(w.replaced for w in self._workers)


async def _result(ref: Any, cancel: threading.Event | None) -> Any:
    """What `ref` (an awaitable Ray object ref) holds; `Cancelled` as soon as `cancel` is
    set (a `threading.Event`, so it is looked at every `CANCEL_POLL_S`)."""
    if cancel is None:
        return await ref
    future = asyncio.ensure_future(ref)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=CANCEL_POLL_S)
            if done:
                return future.result()
            if cancel.is_set():
                raise Cancelled("generation cancelled")
    finally:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # looked at: asyncio does not warn that nobody did
