"""AllTalk's API (v1 and v2 clients: SillyTavern, text-generation-webui, scripts).

AllTalk answers generation requests with JSON pointing at a saved file; failures keep its
`{"status": "generate-failure", "error": ...}` shape but with a 4xx/5xx status code.

V1 clients (SillyTavern 1.12 and older, SillyTavern's "AllTalk V1" mode) use
`output_file_url` as it is, so it must be absolute; V2 clients put their endpoint in
front of it, so it must be relative. Both are answered in their form (`url_form`).
text-generation-webui's extension sends the same requests in both its modes, so it gets
`//host:port/audio/<file>`, which works either way (`_OwnAddressRoute`).
The form fields are declared in the OpenAPI schema (`openapi_extra`) but read by
`fields`, which takes them as a form, as JSON or from the query, as AllTalk does.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.routing import Match
from starlette.types import Scope

from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.server import responses, synthesis
from lowvox.server.errors import retry_headers
from lowvox.server.narration import Turn, narrator_turns
from lowvox.server.routes import core
from lowvox.server.routes.paths import TolerantRoute, read_form, read_json
from lowvox.server.state import ServerState, State
from lowvox.server.textfront import filter_text

logger = logging.getLogger(__name__)

router = APIRouter(route_class=TolerantRoute)

PREVIEW_TEXT = "Hello, this is a preview of my voice. How does it sound?"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def failure(exc: LowvoxError, status_word: str = "generate-failure") -> JSONResponse:
    """AllTalk's failure shape: `error` (and FastAPI's `detail`) as plain text."""
    status = int(getattr(exc, "status_code", 500) or 500)
    return JSONResponse(
        {"status": status_word, "error": str(exc), "detail": str(exc)},
        status_code=status,
        headers=retry_headers(exc, status),
    )


def flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value if value is not None else "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidRequest(f"{name} must be true or false, not {str(value)[:40]!r}", field=name)


def number(value: Any, name: str, default: float | None) -> float | None:
    if value is None or str(value).strip() == "":
        return default
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a number, not {value!r}", field=name)
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(
            f"{name} must be a number, not {str(value)[:40]!r}", field=name
        ) from None
    if not math.isfinite(out):
        raise InvalidRequest(f"{name} must be a finite number", field=name)
    return out


def text(form: dict[str, Any], name: str, default: str | None = None) -> str | None:
    """A text field: forms send strings; JSON bodies may send numbers too, never objects."""
    value = form.get(name)
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise InvalidRequest(f"{name} must be a string, not {type(value).__name__}", field=name)


async def fields(request: Request) -> dict[str, Any]:
    """Form fields (AllTalk clients send x-www-form-urlencoded), JSON, or the query alone."""
    data: dict[str, Any] = dict(request.query_params)
    ctype = request.headers.get("content-type", "")
    if request.method in ("POST", "PUT") and ("form" in ctype or not ctype):
        form = await read_form(request)
        data.update({k: v for k, v in form.items() if isinstance(v, str)})
    elif "json" in ctype:
        body = await read_json(request)
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


# -- The OpenAPI description of the form fields -------------------------------------------


def _schema(names: dict[str, str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: {"type": "string", "description": doc} for name, doc in names.items()},
        "required": list(required),
    }


def form_body(names: dict[str, str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """`openapi_extra` for a route that reads these string fields as a form or JSON."""
    schema = _schema(names, required)
    return {
        "requestBody": {
            "required": bool(required),
            "content": {
                "application/x-www-form-urlencoded": {"schema": schema},
                "application/json": {"schema": schema},
            },
        }
    }


def query_fields(names: dict[str, str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """`openapi_extra` for a route that reads these string fields from the query."""
    return {
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "description": doc,
                "schema": {"type": "string"},
            }
            for name, doc in names.items()
        ]
    }


GENERATE_FIELDS = {
    "text_input": "the text to speak",
    "text_filtering": "none | standard | html (default standard)",
    "character_voice_gen": "the character's voice",
    "narrator_enabled": "true | false | silent",
    "narrator_voice_gen": "the narrator's voice",
    "text_not_inside": "character | narrator | silent: who says text outside * and quotes",
    "language": "a language code, or auto",
    "output_file_name": "the saved file's name (letters, digits, ._-)",
    "output_file_timestamp": "true | false: make the name unique",
    "streaming": "true | false: answer with the audio itself",
    "speed": "0.25-4",
    "temperature": "sampling temperature (engines that sample)",
    "repetition_penalty": "repetition penalty (engines that sample)",
    "autoplay": "accepted, ignored (AllTalk plays on its own machine)",
    "autoplay_volume": "accepted, ignored",
    "rvccharacter_voice_gen": "accepted, ignored (no RVC)",
    "rvcnarrator_voice_gen": "accepted, ignored (no RVC)",
}
STREAMING_FIELDS = {
    "text": "the text to speak",
    "voice": "the voice",
    "language": "a language code, or auto",
    "output_file": "the saved copy's name (GET: made unique; POST: kept, as AllTalk does)",
    "format": "output format (default wav)",
    "engine": "engine name (default: the server's)",
    "speed": "0.25-4",
}
PREVIEW_FIELDS = {"voice": "the voice to preview"}


# -- V1 and V2 clients ---------------------------------------------------------------------


def client_key(request: Request) -> str:
    host = request.client.host if request.client else ""
    return f"{host}|{request.headers.get('user-agent', '')}"


UrlForm = Literal["absolute", "relative", "network"]

# text-generation-webui's AllTalk extension posts these with every request (its
# `send_and_generate`), RVC off or on; SillyTavern never sends `pitch`.
_TGWUI_FIELDS = ("pitch", "rvccharacter_pitch", "rvcnarrator_pitch")


def url_form(
    request: Request, state: ServerState, form: dict[str, Any], voice: str | None
) -> UrlForm:
    """How this client wants `output_file_url`: absolute (V1), relative (V2) or network.

    What tells: the settings (`alltalk_url_style`), else a browser client's start-up
    calls (SillyTavern asks for /api/rvcvoices in V2 mode only), else how it names the
    voice: SillyTavern 1.12 and older (AllTalk V1 only) add `.wav` to every voice name.
    text-generation-webui's extension sends the same calls and fields in its default mode
    (which puts its server URL in front) and its legacy mode (which writes the URL into
    the chat page as it is), so it gets the one form both resolve: `//host:port/...`
    (a network-path reference, RFC 3986 4.2). Anything else is taken for V2.
    """
    style = state.settings.alltalk_url_style
    if style != "auto":
        return style
    version = state.alltalk_clients.version(client_key(request))
    if version is not None:
        return "absolute" if version == "v1" else "relative"
    if isinstance(voice, str) and voice.strip().lower().endswith(".wav"):
        return "absolute"
    if "origin" not in request.headers and all(k in form for k in _TGWUI_FIELDS):
        return "network"
    return "relative"


def _address(host: str, public_url: str | None) -> str:
    """This server's address as a client reached it: `host[:port][/prefix]`."""
    if public_url:
        parts = urlsplit(public_url)
        return f"{parts.netloc}{parts.path}".rstrip("/")
    return host


