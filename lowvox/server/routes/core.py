"""Routes every client shares: readiness, the voice list, generated files, the runtime,
and the web page's session."""

from __future__ import annotations

import hmac
import re

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

from lowvox.audio.formats import FORMATS, format_from_path
from lowvox.errors import InvalidRequest, LowvoxError, UnsupportedFormat
from lowvox.runtime.planner import PRECISIONS, RESIDENCIES
from lowvox.server.routes.paths import TolerantRoute
from lowvox.server.security import (
    SESSION_PATH,
    SESSION_TTL_S,
    header_key,
    session_cookie_name,
    session_token,
)
from lowvox.server.state import State

router = APIRouter(route_class=TolerantRoute)


@router.get("/api/ready", response_class=PlainTextResponse)
async def ready(state: State) -> str:
    # The lifespan loads the default engine before the server accepts requests.
    return "Ready"


@router.get("/api/voices")
async def alltalk_voices(state: State, engine: str | None = None) -> dict:
    """AllTalk's voice list: names the client sends back as `character_voice_gen`."""
    slot = await state.hub.get(engine)
    return {"status": "success", "voices": [v.id for v in await state.hub.voices(slot)]}


class SessionRefused(LowvoxError):
    status_code = 401


@router.post(SESSION_PATH)
async def open_session(request: Request, state: State) -> JSONResponse:
    """The web page sends the key here once, in a header; the HttpOnly cookie it gets back
    is what its audio players, download links and event streams carry, so the key never
    appears in a URL (or an access log). Call again to extend the session."""
    key = state.settings.api_key
    if not key:
        return JSONResponse({"key_required": False})
    presented = header_key(request.scope)
    if presented is None or not hmac.compare_digest(presented, key.encode()):
        raise SessionRefused("send the API key in X-API-Key or Authorization: Bearer")
    response = JSONResponse({"key_required": True, "expires_in": SESSION_TTL_S})
    response.set_cookie(
        session_cookie_name(request.scope),
        session_token(key),
        max_age=SESSION_TTL_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_is_https(request, state.settings.public_url),
    )
    return response


@router.delete(SESSION_PATH)
async def close_session(request: Request) -> JSONResponse:
    response = JSONResponse({"closed": True})
    response.delete_cookie(session_cookie_name(request.scope), path="/", samesite="strict")
    return response


def _is_https(request: Request, public_url: str | None) -> bool:
    return request.url.scheme == "https" or (public_url or "").startswith("https:")


@router.get("/api/engines")
async def engines(state: State) -> dict:
    loaded = state.hub.loaded()
    out = []
    # Engines that cannot run here (XTTS without a model) are not offered.
    for name in await state.hub.available():
        slot = loaded.get(name)
        entry: dict = {
            "name": name,
            "loaded": slot is not None,
            "default": name == state.hub.default,
        }
        if slot is not None:
            caps = slot.engine.capabilities
            entry.update(
                sample_rate=slot.engine.sample_rate,
                languages=slot.engine.languages(),
                capabilities={k: getattr(caps, k) for k in caps.__dataclass_fields__},
                queued=slot.scheduler.queued,
                busy=slot.scheduler.busy,
            )
        out.append(entry)
    return {"engines": out, "default": state.hub.default}


@router.get("/audio/{name}")
@router.get("/audiocache/{name}")
async def output_file(name: str, state: State) -> FileResponse:
    """A generated file, looked up among the outputs folder's own entries only."""
    path = state.outputs.find(name)
    try:
        media = FORMATS[format_from_path(path.name)].media_type
    except UnsupportedFormat:
        media = "application/octet-stream"
    return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})


@router.post("/api/cancel/{request_id}")
async def cancel_request(request_id: str, state: State) -> dict:
    """Stop one request (streaming or not) by the `X-Request-Id` it was sent with."""
    return {"cancelled": state.hub.cancel(request_id)}


@router.post("/api/stop")
async def stop_all(state: State) -> dict:
    return {"cancelled": state.hub.cancel_all()}


@router.get("/api/engines/{name}")
async def engine_detail(name: str, state: State) -> dict:
    """Loads the engine if needed; its voices, languages and capabilities (the web page)."""
    slot = await state.hub.get(name)
    caps = slot.engine.capabilities
    return {
        "name": slot.name,
        "sample_rate": slot.engine.sample_rate,
        "default_voice": slot.engine.default_voice,
        "voices": [
            {"id": v.id, "name": v.name, "kind": v.kind} for v in await state.hub.voices(slot)
        ],
        "languages": slot.engine.languages(),
        "capabilities": {k: getattr(caps, k) for k in caps.__dataclass_fields__},
    }


@router.get("/api/recent")
async def recent(state: State) -> dict:
    return {
        "generations": [
            {
                "file": g.file,
                "url": g.url,
                "engine": g.engine,
                "voice": g.voice,
                "text": g.text,
                "created": g.created,
            }
            for g in state.recent
        ]
    }


_DEVICES = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")
_PRECISIONS = PRECISIONS
_RESIDENCIES = RESIDENCIES


class RuntimeChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str | None = None
    precision: str | None = None
    residency: str | None = None


@router.get("/api/runtime")
async def runtime(state: State) -> dict:
    s = state.settings
    engine = (await state.hub.get(None)).engine
    return {
        "device": s.device,
        "precision": s.precision,
        "residency": s.residency,
        "low_vram": engine.low_vram,
        "fast_path": engine.fast_path,
        "engine": state.hub.default,
        "choices": {"precision": list(_PRECISIONS), "residency": list(_RESIDENCIES)},
    }


@router.post("/api/runtime")
async def change_runtime(change: RuntimeChange, state: State) -> dict:
    """Change device/precision/residency; the default engine reloads with the new values."""
    updates = {k: v.strip().lower() for k, v in change.model_dump().items() if v is not None}
    if "device" in updates and not _DEVICES.match(updates["device"]):
        raise InvalidRequest(
            f"unknown device {updates['device']!r} (auto, cpu, cuda, cuda:N, mps)", field="device"
        )
    if "precision" in updates and updates["precision"] not in _PRECISIONS:
        raise InvalidRequest(
            f"unknown precision {updates['precision']!r} ({', '.join(_PRECISIONS)})",
            field="precision",
        )
    if "residency" in updates and updates["residency"] not in _RESIDENCIES:
        raise InvalidRequest(
            f"unknown residency {updates['residency']!r} ({', '.join(_RESIDENCIES)})",
            field="residency",
        )
    if updates:
        # An impossible plan (say cuda on a machine without a GPU) changes nothing: the
        # engine comes back as it was, and the caller gets the reason.
        try:
            await state.hub.reconfigure(updates)
        finally:
            state.settings = state.hub.settings
    return await runtime(state)
