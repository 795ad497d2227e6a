"""What the running server holds, in one object on `app.state.lowvox`."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from lowvox.jobs.service import JobService
from lowvox.server.engines import EngineHub
from lowvox.server.outputs import OutputStore
from lowvox.settings import Settings
from lowvox.voices.store import VoiceStore


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

    def remember(self, gen: Generation) -> None:
        self.recent.appendleft(gen)


def get_state(request: Request) -> ServerState:
    return request.app.state.lowvox


# Route parameter type: `state: State` injects the server state.
State = Annotated[ServerState, Depends(get_state)]
