"""AllTalk's API (v1 and v2 clients: SillyTavern, text-generation-webui, scripts).

AllTalk answers generation requests with JSON pointing at a saved file; failures keep its
`{"status": "generate-failure", "error": ...}` shape but with a 4xx/5xx status code.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.server import synthesis
from lowvox.server.narration import Turn, narrator_turns
from lowvox.server.state import ServerState, State
from lowvox.server.textfront import filter_text

router = APIRouter()

PREVIEW_TEXT = "Hello, this is a preview of my voice. How does it sound?"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def failure(exc: LowvoxError) -> JSONResponse:
    status = int(getattr(exc, "status_code", 500) or 500)
    headers = None
    if getattr(exc, "retry_after", None) is not None:
        headers = {"Retry-After": str(exc.retry_after)}
    return JSONResponse(
        {"status": "generate-failure", "error": str(exc), "detail": str(exc)},
        status_code=status,
        headers=headers,
    )


def flag(value: Any, name: str) -> bool:
    text = str(value if value is not None else "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidRequest(f"{name} must be true or false, not {value!r}", field=name)


def number(value: Any, name: str, default: float | None) -> float | None:
    if value is None or str(value).strip() == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be a number, not {value!r}", field=name) from None
    if not math.isfinite(out):
        raise InvalidRequest(f"{name} must be a finite number", field=name)
    return out


async def fields(request: Request) -> dict[str, Any]:
    """Form fields (AllTalk clients send x-www-form-urlencoded), with the query as fallback."""
    data: dict[str, Any] = dict(request.query_params)
    ctype = request.headers.get("content-type", "")
    if request.method in ("POST", "PUT") and ("form" in ctype or not ctype):
        try:
            form = await request.form()
        except Exception as e:  # malformed multipart/urlencoded bodies
            raise InvalidRequest(f"could not read the form: {e}") from e
        data.update({k: v for k, v in form.items() if isinstance(v, str)})
    elif "json" in ctype:
        try:
            body = await request.json()
        except ValueError as e:
            raise InvalidRequest("the body is not valid JSON") from e
        if not isinstance(body, dict):
            raise InvalidRequest("the JSON body must be an object")
        data.update(body)
    return data


def _options(form: dict[str, Any]) -> dict[str, float]:
    opts = {}
    for key in ("temperature", "repetition_penalty"):
        value = number(form.get(key), key, None)
        if value is not None:
            opts[key] = value
    return opts


@router.get("/api/rvcvoices")
async def rvc_voices() -> dict:
    return {"status": "success", "rvcvoices": ["Disabled"]}


def _model_entries(state: ServerState) -> list[dict[str, str]]:
    return [{"name": n, "model_name": n} for n in state.hub.names]


@router.get("/api/currentsettings")
async def current_settings(state: State) -> dict:
    slot = await state.hub.get(None)
    caps = slot.engine.capabilities
    is_xtts = slot.name == "xtts"
    return {
        "manufacturer_name": "lowvox",
        "engines_available": list(state.hub.names),
        "current_engine_loaded": slot.name,
        "models_available": _model_entries(state),
        "current_model_loaded": slot.name,
        "audio_format": state.settings.audio_format,
        # DeepSpeed maps to lowvox's fast decode path; low VRAM to the residency setting.
        "deepspeed_capable": is_xtts,
        "deepspeed_available": is_xtts,
        "deepspeed_enabled": slot.engine.fast_path,
        "deepspeed_status": slot.engine.fast_path,
        "lowvram_capable": is_xtts,
        "lowvram_enabled": slot.engine.low_vram,
        "low_vram_status": slot.engine.low_vram,
        "generationspeed_capable": caps.speed,
        "generationspeed_set": 1.0,
        "pitch_capable": caps.pitch,
        "pitch_set": 0,
        "repetitionpenalty_capable": caps.repetition_penalty,
        "repetitionpenalty_set": 10.0,
        "streaming_capable": caps.streaming,
        "temperature_capable": caps.temperature,
        "temperature_set": 0.75,
        "ttsengines_installed": True,
        "languages_capable": len(slot.engine.languages()) > 1,
        "multivoice_capable": caps.multivoice,
        "multimodel_capable": len(state.hub.names) > 1,
        "finetuned_model": False,
    }


@router.post("/api/tts-generate")
async def tts_generate(request: Request, state: State) -> Any:
    try:
        form = await fields(request)
        raw = str(form.get("text_input") or "")
        mode = form.get("text_filtering")
        voice = form.get("character_voice_gen")
        # Split on the * and " marks first: the filter would remove them.
        turns = [
            Turn(text=filter_text(t.text, mode), voice=t.voice)
            for t in narrator_turns(
                raw,
                voice,
                form.get("narrator_voice_gen"),
                str(form.get("narrator_enabled") or "false"),
                str(form.get("text_not_inside") or "character"),
            )
        ]
        turns = [t for t in turns if t.text.strip()]
        text = " ".join(t.text for t in turns) if turns else filter_text(raw, mode)
        if text.strip() and not turns:
            raise InvalidRequest(
                "nothing is left to say: every part of the text is silent", field="text_input"
            )
        plan = await synthesis.plan_job(
            state.hub,
            text=text,
            voice=voice,
            language=form.get("language"),
            speed=number(form.get("speed"), "speed", 1.0),
            fmt="wav",
            options=_options(form),
            turns=turns,
        )
        name = str(form.get("output_file_name") or "output")
        timestamp = flag(form.get("output_file_timestamp", "true"), "output_file_timestamp")
        streaming = flag(form.get("streaming", "false"), "streaming")
        if streaming:
            return await synthesis.respond(
                state, plan, request, stream=True, save_hint=name, timestamp=timestamp
            )
        response = await synthesis.respond(
            state, plan, request, stream=False, save_hint=name, timestamp=timestamp
        )
    except LowvoxError as e:
        return failure(e)
    file = response.headers["x-output-file"]
    return {
        "status": "generate-success",
        "output_file_path": str(state.outputs.find(file)),
        "output_file_url": synthesis.output_url(state.settings, "/audio", file),
        "output_cache_url": synthesis.output_url(state.settings, "/audiocache", file),
    }


@router.api_route("/api/tts-generate-streaming", methods=["GET", "POST"])
async def tts_generate_streaming(request: Request, state: State) -> Any:
    """Streams WAV while also saving it (`X-Output-File-Url` says where)."""
    form = await fields(request)
    plan = await synthesis.plan_job(
        state.hub,
        text=form.get("text"),
        voice=form.get("voice"),
        language=form.get("language"),
        speed=number(form.get("speed"), "speed", 1.0),
        fmt=form.get("format") or "wav",
        engine=form.get("engine"),
    )
    hint = str(form.get("output_file") or "stream_output")
    return await synthesis.respond(state, plan, request, stream=True, save_hint=hint)


@router.put("/api/stop-generation")
async def stop_generation(state: State) -> dict:
    count = state.hub.cancel_all()
    return {"message": "Cancelling current TTS generation", "cancelled": count}


@router.post("/api/reload")
async def reload(state: State, tts_method: str = "") -> Any:
    try:
        slot = await state.hub.reload(tts_method or None)
    except LowvoxError as e:
        return JSONResponse(
            {"status": "model-failure", "error": str(e), "detail": str(e)},
            status_code=getattr(e, "status_code", 500),
        )
    return {"status": "model-success", "engine": slot.name}


async def _engine_setting(state: ServerState, method: str, value: bool) -> None:
    """`Engine.set_low_vram` / `set_fast_path` on the default engine's own thread."""
    slot = await state.hub.get(None)
    setter = getattr(slot.engine, method)
    await slot.scheduler.run(lambda: setter(value))


@router.post("/api/lowvramsetting")
async def low_vram(state: State, new_low_vram_value: str = "") -> dict:
    value = flag(new_low_vram_value, "new_low_vram_value")
    await _engine_setting(state, "set_low_vram", value)
    return {"status": "lowvram-success"}


@router.post("/api/deepspeed")
async def deepspeed(state: State, new_deepspeed_value: str = "") -> dict:
    value = flag(new_deepspeed_value, "new_deepspeed_value")
    await _engine_setting(state, "set_fast_path", value)
    return {"status": "deepspeed-success"}


@router.post("/api/previewvoice/")
@router.post("/api/previewvoice", include_in_schema=False)
async def preview_voice(request: Request, state: State) -> Any:
    try:
        form = await fields(request)
        plan = await synthesis.plan_job(
            state.hub, text=PREVIEW_TEXT, voice=form.get("voice"), fmt="wav"
        )
        response = await synthesis.respond(state, plan, request, stream=False, save_hint="preview")
    except LowvoxError as e:
        return failure(e)
    file = response.headers["x-output-file"]
    return {
        "status": "generate-success",
        "output_file_path": str(state.outputs.find(file)),
        "output_file_url": synthesis.output_url(state.settings, "/audio", file),
    }
