"""From an API request to a queued job: validate everything first, then queue it.

Every API (OpenAI, AllTalk, xtts-api-server, the web page, Wyoming) goes through
`plan_job`, so they all get the same checks and the same clear errors before any audio is
produced; `lowvox.server.responses` takes the job from there to the client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from starlette.requests import Request

from lowvox.audio.formats import get_format
from lowvox.engines.base import Engine, SynthesisRequest, check_voice_name
from lowvox.errors import InvalidRequest, LowvoxError, UnknownVoice
from lowvox.server.engines import EngineHub, EngineSlot
from lowvox.server.narration import Turn
from lowvox.server.scheduler import Job, Priority, QueueFull

logger = logging.getLogger(__name__)

# Seeds as torch takes them (64-bit, kept to the signed range).
MAX_SEED = 2**63 - 1


def check_format(fmt: Any, default: str = "wav") -> str:
    """The canonical name of a requested output format; UnsupportedFormat if unknown."""
    if fmt is not None and not isinstance(fmt, str):
        raise InvalidRequest(f"format must be a string, got {_kind(fmt)}", field="format")
    return get_format(fmt or default).name


def _kind(value: Any) -> str:
    """How a wrongly typed JSON value is named in an error."""
    return {dict: "an object", list: "a list", bool: "true/false"}.get(
        type(value), f"{type(value).__name__} {str(value)[:40]!r}"
    )


def check_options(options: Any) -> Mapping[str, Any]:
    """Engine knobs as every engine may take them: an object whose numbers are finite and
    whose seed fits torch's 64-bit generator. The engine checks each knob's range."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InvalidRequest(f"options must be an object, got {_kind(options)}", field="options")
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"{key} must be a finite number", field=str(key))
    seed = options.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise InvalidRequest(
            f"seed must be an integer in 0..2**63-1, got {str(seed)[:40]}", field="seed"
        )
    return options


def media_type(fmt: str) -> str:
    return get_format(fmt).media_type


@dataclass(frozen=True)
class Plan:
    """A fully validated request: which engine, which segments, in which format."""

    slot: EngineSlot
    segments: list[SynthesisRequest]
    fmt: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sample_rate(self) -> int:
        return self.slot.engine.sample_rate


async def plan_job(
    hub: EngineHub,
    *,
    text: Any,
    voice: str | None,
    language: str | None = None,
    speed: Any = 1.0,
    fmt: str | None = "wav",
    engine: str | None = None,
    options: Mapping[str, Any] | None = None,
    turns: list[Turn] | None = None,
) -> Plan:
    """Check the whole request (text, voice, language, speed, format, size) before any work."""
    settings = hub.settings
    if text is not None and not isinstance(text, str):
        raise InvalidRequest(f"text must be a string, got {_kind(text)}", field="text")
    if not text or not text.strip():
        raise InvalidRequest("text is empty", field="text")
    if len(text) > settings.max_text_chars:
        raise InvalidRequest(
            f"text is {len(text)} characters, over the limit of {settings.max_text_chars}",
            field="text",
        )
    fmt = check_format(fmt, settings.audio_format)
    if language is not None and not isinstance(language, str):
        raise InvalidRequest(f"language must be a string, got {_kind(language)}", field="language")
    options = check_options(options)
    try:
        speed = float(speed if speed not in (None, "") else 1.0)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"speed must be a number, got {_kind(speed)}", field="speed") from None
    if not np.isfinite(speed):
        raise InvalidRequest("speed must be a finite number", field="speed")
    slot = await hub.get(engine)
    slot.touch()
    # Resolved by the engine (`pick_language`), "auto" from each segment's text.
    lang = language.strip() if language is not None and language.strip() else None
    lang = lang or settings.language
    opts = usable_options(slot.engine, options)
    pieces = turns if turns is not None else [Turn(text=text, voice=voice)]
    requests = [
        SynthesisRequest(
            text=turn.text,
            voice=check_voice_name(turn.voice or settings.voice),
            language=lang,
            speed=speed,
            options=opts,
        )
        for turn in pieces
    ]
    if not requests:
        raise InvalidRequest("nothing to say after filtering the text", field="text")

    def validate() -> list[SynthesisRequest]:
        known = {name for v in slot.engine.voices() for name in (v.id, v.name)}
        named = [replace(r, voice=known_voice(r.voice, known)) for r in requests]
        return [slot.engine.validate(r, max_chars=settings.max_text_chars) for r in named]

    # Validation may read the voice library from disk: keep it off the event loop.
    segments = await asyncio.to_thread(validate)
    return Plan(slot=slot, segments=segments, fmt=fmt, options=opts)


# Options each kind of engine can use; clients (SillyTavern, AllTalk) send theirs to every
# engine, so the ones an engine cannot use are dropped rather than refused.
_SAMPLING_OPTIONS = ("top_k", "top_p", "seed", "do_sample", "max_new_tokens")


def usable_options(engine: Engine, options: Mapping[str, Any]) -> dict[str, Any]:
    caps = engine.capabilities
    allowed: set[str] = set()
    if caps.temperature:
        allowed.update(("temperature", *_SAMPLING_OPTIONS))
    if caps.repetition_penalty:
        allowed.add("repetition_penalty")
    if caps.pitch:
        allowed.add("pitch")
    if caps.sentence_splitting:
        allowed.add("split_sentences")
    return {k: v for k, v in options.items() if k in allowed}


_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


def known_voice(voice: str | None, known: set[str]) -> str | None:
    """AllTalk and xtts-api-server clients name voices after files (`female_01.wav`): map
    such a name to the voice it means, and never let it reach an engine as a file name."""
    if voice is None or voice in known or not voice.lower().endswith(_AUDIO_SUFFIXES):
        return voice
    stem = voice.rsplit(".", 1)[0]
    lowered = {k.lower(): k for k in known}
    if stem in known or stem.lower() in lowered:
        return lowered.get(stem.lower(), stem)
    raise UnknownVoice(voice)


def request_tag(request: Request | None) -> str:
    """The id a client can cancel its request by: its own `X-Request-Id`, or a fresh one."""
    given = request.headers.get("x-request-id", "") if request is not None else ""
    given = given.strip()[:100]
    return given if given.isprintable() and given else uuid.uuid4().hex


def submit(plan: Plan, tag: str = "", priority: Priority = Priority.INTERACTIVE) -> Job:
    """Queue a planned job. An engine being restarted under the request (a reload, a
    runtime change) is a 503 with a Retry-After, not a bare "shutting down"."""
    try:
        return plan.slot.scheduler.submit(plan.segments, tag=tag, priority=priority)
    except QueueFull:
        raise
    except LowvoxError as e:
        if plan.slot.retired:
            raise plan.slot.restarting() from e
        raise


def output_url(settings: Any, prefix: str, name: str) -> str:
    """Relative `/audio/…` by default; absolute when `public_url` is configured."""
    path = f"{prefix}/{name}"
    base = (settings.public_url or "").rstrip("/")
    return f"{base}{path}" if base else path
