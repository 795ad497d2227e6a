"""Home Assistant's Wyoming protocol, driven by the `wyoming` package's own client against a
real server (HTTP and Wyoming in one process, one fake engine behind both)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import numpy as np
import pytest
import soundfile as sf
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event, write_event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from lowvox.cli import build_parser
from lowvox.engines.base import EngineCapabilities, VoiceInfo
from lowvox.errors import LowvoxError, UnknownEngine
from lowvox.server import wyoming as wyoming_server
from lowvox.server.engines import EngineHub
from lowvox.server.synthesis import plan_job
from lowvox.server.wyoming import (
    Announcer,
    add_text,
    max_event_bytes,
    resolve_target,
    split_complete,
)
from lowvox.settings import load_settings
from tests.server.srv_audio import decode, dominant_frequency
from tests.server.srv_fixtures import (
    CHUNK_SECONDS,
    FAKE_RATE,
    FakeEngine,
    FakeFactory,
    LiveServer,
    fake_chunks,
    fake_frequency,
    free_port,
    live_server,
    make_settings,
)

# Guards against a hang, not a timing assertion: every answer here comes in milliseconds.
READ_TIMEOUT_S = 10.0


class LibraryEngine(FakeEngine):
    """The fake engine, with library voices joining its list once uploaded (as XTTS's do)."""

    capabilities = EngineCapabilities(streaming=True, cloning=True)

    def __init__(self) -> None:
        super().__init__()
        self.library: list[str] = []

    def prepare_voice(self, name, clips) -> None:
        self.library.append(name)

    def voices(self) -> list[VoiceInfo]:
        return super().voices() + [VoiceInfo(id=n, name=n, kind="cloned") for n in self.library]


class LibraryFactory(FakeFactory):
    def __call__(self, name, settings):
        if name not in ("espeak", "xtts"):
            raise UnknownEngine(name, ["espeak", "xtts"])
        return self.engines.setdefault(name, LibraryEngine())


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> LiveServer:
    tmp = tmp_path_factory.mktemp("wyoming")
    with live_server(tmp, LibraryFactory(), wyoming=True, wyoming_port=free_port()) as s:
        yield s


@pytest.fixture(autouse=True)
def _open_gate(server):
    server.engine.gate.set()
    yield
    server.engine.gate.set()


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def connect(server: LiveServer) -> AsyncIterator[AsyncTcpClient]:
    client = AsyncTcpClient("127.0.0.1", server.settings.wyoming_port, 5, READ_TIMEOUT_S)
    async with client:
        yield client


async def send(client: AsyncTcpClient, *events) -> None:
    for e in events:
        await client.write_event(e if isinstance(e, Event) else e.event())


async def read_until(client: AsyncTcpClient, done: Callable[[Event], bool]) -> list[Event]:
    events = []
    while True:
        event = await client.read_event()
        assert event is not None, f"connection closed after {[e.type for e in events]}"
        events.append(event)
        if done(event):
            return events


def is_type(cls) -> Callable[[Event], bool]:
    return lambda e: cls.is_type(e.type)


def segments(events: list[Event]) -> list[np.ndarray]:
    """The audio between each audio-start and audio-stop, as float samples."""
    out, parts = [], None
    for e in events:
        if AudioStart.is_type(e.type):
            start = AudioStart.from_event(e)
            assert (start.rate, start.width, start.channels) == (FAKE_RATE, 2, 1)
            parts = []
        elif AudioChunk.is_type(e.type):
            assert parts is not None, "audio-chunk before audio-start"
            parts.append(AudioChunk.from_event(e).audio)
        elif AudioStop.is_type(e.type):
            out.append(np.frombuffer(b"".join(parts), "<i2").astype(np.float32) / 32768)
            parts = None
    return out


def assert_speaks(samples: np.ndarray, voice: str, text: str) -> None:
    assert len(samples) == round(fake_chunks(text) * CHUNK_SECONDS * FAKE_RATE), text
    assert abs(dominant_frequency(samples, FAKE_RATE) - fake_frequency(voice, text)) < 5, text


async def describe(client: AsyncTcpClient) -> Info:
    await send(client, Describe())
    events = await read_until(client, is_type(Info))
    return Info.from_event(events[-1])


def test_describe_lists_the_engine_voices_and_streaming(server):
    async def main() -> Info:
        async with connect(server) as c:
            return await describe(c)

    info = run(main())
    assert [p.name for p in info.tts] == ["espeak"]  # the default engine, the one running
    program = info.tts[0]
    assert program.installed and program.supports_synthesize_streaming
    voices = {v.name: v for v in program.voices}
    assert {"alpha", "beta", "gamma"} <= set(voices)
    assert voices["alpha"].languages == ["en"]


def test_synthesize_sends_audio_as_it_is_made(server):
    text = "Good evening from the kitchen"

    async def main() -> list[Event]:
        async with connect(server) as c:
            await send(c, Synthesize(text=text, voice=SynthesizeVoice(name="gamma")))
            return await read_until(c, is_type(AudioStop))

    events = run(main())
    assert AudioStart.is_type(events[0].type)
    # One event per engine chunk: audio goes out as it is made, not after the whole text.
    assert sum(AudioChunk.is_type(e.type) for e in events) == fake_chunks(text)
    (audio,) = segments(events)
    assert_speaks(audio, "gamma", text)


def test_voice_by_language_takes_that_language(server):
    text = "Which voice speaks English"

    async def main() -> list[Event]:
        async with connect(server) as c:
            await send(c, Synthesize(text=text, voice=SynthesizeVoice(language="en_US")))
            return await read_until(c, is_type(AudioStop))

    (audio,) = segments(run(main()))
    assert_speaks(audio, "alpha", text)  # the engine's first English voice


def test_streamed_text_is_spoken_sentence_by_sentence(server):
    words = ["Hello", "there", "friend.", "How", "are", "you", "today?", "Fine", "thanks"]
    sentences = ["Hello there friend.", "How are you today?", "Fine thanks"]

    async def main() -> tuple[list[Event], list[Event]]:
        async with connect(server) as c:
            await send(c, SynthesizeStart(voice=SynthesizeVoice(name="beta")))
            await send(
                c,
                *(SynthesizeChunk(text=w if i == 0 else " " + w) for i, w in enumerate(words[:4])),
            )
            # "How" ended the first sentence: its audio comes while the text still arrives.
            early = await read_until(c, is_type(AudioChunk))
            await send(c, *(SynthesizeChunk(text=" " + w) for w in words[4:]))
            # What clients send for servers that cannot stream: ignored inside a stream.
            await send(c, Synthesize(text=" ".join(words), voice=SynthesizeVoice(name="beta")))
            await send(c, SynthesizeStop())
            rest = await read_until(c, is_type(SynthesizeStopped))
            return early, rest

    early, rest = run(main())
    assert AudioStart.is_type(early[0].type)
    spoken = segments(early + rest)
    assert len(spoken) == len(sentences)
    for audio, sentence in zip(spoken, sentences, strict=True):
        assert_speaks(audio, "beta", sentence)


def test_unknown_voice_and_empty_text_are_errors_and_the_connection_stays(server):
    async def main() -> tuple[list[Event], list[Event], list[Event]]:
        async with connect(server) as c:
            await send(c, Synthesize(text="Hello there", voice=SynthesizeVoice(name="nobody")))
            unknown = await read_until(c, is_type(Error))
            await send(c, Synthesize(text="   "))
            empty = await read_until(c, is_type(Error))
            await send(
                c, Synthesize(text="Still here for you", voice=SynthesizeVoice(name="alpha"))
            )
            after = await read_until(c, is_type(AudioStop))
            return unknown, empty, after

    unknown, empty, after = run(main())
    assert [e.type for e in unknown] == ["error"]  # no audio-start for a refused request
    assert "nobody" in Error.from_event(unknown[0]).text
    assert "empty" in Error.from_event(empty[-1]).text
    (audio,) = segments(after)
    assert_speaks(audio, "alpha", "Still here for you")


def test_a_failed_one_shot_ends_the_connection_of_a_client_that_waits(server, monkeypatch):
    """Home Assistant's one-shot `synthesize`: it ignores `error` events and reads until
    audio-stop or the connection's end. A client that sends nothing after its request failed
    is closed (soon, not after the 5-minute idle limit), so such a client learns it failed."""
    monkeypatch.setattr(wyoming_server, "AFTER_ERROR_S", 0.2)

    async def main() -> list[str | None]:
        async with connect(server) as c:
            await send(c, Synthesize(text="Hello there", voice=SynthesizeVoice(name="nobody")))
            seen: list[str | None] = []
            while True:  # as Home Assistant reads
                event = await asyncio.wait_for(c.read_event(), READ_TIMEOUT_S)
                seen.append(None if event is None else event.type)
                if event is None or AudioStop.is_type(event.type):
                    return seen

    assert run(main()) == ["error", None]


@pytest.mark.parametrize(
    ("language", "voice"),
    [("en_US", "en-us"), ("en", "en-us"), ("fr", "fr"), ("fr_CA", "fr"), ("es_MX", "es-419")],
)
def test_a_language_speaks_with_its_own_espeak_voice(tmp_path, language, voice):
    """The real espeak engine, whose voices are regional: a language picks the voice of
    exactly that region, or the engine's main voice for it, never the first accent listed
    (Caribbean English for en_US, Belgian French for fr). Checked on the planned job: the
    voice the engine is given (espeak's audio differs a little from run to run)."""
    try:
        from lowvox.engines.espeak import EspeakEngine

        EspeakEngine().load()
    except (ImportError, LowvoxError, OSError) as e:
        pytest.skip(f"espeak is not available: {e}")

    async def main() -> str | None:
        hub = EngineHub(make_settings(tmp_path))
        try:
            target = await resolve_target(hub, SynthesizeVoice(language=language), None)
            plan = await plan_job(
                hub, text="Hello.", voice=target.voice, language=target.language, fmt="pcm"
            )
            return plan.segments[0].voice
        finally:
            await hub.close()

    assert run(main()) == voice


def test_a_stream_with_an_unknown_voice_errors_once_and_still_stops(server):
    async def main() -> list[Event]:
        async with connect(server) as c:
            await send(c, SynthesizeStart(voice=SynthesizeVoice(name="nobody")))
            await send(c, SynthesizeChunk(text="One sentence here. Another one there. "))
            await send(c, SynthesizeStop())
            return await read_until(c, is_type(SynthesizeStopped))

    events = run(main())
    assert [e.type for e in events] == ["error", "synthesize-stopped"]


def test_malformed_or_oversized_events_close_only_that_connection(server):
    limit = server.settings.max_text_chars

    async def refused(*events) -> list[Event | None]:
        async with connect(server) as c:
            await send(c, *events)
            return [await c.read_event(), await c.read_event()]

    async def main() -> list[list[Event | None]]:
        return [
            await refused(Event(type="synthesize", data={"text": 42})),
            await refused(Event(type="synthesize", data={"text": "x" * max_event_bytes(limit)})),
            # A stream that never ends a sentence may not grow past the text limit.
            await refused(SynthesizeStart(), SynthesizeChunk(text="word " * (limit // 5 + 10))),
        ]

    for error, end in run(main()):
        assert error is not None and Error.is_type(error.type)
        assert end is None  # closed after saying why
    # The server itself carries on.
    test_synthesize_sends_audio_as_it_is_made(server)


def test_deeply_nested_json_is_refused_with_an_error(server):
    # Within the size limits, but past the JSON decoder's recursion limit: hand-written
    # frames, since the package's own writer cannot even encode such an event.
    deep = b"[" * 20_000 + b"]" * 20_000
    frames = [
        b'{"type": "describe", "data": {"x": ' + deep + b"}}\n",
        b'{"type": "describe", "data_length": %d}\n' % (len(deep) + 7) + b'{"x": ' + deep + b"}",
    ]

    async def refused(frame: bytes) -> list[Event | None]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.settings.wyoming_port)
        try:
            writer.write(frame)
            await writer.drain()
            return [
                await asyncio.wait_for(async_read_event(reader), READ_TIMEOUT_S) for _ in range(2)
            ]
        finally:
            writer.close()

    for frame in frames:
        error, end = run(refused(frame))
        assert error is not None and Error.is_type(error.type), frame[:40]
        assert "nested too deeply" in Error.from_event(error).text
        assert end is None  # closed after saying why
    test_synthesize_sends_audio_as_it_is_made(server)


async def describe_when_served(server: LiveServer) -> Info:
    """Describe on a new connection, retried while the server is still full: it notices
    closed connections on its own time."""
    deadline = time.monotonic() + READ_TIMEOUT_S
    while True:
        async with connect(server) as c:
            await send(c, Describe())
            event = await c.read_event()
        if event is not None and Info.is_type(event.type):
            return Info.from_event(event)
        assert time.monotonic() < deadline, "the server stayed full"
        await asyncio.sleep(0.02)


def test_connections_are_limited(server):
    async def main() -> tuple[Event | None, Info]:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(connect(server)) for _ in range(16)]
            for c in clients:
                await describe(c)  # each one is being served
            async with connect(server) as extra:
                refused = await extra.read_event()
            await clients[0].disconnect()
            info = await describe_when_served(server)
        await describe_when_served(server)  # the others' places are free again too
        return refused, info

    refused, info = run(main())
    assert refused is not None and "too many connections" in Error.from_event(refused).text
    assert info.tts  # a freed place is taken again


def test_disconnect_mid_stream_cancels_the_job(server):
    engine = server.engine
    text = "Hold this sentence please."
    engine.gate.clear()  # the engine stops before its last chunk until the gate opens

    async def main() -> None:
        async with connect(server) as c:
            await send(c, SynthesizeStart(voice=SynthesizeVoice(name="alpha")))
            await send(c, SynthesizeChunk(text=text + " "))
            await read_until(c, is_type(AudioChunk))  # the job is running

    run(main())
    deadline = time.monotonic() + 10
    while text not in engine.cancelled_jobs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert text in engine.cancelled_jobs
    assert text not in engine.finished_jobs


def test_a_stream_cut_short_by_a_reload_says_the_engine_restarts(server):
    # Not "generation cancelled" (what the client would take for a stop it never asked
    # for): the engine is restarting, and when to try again, as HTTP's 503 says.
    server.engine.gate.clear()

    async def main() -> list[Event]:
        async with connect(server) as c:
            await send(c, SynthesizeStart(voice=SynthesizeVoice(name="alpha")))
            await send(c, SynthesizeChunk(text="Cut this sentence short please. "))
            await read_until(c, is_type(AudioChunk))  # the job is running
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                assert (await http.post("/api/reload")).json()["status"] == "model-success"
            return await read_until(c, is_type(Error))

    events = run(main())
    assert any(AudioStop.is_type(e.type) for e in events)
    error = Error.from_event(events[-1])
    assert error.code == "EngineRestarting" and "restarting" in error.text, error


def test_stopping_the_server_ends_connections_and_their_jobs(tmp_path):
    port = free_port()
    text = "A sentence held at shutdown."
    running = threading.Event()

    async def hold() -> None:
        async with AsyncTcpClient("127.0.0.1", port, 5, READ_TIMEOUT_S) as c:
            await send(c, SynthesizeStart(), SynthesizeChunk(text=text + " "))
            await read_until(c, is_type(AudioChunk))
            running.set()
            while await c.read_event() is not None:  # until the server closes it
                pass

    with live_server(tmp_path, wyoming=True, wyoming_port=port) as s:
        s.engine.gate.clear()
        client = threading.Thread(target=lambda: run(hold()))
        client.start()
        assert running.wait(READ_TIMEOUT_S)
    client.join(READ_TIMEOUT_S)
    assert not client.is_alive()
    assert text in s.engine.cancelled_jobs


@contextlib.contextmanager
def a_client_that_reads_nothing(port: int, text: str) -> Iterator[socket.socket]:
    """A client that asks for `text` and then reads none of its audio: a small receive
    buffer, so the server's writes back up once a few hundred kilobytes are in flight."""
    frame = io.BytesIO()
    write_event(Synthesize(text=text).event(), frame)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(frame.getvalue())
        yield sock
    finally:
        sock.close()


def wait_for_cancel(engine: FakeEngine, text: str) -> None:
    deadline = time.monotonic() + READ_TIMEOUT_S
    while text not in engine.cancelled_jobs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert text in engine.cancelled_jobs
    assert text not in engine.finished_jobs


def test_a_client_that_reads_nothing_is_closed_and_its_job_cancelled(tmp_path, monkeypatch):
    monkeypatch.setattr(wyoming_server, "IDLE_TIMEOUT_S", 0.5)  # seconds without reading
    port = free_port()
    text = "word " * 3000  # megabytes of audio, far more than the socket buffers hold
    factory = FakeFactory(chunk_delay=0)
    with live_server(tmp_path, factory, wyoming=True, wyoming_port=port) as s:
        s.engine.gate.clear()  # the job waits before its last chunk: it never ends alone
        try:
            with a_client_that_reads_nothing(port, text) as sock:
                wait_for_cancel(s.engine, text)
                # Its connection is closed too: what is left to read ends.
                sock.settimeout(READ_TIMEOUT_S)
                with contextlib.suppress(ConnectionResetError):
                    while sock.recv(1 << 20):
                        pass
        finally:
            s.engine.gate.set()


@pytest.mark.slow
def test_stopping_the_server_does_not_wait_for_a_client_that_reads_nothing(tmp_path):
    port = free_port()
    text = "word " * 3000
    client = contextlib.ExitStack()
    with live_server(tmp_path, FakeFactory(chunk_delay=0), wyoming=True, wyoming_port=port) as s:
        client.enter_context(a_client_that_reads_nothing(port, text))
        deadline = time.monotonic() + READ_TIMEOUT_S
        while text not in s.engine.finished_jobs and time.monotonic() < deadline:
            time.sleep(0.02)
        assert text in s.engine.finished_jobs  # all its audio waits to be sent
    # The server stopped with the client still connected.
    alive = s.thread.is_alive()
    client.close()
    assert not alive, "the server did not stop"


class SlowLoadFactory(FakeFactory):
    """Its xtts engine loads only once `release` is set, and counts its loads."""

    def __init__(self) -> None:
        super().__init__()
        self.loading = threading.Event()
        self.release = threading.Event()
        self.loads = 0

    def __call__(self, name, settings):
        engine = super().__call__(name, settings)
        if name == "xtts":
            engine.load = self._load
        return engine

    def _load(self) -> None:
        self.loads += 1
        self.loading.set()
        assert self.release.wait(READ_TIMEOUT_S)


def test_a_client_leaving_while_its_engine_loads_does_not_abort_the_load(tmp_path):
    factory = SlowLoadFactory()
    port = free_port()
    text = "Spoken by the second engine"
    program = Event(type="select-program", data={"name": "xtts"})

    async def leave_during_the_load() -> None:
        async with AsyncTcpClient("127.0.0.1", port, 5, READ_TIMEOUT_S) as c:
            await send(c, program, Synthesize(text=text, voice=SynthesizeVoice(name="alpha")))
            assert await asyncio.to_thread(factory.loading.wait, READ_TIMEOUT_S)

    async def ask_again() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", port, 5, READ_TIMEOUT_S) as c:
            await send(c, program, Synthesize(text=text, voice=SynthesizeVoice(name="alpha")))
            factory.release.set()  # the load goes on only now that the first client is gone
            return await read_until(c, is_type(AudioStop))

    with live_server(tmp_path, factory, wyoming=True, wyoming_port=port):
        run(leave_during_the_load())
        (audio,) = segments(run(ask_again()))
    assert_speaks(audio, "alpha", text)
    assert factory.loads == 1  # the second client got the load the first one started


def test_a_voice_uploaded_over_http_appears_in_the_next_describe(server):
    buf = io.BytesIO()
    t = np.arange(3 * 22_050) / 22_050
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 220 * t), 22_050, format="WAV", subtype="PCM_16")
    with server.client() as c:
        files = [("files", ("clip.wav", buf.getvalue(), "audio/wav"))]
        r = c.post("/api/library/voices", data={"name": "Kitchen Voice"}, files=files)
        assert r.status_code == 201, r.text

    async def main() -> Info:
        async with connect(server) as c:
            return await describe(c)

    voices = {v.name: v for v in run(main()).tts[0].voices}
    assert "Kitchen Voice" in voices
    # A voice that names no language speaks all of the engine's.
    assert voices["Kitchen Voice"].languages == ["en", "de", "fr"]


