"""Every failure becomes a short JSON answer: 4xx naming the problem, 500 without a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from lowvox.errors import LowvoxError
from lowvox.server.routes.paths import collapse_slashes

logger = logging.getLogger(__name__)

# A 503 (an engine starting, reloading or stopping) says when to try again; clients such
# as the OpenAI SDK wait that long instead of failing at once.
UNAVAILABLE_RETRY_AFTER_S = 5


def error_response(
    status: int, message: str, kind: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    # `detail` is what FastAPI clients expect; `error` is the OpenAI shape, so both SDK
    # families show the message. OpenAI's `code` is a string or null (its openapi.yaml,
    # `Error`): typed clients (Rust's async-openai, say) fail to read a number there.
    body = {
        "detail": message,
        "error": {"message": message, "type": kind, "param": field, "code": None},
    }
    return JSONResponse(body, status_code=status, headers=headers)


def retry_headers(exc: Exception, status: int) -> dict[str, str] | None:
    """`Retry-After` for a failure that says when to try again (a 503 always does)."""
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is None and status == 503:
        retry_after = UNAVAILABLE_RETRY_AFTER_S
    return {"Retry-After": str(int(retry_after))} if retry_after is not None else None


def _kind(status: int) -> str:
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


# Pydantic's complaint about a body that is not an object (a list, or text and form bodies,
# which FastAPI does not read as JSON).
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")


def _describe_validation(
    exc: RequestValidationError, content_type: str = ""
) -> tuple[str, str | None]:
    problems = []
    first_field = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form")]
        name = ".".join(loc) or "request"
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
            name = "body"
        elif tuple(err.get("loc", ())) == ("body",) and err.get("type") in _NOT_AN_OBJECT:
            name = "body"
            if "json" in content_type.lower():
                msg = "the body must be a JSON object"
            else:
                # `curl -d` sends form-urlencoded unless told otherwise.
                sent = repr(content_type[:60]) if content_type else "none"
                msg = f"send a JSON object with Content-Type: application/json (got {sent})"
        first_field = first_field or name
        problems.append(f"{name}: {msg}")
    return "invalid request: " + "; ".join(problems[:5]), first_field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LowvoxError)
    async def _lowvox(request: Request, exc: LowvoxError) -> JSONResponse:
        status = int(getattr(exc, "status_code", 500) or 500)
        headers = retry_headers(exc, status)
        if status >= 500:
            logger.warning("%s %s failed: %s", request.method, request.url.path, exc)
        return error_response(status, str(exc), _kind(status), getattr(exc, "field", None), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _describe_validation(exc, request.headers.get("content-type", ""))
        # OpenAI answers a missing or mistyped field with 400, never 422, and its SDKs
        # raise BadRequestError only for 400: its routes do the same here.
        status = 400 if collapse_slashes(request.url.path).startswith("/v1/") else 422
        return error_response(status, message, "invalid_request_error", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"not found: {request.url.path}"
        return error_response(
            exc.status_code, message, _kind(exc.status_code), headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody reads the answer; one line says what happened (no traceback, no 500).
        logger.info(
            "client left before its request was read: %s %s", request.method, request.url.path
        )
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, "internal server error (see the server log)", "server_error")
