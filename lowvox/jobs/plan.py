"""From an input file and the job's settings to a stored job: read, check, plan, store.

Everything that can be wrong with a job is found here, before it is stored: an unreadable
or encrypted file, a text over the job limit, nothing to speak, an unknown voice (the job's,
the narrator's or one named in a `[voice:...]` tag), an unknown language. The CLI and the
server both create jobs through `create_job`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from lowvox.engines.base import SynthesisRequest, check_voice_name
from lowvox.errors import InvalidRequest
from lowvox.jobs.executors import Executor
from lowvox.jobs.model import BookMeta, Document, Line
from lowvox.jobs.readers import read_document
from lowvox.jobs.script import Narrator, count_chars, plan_lines
from lowvox.jobs.store import JobInfo, JobSettings, JobStore

# How much of the text "auto" language detection reads.
_DETECT_CHARS = 4000
# The highest chapter number `chapters` may name: a range is held as a set of numbers, so
# "1-999999999" must not become a billion of them.
MAX_CHAPTER = 100_000
# Comma-separated parts of a `chapters` spec ("2-5,7" has two).
MAX_CHAPTER_PARTS = 1_000


def parse_chapters(spec: str | None, count: int | None = None) -> tuple[int, ...] | None:
    """`"2-5,7"` (1-based, as people count chapters) to 0-based indices; None: all."""
    if spec is None or not str(spec).strip():
        return None
    parts = str(spec).split(",")
    if len(parts) > MAX_CHAPTER_PARTS:
        raise InvalidRequest(
            f"chapters lists {len(parts):,} parts; at most {MAX_CHAPTER_PARTS:,} (use ranges: 2-5)",
            field="chapters",
        )
    ranges: list[tuple[int, int]] = []
    for part in parts:
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
            else:
                lo = hi = int(part)
        except ValueError:
            raise InvalidRequest(
                f"chapters must look like 2-5,7 (got {str(spec)[:80]!r})", field="chapters"
            ) from None
        if lo < 1 or hi < lo:
            raise InvalidRequest(f"bad chapter range {part!r}", field="chapters")
        if hi > MAX_CHAPTER:
            raise InvalidRequest(
                f"chapter numbers go up to {MAX_CHAPTER:,} (got {part!r})", field="chapters"
            )
        ranges.append((lo - 1, hi))
    # Each chapter is added once, however the ranges overlap: "1-100000" a thousand times
    # costs what it costs once (it was 10^8 set insertions on the server's event loop).
    chosen: set[int] = set()
    done = 0
    for lo, hi in sorted(ranges):
        if hi > done:
            chosen.update(range(max(lo, done), hi))
            done = hi
    if count is not None and not any(i < count for i in chosen):
        raise InvalidRequest(
            f"chapters {str(spec)[:80]!r} select nothing: the book has {count} chapters",
            field="chapters",
        )
    return tuple(sorted(chosen))


def _sample_text(doc: Document) -> str:
    text = " ".join(p for ch in doc.chapters for p in ch.paragraphs[:20])
    return text[:_DETECT_CHARS]


async def create_job(
    store: JobStore,
    executor: Executor,
    *,
    data: bytes,
    filename: str,
    settings: JobSettings,
    max_chars: int,
    max_unpacked_bytes: int,
    title: str | None = None,
    origin: str = "server",
    output: str | None = None,
    max_jobs: int = 0,
) -> JobInfo:
    """Read, check and plan a job, then store it (state `queued`). Raises a 4xx
    `LowvoxError` naming the problem; nothing is stored when anything is wrong.
    `max_jobs`: as for `JobStore.create`."""
    doc = await asyncio.to_thread(
        read_document, data, filename, max_unpacked_bytes=max_unpacked_bytes
    )
    chars = count_chars(doc)
    if chars > max_chars:
        raise InvalidRequest(
            f"the text is {chars:,} characters, over the job limit of {max_chars:,}",
            field="file",
        )
    # The language: as asked, or (auto) as the engine detects it from the text. The
    # job's speed and options go with it: a value the engine refuses (XTTS's
    # max_new_tokens over the model's limit) is refused here, not by every sentence.
    probe = await executor.validate(
        SynthesisRequest(
            text=_sample_text(doc) or doc.title,
            voice=settings.voice,
            language=settings.language or doc.language or "en",
            speed=settings.speed,
            options=settings.options,
        )
    )
    language = probe.language or "en"
    narrator = (
        Narrator(
            narrator_voice=settings.narrator.narrator_voice,
            character_voice=settings.narrator.character_voice,
            text_not_inside=settings.narrator.text_not_inside,
        )
        if settings.narrator is not None
        else None
    )
    lines: list[Line] = await asyncio.to_thread(
        plan_lines, doc, language=language, narrator=narrator
    )
    if settings.chapters is not None:
        wanted = set(settings.chapters)
        if not any(i in wanted for i in range(len(doc.chapters))):
            raise InvalidRequest(
                f"the chapters asked for are not in the book (it has {len(doc.chapters)})",
                field="chapters",
            )
        lines = [ln for ln in lines if ln.chapter in wanted]
    if not lines:
        raise InvalidRequest("the input has nothing to speak", field="file")
    # Every voice the job names must exist before anything is stored.
    voices = {ln.voice for ln in lines} | {settings.voice}
    if settings.narrator is not None:
        voices |= {settings.narrator.narrator_voice, settings.narrator.character_voice}
    for voice in sorted(voices, key=lambda v: v or ""):
        # A job names voices (a `[voice:…]` tag too), never files: a path is refused here,
        # whatever the engine would make of it.
        check_voice_name(voice)
        await executor.validate(SynthesisRequest(text="Hello.", voice=voice, language=language))
    meta = BookMeta(
        title=(title or doc.title or Path(filename).stem)[:300],
        author=doc.author,
        language=language,
        cover=doc.cover,
        cover_type=doc.cover_type,
        chapter_titles=tuple(ch.title for ch in doc.chapters),
    )
    return await asyncio.to_thread(
        store.create,
        input_name=filename,
        data=data,
        meta=meta,
        settings=settings,
        lines=lines,
        origin=origin,
        output=output,
        max_jobs=max_jobs,
    )


async def check_retake(
    executor: Executor, job: JobInfo, *, text: str | None, voice: str | None
) -> None:
    """Refuse, before the sentence's row changes, a retake with an unknown voice or a text
    the engine would not take: stored, it would fail the finished job and keep the bad
    voice or text."""
    check_voice_name(voice)
    if voice or text is not None:
        await executor.validate(
            SynthesisRequest(
                text=text or "Hello.", voice=voice or job.settings.voice, language=job.language
            )
        )