def test_http_and_wyoming_at_once_each_get_their_own_audio(server):
    http_text, wyoming_text = "Spoken over HTTP today", "Spoken over Wyoming today"

    def over_http() -> np.ndarray:
        body = {"model": "tts-1", "input": http_text, "voice": "gamma", "response_format": "wav"}
        with server.client() as c:
            r = c.post("/v1/audio/speech", json=body)
            assert r.status_code == 200, r.text
            return decode(r.content, "wav")[0]

    async def over_wyoming() -> list[Event]:
        async with connect(server) as c:
            await send(c, Synthesize(text=wyoming_text, voice=SynthesizeVoice(name="beta")))
            return await read_until(c, is_type(AudioStop))

    async def main() -> tuple[np.ndarray, list[Event]]:
        return await asyncio.gather(asyncio.to_thread(over_http), over_wyoming())

    http_audio, events = run(main())
    assert_speaks(http_audio, "gamma", http_text)
    (audio,) = segments(events)
    assert_speaks(audio, "beta", wyoming_text)


@pytest.mark.slow
def test_zeroconf_announces_the_server_on_loopback(tmp_path):
    zc = pytest.importorskip("zeroconf.asyncio")
    from zeroconf import IPVersion

    port = free_port()

    async def find() -> int | None:
        browser_zc = zc.AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        names: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def seen(zeroconf, service_type, name, state_change) -> None:
            loop.call_soon_threadsafe(names.put_nowait, name)

        browser = zc.AsyncServiceBrowser(
            browser_zc.zeroconf, "_wyoming._tcp.local.", handlers=[seen]
        )
        try:
            while True:
                name = await asyncio.wait_for(names.get(), READ_TIMEOUT_S)
                info = zc.AsyncServiceInfo("_wyoming._tcp.local.", name)
                if await info.async_request(browser_zc.zeroconf, 3000) and info.port == port:
                    return info.port
        finally:
            await browser.async_cancel()
            await browser_zc.async_close()

    with live_server(tmp_path, wyoming=True, wyoming_port=port, wyoming_zeroconf=True):
        assert run(find()) == port