def file_urls(request: Request, state: ServerState, name: str, form: UrlForm) -> dict[str, str]:
    public_url = state.settings.public_url
    base = ""
    if form == "absolute":
        base = (public_url or str(request.base_url)).rstrip("/")
    elif form == "network":
        base = "//" + _address(request.url.netloc, public_url)
    return {
        "output_file_url": f"{base}/audio/{name}",
        "output_cache_url": f"{base}/audiocache/{name}",
    }


class _OwnAddressRoute(TolerantRoute):
    """A route whose leading `{address}` must be this server's own address.

    text-generation-webui's default mode joins its server URL and a network-path URL into
    `http://host:port//host:port/audio/<file>`; this serves that path and nothing else.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.NONE:
            return match, child
        address = str(child.get("path_params", {}).get("address", "")).lower()
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        state = getattr(scope["app"].state, "lowvox", None)
        public_url = state.settings.public_url if state is not None else None
        if address not in {host.lower(), _address(host, public_url).lower()}:
            return Match.NONE, {}
        return match, child


async def _own_address_file(name: str, state: State) -> FileResponse:
    return await core.output_file(name, state)


# -- Routes -------------------------------------------------------------------------------

for _folder in ("audio", "audiocache"):
    router.add_api_route(
        f"/{{address:path}}/{_folder}/{{name}}",
        _own_address_file,
        methods=["GET"],
        include_in_schema=False,
        route_class_override=_OwnAddressRoute,
    )


@router.get("/api/rvcvoices")
async def rvc_voices(request: Request, state: State) -> dict:
    state.alltalk_clients.rvc_read(client_key(request))
    return {"status": "success", "rvcvoices": ["Disabled"]}


@router.get("/api/currentsettings")
async def current_settings(request: Request, state: State) -> dict:
    """The engines offered are those that can run here (XTTS without a model is not)."""
    state.alltalk_clients.settings_read(client_key(request), "origin" in request.headers)
    slot = await state.hub.get(None)
    available = await state.hub.available()
    caps = slot.engine.capabilities
    is_xtts = slot.name == "xtts"
    return {
        "manufacturer_name": "lowvox",
        "engines_available": available,
        "current_engine_loaded": slot.name,
        "models_available": [{"name": n, "model_name": n} for n in available],
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
        # The `pitch` field is not passed on (AllTalk's -10..10 is no engine's scale).
        "pitch_capable": False,
        "pitch_set": 0,
        "repetitionpenalty_capable": caps.repetition_penalty,
        "repetitionpenalty_set": 10.0,
        "streaming_capable": caps.streaming,
        "temperature_capable": caps.temperature,
        "temperature_set": 0.75,
        "ttsengines_installed": True,
        "languages_capable": len(slot.engine.languages()) > 1,
        "multivoice_capable": caps.multivoice,
        "multimodel_capable": len(available) > 1,
        "finetuned_model": False,
    }


@router.post(
    "/api/tts-generate", openapi_extra=form_body(GENERATE_FIELDS, required=("text_input",))
)
async def tts_generate(request: Request, state: State) -> Any:
    try:
        form = await fields(request)
        raw = text(form, "text_input", "") or ""
        mode = text(form, "text_filtering")
        voice = text(form, "character_voice_gen")
        # Split on the * and " marks first: the filter would remove them.
        turns = [
            Turn(text=filter_text(t.text, mode), voice=t.voice)
            for t in narrator_turns(
                raw,
                voice,
                text(form, "narrator_voice_gen"),
                text(form, "narrator_enabled") or "false",
                text(form, "text_not_inside") or "character",
            )
        ]
        turns = [t for t in turns if t.text.strip()]
        said = " ".join(t.text for t in turns) if turns else filter_text(raw, mode)
        if said.strip() and not turns:
            raise InvalidRequest(
                "nothing is left to say: every part of the text is silent", field="text_input"
            )
        plan = await synthesis.plan_job(
            state.hub,
            text=said,
            voice=voice,
            language=text(form, "language"),
            speed=number(form.get("speed"), "speed", 1.0),
            fmt="wav",
            options=_options(form),
            turns=turns,
        )
        hint = text(form, "output_file_name") or "output"
        timestamp = flag(form.get("output_file_timestamp", "true"), "output_file_timestamp")
        if flag(form.get("streaming", "false"), "streaming"):
            return await responses.respond(
                state, plan, request, stream=True, save_hint=hint, timestamp=timestamp
            )
        name = await responses.save(state, plan, request, hint, timestamp=timestamp)
    except LowvoxError as e:
        return failure(e)
    return {
        "status": "generate-success",
        "output_file_path": str(state.outputs.find(name)),
        **file_urls(request, state, name, url_form(request, state, form, voice)),
    }


async def _streaming_job(request: Request, state: ServerState) -> tuple[synthesis.Plan, str]:
    """The job the streaming route's fields ask for, and the name its file is saved under."""
    form = await fields(request)
    plan = await synthesis.plan_job(
        state.hub,
        text=text(form, "text"),
        voice=text(form, "voice"),
        language=text(form, "language"),
        speed=number(form.get("speed"), "speed", 1.0),
        fmt=text(form, "format") or "wav",
        engine=text(form, "engine"),
    )
    return plan, text(form, "output_file") or "stream_output"


