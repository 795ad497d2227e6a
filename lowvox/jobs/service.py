"""The server's long-form jobs: created over HTTP, run one at a time, resumed at start-up.

`JobService` owns the job store and a queue of jobs to run. Its task (on the event loop)
runs the oldest waiting job through a `JobRunner`; the job's sentences go to the engine's
scheduler at bulk priority, so interactive requests keep their turn while a book renders.
At start-up, jobs the server was running when it stopped (or was killed) are queued again,
and so are finished ones with a retake still to speak; failed and paused jobs wait for a
resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

from lowvox.errors import LowvoxError
from lowvox.files import sweep_partials
from lowvox.jobs import store as store_module
from lowvox.jobs.executors import Executor, open_executor
from lowvox.jobs.plan import check_retake, create_job
from lowvox.jobs.runner import (
    JobEvents,
    JobRunner,
    book_file,
    chapter_format,
    progress_event,
    recognizer_for,
)
from lowvox.jobs.store import JobConflict, JobInfo, JobSettings, JobStore
from lowvox.server.outputs import STALE_PARTIAL_S

logger = logging.getLogger(__name__)


class JobService:
    """Jobs of one server: the store, the executors per engine, the queue and its runner."""

    def __init__(self, settings: Any, hub: Any, store: JobStore | None = None) -> None:
        self.settings = settings
        self.hub = hub
        self.store = store or JobStore(settings.jobs_path)
        self.events = JobEvents()
        self._executors: dict[str, Executor] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._runner: JobRunner | None = None
        self._current: str | None = None
        self._chapter_lock = asyncio.Lock()
        self._recognizer = recognizer_for(settings)  # checked now: a missing extra is loud

    # -- life -------------------------------------------------------------------------

    async def start(self) -> None:
        # Another server or a `lowvox book` may be writing into the store right now: only
        # what no live writer would leave this long is removed (a job's runner sweeps its
        # own sentence audio when it takes the job).
        swept = await asyncio.to_thread(sweep_partials, self.store.root, STALE_PARTIAL_S)
        if swept:
            logger.info("removed %d partial file(s) left in the job store", swept)
        orphans = await asyncio.to_thread(self.store.sweep_orphans, STALE_PARTIAL_S)
        if orphans:
            logger.info("removed %d job folder(s) without a job in the store", orphans)
        for job in await asyncio.to_thread(
            self.store.jobs, origin="server", states=("queued", "running", "done")
        ):
            # A done job with a sentence to speak: a retake whose job was not yet queued
            # again when the server stopped.
            if job.state == "done" and not await asyncio.to_thread(self._has_pending, job.id):
                continue
            logger.info("job %s (%s) will resume", job.id, job.title)
            self._queue.put_nowait(job.id)
        self._task = asyncio.create_task(self._loop(), name="lowvox-jobs")

    async def close(self) -> None:
        """Stop working; a running job stays `running` and resumes at the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for executor in self._executors.values():
            with contextlib.suppress(Exception):
                await executor.close()
        self.store.close()

    async def executor(self, engine: str | None) -> Executor:
        name = self.hub.resolve_name(engine)
        executor = self._executors.get(name)
        if executor is None:
            executor = open_executor(self.settings, self.hub, name)
            await executor.start()
            self._executors[name] = executor
        return executor

    async def _loop(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                job = await asyncio.to_thread(self.store.get, job_id)
            except LowvoxError:
                continue  # deleted meanwhile
            if job.state not in ("queued", "running") and not (
                job.state == "done" and await asyncio.to_thread(self._has_pending, job_id)
            ):
                continue
            try:
                executor = await self.executor(job.settings.engine)
                runner = JobRunner(
                    self.store, executor, events=self.events, recognizer=self._recognizer
                )
                self._runner, self._current = runner, job_id
                job = await runner.run(job_id, states=("queued", "running", "done"))
                logger.info("job %s is %s", job_id, job.state)
            except asyncio.CancelledError:
                raise
            except JobConflict as e:
                # Held by another process, or by a dead one whose lease has not lapsed yet
                # (a server killed and started again on another host, say): try again once
                # it may have; a job that is finished by then is skipped.
                logger.info("job %s skipped for now: %s", job_id, e)
                asyncio.get_running_loop().call_later(
                    store_module.LEASE_S, self._queue.put_nowait, job_id
                )
            except LowvoxError as e:
                logger.warning("job %s stopped: %s", job_id, e)
                await self._fail(job_id, str(e))
            except Exception:
                logger.exception("job %s failed", job_id)
                await self._fail(job_id, "internal error (see the log)")
            finally:
                self._runner, self._current = None, None

    async def _fail(self, job_id: str, error: str) -> None:
        """Record that a job failed. A store that cannot (a full disk fails its writes too)
        leaves the job as it was, resumed at the next start; the loop goes on."""
        try:
            await asyncio.to_thread(self.store.set_state, job_id, "failed", error)
        except (LowvoxError, sqlite3.Error) as e:
            logger.error("job %s: cannot record that it failed (%s)", job_id, e)

    def _has_pending(self, job_id: str) -> bool:
        return bool(self.store.sentences(job_id, state="pending"))

    # -- what the routes call -----------------------------------------------------------

    async def create(
        self, *, data: bytes, filename: str, settings: JobSettings, title: str | None
    ) -> JobInfo:
        executor = await self.executor(settings.engine)
        job = await create_job(
            self.store,
            executor,
            data=data,
            filename=filename,
            settings=settings,
            max_chars=self.settings.max_job_chars,
            max_unpacked_bytes=self.settings.max_job_bytes * 4,
            title=title,
            max_jobs=self.settings.max_jobs,
        )
        self._queue.put_nowait(job.id)
        return job

    async def get(self, job_id: str) -> JobInfo:
        return await asyncio.to_thread(self.store.get, job_id)

    async def pause(self, job_id: str) -> JobInfo:
        if self._current == job_id and self._runner is not None:
            await self._runner.stop(job_id, "paused")
            return await self._settled(job_id)
        job = await asyncio.to_thread(
            self.store.set_state, job_id, "paused", expect=("queued", "running")
        )
        await self._announce(job_id)
        return job

    async def resume(self, job_id: str) -> JobInfo:
        job = await asyncio.to_thread(
            self.store.set_state, job_id, "queued", expect=("paused", "failed", "queued")
        )
        self._queue.put_nowait(job_id)
        await self._announce(job_id)
        return job

    async def cancel(self, job_id: str) -> JobInfo:
        if self._current == job_id and self._runner is not None:
            await self._runner.stop(job_id, "cancelled")
            return await self._settled(job_id)
        job = await asyncio.to_thread(
            self.store.set_state,
            job_id,
            "cancelled",
            expect=("queued", "running", "paused", "failed"),
        )
        await self._announce(job_id)
        return job

    async def _announce(self, job_id: str) -> None:
        """Tell the job's listeners about a change no runner saw (a queued job paused)."""
        event = await asyncio.to_thread(progress_event, self.store, job_id, None)
        self.events.publish(event)

    async def delete(self, job_id: str) -> None:
        if self._current == job_id and self._runner is not None:
            await self._runner.stop(job_id, "cancelled")
            await self._settled(job_id)
        await asyncio.to_thread(self.store.delete, job_id)

    async def retake(
        self, job_id: str, index: int, *, text: str | None = None, voice: str | None = None
    ) -> JobInfo:
        """Speak one sentence again (new seed; new text or voice if given), then re-bake
        the book. Nothing else is spoken again."""
        job = await asyncio.to_thread(self.store.get, job_id)
        if job.state == "cancelled":
            raise JobConflict(f"job {job_id} was cancelled")
        await check_retake(await self.executor(job.settings.engine), job, text=text, voice=voice)
        await asyncio.to_thread(self.store.retake, job_id, index, text=text, voice=voice)
        if self._current != job_id and job.state in ("done", "failed"):
            await asyncio.to_thread(self.store.set_state, job_id, "queued")
        # Queued even when the job is running now: a run that is already past its last
        # check for pending sentences leaves this one to the next (which skips a job with
        # nothing left to speak).
        self._queue.put_nowait(job_id)
        return await asyncio.to_thread(self.store.get, job_id)

    async def _settled(self, job_id: str, timeout: float = 60.0) -> JobInfo:
        """Wait until the runner has let go of the job."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._current == job_id and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return await asyncio.to_thread(self.store.get, job_id)

    # -- files ----------------------------------------------------------------------------

    async def book(self, job_id: str) -> Path:
        job = await asyncio.to_thread(self.store.get, job_id)
        path = book_file(self.store, job)
        if job.assembled is None or not path.is_file():
            raise JobConflict(f"job {job_id} has no book yet (it is {job.state})")
        return path

    async def chapter(self, job_id: str, chapter: int) -> Path:
        """One chapter's own file, assembled on first request and kept until the book is
        assembled again."""
        job = await asyncio.to_thread(self.store.get, job_id)
        if job.assembled is None:
            raise JobConflict(f"job {job_id} has no book yet (it is {job.state})")
        fmt = chapter_format(job.settings.format)
        path = self.store.out_folder(job_id) / f"chapter-{chapter + 1:03d}.{fmt}"
        async with self._chapter_lock:
            if path.is_file() and path.stat().st_mtime >= job.assembled:
                return path
            executor = await self.executor(job.settings.engine)
            return await JobRunner(self.store, executor).assemble_chapter(job_id, chapter)