def test_without_zeroconf_the_server_says_so_and_runs(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "zeroconf", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="lowvox.server.wyoming"):
        Announcer("127.0.0.1", 10200).start()
    assert "pip install lowvox[zeroconf]" in caplog.text


def test_split_complete_keeps_unfinished_sentences():
    assert split_complete("Hello there. How") == ("Hello there. ", "How")
    assert split_complete("It costs 3.5 euros") == ("", "It costs 3.5 euros")
    assert split_complete('He said "stop!" and left') == ('He said "stop!" ', "and left")
    assert split_complete("第一句。第二") == ("第一句。", "第二")
    assert split_complete("- milk\n- eggs") == ("- milk\n", "- eggs")


def test_abbreviations_and_initials_end_no_streamed_sentence():
    # "Dr." sent on its own was spoken as a sentence of its own (an LLM's reply streamed by
    # Home Assistant), where HTTP's splitter keeps it with its name.
    assert split_complete("Dr. Smith is in. He") == ("Dr. Smith is in. ", "He")
    assert split_complete("Ask (Prof. Li) now. Or") == ("Ask (Prof. Li) now. ", "Or")
    assert split_complete("Made in the U.S. Then") == ("", "Made in the U.S. Then")
    assert split_complete("Fruit, e.g. pears. Or") == ("Fruit, e.g. pears. ", "Or")
    assert split_complete("La Sra. Ruiz llegó. Y") == ("La Sra. Ruiz llegó. ", "Y")
    # Ordinary words, words longer than any abbreviation and ellipses still end sentences.
    assert split_complete("It is done. Go") == ("It is done. ", "Go")
    assert split_complete("Supercalifragilistic. Go") == ("Supercalifragilistic. ", "Go")
    assert split_complete("Wait... Go") == ("Wait... ", "Go")


