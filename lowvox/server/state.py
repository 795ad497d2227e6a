"""What the running server holds, in one object on `app.state.lowvox`."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from lowvox.jobs.service import JobService
from lowvox.server.engines import EngineHub
from lowvox.server.outputs import OutputStore
from lowvox.settings import Settings
from lowvox.voices.store import VoiceLimits, VoiceStore


@dataclass
class Generation:
    """A finished generation, for the web page's "recent" list."""

    file: str
    url: str
    engine: str
    voice: str | None
    text: str
    created: float = field(default_factory=time.time)


@dataclass
class _Startup:
    settings_at: float | None = None  # when it last read /api/currentsettings
    from_page: bool = False  # ... from a web page (the request had an Origin)
    rvc_at: float | None = None  # when it last read /api/rvcvoices


class AllTalkClients:
    """What each AllTalk client's start-up calls say about the API version it speaks.

    SillyTavern's AllTalk provider (in the browser) reads `/api/currentsettings` when it
    starts or reloads; in its "AllTalk V2" mode it asks for `/api/rvcvoices` right after
    (V2 servers have RVC), in "AllTalk V1" mode it never does. V1 clients use
    `output_file_url` as it is (it must be absolute), V2 clients put their endpoint in
    front of it (it must be relative). Scripts (no Origin) are never taken for V1 this
    way. Kept per client address and User-Agent, for the most recent `limit` clients.
    """

    # How far apart the two start-up reads of a V2 client may be, either way round.
    WINDOW_S = 10.0

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._clients: collections.OrderedDict[str, _Startup] = collections.OrderedDict()

    def _get(self, key: str) -> _Startup:
        seen = self._clients.pop(key, None) or _Startup()
        self._clients[key] = seen
        while len(self._clients) > self.limit:
            self._clients.popitem(last=False)
        return seen

    def settings_read(self, key: str, from_page: bool) -> None:
        seen = self._get(key)
        seen.settings_at, seen.from_page = time.monotonic(), from_page

    def rvc_read(self, key: str) -> None:
        self._get(key).rvc_at = time.monotonic()

    def version(self, key: str) -> str | None:
        """ "v1" or "v2" from a web page's start-up; None when none was seen."""
        seen = self._clients.get(key)
        if seen is None or seen.settings_at is None or not seen.from_page:
            return None
        if seen.rvc_at is not None and seen.rvc_at >= seen.settings_at - self.WINDOW_S:
            return "v2"
        return "v1"


@dataclass
class ServerState:
    settings: Settings
    hub: EngineHub
    outputs: OutputStore
    voices: VoiceStore
    jobs: JobService
    # Values set through xtts-api-server's /set_tts_settings, applied to its later requests.
    tts_options: dict[str, Any] = field(default_factory=dict)
    recent: collections.deque[Generation] = field(
        default_factory=lambda: collections.deque(maxlen=50)
    )
    alltalk_clients: AllTalkClients = field(default_factory=AllTalkClients)
    # Voice previews being made (cache path -> task), shared by the requests that wait.
    previews: dict[str, asyncio.Task] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The library's limits come from the same settings as everything else.
        self.voices.limits = VoiceLimits.from_settings(self.settings)

    def remember(self, gen: Generation) -> None:
        self.recent.appendleft(gen)


def get_state(request: Request) -> ServerState:
    return request.app.state.lowvox


# Route parameter type: `state: State` injects the server state.
State = Annotated[ServerState, Depends(get_state)]
