"""Server test helpers: a fake engine and a real uvicorn server on a free 127.0.0.1 port.

(Named uniquely, not `conftest`, so that test files can import it whatever else runs.)
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from lowvox.engines.base import AudioChunk, Engine, EngineCapabilities, SynthesisRequest, VoiceInfo
from lowvox.errors import UnknownEngine
from lowvox.server.app import create_app, make_server, server_config
from lowvox.settings import Settings

FAKE_RATE = 24_000
CHUNK_SECONDS = 0.1
FAKE_VOICES = ("alpha", "beta", "gamma")


def fake_frequency(voice: str, text: str) -> float:
    """Each (voice, text) pair gets its own pitch, so swapped audio is detectable."""
    base = {"alpha": 200.0, "beta": 300.0, "gamma": 400.0}[voice]
    h = int(hashlib.sha256(text.encode()).hexdigest()[:6], 16) % 97
    return base + h


def fake_chunks(text: str) -> int:
    """One 0.1 s chunk per word: duration is predictable from the text."""
    return max(1, len(text.split()))


class FakeEngine(Engine):
    """Deterministic sine per voice and text, produced in 0.1 s chunks with a short pause.

    `gate` (set by default) lets a test hold the engine before its last chunk, to observe
    streaming and cancellation without timing assumptions.
    """

    name = "fake"
    capabilities = EngineCapabilities(streaming=True, cloning=False)

    def __init__(self, chunk_delay: float = 0.01) -> None:
        self.chunk_delay = chunk_delay
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.finished_jobs: list[str] = []
        self.languages_seen: list[str | None] = []
        self.cancelled_jobs: list[str] = []
        self.loaded = False
        self.warmed = False
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    @property
    def sample_rate(self) -> int:
        return FAKE_RATE

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(id=v, name=v, language="en") for v in FAKE_VOICES]

    def languages(self) -> list[str]:
        return ["en", "de", "fr"]

    def load(self) -> None:
        self.loaded = True

    def warmup(self) -> None:
        self.warmed = True

    # AllTalk's runtime switches: remembered, as an engine that has them would.
    _low_vram = False
    _fast_path = False

    @property
    def low_vram(self) -> bool:
        return self._low_vram

    @property
    def fast_path(self) -> bool:
        return self._fast_path

    def set_low_vram(self, enabled: bool) -> None:
        self._low_vram = enabled

    def set_fast_path(self, enabled: bool) -> None:
        self._fast_path = enabled

    def synthesize_stream(self, request: SynthesisRequest, cancel=None):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.started.set()
            self.languages_seen.append(request.language)
            freq = fake_frequency(request.voice, request.text) * request.speed
            n = int(CHUNK_SECONDS * FAKE_RATE)
            count = fake_chunks(request.text)
            for i in range(count):
                if i == count - 1:
                    while not self.gate.wait(0.02):
                        if cancel is not None and cancel.is_set():
                            self.cancelled_jobs.append(request.text)
                            return
                if cancel is not None and cancel.is_set():
                    self.cancelled_jobs.append(request.text)
                    return
                t = (np.arange(n) + i * n) / FAKE_RATE
                try:
                    yield AudioChunk(
                        (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), FAKE_RATE
                    )
                except GeneratorExit:
                    # The scheduler may see the cancel first and close the stream here.
                    if cancel is not None and cancel.is_set():
                        self.cancelled_jobs.append(request.text)
                    raise
                time.sleep(self.chunk_delay)
            self.finished_jobs.append(request.text)
        finally:
            with self._lock:
                self.active -= 1


class FakeFactory:
    """Engine factory for create_app: `fake` is every engine name the hub knows."""

    def __init__(self, **kwargs) -> None:
        self.engines: dict[str, FakeEngine] = {}
        self.kwargs = kwargs

    def __call__(self, name: str, settings: Settings) -> Engine:
        if name not in ("espeak", "xtts"):
            raise UnknownEngine(name, ["espeak", "xtts"])
        engine = self.engines.get(name) or FakeEngine(**self.kwargs)
        self.engines[name] = engine
        return engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, settings: Settings, factory=None) -> None:
        self.settings = settings
        self.factory = factory
        self.app = create_app(settings, factory)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def engine(self) -> FakeEngine:
        return self.factory.engines["espeak"]

    @property
    def state(self):
        return self.app.state.lowvox

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    timeout = 30.0

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=self.timeout, **kwargs)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Whether `condition()` holds within `timeout` seconds (polled every 10 ms): for what
    a server does on its own threads. A test asserts the result; the timeout only bounds a
    test that would otherwise hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def make_settings(tmp: Path, **overrides) -> Settings:
    return Settings(**{"home": tmp, "engine": "espeak", "voice": None, **overrides})


@contextlib.contextmanager
def live_server(tmp: Path, factory=None, **overrides) -> Iterator[LiveServer]:
    factory = factory or FakeFactory()
    with LiveServer(make_settings(tmp, **overrides), factory) as server:
        yield server


class ProductionServer(LiveServer):
    """A LiveServer run through `server_config`: the header and send timeouts, the
    connection limit, the socket's peer as the client and the access log's redaction, as
    `lowvox serve`."""

    def __init__(self, settings: Settings, factory=None) -> None:
        super().__init__(settings, factory)
        config = server_config(
            self.app, settings.model_copy(update={"host": "127.0.0.1", "port": self.port})
        )
        self.server = make_server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


@contextlib.contextmanager
def production_server(tmp: Path, factory=None, **overrides) -> Iterator[ProductionServer]:
    factory = factory or FakeFactory()
    with ProductionServer(make_settings(tmp, **overrides), factory) as server:
        yield server


def st_form(text: str, voice: str, **extra: str) -> dict[str, str]:
    """What SillyTavern's AllTalk provider posts to /api/tts-generate."""
    return {
        "text_input": text,
        "text_filtering": "standard",
        "character_voice_gen": voice,
        "narrator_enabled": "false",
        "narrator_voice_gen": "Please set a voice",
        "text_not_inside": "narrator",
        "language": "en",
        "output_file_name": "st_output",
        "output_file_timestamp": "true",
        "autoplay": "false",
        "autoplay_volume": "0.8",
        **extra,
    }
