"""lowvox's voice library API: list, upload (one or more clips), rename, delete, preview.

Engines that clone voices compute the voice's conditioning once, at upload, through an
optional engine hook `prepare_voice(name, clip_paths)` run on the engine's own worker;
`forget_voice(name)` is called after a rename or delete.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import soundfile as sf
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.server import synthesis
from lowvox.server.outputs import served_file
from lowvox.server.routes.paths import TolerantRoute, read_form, read_json
from lowvox.server.state import ServerState, State
from lowvox.voices.store import MAX_CLIPS, StoredVoice, VoiceExists, check_name

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/library", route_class=TolerantRoute)


class PayloadTooLarge(InvalidRequest):
    status_code = 413


def describe(state: ServerState, voice: StoredVoice) -> dict[str, Any]:
    return {
        "name": voice.name,
        "clips": len(voice.clips),
        "duration": round(voice.duration, 2),
        "created": voice.created,
        "preview_url": synthesis.output_url(
            state.settings, "/api/library/voices", f"{quote(voice.name, safe='')}/preview"
        ),
    }


async def _engine_hook(state: ServerState, method: str, *args: Any) -> None:
    """Call a voice hook (`Engine.prepare_voice` / `forget_voice`) on every loaded engine
    that clones voices, on the engine's own worker thread."""
    for slot in state.hub.loaded().values():
        if slot.engine.capabilities.cloning:
            hook: Callable[..., None] = getattr(slot.engine, method)
            await slot.scheduler.run(functools.partial(hook, *args))


async def _not_built_in(state: ServerState, name: str) -> None:
    """VoiceExists when `name` is, in any letter case, a built-in voice (XTTS's studio
    speakers) of a loaded engine that clones: that engine looks its own voices up first,
    so a library voice of that name would be stored and listed but never spoken."""
    lowered = check_name(name).lower()
    for slot in state.hub.loaded().values():
        if not slot.engine.capabilities.cloning:
            continue
        for info in await state.hub.voices(slot):
            if info.kind != "cloned" and lowered in (info.id.lower(), info.name.lower()):
                raise VoiceExists(info.name, f"a built-in voice of engine {slot.name!r}")


@router.get("/voices")
async def list_voices(state: State) -> dict:
    voices = await asyncio.to_thread(state.voices.list)
    return {"voices": [describe(state, v) for v in voices]}


@router.post("/voices", status_code=201)
async def upload_voice(request: Request, state: State) -> dict:
    limit = state.settings.max_upload_bytes * MAX_CLIPS + 64 * 1024
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"upload is {declared} bytes, over the limit of {limit}", field="files"
        )
    ctype = request.headers.get("content-type", "")
    if "multipart/form-data" not in ctype and "x-www-form-urlencoded" not in ctype:
        raise InvalidRequest("upload voices as multipart/form-data with `name` and `files`")
    form = await read_form(
        request, "could not read the upload", max_files=MAX_CLIPS + 1, max_fields=20
    )
    name = form.get("name")
    files = [
        f
        for key in ("files", "file", "files[]")
        for f in form.getlist(key)
        if isinstance(f, UploadFile)
    ]
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("the voice needs a name", field="name")
    uploads = []
    for f in files:
        data = await f.read(state.settings.max_upload_bytes + 1)
        uploads.append((f.filename or "upload", data))
    await _not_built_in(state, name)
    voice = await asyncio.to_thread(state.voices.add, name, uploads)
    try:
        await _engine_hook(state, "prepare_voice", voice.name, list(voice.clips))
    except LowvoxError:
        await asyncio.to_thread(state.voices.delete, voice.name)
        raise
    except Exception as e:
        await asyncio.to_thread(state.voices.delete, voice.name)
        raise InvalidRequest(f"the engine could not use these clips: {e}", field="files") from e
    return {"voice": describe(state, voice)}


@router.patch("/voices/{name}")
@router.post("/voices/{name}/rename", include_in_schema=False)
async def rename_voice(name: str, request: Request, state: State) -> dict:
    body = await read_json(request, 'send JSON like {"name": "new name"}')
    new = body.get("name") if isinstance(body, dict) else None
    if not isinstance(new, str):
        raise InvalidRequest("the new name is missing", field="name")
    await _not_built_in(state, new)
    voice = await asyncio.to_thread(state.voices.rename, name, new)
    await _engine_hook(state, "forget_voice", name)
    await _engine_hook(state, "prepare_voice", voice.name, list(voice.clips))
    return {"voice": describe(state, voice)}


@router.delete("/voices/{name}")
async def delete_voice(name: str, state: State) -> dict:
    await asyncio.to_thread(state.voices.delete, name)
    await _engine_hook(state, "forget_voice", name)
    return {"deleted": name}


def preview_clip(voice: StoredVoice, root: Path) -> Path:
    """The first of the voice's clips that is readable audio, to send as its preview: a
    damaged clip (a file someone copied in half, or not audio at all) was sent as audio/wav
    that no player plays. A symbolic link placed in the library must not send what it
    points at (`served_file`)."""
    for clip in voice.clips:
        path = served_file(clip, root)
        try:
            if sf.info(str(path)).frames > 0:
                return path
        except (sf.LibsndfileError, RuntimeError, OSError):
            continue
    raise InvalidRequest(
        f"voice {voice.name!r} has no readable clip to preview (damaged files in its folder)",
        field="voice",
    )


@router.get("/voices/{name}/preview")
async def preview(name: str, state: State) -> FileResponse:
    voice = await asyncio.to_thread(state.voices.get, name)
    clip = await asyncio.to_thread(preview_clip, voice, state.voices.root)
    return FileResponse(clip, media_type="audio/wav")
