"""One scheduler per engine: the thread that owns the engine, and continuous batching.

Requests never touch the engine directly. They submit a `Job` (one or more segments, e.g. a
narrator's turns) and read its chunks back on the event loop. The scheduler's worker thread
is the only thread that loads, uses or unloads the engine's model: between steps it runs
the calls handed to it (`call`/`run`: loading, voice preparation, runtime switches), and it
drives the engine's batch (`Engine.open_batch`) one step at a time. At every step finished
requests leave and waiting ones join (continuous batching): interactive jobs first, bulk
jobs (long-form work) only into slots interactive ones leave free, each within the batch's
own bound (rows and KV-cache memory). A job's segments run one after another, each
admitted within that bound.
One request's failure is delivered to that request alone.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lowvox.engines.base import AudioChunk, BatchEvent, Engine, EngineBatch, SynthesisRequest
from lowvox.errors import Cancelled, LowvoxError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ids = itertools.count(1)


class Priority(enum.IntEnum):
    """Interactive requests (a listener waits) go before bulk ones (long-form jobs)."""

    INTERACTIVE = 0
    BULK = 1


class QueueFull(LowvoxError):
    """The engine's queue is at its bound; the client should retry later."""

    status_code = 429

    def __init__(self, engine: str, retry_after: int) -> None:
        super().__init__(f"the {engine} engine is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


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
    priority: Priority = Priority.INTERACTIVE
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    tag: str = ""
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    segment: int = 0  # the segment being spoken
    began: float = 0.0  # when it joined the batch (monotonic)

    def _deliver(self, item: Any) -> None:
        # Called from the worker thread; the queue belongs to the event loop.
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _end(self, outcome: BaseException | _Done) -> None:
        self._deliver(outcome)
        self.finished.set()

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
    """Owns one engine on one worker thread; jobs wait in bounded priority queues."""

    def __init__(self, engine: Engine, max_queue: int = 32, name: str | None = None) -> None:
        self.engine = engine
        self.name = name or engine.name or type(engine).__name__
        self.max_queue = max_queue
        self._pending: dict[Priority, collections.deque[Job]] = {
            p: collections.deque() for p in Priority
        }
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            collections.deque()
        )
        self._running: dict[int, Job] = {}  # batch request id -> job
        # The job whose segment the worker is adding to the batch (a voice may be cloned
        # meanwhile): neither waiting nor running, yet it can be cancelled and keeps the
        # engine busy.
        self._joining: Job | None = None
        self._working = False  # the worker is doing something (not waiting for work)
        # When the worker last finished its work (monotonic): keep-alive counts from here.
        self.idle_since = time.monotonic()
        self._capacity = 1
        self._cond = threading.Condition()
        self._stopping = False
        self._last: Callable[[], object] | None = None  # run by the worker as it ends
        self._job_seconds = 2.0  # running mean of a job's time in the batch, for Retry-After
        self._thread = threading.Thread(target=self._work, name=f"lowvox-{self.name}", daemon=True)
        self._thread.start()

    # -- submitting ------------------------------------------------------------------

    def submit(
        self,
        segments: Sequence[SynthesisRequest],
        loop: asyncio.AbstractEventLoop | None = None,
        tag: str = "",
        priority: Priority = Priority.INTERACTIVE,
    ) -> Job:
        """Queue a job of validated segments; raises `QueueFull` (429, with a Retry-After
        estimate) when `max_queue` jobs are already waiting."""
        if not segments:
            raise LowvoxError("a job needs at least one segment")
        loop = loop or asyncio.get_running_loop()
        with self._cond:
            if self._stopping:
                raise LowvoxError(f"the {self.name} engine is shutting down")
            self._drop_cancelled()
            if self.queued >= self.max_queue:
                raise QueueFull(self.name, self.retry_after())
            job = Job(segments=list(segments), loop=loop, tag=tag, priority=priority)
            self._pending[priority].append(job)
            self._cond.notify()
        return job

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the worker thread, between batch steps: it owns the engine."""
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
        """Seconds until a job submitted now would likely start: the jobs ahead of it,
        leaving the batch at the rate its slots free up."""
        with self._cond:
            ahead = self.queued
            free = self._capacity - len(self._running)
            if ahead < free:
                return 1
            rate = max(1, self._capacity) / max(self._job_seconds, 0.1)  # jobs per second
            return max(1, math.ceil((ahead - free + 1) / rate))

    def cancel_all(self, priority: Priority | None = None) -> int:
        """Stop every running and waiting job (of `priority`, when given); returns how many
        were stopped."""
        with self._cond:
            jobs = [*self._in_hand(), *self._waiting()]
            jobs = [j for j in jobs if priority is None or j.priority is priority]
            for job in jobs:
                job.cancel.set()
            self._drop_cancelled()
            self._cond.notify()
        return len(jobs)

    def cancel(self, tag: str) -> int:
        """Stop the running or waiting jobs submitted with `tag`; returns how many. Waiting
        ones are released at once, running ones at the batch's next step."""
        with self._cond:
            jobs = [j for j in (*self._in_hand(), *self._waiting()) if j.tag == tag]
            for job in jobs:
                job.cancel.set()
            self._drop_cancelled()
            self._cond.notify()
        return len(jobs)

    @property
    def busy(self) -> bool:
        """Whether it has work: jobs waiting, joining or running, or calls to run."""
        with self._cond:
            return bool(self._working or self._running or self._calls or self.queued)

    @property
    def queued(self) -> int:
        with self._cond:
            return sum(1 for j in self._waiting() if not j.cancel.is_set())

    def stop(self, timeout: float = 10.0, last: Callable[[], object] | None = None) -> None:
        """Refuse new jobs and calls, end those in hand, and let the worker go. `last`
        (an engine's `unload`) runs on the worker once nothing else can: a job submitted
        after it would load the model again on a scheduler that is going away."""
        with self._cond:
            self._stopping = True
            if last is not None:
                self._last = last
            self._cond.notify()
        self.cancel_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "%s: the worker is still busy after %.0f s; left behind", self.name, timeout
            )

    # -- the worker ------------------------------------------------------------------

    def _waiting(self) -> list[Job]:
        return [j for p in Priority for j in self._pending[p]]

    def _in_hand(self) -> list[Job]:
        """Jobs the worker has taken: running, and the one joining the batch (lock held)."""
        joining = [self._joining] if self._joining is not None else []
        return [*self._running.values(), *joining]

    def _drop_cancelled(self) -> None:
        """Jobs cancelled while waiting leave the queue without running (lock held)."""
        for queue in self._pending.values():
            for job in [j for j in queue if j.cancel.is_set()]:
                queue.remove(job)
                job._end(Cancelled("generation cancelled"))

    def _work(self) -> None:
        batch: EngineBatch | None = None
        while True:
            with self._cond:
                while not (self._calls or self.queued or self._running or self._stopping):
                    if self._working:
                        self._working = False
                        self.idle_since = time.monotonic()
                    self._cond.wait()
                self._working = True
                self._drop_cancelled()
                calls = list(self._calls)
                self._calls.clear()
                if self._stopping and not (calls or self._running):
                    last, self._last = self._last, None
                    break
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to the awaiting caller
                        future.set_exception(e)
            if self._stopping:
                self._fail_running(batch, Cancelled("the engine is shutting down"))
                continue
            if batch is None:
                try:
                    batch = self.engine.open_batch()
                except BaseException as e:  # noqa: BLE001 -- reported to those waiting
                    logger.exception("%s: cannot open a batch", self.name)
                    self._fail_waiting(e)
                    continue
                self._capacity = batch.capacity
            self._admit(batch)
            if not self._running:
                continue
            try:
                events = batch.step()
            except BaseException as e:  # noqa: BLE001 -- the batch itself broke
                logger.exception("%s: batch step failed", self.name)
                self._fail_running(batch, e)
                batch = None
                continue
            for event in events:
                self._deliver(batch, event)
        del batch  # its rows' memory goes before the model's
        if last is not None:
            try:
                last()
            except Exception as e:  # stopping anyway; say why
                logger.warning("%s: %s", self.name, e)

    def _admit(self, batch: EngineBatch) -> None:
        """Waiting jobs into the batch while it has room: interactive first, bulk jobs only
        into slots that leave one free for the next interactive request. First come, first
        served within a class: a job that does not fit yet holds those behind it, so a big
        request is never starved by a stream of small ones."""
        while True:
            with self._cond:
                job = None
                for priority in Priority:
                    queue = self._pending[priority]
                    if not queue:
                        continue
                    room = batch.capacity - (1 if priority is Priority.BULK else 0)
                    head = queue[0]
                    if len(batch) < max(1, room) and batch.fits(head.segments[head.segment]):
                        job = self._joining = queue.popleft()
                    break
                if job is None:
                    return
            if not job.started.is_set():  # not a later segment that waited for room
                job.began = time.monotonic()
                job.started.set()
            self._start_segment(batch, job)

    def _start_segment(self, batch: EngineBatch, job: Job) -> None:
        """Add the job's current segment to the batch (the job is `_joining` meanwhile)."""
        job._deliver(SegmentStart(job.segment))
        try:
            rid = batch.add(
                job.segments[job.segment], job.cancel, bulk=job.priority is Priority.BULK
            )
        except LowvoxError as e:
            self._joined(None, job)
            job._end(e)
            return
        except Exception:  # noqa: BLE001 -- this job's own failure, details in the log
            logger.exception("job %d on %s failed to start", job.id, self.name)
            self._joined(None, job)
            job._end(LowvoxError("synthesis failed"))
            return
        self._joined(rid, job)

    def _joined(self, rid: int | None, job: Job) -> None:
        with self._cond:
            self._joining = None
            if rid is not None:
                self._running[rid] = job

    def _deliver(self, batch: EngineBatch, event: BatchEvent) -> None:
        job = self._running.get(event.request)
        if job is None:
            return
        if event.chunk is not None:
            if not job.cancel.is_set():
                job._deliver(event.chunk)
            return
        with self._cond:
            del self._running[event.request]
            more = event.error is None and not job.cancel.is_set()
            more = more and job.segment + 1 < len(job.segments)
            if more and not batch.fits(job.segments[job.segment + 1]):
                # Its next segment waits for room (rows, KV budget) as a new job would,
                # ahead of the jobs that came after it.
                job.segment += 1
                self._pending[job.priority].appendleft(job)
                return
            if more:
                self._joining = job  # never out of reach of a cancel between segments
        if event.error is not None:
            job._end(event.error)
        elif more:
            job.segment += 1
            self._start_segment(batch, job)
            return
        elif job.cancel.is_set():
            job._end(Cancelled("generation cancelled"))
        else:
            job._end(_DONE)
        seconds = time.monotonic() - job.began
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * seconds

    def _fail_running(self, batch: EngineBatch | None, error: BaseException) -> None:
        with self._cond:
            jobs = list(self._running.values())
            self._running.clear()
        if not isinstance(error, LowvoxError):
            error = LowvoxError("synthesis failed")
        for job in jobs:
            job._end(error)

    def _fail_waiting(self, error: BaseException) -> None:
        with self._cond:
            jobs = self._waiting()
            for queue in self._pending.values():
                queue.clear()
        if not isinstance(error, LowvoxError):
            error = LowvoxError(f"the {self.name} engine cannot start")
        for job in jobs:
            job._end(error)