def test_text_arriving_piecewise_splits_as_if_whole():
    text = 'One. "Two?!" Dr. Three 3.5 four… U.S. five.) 六。 seven\n eight'
    for size in (1, 2, 3, 7):
        kept, spoken = "", ""
        for i in range(0, len(text), size):
            complete, kept = add_text(kept, text[i : i + size])
            spoken += complete
        # The same words on each side (a line break's trailing spaces may fall either way).
        whole = split_complete(text)
        assert (spoken.split(), kept.split()) == (whole[0].split(), whole[1].split()), size


class _CountingPattern:
    """The sentence-end pattern, adding up the characters it is asked to look through."""

    def __init__(self, pattern, counter: list[int]) -> None:
        self._pattern, self._counter = pattern, counter

    def finditer(self, text: str, pos: int = 0):
        self._counter[0] += len(text) - pos
        return self._pattern.finditer(text, pos)


def _streaming_work(unit: str, n: int) -> int:
    """Characters the sentence-end pattern looks through while `unit` arrives n times, one
    event each, after "Go" and before " Next"."""
    counter = [0]
    with pytest.MonkeyPatch.context() as mp:
        real = wyoming_server._SENTENCE_END
        mp.setattr(wyoming_server, "_SENTENCE_END", _CountingPattern(real, counter))
        kept, spoken = "", ""
        for piece in ["Go"] + [unit] * n + [" Next"]:
            complete, kept = add_text(kept, piece)
            spoken += complete
    assert (spoken, kept) == ("Go" + unit * n + " ", "Next")
    return counter[0]


