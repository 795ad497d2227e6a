"""From an API request to audio: validate everything first, queue a job, then collect or stream.

Every API (OpenAI, AllTalk, xtts-api-server, the web page) goes through `plan_job`, so
they all get the same checks and the same clear errors before any audio is produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from lowvox.audio.formats import get_format
from lowvox.engines.base import AudioChunk, Engine, SynthesisRequest
from lowvox.errors import Cancelled, InvalidRequest, LowvoxError, UnknownVoice
from lowvox.server.engines import EngineHub, EngineSlot
from lowvox.server.narration import Turn
from lowvox.server.outputs import OutputStore
from lowvox.server.scheduler import Job
from lowvox.server.state import Generation, ServerState

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


def check_format(fmt: str | None, default: str = "wav") -> str:
    """The canonical name of a requested output format; UnsupportedFormat if unknown."""
    return get_format(fmt or default).name


def media_type(fmt: str) -> str:
    return get_format(fmt).media_type


def _encoder_module() -> ModuleType:
    # Imported lazily: PyAV loads only once audio is encoded.
    from lowvox.audio import encode

    return encode


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
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("text is empty", field="text")
    if len(text) > settings.max_text_chars:
        raise InvalidRequest(
            f"text is {len(text)} characters, over the limit of {settings.max_text_chars}",
            field="text",
        )
    fmt = check_format(fmt, settings.audio_format)
    try:
        speed = float(speed if speed not in (None, "") else 1.0)
    except (TypeError, ValueError):
        raise InvalidRequest(f"speed must be a number, got {speed!r}", field="speed") from None
    if not np.isfinite(speed):
        raise InvalidRequest("speed must be a finite number", field="speed")
    slot = await hub.get(engine)
    slot.touch()
    # Resolved by the engine (`pick_language`), "auto" from each segment's text.
    lang = str(language).strip() if language is not None and str(language).strip() else None
    lang = lang or settings.language
    opts = usable_options(slot.engine, options or {})
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
    allowed = set()
    if caps.temperature:
        allowed.update(("temperature", *_SAMPLING_OPTIONS))
    if caps.repetition_penalty:
        allowed.add("repetition_penalty")
    if caps.pitch:
        allowed.add("pitch")
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


def check_voice_name(voice: Any) -> str | None:
    """Clients name voices; they never point at files. Anything path-like is refused so
    that no engine ever opens a file a client chose."""
    if voice is None:
        return None
    if not isinstance(voice, str):
        raise InvalidRequest("voice must be a string", field="voice")
    name = voice.strip()
    if not name:
        return None
    if "/" in name or "\\" in name or name.startswith(".") or "\x00" in name or len(name) > 200:
        raise InvalidRequest(
            f"invalid voice name: {voice[:80]!r} (a voice name, not a path)", field="voice"
        )
    return name


def request_tag(request: Request | None) -> str:
    """The id a client can cancel its request by: its own `X-Request-Id`, or a fresh one."""
    given = request.headers.get("x-request-id", "") if request is not None else ""
    given = given.strip()[:100]
    return given if given.isprintable() and given else uuid.uuid4().hex


def submit(plan: Plan, tag: str = "") -> Job:
    return plan.slot.scheduler.submit(plan.segments, tag=tag)


async def until_done_or_gone(aw: Awaitable[T], job: Job, request: Request | None) -> T:
    """Await `aw`, cancelling the job if the client disconnects meanwhile (checked every
    0.25 s): a request that nobody waits for any more frees its slot."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if request is not None and await request.is_disconnected():
                logger.info("client left; cancelling job %d", job.id)
                job.cancel.set()
    finally:
        if not task.done():
            job.cancel.set()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def collect(job: Job, request: Request | None = None) -> np.ndarray:
    """All of a job's audio as one float32 array; cancels the job if the client leaves."""
    parts: list[np.ndarray] = []

    async def consume() -> None:
        async for chunk in job.chunks():
            parts.append(chunk.samples)

    try:
        await until_done_or_gone(consume(), job, request)
    finally:
        if not job.finished.is_set():
            job.cancel.set()
    if not parts:
        return np.zeros(0, np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


async def encode(
    samples: np.ndarray, sample_rate: int, fmt: str, out_rate: int | None = None
) -> bytes:
    return await asyncio.to_thread(
        _encoder_module().encode_audio, samples, sample_rate, fmt, out_rate
    )


async def _prepend(
    first: AudioChunk | None, rest: AsyncIterator[AudioChunk]
) -> AsyncIterator[AudioChunk]:
    if first is not None:
        yield first
        async for chunk in rest:
            yield chunk


async def first_chunk(
    job: Job, request: Request | None
) -> tuple[AudioChunk | None, AsyncIterator[AudioChunk]]:
    """Wait for a job's first audio before answering, so that a failure before any audio
    (engine error, cancel) still gets a proper status code instead of a cut stream."""
    chunks = job.chunks()
    first = await until_done_or_gone(anext(chunks, None), job, request)
    return first, chunks


async def stream_bytes(
    job: Job,
    fmt: str,
    sample_rate: int,
    on_complete: Callable[[np.ndarray], Any] | None = None,
    chunks: AsyncIterator[AudioChunk] | None = None,
    out_rate: int | None = None,
) -> AsyncIterator[bytes]:
    """Encoded bytes as chunks arrive (resampled to `out_rate` when given). With
    `on_complete`, the whole audio is handed over at the end (to be saved), so a streamed
    request keeps its file."""
    encoder = _encoder_module().StreamEncoder(fmt, sample_rate, out_rate)
    kept: list[np.ndarray] = []
    completed = False
    try:
        async for chunk in chunks if chunks is not None else job.chunks():
            if on_complete is not None:
                kept.append(chunk.samples)
            # Encoding (mp3, opus, aac) is CPU work: keep it off the event loop.
            data = await asyncio.to_thread(encoder.write, chunk.samples)
            if data:
                yield data
        tail = await asyncio.to_thread(encoder.close)
        if tail:
            yield tail
        completed = True
    except Cancelled:
        logger.info("stream of job %d cancelled", job.id)
    except LowvoxError as e:
        # Headers are gone already: the best we can do is end the stream and say why.
        logger.warning("stream of job %d failed: %s", job.id, e)
    finally:
        if not job.finished.is_set():
            job.cancel.set()
    if completed and on_complete is not None:
        audio = np.concatenate(kept).astype(np.float32) if kept else np.zeros(0, np.float32)
        try:
            await on_complete(audio) if asyncio.iscoroutinefunction(on_complete) else on_complete(
                audio
            )
        except Exception:
            logger.exception("saving the streamed audio of job %d failed", job.id)


class JobStream(StreamingResponse):
    """A streaming response that cancels its job however the response ends."""

    def __init__(self, content: AsyncIterator[bytes], job: Job, **kwargs: Any) -> None:
        headers = dict(kwargs.pop("headers", None) or {})
        headers.setdefault("X-Accel-Buffering", "no")
        headers.setdefault("Cache-Control", "no-cache")
        super().__init__(content, headers=headers, **kwargs)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished.is_set():
                self.job.cancel.set()


async def save_output(
    outputs: OutputStore,
    name: str,
    samples: np.ndarray,
    sample_rate: int,
    fmt: str,
    out_rate: int | None = None,
) -> None:
    data = await encode(samples, sample_rate, fmt, out_rate)
    await asyncio.to_thread(outputs.write, name, data)


def output_url(settings: Any, prefix: str, name: str) -> str:
    """Relative `/audio/…` by default; absolute when `public_url` is configured."""
    path = f"{prefix}/{name}"
    base = (settings.public_url or "").rstrip("/")
    return f"{base}{path}" if base else path


async def respond(
    state: ServerState,
    plan: Plan,
    request: Request,
    *,
    stream: bool,
    save_hint: str | None = None,
    timestamp: bool = True,
    out_rate: int | None = None,
) -> Response:
    """Run a planned job and answer with its audio, whole or streamed, resampled to
    `out_rate` when the API fixes one.

    With `save_hint` the audio is also written to the outputs folder, streamed or not, and
    `X-Output-File-Url` tells where it will be.
    """
    fmt, rate = plan.fmt, plan.sample_rate
    name = state.outputs.new_name(save_hint, fmt, timestamp) if save_hint else None
    tag = request_tag(request)
    sent_rate = _encoder_module().output_rate(fmt, out_rate or rate)
    headers = {"X-Sample-Rate": str(sent_rate), "X-Request-Id": tag}
    if name:
        url = output_url(state.settings, "/audio", name)
        headers["X-Output-File-Url"] = url
        headers["X-Output-File"] = name

    def remember() -> None:
        if name:
            state.remember(
                Generation(
                    file=name,
                    url=output_url(state.settings, "/audio", name),
                    engine=plan.slot.name,
                    voice=plan.segments[0].voice,
                    text=" ".join(s.text for s in plan.segments)[:200],
                )
            )

    job = submit(plan, tag)
    if stream:

        async def keep(audio: np.ndarray) -> None:
            await save_output(state.outputs, name, audio, rate, fmt, out_rate)
            remember()

        first, rest = await first_chunk(job, request)
        body = stream_bytes(job, fmt, rate, keep if name else None, _prepend(first, rest), out_rate)
        return JobStream(body, job, media_type=media_type(fmt), headers=headers)
    audio = await collect(job, request)
    data = await encode(audio, rate, fmt, out_rate)
    if name:
        await asyncio.to_thread(state.outputs.write, name, data)
        remember()
    return Response(content=data, media_type=media_type(fmt), headers=headers)
