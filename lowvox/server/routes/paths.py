"""A route class for the client-facing APIs: what clients get wrong is a 4xx, named.

- Doubled slashes: a client configured with a base URL that ends in a slash
  (`http://host:7851/v1/`) joins paths as `/v1//audio/speech`; SillyTavern's providers do
  the same with `/api/...`. The route matches its path with each run of slashes as one.
- A JSON body nested too deeply for the parser (Python's `json` gives up after ~1000
  levels) is a 400 that says so, not FastAPI's "error parsing the body".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from lowvox.errors import InvalidRequest

_SLASHES = re.compile(r"/{2,}")


class TolerantRoute(APIRoute):
    """An APIRoute that matches `//a///b` as `/a/b` and names a too-deep JSON body."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if "//" in path:
            scope = {**scope, "path": _SLASHES.sub("/", path)}
        return super().matches(scope)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as e:
                if isinstance(e.__cause__, RecursionError):
                    raise InvalidRequest("the JSON body is nested too deeply", field="body") from e
                raise

        return handle
