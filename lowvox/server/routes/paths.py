"""A route class for the client-facing APIs: what clients get wrong is a 4xx, named.

- Doubled slashes: a client configured with a base URL that ends in a slash
  (`http://host:7851/v1/`) joins paths as `/v1//audio/speech`; SillyTavern's providers do
  the same with `/api/...`. The route matches its path with each run of slashes as one.
- A JSON body nested too deeply for the parser (Python's `json` gives up after ~1000
  levels) is a 400 that says so, not FastAPI's "error parsing the body"; routes that read
  their body themselves do so through `read_json` and `read_form`, which say the same.
- A client that leaves before its body has arrived raises `ClientDisconnect` wherever the
  body is read; the app's handler (`server/errors.py`) logs it as one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from lowvox.errors import InvalidRequest, LowvoxError

_SLASHES = re.compile(r"/{2,}")

TOO_DEEP = "the JSON body is nested too deeply"


def collapse_slashes(path: str) -> str:
    """`path` with each run of slashes as one: the path a route matches."""
    return _SLASHES.sub("/", path) if "//" in path else path


async def read_json(request: Request, problem: str = "the body is not valid JSON") -> Any:
    """The request's body as JSON; `problem` (a 400) when it is not JSON, and a 400 that
    says so when it is nested deeper than the parser goes."""
    try:
        return await request.json()
    except ValueError as e:  # not JSON, or not UTF-8
        raise InvalidRequest(problem, field="body") from e
    except RecursionError as e:
        raise InvalidRequest(TOO_DEEP, field="body") from e


async def read_form(
    request: Request, problem: str = "could not read the form", **limits: Any
) -> FormData:
    """The request's form (urlencoded or multipart, within Starlette's `limits`); a
    malformed one is a 400: `problem` and the parser's complaint."""
    try:
        return await request.form(**limits)
    except (ClientDisconnect, LowvoxError):  # the client left; the body broke a limit
        raise
    except Exception as e:  # noqa: BLE001 -- the multipart parser's many failures
        raise InvalidRequest(f"{problem}: {e}", field="body") from e


class TolerantRoute(APIRoute):
    """An APIRoute that matches `//a///b` as `/a/b` and names a too-deep JSON body."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if "//" in path:
            scope = {**scope, "path": collapse_slashes(path)}
        return super().matches(scope)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as e:
                # FastAPI reports every failure to read a declared body as a 400 "error
                # parsing the body"; two of them are something else.
                if isinstance(e.__cause__, RecursionError):
                    raise InvalidRequest(TOO_DEEP, field="body") from e
                if isinstance(e.__cause__, ClientDisconnect):
                    raise e.__cause__ from None
                raise

        return handle