@router.get(
    "/api/tts-generate-streaming",
    openapi_extra=query_fields(STREAMING_FIELDS, required=("text",)),
)
async def tts_generate_streaming(request: Request, state: State) -> Any:
    """Streams the audio while also saving it (`X-Output-File-Url` says where)."""
    try:
        plan, hint = await _streaming_job(request, state)
        return await responses.respond(state, plan, request, stream=True, save_hint=hint)
    except LowvoxError as e:
        return failure(e)


@router.post(
    "/api/tts-generate-streaming",
    openapi_extra=form_body(STREAMING_FIELDS, required=("text",)),
)
async def tts_generate_streaming_post(request: Request, state: State) -> Any:
    """AllTalk's POST form does not stream: it saves the file under the name asked for
    (made safe) and answers `{"output_file_path": name}`, served at `/audio/<name>`."""
    try:
        plan, hint = await _streaming_job(request, state)
        name = await responses.save(state, plan, request, hint, timestamp=False)
    except LowvoxError as e:
        return failure(e)
    return {"output_file_path": name}


@router.put("/api/stop-generation")
async def stop_generation(state: State) -> dict:
    count = state.hub.cancel_all()
    return {"message": "Cancelling current TTS generation", "cancelled": count}


@router.post("/api/reload")
async def reload(state: State, tts_method: str = "") -> Any:
    try:
        slot = await state.hub.reload(tts_method or None)
    except LowvoxError as e:
        return failure(e, "model-failure")
    return {"status": "model-success", "engine": slot.name}


async def _engine_setting(state: ServerState, method: str, value: bool) -> None:
    """`Engine.set_low_vram` / `set_fast_path` on the default engine's own thread."""
    slot = await state.hub.get(None)
    setter = getattr(slot.engine, method)
    try:
        await slot.scheduler.run(lambda: setter(value))
    except LowvoxError as e:
        if slot.retired:  # a reload took the engine away meanwhile
            raise slot.restarting() from e
        raise


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


@router.post("/api/previewvoice/", openapi_extra=form_body(PREVIEW_FIELDS, required=("voice",)))
@router.post("/api/previewvoice", include_in_schema=False)
async def preview_voice(request: Request, state: State) -> Any:
    try:
        form = await fields(request)
        voice = text(form, "voice")
        plan = await synthesis.plan_job(state.hub, text=PREVIEW_TEXT, voice=voice, fmt="wav")
        name = await responses.save(state, plan, request, "preview")
    except LowvoxError as e:
        return failure(e)
    urls = file_urls(request, state, name, url_form(request, state, form, voice))
    return {
        "status": "generate-success",
        "output_file_path": str(state.outputs.find(name)),
        "output_file_url": urls["output_file_url"],
    }