@pytest.mark.parametrize("unit", [".", "?!", ".)", "…»"])
def test_a_long_sentence_end_streamed_a_mark_at_a_time_is_read_in_linear_time(unit):
    # Every event looked through the whole unfinished end again: 2,000 dots sent one at a
    # time took 48 s of the event loop that HTTP shares. Counted, not timed: over sizes
    # n and 4n linear work grows about 4x, quadratic 16x.
    small, large = _streaming_work(unit, 500), _streaming_work(unit, 2000)
    assert large / max(small, 1) < 6


@pytest.mark.timeout(20)
def test_a_long_run_of_marks_is_split_in_linear_time():
    # From every mark of a run the pattern read the rest of the run to fail the same way:
    # 8,000 dots took 1.6 s, 200,000 would take about 1,000 s. The timeout only stops a hang.
    dots = "." * 200_000
    assert split_complete("Go" + dots + " on") == ("Go" + dots + " ", "on")
    assert split_complete("Go" + dots + ")" * 1000) == ("", "Go" + dots + ")" * 1000)


def test_serve_flags_and_environment(monkeypatch):
    args = build_parser().parse_args(["serve", "--wyoming", "--wyoming-port", "10300"])
    assert (args.wyoming, args.wyoming_port, args.wyoming_zeroconf) == (True, 10300, None)
    monkeypatch.setenv("LOWVOX_WYOMING_ZEROCONF", "1")
    settings = load_settings(wyoming=args.wyoming, wyoming_port=args.wyoming_port)
    assert (settings.wyoming, settings.wyoming_port, settings.wyoming_zeroconf) == (
        True,
        10300,
        True,
    )
    monkeypatch.delenv("LOWVOX_WYOMING", raising=False)
    assert load_settings().wyoming is False  # off unless asked for
