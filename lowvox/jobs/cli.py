"""`lowvox book` and `lowvox jobs`: long-form jobs from the command line.

`lowvox book INPUT -o OUTPUT.m4b` stores a job in the data folder's job store, speaks it
with a progress bar, and writes OUTPUT with OUTPUT's `.srt` and `.vtt` beside it.
Rerunning the same command (same input, output and options) after a crash or Ctrl-C
continues the job where it stopped. `lowvox jobs` lists, shows, retakes and cancels jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.files import check_writable
from lowvox.settings import Settings


def add_parsers(sub: Any, add_common: Any, add_engine_flags: Any) -> None:
    book = sub.add_parser(
        "book",
        help="speak a long text, Markdown or EPUB file into a book (resumable)",
        description="Speak INPUT (.txt, .md, .epub) into OUTPUT (.m4b, .mp3, .opus, .flac, "
        ".wav), with .srt and .vtt subtitles beside it. Rerun the same command to resume.",
    )
    add_common(book)
    add_engine_flags(book)
    book.add_argument("input", help="the text, Markdown or EPUB file")
    book.add_argument("-o", "--output", required=True, help="the book file; format from it")
    book.add_argument("--voice", help="voice name")
    book.add_argument("--language", help="language code, or 'auto' (default: settings)")
    book.add_argument("--speed", type=float, default=1.0, help="0.25 to 4.0 (default 1.0)")
    book.add_argument("--chapters", help="which chapters, 1-based: 2-5,7 (default all)")
    book.add_argument("--title", help="the book's title (default: from the input)")
    book.add_argument("--seed", type=int, default=0, help="the job's seed (default 0)")
    book.add_argument("--retakes", type=int, help="retakes of a flagged sentence (default 2)")
    book.add_argument("--temperature", type=float, help="XTTS sampling temperature")
    book.add_argument("--max-new-tokens", type=int, help="XTTS: audio tokens per sentence, at most")
    book.add_argument(
        "--narrator-voice", help='narrator mode: *narration* in this voice, "speech" in --voice'
    )
    book.add_argument("--no-normalize", action="store_true", help="skip loudness normalisation")
    book.add_argument("--lufs", type=float, default=-18.0, help="loudness target (default -18)")
    book.add_argument("--executor", choices=["local", "ray"], help="where sentences are spoken")
    book.add_argument("--ray-address", help="Ray cluster address (ray executor)")
    book.add_argument(
        "--asr-model",
        help="check every take with this faster-whisper model (e.g. tiny; lowvox[asr])",
    )
    book.add_argument("--no-progress", action="store_true", help="no progress bar")

    jobs = sub.add_parser("jobs", help="list, show, retake or cancel long-form jobs")
    add_common(jobs)
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    jl = jsub.add_parser("list", help="every job in the data folder")
    add_common(jl)
    js = jsub.add_parser("show", help="one job: progress, chapters, flagged sentences")
    add_common(js)
    js.add_argument("job", help="job id (or a unique prefix)")
    js.add_argument("--all", action="store_true", help="list every sentence")
    jr = jsub.add_parser("retake", help="speak one sentence again (new seed), then re-bake")
    add_common(jr)
    add_engine_flags(jr)
    jr.add_argument("job", help="job id (or a unique prefix)")
    jr.add_argument("sentence", type=int, help="sentence number (as `jobs show` lists it)")
    jr.add_argument("--text", help="new text for the sentence")
    jr.add_argument("--voice", help="new voice for the sentence")
    jc = jsub.add_parser("cancel", help="stop a job for good")
    add_common(jc)
    jc.add_argument("job", help="job id (or a unique prefix)")


def _store(settings: Settings) -> Any:
    from lowvox.jobs.store import JobStore

    return JobStore(settings.jobs_path)


def _find(store: Any, prefix: str) -> Any:
    matches = [j for j in store.jobs() if j.id.startswith(prefix.strip().lower())]
    if not prefix.strip() or not matches:
        raise LowvoxError(f"no job matches {prefix!r} (see `lowvox jobs list`)")
    if len(matches) > 1:
        raise LowvoxError(f"{prefix!r} matches {len(matches)} jobs; give more of the id")
    return matches[0]


class ProgressBar:
    """One line on stderr: sentences, audio time, ETA and real-time factor."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, event: Any) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and event.done < event.total):
            return
        self._last = now
        width = 30
        filled = int(width * event.done / max(1, event.total))
        eta = _clock(event.eta) if event.eta is not None else "--:--"
        rtf = f"{event.rtf:.2f}" if event.rtf is not None else "-"
        line = (
            f"\r[{'#' * filled}{'.' * (width - filled)}] {event.done}/{event.total} sentences"
            f"  {_clock(event.audio_seconds)} audio  ETA {eta}  RTF {rtf}"
        )
        if event.flagged:
            line += f"  {event.flagged} flagged"
        sys.stderr.write(line + "\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


# `book`'s flags by the names of the job options they give, for its error messages.
_FLAGS = {
    "voice": "--voice",
    "language": "--language",
    "speed": "--speed",
    "chapters": "--chapters",
    "title": "--title",
    "seed": "--seed",
    "retakes": "--retakes",
    "temperature": "--temperature",
    "max_new_tokens": "--max-new-tokens",
    "narrator_voice": "--narrator-voice",
    "character_voice": "--voice",
    "lufs": "--lufs",
}


def _job_settings(args: argparse.Namespace, settings: Settings, fmt: str) -> Any:
    """The job's settings from `book`'s flags, checked as the HTTP jobs route checks its
    fields (`lowvox.jobs.options`): before any job is created."""
    from dataclasses import replace

    from lowvox.jobs.options import job_settings, parse_job_options

    given = {
        "voice": args.voice,
        "language": args.language,
        "speed": args.speed,
        "chapters": args.chapters,
        "title": args.title,
        "seed": args.seed,
        "retakes": args.retakes,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "narrator_voice": args.narrator_voice,
        # In narrator mode "speech" is spoken in --voice (None: the settings' voice).
        "character_voice": args.voice if args.narrator_voice else None,
    }
    fields = {k: v for k, v in given.items() if v is not None}
    opts = parse_job_options({**fields, "lufs": args.lufs}, names=_FLAGS)
    if args.no_normalize:  # --lufs is checked all the same: a bad value is a mistake
        opts = opts.model_copy(update={"lufs": None})
    job = job_settings(
        opts,
        engine=settings.engine,
        default_voice=settings.voice,
        default_language=settings.language,
        default_retakes=settings.job_retakes,
    )
    # The format comes from the output's name, and the assembler writes .m4a books too.
    return replace(job, format=fmt)


def cmd_book(args: argparse.Namespace, settings: Settings) -> int:
    from lowvox.audio.formats import format_from_path

    source = Path(args.input)
    output = Path(args.output).expanduser().resolve()
    fmt = "m4b" if output.suffix.lower() == ".m4b" else format_from_path(output)
    if fmt not in ("m4b", "m4a", "mp3", "opus", "flac", "wav"):
        raise InvalidRequest(f"a book can be m4b, m4a, mp3, opus, flac or wav, not {fmt}")
    job_settings = _job_settings(args, settings, fmt)
    check_writable(output)  # known now, not when the book is assembled
    data = read_input(source, settings.max_job_bytes)
    return asyncio.run(
        _book(settings, source, data, output, job_settings, args.title, not args.no_progress)
    )


def read_input(source: Path, limit: int) -> bytes:
    """The input file's bytes, refused when over `limit` (the server's `max_job_bytes`).

    No more than `limit + 1` bytes are read, whatever `source` is: a device such as
    /dev/zero, a pipe or a file that grows would otherwise be read into memory without
    end (4.7 GB in 4 s). A regular file's size is checked before any byte is read."""
    try:
        with open(source, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_size > limit:
                raise InvalidRequest(
                    f"{source} is {st.st_size:,} bytes, over the job limit of {limit:,}",
                    field="file",
                )
            data = f.read(limit + 1)
    except OSError as e:
        raise LowvoxError(f"cannot read {source}: {e.strerror or e}") from e
    if len(data) > limit:
        raise InvalidRequest(f"{source} is over the job limit of {limit:,} bytes", field="file")
    return data


async def _book(
    settings: Settings,
    source: Path,
    data: bytes,
    output: Path,
    job_settings: Any,
    title: str | None,
    progress: bool,
) -> int:
    from lowvox.jobs.executors import open_executor
    from lowvox.jobs.plan import create_job
    from lowvox.jobs.runner import JobRunner, recognizer_for, subtitle_paths
    from lowvox.server.engines import EngineHub
    from lowvox.server.outputs import STALE_PARTIAL_S

    recognizer = recognizer_for(settings)
    store = _store(settings)
    store.sweep_orphans(STALE_PARTIAL_S)
    hub = EngineHub(settings)
    executor = open_executor(settings, hub, job_settings.engine)
    bar = ProgressBar(progress)
    try:
        await executor.start()
        sha = hashlib.sha256(data).hexdigest()
        job = store.find_cli_job(str(output), sha, job_settings)
        if job is None:
            job = await create_job(
                store,
                executor,
                data=data,
                filename=source.name,
                settings=job_settings,
                max_chars=settings.max_job_chars,
                max_unpacked_bytes=settings.max_job_bytes * 4,
                title=title,
                origin="cli",
                output=str(output),
            )
            print(f"job {job.id}: {job.title}", file=sys.stderr)
        else:
            print(f"resuming job {job.id}: {job.title}", file=sys.stderr)
        runner = JobRunner(store, executor, on_progress=bar, recognizer=recognizer)
        job = await runner.run(job.id, book_path=output)
    finally:
        bar.close()
        await executor.close()
        await hub.close()
        store.close()
    if job.state == "cancelled":
        raise LowvoxError(f"job {job.id} was cancelled")
    if job.state != "done":
        why = job.error or "stopped"
        hint = "" if "resume" in why else "; rerun to resume"
        raise LowvoxError(f"job {job.id} is {job.state}: {why}{hint}")
    srt, vtt = subtitle_paths(output)
    print(f"wrote {output} (+ {srt.name}, {vtt.name})", file=sys.stderr)
    return 0


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    try:
        if args.jobs_command == "list":
            for job in store.jobs():
                p = store.progress(job.id, job.sample_rate)
                print(
                    f"{job.id[:12]}  {job.state:9s}  {p.done}/{p.total}  {job.origin:6s}"
                    f"  {job.title}"
                )
            return 0
        job = _find(store, args.job)
        if args.jobs_command == "show":
            _show(store, job, args.all)
            return 0
        if args.jobs_command == "cancel":
            if job.state in ("done", "cancelled"):
                raise LowvoxError(f"job {job.id} is already {job.state}")
            store.set_state(job.id, "cancelled")
            print(f"cancelled {job.id}")
            return 0
        if args.jobs_command == "retake":
            return asyncio.run(_retake(settings, store, job, args))
    finally:
        store.close()
    return 2


def _show(store: Any, job: Any, every: bool) -> None:
    from lowvox.jobs.store import by_chapter

    p = store.progress(job.id, job.sample_rate)
    print(f"job       {job.id}")
    print(f"title     {job.title}" + (f" — {job.author}" if job.author else ""))
    print(f"state     {job.state}" + (f" ({job.error})" if job.error else ""))
    print(f"progress  {p.done}/{p.total} sentences, {_clock(p.audio_seconds)} of audio")
    print(f"settings  {job.settings.engine}, voice {job.settings.voice or 'default'}, "
          f"{job.settings.language}, {job.settings.format}")  # fmt: skip
    if job.output:
        print(f"output    {job.output}")
    chapters = store.chapters(job.id)
    sentences = store.sentences(job.id)
    grouped = by_chapter(sentences)
    print("chapters")
    for i, title in enumerate(chapters):
        mine = grouped.get(i)
        if mine:
            done = sum(s.state == "done" for s in mine)
            print(f"  {i + 1:3d}  {done}/{len(mine)}  {title}")
    flagged = [s for s in sentences if s.flags or s.state == "failed"]
    for s in sentences if every else flagged:
        mark = ",".join(s.flags) or s.error or ""
        print(f"  #{s.idx:<5d} {s.state:7s} {mark:20s} {s.text[:70]}")


async def _retake(settings: Settings, store: Any, job: Any, args: argparse.Namespace) -> int:
    from lowvox.jobs.executors import open_executor
    from lowvox.jobs.options import parse_sentence_edit
    from lowvox.jobs.plan import check_retake
    from lowvox.jobs.runner import JobRunner
    from lowvox.server.engines import EngineHub

    # As the retake route checks its body (at most 2,000 characters of text).
    edit = parse_sentence_edit(
        {"text": args.text, "voice": args.voice}, names={"text": "--text", "voice": "--voice"}
    )
    text = edit.text.strip() if edit.text is not None else None
    if text is not None and not text:
        raise InvalidRequest("the new text is empty")
    if job.state == "cancelled":
        raise LowvoxError(f"job {job.id} was cancelled")
    store.sentence(job.id, args.sentence)  # a clear error for a wrong number
    hub = EngineHub(settings)
    executor = open_executor(settings, hub, job.settings.engine)
    try:
        await executor.start()
        await check_retake(executor, job, text=text, voice=args.voice)
        store.retake(job.id, args.sentence, text=text, voice=args.voice)
        runner = JobRunner(store, executor)
        book = Path(job.output) if job.output else None
        job = await runner.run(job.id, book_path=book)
    finally:
        await executor.close()
        await hub.close()
    if job.state != "done":
        raise LowvoxError(f"job {job.id} is {job.state}: {job.error or 'stopped'}")
    print(f"sentence {args.sentence} retaken; book re-assembled", file=sys.stderr)
    return 0
