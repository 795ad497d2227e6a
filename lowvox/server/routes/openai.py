"""OpenAI-compatible speech API: `/v1/audio/speech`, `/v1/audio/voices`, `/v1/models`
(and `/v1/models/{id}`).

Speech is streamed by default, as OpenAI's own API sends it: bytes go out as the audio is
made, so a client with a short socket timeout (Home Assistant's is 30 s) hears the start
of a long text long before its end is spoken. `"stream": false` asks for the whole file.
`"stream_format": "sse"` sends the same encoded audio as server-sent events, as OpenAI
does: `speech.audio.delta` events with base64 audio while it is made, then
`speech.audio.done` and `[DONE]`.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from lowvox.audio.formats import get_format
from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.server import responses, synthesis
from lowvox.server.routes.paths import TolerantRoute
from lowvox.server.state import ServerState, State

router = APIRouter(route_class=TolerantRoute)

# OpenAI's speech model names (its API reference, and the `openai` SDK's SpeechModel) all
# mean "the default engine" here, and so do their dated snapshots ("tts-1-1106",
# "gpt-4o-mini-tts-2025-03-20"), which clients hard-code as well.
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")
_OPENAI_SNAPSHOT = re.compile(r"(tts-1|tts-1-hd|gpt-4o-mini-tts)-\d{4}(-\d{2}-\d{2})?")
# OpenAI's built-in voices: clients hard-code them, so unknown ones fall back to the default.
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
    "shimmer", "verse",
)  # fmt: skip


class UnknownModel(InvalidRequest):
    status_code = 404

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(
            f"unknown model: {model!r} (available: {', '.join(available)})", field="model"
        )


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = "tts-1"
    input: str
    voice: str | dict[str, Any] | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    stream: bool | None = None  # None: streamed, whenever the format can be
    stream_format: str | None = None
    instructions: str | None = None  # accepted for compatibility; engines have no prompt
    # lowvox extensions
    language: str | None = None
    save: bool = False
    options: dict[str, Any] | None = None  # engine knobs: temperature, top_k, seed, do_sample...


def _engine_for(model: str, state: ServerState) -> str | None:
    name = (model or "").strip().lower()
    if name in OPENAI_MODELS or name in ("", "lowvox") or _OPENAI_SNAPSHOT.fullmatch(name):
        return None
    if name in state.hub.names:
        return name
    if name == state.settings.model_name.lower():
        return "xtts"
    raise UnknownModel(model, [*OPENAI_MODELS, *state.hub.names])


def map_voice(voice: Any, state: ServerState, known: set[str]) -> str | None:
    """OpenAI voice names go through the configured map; others are lowvox voices."""
    if isinstance(voice, dict):
        voice = voice.get("id")
    if voice is None:
        return None
    if not isinstance(voice, str):
        raise InvalidRequest("voice must be a string", field="voice")
    voice_map = state.settings.openai_voice_map
    # As sent, else whatever the case of either side ("Nova" in the map, "nova" sent).
    mapped = voice_map.get(voice) or next(
        (v for k, v in voice_map.items() if k.lower() == voice.lower()), None
    )
    if mapped:
        return mapped
    if voice.lower() in OPENAI_VOICES and voice not in known and voice.lower() not in known:
        return None
    return voice


OPENAI_PCM_RATE = 24_000

# The fields `plan_job` names in its errors, by OpenAI's names for them (an error's `param`).
_OPENAI_PARAMS = {"text": "input", "format": "response_format"}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class SpeechEvents:
    """OpenAI's `stream_format: "sse"` framing: each block of encoded audio (in the
    response_format, as OpenAI sends it) is a `speech.audio.delta` event carrying it in
    base64; a complete stream ends with `speech.audio.done` and `data: [DONE]`. lowvox
    counts no tokens, so the usage it reports is zero. A stream cut short after its
    headers ends with an `error` event (the shape OpenAI's SDKs read in other event
    streams) and no `done`."""

    media_type = "text/event-stream"

    def delta(self, data: bytes) -> bytes:
        audio = base64.b64encode(data).decode("ascii")
        return _event({"type": "speech.audio.delta", "audio": audio})

    def end(self, error: BaseException | None) -> bytes:
        if error is None:
            usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
            return _event({"type": "speech.audio.done", "usage": usage}) + b"data: [DONE]\n\n"
        message, kind = "internal server error (see the server log)", "server_error"
        if isinstance(error, LowvoxError):
            message = str(error)
            kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        details = {"message": message, "type": kind, "param": None, "code": None}
        return _event({"type": "error", "error": details})


@router.post("/v1/audio/speech")
async def speech(body: SpeechRequest, request: Request, state: State) -> Any:
    if body.stream_format not in (None, "audio", "sse"):
        raise InvalidRequest(
            f"stream_format must be 'audio' or 'sse', got {body.stream_format!r}",
            field="stream_format",
        )
    engine = _engine_for(body.model, state)
    slot = await state.hub.get(engine)
    known = {name for v in await state.hub.voices(slot) for name in (v.id, v.name)}
    try:
        plan = await synthesis.plan_job(
            state.hub,
            text=body.input,
            voice=map_voice(body.voice, state, known),
            language=body.language,
            speed=body.speed,
            fmt=body.response_format,
            engine=engine,
            options=body.options,
        )
    except InvalidRequest as e:
        e.field = _OPENAI_PARAMS.get(e.field or "", e.field)
        raise
    sse = body.stream_format == "sse"
    if sse and not get_format(plan.fmt).streamable:
        raise InvalidRequest(
            f"response_format {plan.fmt!r} is made whole, not as a stream of events",
            field="stream_format",
        )
    stream = sse or body.stream is not False or body.stream_format == "audio"
    # OpenAI's pcm has no header: clients assume 24 kHz, so resample whatever the engine makes.
    out_rate = OPENAI_PCM_RATE if plan.fmt == "pcm" else None
    return await responses.respond(
        state,
        plan,
        request,
        stream=stream,
        save_hint="speech" if body.save else None,
        out_rate=out_rate,
        framing=SpeechEvents() if sse else None,
    )


@router.get("/v1/audio/voices")
async def voices(state: State, model: str | None = None) -> dict:
    slot = await state.hub.get(_engine_for(model or "", state))
    return {"voices": [{"id": v.id, "name": v.name} for v in await state.hub.voices(slot)]}


async def _model_ids(state: ServerState) -> list[str]:
    """OpenAI's names (the default engine) and the engines that can run here: one without
    its model (XTTS not installed) is not offered."""
    return [*OPENAI_MODELS, *await state.hub.available()]


@router.get("/v1/models")
async def models(state: State) -> dict:
    ids = await _model_ids(state)
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "created": 0, "owned_by": "lowvox"} for i in ids],
    }


@router.get("/v1/models/{model}")
async def model(model: str, state: State) -> dict:
    """One model, as the SDKs' `models.retrieve` reads it: whatever speech accepts."""
    _engine_for(model, state)  # 404 for a name speech would refuse
    return {"id": model, "object": "model", "created": 0, "owned_by": "lowvox"}


@router.get("/v1/audio/models")
async def audio_models(state: State) -> dict:
    """Open WebUI asks OpenAI-compatible TTS servers for their models here."""
    return {"models": [{"id": i, "name": i} for i in await _model_ids(state)]}
