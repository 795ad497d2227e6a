"""Running a job: speak its pending sentences, check and retake them, then assemble.

The runner holds the job's lease while it works. Sentences go to the executor in book
order, several at a time (they share the engine's batch at bulk priority). Each finished
sentence is checked (`quality.check_take`); a flagged one is taken again with the next
seed, up to `settings.retakes` times, and the best take is kept. Its audio is written
(FLAC, atomically) before its row says `done`, so a kill at any moment loses at most the
sentences in flight, and a resumed job makes them again with the same seeds: the finished
book is the same as an uninterrupted run's.

When every sentence is done the outputs are assembled from the sentence files: the book,
its SRT and WebVTT subtitles (and, on request, one chapter). Re-assembling after a retake
or an edit regenerates nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowvox.errors import Cancelled, InvalidRequest, LowvoxError
from lowvox.files import PART_SUFFIX, sweep_partials, why_not_written, write_atomic
from lowvox.jobs import assemble as assembly
from lowvox.jobs.executors import Executor, Take
from lowvox.jobs.model import BookMeta
from lowvox.jobs.quality import QualityLimits, Recognizer, Verdict, check_take
from lowvox.jobs.store import (
    LEASE_S,
    JobConflict,
    JobInfo,
    JobState,
    JobStore,
    Sentence,
    sentence_seed,
)

logger = logging.getLogger(__name__)

# FLAC keeps a sentence's audio exactly (24-bit) at a third of the size of float WAV.
SENTENCE_SUBTYPE = "PCM_24"


@dataclass(frozen=True)
class ProgressEvent:
    """What a job's listeners (SSE, the CLI's progress bar) hear after each sentence."""

    job: str
    state: str
    total: int
    done: int
    failed: int
    flagged: int
    audio_seconds: float
    elapsed: float  # wall seconds of this run
    rtf: float | None  # wall seconds per audio second, this run
    eta: float | None  # seconds until the last sentence, at this run's pace
    sentence: int | None = None  # the sentence that just finished
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JobEvents:
    """In-process publish/subscribe of progress events, per job (event loop only)."""

    def __init__(self) -> None:
        self._subs: dict[str, set[asyncio.Queue[ProgressEvent]]] = {}

    def subscribe(self, job: str) -> asyncio.Queue[ProgressEvent]:
        queue: asyncio.Queue[ProgressEvent] = asyncio.Queue(maxsize=256)
        self._subs.setdefault(job, set()).add(queue)
        return queue

    def unsubscribe(self, job: str, queue: asyncio.Queue[ProgressEvent]) -> None:
        subs = self._subs.get(job)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                del self._subs[job]

    def publish(self, event: ProgressEvent) -> None:
        for queue in list(self._subs.get(event.job, ())):
            if queue.full():  # a listener that does not read loses the oldest news
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)


def progress_event(
    store: JobStore,
    job_id: str,
    sample_rate: int | None,
    *,
    elapsed: float = 0.0,
    spoken: int = 0,
    spoken_audio: float = 0.0,
    sentence: int | None = None,
    error: str | None = None,
) -> ProgressEvent:
    """Where a job stands; ETA and RTF from this run's pace (`spoken` sentences making
    `spoken_audio` seconds in `elapsed` seconds)."""
    job = store.get(job_id)
    progress = store.progress(job_id, sample_rate or job.sample_rate)
    return ProgressEvent(
        job=job_id,
        state=job.state,
        total=progress.total,
        done=progress.done,
        failed=progress.failed,
        flagged=progress.flagged,
        audio_seconds=progress.audio_seconds,
        elapsed=elapsed,
        rtf=elapsed / spoken_audio if spoken_audio else None,
        eta=elapsed / spoken * progress.pending if spoken else None,
        sentence=sentence,
        error=error if error is not None else job.error,
    )


def recognizer_for(settings: Any) -> Recognizer | None:
    """The speech recognition check `settings.job_asr_model` asks for, if any."""
    if not settings.job_asr_model:
        return None
    from lowvox.jobs.quality import WhisperRecognizer

    return WhisperRecognizer(settings.job_asr_model)


def take_seed(job_seed: int, index: int, attempt: int, take: int) -> int:
    """Take `take` (0: the first, then the quality retakes) of the sentence's `attempt`
    (0, then one per retake the user asks for)."""
    return sentence_seed(job_seed, index, attempt * 1000 + take)


def write_sentence_audio(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """Encoded in memory, then written: libsndfile reports a full disk as its own "System
    error.", where a plain write raises the OSError that says what is wrong."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="FLAC", subtype=SENTENCE_SUBTYPE)
    write_atomic(path, buf.getvalue())


