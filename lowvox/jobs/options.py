"""A job's options as a client gives them, checked once, before any job exists.

The HTTP jobs route (`POST /api/jobs`) and `lowvox book` both turn what they were given
into `JobOptions` through `parse_job_options`, and that into the stored `JobSettings`
through `job_settings`: one set of ranges for both, so a value the server refuses (a
speed of 0, a NaN loudness target, -1 retakes) is refused by the command too, before a
job is created, not sentence by sentence or at assembly after hours of speech.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lowvox.engines.base import check_voice_name
from lowvox.errors import InvalidRequest
from lowvox.jobs.model import Pauses
from lowvox.jobs.plan import parse_chapters
from lowvox.jobs.store import JobSettings, NarratorSettings

_Model = TypeVar("_Model", bound=BaseModel)


class JobOptions(BaseModel):
    """How to speak a job (JSON body, the form fields of an upload, or `book`'s flags)."""

    # NaN and infinity are refused as such, not as "should be at most 4".
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    text: str | None = Field(None, description="the text (JSON jobs); Markdown if markdown=true")
    markdown: bool = False
    title: str | None = Field(None, max_length=300)
    engine: str | None = None
    voice: str | None = None
    language: str | None = Field(None, description="language code or 'auto'")
    speed: float = Field(1.0, ge=0.25, le=4.0)
    format: Literal["m4b", "mp3", "opus", "flac", "wav"] = "m4b"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    retakes: int | None = Field(None, ge=0, le=10)
    temperature: float | None = Field(None, gt=0, le=5)
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="XTTS: audio tokens cap")
    chapters: str | None = Field(None, description="1-based chapters to speak: 2-5,7")
    narrator_voice: str | None = None
    character_voice: str | None = None
    text_not_inside: Literal["character", "narrator", "silent"] = "character"
    pause_sentence: float = Field(Pauses.sentence, ge=0, le=10)
    pause_paragraph: float = Field(Pauses.paragraph, ge=0, le=30)
    pause_chapter: float = Field(Pauses.chapter, ge=0, le=60)
    lufs: float | None = Field(-18.0, ge=-40, le=-6, description="loudness target; null: off")


class SentenceEdit(BaseModel):
    """A retake's new text or voice (the retake route's body, `jobs retake`'s flags)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=2000)
    voice: str | None = None


def parse_job_options(
    fields: Mapping[str, Any], *, names: Mapping[str, str] | None = None
) -> JobOptions:
    """`fields` checked into `JobOptions`; `InvalidRequest` naming the first problems.
    `names` gives a field the name its caller knows it by (`--lufs` for `lufs`)."""
    return _checked(JobOptions, "job", fields, names)


def parse_sentence_edit(
    fields: Mapping[str, Any], *, names: Mapping[str, str] | None = None
) -> SentenceEdit:
    """`fields` checked into a `SentenceEdit`, as `parse_job_options` checks a job."""
    return _checked(SentenceEdit, "retake", fields, names)


def _checked(
    model: type[_Model], what: str, fields: Mapping[str, Any], names: Mapping[str, str] | None
) -> _Model:
    try:
        return model.model_validate(dict(fields))
    except ValidationError as e:
        problems = []
        for err in e.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{(names or {}).get(where, where)}: {err['msg']}")
        raise InvalidRequest(f"invalid {what}: " + "; ".join(problems)) from None


def job_settings(
    opts: JobOptions,
    *,
    engine: str,
    default_voice: str | None,
    default_language: str,
    default_retakes: int,
) -> JobSettings:
    """The settings a job is stored with: `opts`, with the caller's defaults where they
    name nothing, and the chapter spec and voice names checked."""
    options: dict[str, Any] = {}
    if opts.temperature is not None:
        options["temperature"] = opts.temperature
    if opts.max_new_tokens is not None:
        options["max_new_tokens"] = opts.max_new_tokens
    narrator = None
    if opts.narrator_voice or opts.character_voice:
        narrator = NarratorSettings(
            narrator_voice=check_voice_name(opts.narrator_voice),
            character_voice=check_voice_name(opts.character_voice),
            text_not_inside=opts.text_not_inside,
        )
    return JobSettings(
        engine=engine,
        voice=check_voice_name(opts.voice) or default_voice,
        language=(opts.language or default_language).strip(),
        speed=opts.speed,
        options=options,
        seed=opts.seed,
        format=opts.format,
        retakes=default_retakes if opts.retakes is None else opts.retakes,
        pauses=Pauses(opts.pause_sentence, opts.pause_paragraph, opts.pause_chapter),
        target_lufs=opts.lufs,
        narrator=narrator,
        chapters=parse_chapters(opts.chapters),
    )
