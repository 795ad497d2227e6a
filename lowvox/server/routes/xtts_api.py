"""xtts-api-server's API, as SillyTavern's XTTSv2 provider calls it.

Every voice has a preview (`/sample/<voice>.wav`): a library voice's first clip, or for a
built-in voice a short sentence spoken once and kept in the cache folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from lowvox.errors import InvalidRequest, UnknownEngine, UnknownVoice
from lowvox.server import responses, synthesis
from lowvox.server.outputs import safe_stem
from lowvox.server.routes.alltalk import (
    PREVIEW_TEXT,
    fields,
    flag,
    form_body,
    number,
    query_fields,
    text,
)
from lowvox.server.routes.paths import TolerantRoute
from lowvox.server.routes.voices import preview_clip
from lowvox.server.scheduler import Priority
from lowvox.server.state import ServerState, State
from lowvox.voices import fold_name
from lowvox.voices.store import VoiceNotFound

router = APIRouter(route_class=TolerantRoute)

SPEECH_FIELDS = {
    "text": "the text to speak",
    "speaker_wav": "the voice",
    "language": "a language code, or auto",
}
MODEL_FIELDS = {"model_name": "an engine's name, as /get_models_list gives it"}
OUTPUT_FIELDS = {"output_folder": "the folder outputs go to: only the one it is (not changed)"}
SPEAKER_FIELDS = {"speaker_folder": "the voice folder: only the one it is (not changed)"}
FILE_FIELDS = {
    **SPEECH_FIELDS,
    "file_name_or_path": "the saved file's name (its folder is ignored)",
}
SETTINGS_FIELDS = {
    "temperature": "0.01-10",
    "speed": "0.25-4",
    "length_penalty": "-10-10",
    "repetition_penalty": "0.01-100",
    "top_p": "0-1",
    "top_k": "0-1000 (0: off)",
    "stream_chunk_size": "1-1000 (accepted, ignored: lowvox streams at its own pace)",
    "enable_text_splitting": "true | false (false: the whole text in one generation)",
}

LANGUAGE_NAMES = {
    "ar": "Arabic", "pt": "Brazilian Portuguese", "zh-cn": "Chinese", "zh": "Chinese",
    "cs": "Czech", "nl": "Dutch", "en": "English", "fr": "French", "de": "German",
    "it": "Italian", "pl": "Polish", "ru": "Russian", "es": "Spanish", "tr": "Turkish",
    "ja": "Japanese", "ko": "Korean", "hu": "Hungarian", "hi": "Hindi",
}  # fmt: skip

# What xtts-api-server starts with (its tts_funcs.py), the released XTTS v2 config.json's
# values; these routes speak with them until /set_tts_settings changes them.
DEFAULT_SETTINGS: dict[str, Any] = {
    "temperature": 0.75,
    "length_penalty": 1.0,
    "repetition_penalty": 5.0,
    "top_k": 50,
    "top_p": 0.85,
    "speed": 1.0,
    "enable_text_splitting": True,
    "stream_chunk_size": 100,
}

# /set_tts_settings fields: name -> (kind, lowest, highest)
_SETTINGS = {
    "temperature": (float, 0.01, 10.0),
    "speed": (float, 0.25, 4.0),
    "length_penalty": (float, -10.0, 10.0),
    "repetition_penalty": (float, 0.01, 100.0),  # the sampler divides by it
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 1000),
    "stream_chunk_size": (int, 1, 1000),
    "enable_text_splitting": (bool, None, None),
}


@router.get("/speakers")
async def speakers(request: Request, state: State) -> list[dict]:
    """Preview URLs are absolute, as xtts-api-server's are: the browser plays them from
    SillyTavern's page, not from ours. Every voice has one (SillyTavern's preview button
    fails on a voice without)."""
    slot = await state.hub.get(None)
    base = (state.settings.public_url or str(request.base_url)).rstrip("/")
    return [
        {
            "name": v.name,
            "voice_id": v.id,
            "preview_url": f"{base}/sample/{quote(v.id, safe='')}.wav",
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


@router.post("/set_tts_settings", openapi_extra=form_body(SETTINGS_FIELDS))
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
            if kind is int and value != int(value):  # top_k 2.7 is not silently 2
                raise InvalidRequest(f"{key} must be a whole number, not {value:g}", field=key)
            value = int(value) if kind is int else value
        updates[key] = value
    state.tts_options.update(updates)
    return {"message": "Settings successfully applied"}


def _settings(state: ServerState) -> dict[str, Any]:
    """The settings these routes speak with: xtts-api-server hands its whole table to
    every generation, its defaults too (not the checkpoint's), and so do they."""
    return {**DEFAULT_SETTINGS, **state.tts_options}


@router.get("/get_tts_settings")
async def get_tts_settings(state: State) -> dict:
    return _settings(state)


def _request_options(state: ServerState) -> tuple[float, dict[str, Any]]:
    opts = _settings(state)
    speed = float(opts.pop("speed"))
    # top_k 0 stays 0: off, as lowvox's sampler reads it (xtts-api-server refuses it).
    # length_penalty changes nothing: XTTS samples with one beam, and transformers applies
    # it to beam search only, so xtts-api-server's value is a no-op too.
    opts.pop("length_penalty")
    # How many tokens xtts-api-server vocodes per streamed chunk: the audio is the same,
    # and lowvox's scheduler picks its own cadence for every stream it serves.
    opts.pop("stream_chunk_size")
    opts["split_sentences"] = bool(opts.pop("enable_text_splitting"))
    return speed, opts


async def _plan(state: ServerState, form: dict[str, Any]) -> synthesis.Plan:
    speed, opts = _request_options(state)
    return await synthesis.plan_job(
        state.hub,
        text=text(form, "text"),
        voice=text(form, "speaker_wav"),
        language=text(form, "language"),
        speed=speed,
        fmt="wav",
        options=opts,
    )


@router.post(
    "/tts_to_audio/", openapi_extra=form_body(SPEECH_FIELDS, required=("text", "speaker_wav"))
)
@router.post("/tts_to_audio", include_in_schema=False)
async def tts_to_audio(request: Request, state: State) -> Any:
    form = await fields(request)
    plan = await _plan(state, form)
    response = await responses.respond(state, plan, request, stream=False)
    # As xtts-api-server's FileResponse names it (a download is saved as output.wav).
    response.headers["Content-Disposition"] = 'attachment; filename="output.wav"'
    return response


@router.get("/tts_stream", openapi_extra=query_fields(SPEECH_FIELDS, required=("text",)))
@router.get("/tts_stream/", include_in_schema=False)
async def tts_stream(request: Request, state: State) -> Any:
    form = dict(request.query_params)
    plan = await _plan(state, form)
    return await responses.respond(state, plan, request, stream=True, save_hint="tts_stream")


@router.post("/tts_to_file", openapi_extra=form_body(FILE_FIELDS, required=("text", "speaker_wav")))
@router.post("/tts_to_file/", include_in_schema=False)
async def tts_to_file(request: Request, state: State) -> dict:
    """Saves into the outputs folder only: a client-given path keeps just its file name."""
    form = await fields(request)
    plan = await _plan(state, form)
    hint = safe_stem(text(form, "file_name_or_path"), "tts_output")
    name = await responses.save(state, plan, request, hint, timestamp=False)
    return {
        "message": "The audio was successfully made and stored.",
        "output_path": str(state.outputs.find(name)),
        "output_url": synthesis.output_url(state.settings, "/audio", name),
    }


# -- Folders and models --------------------------------------------------------------------
# xtts-api-server lets a client point it at any folder (/set_output, /set_speaker_folder):
# lowvox's folders are set where it is started, so those routes only agree with what is.


@router.get("/get_folders")
async def get_folders(state: State) -> dict:
    settings = state.settings
    return {
        "speaker_folder": str(state.voices.root),
        "output_folder": str(state.outputs.root),
        "model_folder": str(settings.model_dir or settings.models_path),
    }


@router.get("/get_models_list")
async def get_models_list(state: State) -> list[str]:
    """lowvox's models are its engines, those that can run here (as /switch_model takes)."""
    return await state.hub.available()


@router.post("/switch_model", openapi_extra=form_body(MODEL_FIELDS, required=("model_name",)))
async def switch_model(request: Request, state: State) -> dict:
    """As xtts-api-server: 400 for the model already loaded and for one not offered."""
    name = (text(await fields(request), "model_name") or "").strip()
    if not name:
        raise InvalidRequest("model_name is required", field="model_name")
    if name.lower() == state.hub.default:
        raise InvalidRequest(f"the model {name!r} is already loaded", field="model_name")
    available = await state.hub.available()
    if name.lower() not in available:
        # UnknownEngine's message, with xtts-api-server's status for it.
        raise InvalidRequest(str(UnknownEngine(name, available)), field="model_name")
    await state.hub.reload(name)
    return {"message": f"Model switched to {name}"}


def _same_folder(body: dict[str, Any], key: str, current: Path, setting: str) -> str:
    """The folder `body[key]` when it names `current`. The client's path is only compared,
    never looked at on disk: not even to follow its links (which would tell what exists
    on this machine)."""
    folder = (text(body, key) or "").strip()
    if not folder:
        raise InvalidRequest(f"{key} is required", field=key)
    try:
        same = Path(os.path.abspath(os.path.expanduser(folder))) in (
            current.absolute(),
            current.resolve(),
        )
    except (OSError, ValueError):  # a NUL byte, a name too long
        same = False
    if not same:
        raise InvalidRequest(
            f"{key} stays {current}: lowvox does not change its folders over HTTP "
            f"(set {setting} where it is started)",
            field=key,
        )
    return folder


@router.post("/set_output", openapi_extra=form_body(OUTPUT_FIELDS, required=("output_folder",)))
async def set_output(request: Request, state: State) -> dict:
    body = await fields(request)
    folder = _same_folder(body, "output_folder", state.outputs.root, "outputs_dir")
    return {"message": f"Output folder set to {folder}"}


@router.post(
    "/set_speaker_folder", openapi_extra=form_body(SPEAKER_FIELDS, required=("speaker_folder",))
)
async def set_speaker_folder(request: Request, state: State) -> dict:
    body = await fields(request)
    folder = _same_folder(body, "speaker_folder", state.voices.root, "voices_dir")
    return {"message": f"Speaker folder set to {folder}"}


def _preview_path(state: ServerState, engine: str, voice_id: str) -> Path:
    # Named after the voice, and a hash of its exact id so that ids differing only in
    # characters a file name cannot hold stay apart.
    digest = hashlib.sha256(f"{engine}/{voice_id}".encode()).hexdigest()[:12]
    return state.settings.cache_path / "previews" / engine / f"{safe_stem(voice_id)}-{digest}.wav"


async def _builtin_preview(state: ServerState, name: str) -> Path:
    """A built-in voice's preview: spoken once on first request, then kept. SillyTavern's
    voice list asks for every voice's preview at once: they are made at bulk priority (a
    listener's speech goes first), each once however many ask, and a request that gives
    up does not stop it."""
    slot = await state.hub.get(None)
    wanted = name.removesuffix(".wav")
    voices = await state.hub.voices(slot)
    voice = next((v for v in voices if wanted in (v.id, v.name)), None)
    if voice is None:
        folded = fold_name(wanted)
        voice = next((v for v in voices if folded in (fold_name(v.id), fold_name(v.name))), None)
    if voice is None:
        raise UnknownVoice(name)
    path = _preview_path(state, slot.name, voice.id)
    if path.is_file():
        return path
    key = str(path)
    task = state.previews.get(key)
    if task is None:
        voice_id = voice.id

        async def make() -> None:
            plan = await synthesis.plan_job(state.hub, text=PREVIEW_TEXT, voice=voice_id, fmt="wav")
            await responses.render_file(plan, path, priority=Priority.BULK)

        task = state.previews[key] = asyncio.ensure_future(make())
        task.add_done_callback(lambda t: _forget_preview(state, key, t))
    await asyncio.shield(task)
    return path


def _forget_preview(state: ServerState, key: str, task: asyncio.Task) -> None:
    state.previews.pop(key, None)
    if not task.cancelled():
        task.exception()  # retrieved: its waiters were told, or nobody is waiting


@router.get("/sample/{name}")
async def sample(name: str, state: State) -> FileResponse:
    """A voice's preview; a library voice's clip is served only when no symbolic link
    leads to it (the library folder is one people and other programs write to)."""
    try:
        voice = await asyncio.to_thread(state.voices.get, name)
    except VoiceNotFound:
        path = await _builtin_preview(state, name)
        return FileResponse(path, media_type="audio/wav")
    clip = await asyncio.to_thread(preview_clip, voice, state.voices.root)
    return FileResponse(clip, media_type="audio/wav")