@dataclass
class _Run:
    job: JobInfo
    started: float = field(default_factory=time.monotonic)
    audio_s: float = 0.0
    spoken: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: threading.Event = field(default_factory=threading.Event)  # for the executor
    stop_reason: JobState | None = None


class JobRunner:
    """Runs jobs of one store through one executor (one job at a time per call of `run`)."""

    def __init__(
        self,
        store: JobStore,
        executor: Executor,
        *,
        events: JobEvents | None = None,
        limits: QualityLimits | None = None,
        recognizer: Recognizer | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.events = events or JobEvents()
        self.limits = limits or QualityLimits()
        self.recognizer = recognizer
        self.on_progress = on_progress
        self._runs: dict[str, _Run] = {}
        self._early_stops: dict[str, JobState] = {}

    # -- control from outside (routes, CLI) -------------------------------------------

    def is_running(self, job_id: str) -> bool:
        return job_id in self._runs

    async def stop(self, job_id: str, reason: JobState) -> None:
        """Stop a running job after its sentences in flight are cancelled; `reason` is
        the state it is left in (paused or cancelled)."""
        run = self._runs.get(job_id)
        if run is None:  # asked before `run` got going: it stops as soon as it starts
            self._early_stops[job_id] = reason
            return
        run.stop_reason = reason
        run.stop.set()
        run.cancel.set()  # takes about to be submitted see this; those in flight, the next
        await self.executor.cancel(job_id)

    # -- running ----------------------------------------------------------------------

    async def run(
        self,
        job_id: str,
        *,
        book_path: Path | None = None,
        states: tuple[str, ...] = ("queued", "running", "paused", "failed", "done"),
    ) -> JobInfo:
        """Work on the job until it is done, failed, paused or cancelled; returns its row.
        `book_path`: where to write the book (default: the job's own `out/` folder).
        A job in none of `states` is left as it is (the server runs only queued ones: a
        job paused meanwhile stays paused)."""
        store = self.store
        if not await asyncio.to_thread(store.claim, job_id):
            raise JobConflict(f"job {job_id} is being worked on by another process")
        job = await asyncio.to_thread(store.get, job_id)
        run = _Run(job)
        self._runs[job_id] = run
        if job_id in self._early_stops:
            run.stop_reason = self._early_stops.pop(job_id)
            run.stop.set()
            run.cancel.set()
        renewer = asyncio.create_task(self._renew(run))
        try:
            await asyncio.to_thread(self._sweep, job, book_path or book_file(store, job))
            if job.state == "cancelled":
                return job
            # A finished job whose book or subtitles are gone is assembled again below.
            if (
                job.state == "done"
                and (book_path is None or all(p.exists() for p in _outputs(book_path)))
                and not await self._pending(job)
            ):
                return job
            try:
                job = await asyncio.to_thread(store.set_state, job_id, "running", expect=states)
            except JobConflict:
                return await asyncio.to_thread(store.get, job_id)
            await asyncio.to_thread(store.retry_failed, job_id)
            run.job = job
            self._publish(run)
            if job.sample_rate is None:
                await asyncio.to_thread(store.set_sample_rate, job_id, self.executor.sample_rate)
                job = run.job = await asyncio.to_thread(store.get, job_id)
            # Until nothing is pending: a retake asked for meanwhile, even while the book
            # was being assembled, joins this run.
            redone: set[int] = set()
            while True:
                while not run.stop.is_set() and (pending := await self._pending(run.job)):
                    await self._speak_pending(run, pending)
                if run.stop.is_set():
                    state: JobState = run.stop_reason or "paused"
                    job = await asyncio.to_thread(store.set_state, job_id, state)
                    self._publish(run)
                    return job
                progress = await asyncio.to_thread(store.progress, job_id)
                if progress.failed:
                    failed = await asyncio.to_thread(store.sentences, job_id, state="failed")
                    error = f"{progress.failed} sentence(s) failed; first: {failed[0].error}"
                    job = await asyncio.to_thread(store.set_state, job_id, "failed", error)
                    self._publish(run, error=error)
                    return job
                try:
                    await self.assemble(job_id, book_path=book_path)
                except JobConflict:  # a sentence became pending: speak it first
                    if await self._pending(run.job):
                        continue
                    raise
                except assembly.DamagedSentence as e:
                    # Its audio was lost or damaged after it was done: spoken again with
                    # its seed (with every other whose file is gone), once in a run.
                    if e.index in redone:
                        raise _StopJob(f"cannot assemble the book ({e}); resume once fixed") from e
                    again = {e.index, *await asyncio.to_thread(self._lost_audio, job_id)}
                    logger.warning(
                        "job %s: %s; speaking %d sentence(s) again", job_id, e, len(again)
                    )
                    redone |= again
                    await asyncio.to_thread(store.redo, job_id, sorted(again))
                    continue
                except (LowvoxError, OSError) as e:
                    # A full disk, an unwritable output: every sentence is kept, and
                    # resuming assembles again.
                    raise _StopJob(
                        f"cannot assemble the book ({why_not_written(e)}); resume once fixed"
                    ) from e
                if not await self._pending(run.job):
                    break
            try:
                # Only from running: a job paused or cancelled by another process while
                # its book was assembled stays as that process left it.
                job = await asyncio.to_thread(store.set_state, job_id, "done", expect=("running",))
            except JobConflict:
                job = await asyncio.to_thread(store.get, job_id)
            self._publish(run)
            return job
        except _StopJob as e:
            job = await asyncio.to_thread(store.set_state, job_id, "failed", str(e))
            self._publish(run, error=str(e))
            return job
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            self._runs.pop(job_id, None)
            await asyncio.to_thread(store.release, job_id)

    def _sweep(self, job: JobInfo, book: Path) -> None:
        """Remove what a killed holder of the job's lease was writing: only the holder
        writes sentence audio and the book (another process's sweep of the store spares
        fresh files), and a `lowvox book` output's folder is swept by no one else."""
        sweep_partials(self.store.folder(job.id) / "audio")
        names = [glob.escape(f".{p.name}.") + f"*{PART_SUFFIX}" for p in _outputs(book)]
        sweep_partials(book.parent, patterns=names, recursive=False)

    def _lost_audio(self, job_id: str) -> list[int]:
        done = self.store.sentences(job_id, state="done")
        return [s.idx for s in done if not self.store.audio_path(job_id, s.idx).is_file()]

    async def _pending(self, job: JobInfo) -> list[Sentence]:
        return await asyncio.to_thread(self.store.sentences, job.id, state="pending")

    async def _renew(self, run: _Run) -> None:
        job_id = run.job.id
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                await asyncio.to_thread(self.store.renew, job_id)
                job = await asyncio.to_thread(self.store.get, job_id)
            except Exception:  # a busy database: the next renewal will do
                logger.warning("renewing the lease of job %s failed", job_id, exc_info=True)
                continue
            await self._follow(run, job.state)

    async def _follow(self, run: _Run, state: str) -> None:
        """Stop when the store says the job was paused or cancelled by someone who does not
        hold it (`lowvox jobs cancel`, or the server's routes for a `lowvox book` job)."""
        if state in ("paused", "cancelled") and not run.stop.is_set():
            logger.info("job %s was %s from elsewhere; stopping", run.job.id, state)
            await self.stop(run.job.id, "paused" if state == "paused" else "cancelled")

    async def _speak_pending(self, run: _Run, pending: list[Sentence]) -> None:
        """These sentences, in order, `concurrency` at a time."""
        queue: asyncio.Queue[Sentence] = asyncio.Queue()
        for sentence in pending:
            queue.put_nowait(sentence)
        fatal: list[BaseException] = []

        async def worker() -> None:
            while not run.stop.is_set():
                try:
                    sentence = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    await self._speak_sentence(run, sentence)
                except Cancelled:
                    if not run.stop.is_set():
                        raise
                except BaseException as e:
                    fatal.append(e)
                    run.stop_reason = "failed"
                    run.stop.set()
                    run.cancel.set()
                    await self.executor.cancel(run.job.id)
                    return

        workers = [asyncio.create_task(worker()) for _ in range(max(1, self.executor.concurrency))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        if fatal:
            raise fatal[0]

    async def _speak_sentence(self, run: _Run, sentence: Sentence) -> None:
        job, settings = run.job, run.job.settings
        rate = self.executor.sample_rate
        best: tuple[float, int, np.ndarray, Verdict] | None = None  # score, seed, audio
        for take in range(max(0, settings.retakes) + 1):
            options = dict(settings.options)
            options["seed"] = take_seed(settings.seed, sentence.idx, sentence.attempt, take)
            try:
                audio = await self.executor.speak(
                    Take(
                        job=job.id,
                        index=sentence.idx,
                        text=sentence.text,
                        voice=sentence.voice or settings.voice,
                        language=job.language,
                        speed=settings.speed,
                        options=options,
                    ),
                    run.cancel,
                )
            except Cancelled:
                raise
            except LowvoxError as e:  # this sentence's own failure
                logger.warning("job %s sentence %d failed: %s", job.id, sentence.idx, e)
                await asyncio.to_thread(
                    self.store.fail_sentence,
                    job.id,
                    sentence.idx,
                    attempt=sentence.attempt,
                    error=str(e),
                )
                await self._follow(run, self._publish(run, sentence=sentence.idx).state)
                return
            verdict = await asyncio.to_thread(
                check_take,
                audio,
                rate,
                sentence.text,
                job.language,
                settings.speed,
                self.limits,
                recognizer=self.recognizer,
            )
            if best is None or verdict.score < best[0]:
                best = (verdict.score, options["seed"], audio, verdict)
            if not verdict.flags:
                break
            logger.info(
                "job %s sentence %d take %d flagged %s",
                job.id,
                sentence.idx,
                take,
                ",".join(verdict.flags),
            )
        assert best is not None
        _, seed, audio, verdict = best
        path = self.store.audio_path(job.id, sentence.idx)
        try:
            await asyncio.to_thread(write_sentence_audio, path, audio, rate)
        except OSError as e:
            # A full disk or a missing folder stops the job; resuming retries it.
            raise _StopJob(
                f"cannot write sentence audio ({why_not_written(e)}); resume once fixed"
            ) from e
        fresh = await asyncio.to_thread(
            self.store.finish_sentence,
            job.id,
            sentence.idx,
            attempt=sentence.attempt,
            samples=len(audio),
            flags=verdict.flags,
            score=verdict.score,
            seed=seed,
        )
        if fresh:
            run.spoken += 1
            run.audio_s += len(audio) / rate
        await self._follow(run, self._publish(run, sentence=sentence.idx).state)

    def _publish(
        self, run: _Run, sentence: int | None = None, error: str | None = None
    ) -> ProgressEvent:
        elapsed = time.monotonic() - run.started
        event = progress_event(
            self.store,
            run.job.id,
            self.executor.sample_rate,
            elapsed=elapsed,
            spoken=run.spoken,
            spoken_audio=run.audio_s,
            sentence=sentence,
            error=error,
        )
        self.events.publish(event)
        if self.on_progress is not None:
            self.on_progress(event)
        return event

    # -- assembly ---------------------------------------------------------------------

    def pieces(self, job: JobInfo, chapter: int | None = None) -> list[assembly.Piece]:
        sentences = self.store.sentences(job.id, chapter=chapter)
        missing = [s.idx for s in sentences if s.state != "done"]
        if missing:
            raise JobConflict(
                f"job {job.id} is not finished: {len(missing)} sentence(s) still to speak"
            )
        return [
            assembly.Piece(
                index=s.idx,
                chapter=s.chapter,
                paragraph=s.paragraph,
                text=s.text,
                path=self.store.audio_path(job.id, s.idx),
                samples=int(s.samples or 0),
                pause_before=s.pause_before,
                pause_after=s.pause_after,
            )
            for s in sentences
        ]

    def meta(self, job: JobInfo) -> BookMeta:
        cover_path = self.store.cover_path(job)
        cover = cover_path.read_bytes() if cover_path and cover_path.is_file() else None
        return BookMeta(
            title=job.title,
            author=job.author,
            language=job.language,
            cover=cover,
            cover_type=job.cover_type if cover else None,
            chapter_titles=tuple(self.store.chapters(job.id)),
        )

    async def assemble(self, job_id: str, *, book_path: Path | None = None) -> Path:
        """(Re)build the book and its subtitles from the sentence files; returns the book's
        path. Nothing is spoken again."""
        job = await asyncio.to_thread(self.store.get, job_id)
        path = book_path or book_file(self.store, job)
        await asyncio.to_thread(assemble_book, self, job, path)
        await asyncio.to_thread(self.store.mark_assembled, job_id)
        return path

    async def assemble_chapter(self, job_id: str, chapter: int) -> Path:
        job = await asyncio.to_thread(self.store.get, job_id)
        fmt = chapter_format(job.settings.format)
        path = self.store.out_folder(job_id) / f"chapter-{chapter + 1:03d}.{fmt}"
        pieces = await asyncio.to_thread(self.pieces, job, chapter)
        if not pieces:  # not in the book, or not among the chapters the job speaks
            raise InvalidRequest(
                f"job {job_id} has no chapter {chapter + 1} to assemble", field="chapter"
            )
        meta = self.meta(job)
        await asyncio.to_thread(
            functools.partial(assembly.assemble, chapter_track=True),
            pieces,
            path,
            fmt,
            meta=meta,
            pauses=job.settings.pauses,
            sample_rate=job.sample_rate or self.executor.sample_rate,
            target_lufs=job.settings.target_lufs,
        )
        return path


class _StopJob(LowvoxError):
    """Something outside the job stops it (a full disk); resuming retries."""


def book_file(store: JobStore, job: JobInfo) -> Path:
    return store.out_folder(job.id) / f"book.{job.settings.format}"


def subtitle_paths(book: Path) -> tuple[Path, Path]:
    return book.with_suffix(".srt"), book.with_suffix(".vtt")


def _outputs(book: Path) -> tuple[Path, Path, Path]:
    """The files assembling a book writes: the book and its subtitles."""
    return (book, *subtitle_paths(book))


def chapter_format(fmt: str) -> str:
    # A chapter alone needs no chapter marks: m4b becomes plain AAC in MP4.
    return "m4a" if fmt == "m4b" else fmt


def assemble_book(runner: JobRunner, job: JobInfo, path: Path) -> None:
    pieces = runner.pieces(job)
    timeline = assembly.assemble(
        pieces,
        path,
        job.settings.format,
        meta=runner.meta(job),
        pauses=job.settings.pauses,
        sample_rate=job.sample_rate or runner.executor.sample_rate,
        target_lufs=job.settings.target_lufs,
    )
    srt, vtt = subtitle_paths(path)
    assembly.write_srt(timeline.cues, srt)
    assembly.write_vtt(timeline.cues, vtt)
