"""xtts-api-server's API, as SillyTavern's XTTSv2 provider calls it."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from lowvox.errors import InvalidRequest
from lowvox.server import synthesis
from lowvox.server.outputs import safe_stem
from lowvox.server.routes.alltalk import fields, flag, number
from lowvox.server.state import ServerState, State

router = APIRouter()

LANGUAGE_NAMES = {
    "ar": "Arabic", "pt": "Brazilian Portuguese", "zh-cn": "Chinese", "zh": "Chinese",
    "cs": "Czech", "nl": "Dutch", "en": "English", "fr": "French", "de": "German",
    "it": "Italian", "pl": "Polish", "ru": "Russian", "es": "Spanish", "tr": "Turkish",
    "ja": "Japanese", "ko": "Korean", "hu": "Hungarian", "hi": "Hindi",
}  # fmt: skip

# /set_tts_settings fields: name -> (kind, lowest, highest)
_SETTINGS = {
    "temperature": (float, 0.01, 10.0),
    "speed": (float, 0.25, 4.0),
    "length_penalty": (float, -10.0, 10.0),
    "repetition_penalty": (float, 0.0, 100.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 1000),
    "stream_chunk_size": (int, 1, 1000),
    "enable_text_splitting": (bool, None, None),
}


@router.get("/speakers")
async def speakers(request: Request, state: State) -> list[dict]:
    """Preview URLs are absolute, as xtts-api-server's are: the browser plays them from
    SillyTavern's page, not from ours."""
    slot = await state.hub.get(None)
    library = {v.name for v in await asyncio.to_thread(state.voices.list)}
    base = (state.settings.public_url or str(request.base_url)).rstrip("/")
    return [
        {
            "name": v.name,
            "voice_id": v.id,
            "preview_url": f"{base}/sample/{quote(v.id)}.wav" if v.id in library else None,
        }
        for v in await state.hub.voices(slot)
    ]


@router.get("/speakers_list")
async def speakers_list(state: State) -> list[str]:
    slot = await state.hub.get(None)
    return [v.id for v in await state.hub.voices(slot)]


@router.get("/languages")
async def languages(state: State) -> dict:
    slot = await state.hub.get(None)
    return {"languages": {LANGUAGE_NAMES.get(code, code): code for code in slot.engine.languages()}}


@router.post("/set_tts_settings")
async def set_tts_settings(request: Request, state: State) -> dict:
    """Values may arrive as strings (SillyTavern sends slider values); top_k 0 means off."""
    body = await fields(request)
    updates: dict[str, Any] = {}
    for key, (kind, low, high) in _SETTINGS.items():
        if key not in body or body[key] is None:
            continue
        if kind is bool:
            value: Any = body[key] if isinstance(body[key], bool) else flag(body[key], key)
        else:
            value = number(body[key], key, None)
            if value is None:
                continue
            if not (low <= value <= high):
                raise InvalidRequest(
                    f"{key} {value:g} is out of range ({low:g}-{high:g})", field=key
                )
            value = int(value) if kind is int else value
        updates[key] = value
    state.tts_options.update(updates)
    return {"message": "Settings successfully applied"}


def _request_options(state: ServerState) -> tuple[float, dict[str, Any]]:
    opts = dict(state.tts_options)
    speed = float(opts.pop("speed", 1.0))
    if opts.get("top_k") == 0:
        opts["top_k"] = None  # xtts-api-server semantics: 0 switches top-k filtering off
    opts.pop("stream_chunk_size", None)
    return speed, opts


async def _plan(state: ServerState, form: dict[str, Any]) -> synthesis.Plan:
    speed, opts = _request_options(state)
    return await synthesis.plan_job(
        state.hub,
        text=form.get("text"),
        voice=form.get("speaker_wav"),
        language=form.get("language"),
        speed=speed,
        fmt="wav",
        options=opts,
    )


@router.post("/tts_to_audio/")
@router.post("/tts_to_audio", include_in_schema=False)
async def tts_to_audio(request: Request, state: State) -> Any:
    form = await fields(request)
    plan = await _plan(state, form)
    return await synthesis.respond(state, plan, request, stream=False)


@router.get("/tts_stream")
@router.get("/tts_stream/", include_in_schema=False)
async def tts_stream(request: Request, state: State) -> Any:
    form = dict(request.query_params)
    plan = await _plan(state, form)
    return await synthesis.respond(state, plan, request, stream=True, save_hint="tts_stream")


@router.post("/tts_to_file")
@router.post("/tts_to_file/", include_in_schema=False)
async def tts_to_file(request: Request, state: State) -> dict:
    """Saves into the outputs folder only: a client-given path keeps just its file name."""
    form = await fields(request)
    plan = await _plan(state, form)
    hint = safe_stem(form.get("file_name_or_path"), "tts_output")
    response = await synthesis.respond(
        state, plan, request, stream=False, save_hint=hint, timestamp=False
    )
    file = response.headers["x-output-file"]
    return {
        "message": "The audio was successfully made and stored.",
        "output_path": str(state.outputs.find(file)),
        "output_url": synthesis.output_url(state.settings, "/audio", file),
    }


@router.get("/sample/{name}")
async def sample(name: str, state: State) -> FileResponse:
    voice = state.voices.get(name)
    return FileResponse(voice.clips[0], media_type="audio/wav")
