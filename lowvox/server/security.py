"""Request gatekeeping as plain ASGI middleware: the optional API key and a body size limit."""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from lowvox.errors import InvalidRequest
from lowvox.server.errors import error_response

# The page itself and its assets hold no data; the page asks for the key and sends it.
_OPEN_PATHS = ("/", "/favicon.ico")
_OPEN_PREFIXES = ("/static/",)


class ApiKeyMiddleware:
    """Rejects requests without the configured key. CORS preflights pass (they carry no
    credentials by design); `?api_key=` works for <audio src> URLs that cannot set headers."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    def _presented(self, scope: Scope) -> bytes | None:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        if b"x-api-key" in headers:
            return headers[b"x-api-key"].strip()
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "api_key" in query:
            return query["api_key"][0].encode()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        presented = self._presented(scope)
        if presented is not None and hmac.compare_digest(presented, self.key):
            await self.app(scope, receive, send)
            return
        message = "missing API key" if presented is None else "invalid API key"
        answer = error_response(
            401, message, "authentication_error", headers={"WWW-Authenticate": "Bearer"}
        )
        await answer(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses request bodies over `limit` bytes (413) before anything reads them whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _refuse(scope, receive, send, self.limit)
            return
        seen = 0

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(f"request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


class BodyTooLarge(InvalidRequest):
    status_code = 413


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    message = f"request body is over the limit of {limit} bytes"
    await error_response(413, message, "invalid_request_error")(scope, receive, send)
