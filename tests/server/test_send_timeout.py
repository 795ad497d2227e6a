"""`send_timeout`: a client that stops taking its answer loses its connection.

First the guard itself (`security.guarded_protocol`) on a stand-in for uvicorn's protocol
and transport; then, marked slow, a real server run the way `lowvox serve` runs it
(`server_config`), with clients whose socket buffers are small and answers larger than
what the kernels hold, so that the answer waits for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h11
import httpx
import pytest

from lowvox.errors import LowvoxError
from lowvox.server.security import guarded_protocol
from lowvox.settings import Settings, load_settings
from tests.server.srv_audio import decode, dominant_frequency
from tests.server.srv_fixtures import (
    CHUNK_SECONDS,
    FAKE_RATE,
    FakeFactory,
    fake_frequency,
    production_server,
    wait_for,
)

TIMED_OUT = "(send_timeout)"  # the end of the guard's log line


def _records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("lowvox", "uvicorn"))]


def _timeouts(caplog) -> list[str]:
    return [r.getMessage() for r in _records(caplog) if TIMED_OUT in r.getMessage()]


# -- The setting --------------------------------------------------------------------------


def test_send_timeout_setting(monkeypatch, tmp_path):
    assert Settings(home=tmp_path).send_timeout == 300.0  # a paused <audio> player is kept
    monkeypatch.setenv("LOWVOX_SEND_TIMEOUT", "45")
    assert load_settings(home=tmp_path).send_timeout == 45.0
    config = tmp_path / "lowvox.toml"
    config.write_text("send_timeout = 12.5\n")
    monkeypatch.delenv("LOWVOX_SEND_TIMEOUT")
    assert load_settings(config, home=tmp_path).send_timeout == 12.5
    with pytest.raises(LowvoxError, match="send_timeout"):
        load_settings(send_timeout=0)


# -- The guard on a stand-in for uvicorn ------------------------------------------------------

PERIOD = 0.05  # the stand-in's send_timeout


class FakeTransport(asyncio.Transport):
    """What the guard asks of a transport: the bytes buffered for the peer (no socket, so no
    kernel queue), and closing."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.buffered = 0
        self.aborted = False
        self.closing = False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def close(self) -> None:
        self.closing = True  # asyncio's close() waits for the buffer to go out

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


class FakeHTTP(asyncio.Protocol):
    """uvicorn's flow-control surface: `flow.write_paused`, the pause/resume calls and
    `on_response_complete`."""

    def __init__(self) -> None:
        self.flow = SimpleNamespace(write_paused=False)
        self.client = ("127.0.0.1", 40000)
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def pause_writing(self) -> None:
        self.flow.write_paused = True

    def resume_writing(self) -> None:
        self.flow.write_paused = False

    def on_response_complete(self) -> None:
        pass


def _connect(send_timeout: float | None = PERIOD) -> tuple[Any, FakeTransport]:
    protocol = guarded_protocol(FakeHTTP, header_timeout=60, send_timeout=send_timeout)()
    transport = FakeTransport(protocol)
    protocol.connection_made(transport)
    return protocol, transport


def test_a_paused_answer_nobody_takes_is_reset_with_one_line(caplog):
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        protocol, transport = _connect()
        transport.buffered = 80_000
        protocol.pause_writing()
        await asyncio.sleep(PERIOD * 4)
        assert transport.aborted and protocol.lost

    asyncio.run(scenario())
    lines = _timeouts(caplog)
    assert lines == ["closing the connection from 127.0.0.1:40000: it took no data for 0.05 s "
                     "(send_timeout)"]  # fmt: skip
    assert not any(r.exc_info for r in _records(caplog))


def test_a_client_that_takes_a_little_each_period_is_kept():
    async def scenario() -> None:
        protocol, transport = _connect()
        transport.buffered = 80_000
        protocol.pause_writing()
        for _ in range(12):  # 12 x 0.02 s: several periods, each with a few bytes taken
            await asyncio.sleep(PERIOD * 0.4)
            transport.buffered -= 100
        assert not transport.aborted
        protocol.resume_writing()  # under the low-water mark: the clock stops
        await asyncio.sleep(PERIOD * 3)
        assert not transport.aborted

    asyncio.run(scenario())


def test_the_tail_of_a_finished_answer_is_timed_too():
    """An answer's last bytes still buffered when it ends: `close()` would wait for them
    for ever. Without a buffered tail there is nothing to time."""

    async def scenario() -> None:
        protocol, transport = _connect()
        protocol.on_response_complete()  # all of it taken
        await asyncio.sleep(PERIOD * 3)
        assert not transport.aborted
        transport.buffered = 30_000  # under the high-water mark: no pause_writing
        protocol.on_response_complete()
        transport.close()
        await asyncio.sleep(PERIOD * 3)
        assert transport.aborted and protocol.lost

    asyncio.run(scenario())


def test_no_send_timeout_no_reset():
    async def scenario() -> None:
        protocol, transport = _connect(send_timeout=None)
        transport.buffered = 80_000
        protocol.pause_writing()
        await asyncio.sleep(PERIOD * 3)
        assert not transport.aborted

    asyncio.run(scenario())


# -- A real server -----------------------------------------------------------------------------

SEND_TIMEOUT = 1.0
SAMPLES_PER_WORD = int(CHUNK_SECONDS * FAKE_RATE)  # the fake engine: one 0.1 s chunk a word
CLIENT_RCVBUF = 4096


def _words_beyond_socket_buffers() -> int:
    """Enough words that their WAV (9.6 kB a word) is well over what the kernel queues for
    a socket (tcp_wmem's largest send buffer: 4 MiB by default), so that some of it waits
    in the server for the client."""
    try:
        largest = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        largest = 4 * 1024 * 1024
    return max(1500, (largest + 3 * 1024 * 1024) // (2 * SAMPLES_PER_WORD) + 1)


WORDS = _words_beyond_socket_buffers()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with production_server(
        tmp_path_factory.mktemp("send-timeout"),
        FakeFactory(chunk_delay=0),
        send_timeout=SEND_TIMEOUT,
        max_connections=3,
        max_text_chars=10 * WORDS,
    ) as s:
        yield s


def _speech(tag: str, **extra: Any) -> dict[str, Any]:
    text = f"{tag} " + "word " * (WORDS - 1)
    return {"input": text.strip(), "voice": "beta", "response_format": "wav", **extra}


class Answer:
    """A request sent on a raw socket whose receive buffer is small, and its answer read
    (with h11) only as far as the test says."""

    def __init__(self, server, body: dict[str, Any], sock: socket.socket | None = None) -> None:
        self.sock = sock or _small_socket(server)
        self.http = h11.Connection(h11.CLIENT)
        data = json.dumps(body).encode()
        head = h11.Request(
            method="POST",
            target="/v1/audio/speech",
            headers=[
                ("Host", "127.0.0.1"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
            ],
        )
        self.sock.sendall(
            self.http.send(head)
            + self.http.send(h11.Data(data=data))
            + self.http.send(h11.EndOfMessage())
        )
        self.response: h11.Response | None = None
        self.body = bytearray()
        self.complete = False

    def read(self, size: int = 65536) -> bool:
        """One recv and whatever it completes; False once the server has closed."""
        try:
            data = self.sock.recv(size)
        except ConnectionResetError:
            data = b""
        self.http.receive_data(data)
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError:  # closed mid-answer
                return False
            if event is h11.NEED_DATA:
                return bool(data)
            if isinstance(event, h11.Response):
                self.response = event
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
                return True
            elif isinstance(event, h11.ConnectionClosed):
                return False

    def read_head(self) -> dict[str, str]:
        """The status line and headers, as a player reads them before it stalls."""
        self.sock.settimeout(10)
        while self.response is None:
            assert self.read(1024), "the server closed before its answer's head"
        assert self.response.status_code == 200
        return {k.decode(): v.decode() for k, v in self.response.headers}

    def read_to_end(self, within: float = 15.0) -> None:
        """Everything until the answer ends or the server closes."""
        self.sock.settimeout(within)
        while not self.complete and self.read():
            pass
        self.sock.close()


def _small_socket(server) -> socket.socket:
    sock = socket.socket()
    # Before connecting, so the window the client offers stays small.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    sock.connect(("127.0.0.1", server.port))
    return sock


def _connections(server) -> int:
    return len(server.server.server_state.connections)


@pytest.mark.slow
def test_a_client_that_stops_reading_is_cut_off(server, caplog):
    caplog.set_level(logging.INFO)
    caplog.clear()
    stalled = Answer(server, _speech("stalled"))
    stalled.read_head()
    with server.client() as c:  # others are served meanwhile
        body = {"input": "served meanwhile", "voice": "alpha", "response_format": "wav"}
        r = c.post("/v1/audio/speech", json=body)
        assert r.status_code == 200 and r.content[:4] == b"RIFF"
    assert wait_for(lambda: _timeouts(caplog)), "the stalled connection was kept"
    assert wait_for(lambda: _connections(server) == 0)
    # The client, reading at last, finds its answer cut short.
    stalled.read_to_end()
    assert not stalled.complete
    assert len(stalled.body) < 44 + WORDS * SAMPLES_PER_WORD * 2
    time.sleep(0.2)
    assert len(_timeouts(caplog)) == 1, _timeouts(caplog)
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in _records(caplog))


@pytest.mark.slow
def test_a_stalled_connection_frees_its_slot(server):
    """max_connections is 3: two held connections and a third is refused, until the two
    stop reading and are reset."""
    socks = [_small_socket(server) for _ in range(2)]
    assert wait_for(lambda: _connections(server) == 2)
    with server.client() as c:
        assert c.get("/api/ready").status_code == 503
    assert wait_for(lambda: _connections(server) == 2)  # the refused one has gone
    answers = [Answer(server, _speech(f"slot{i}"), sock) for i, sock in enumerate(socks)]
    for answer in answers:
        answer.read_head()
    assert wait_for(lambda: _connections(server) == 0), "the stalled connections were kept"
    with server.client() as c:
        assert c.get("/api/ready").text == "Ready"
    for answer in answers:
        answer.read_to_end()
        assert not answer.complete


@pytest.mark.slow
def test_a_slow_reader_gets_its_whole_answer(server, caplog):
    """A reader that takes a few kB every quarter second, for longer than send_timeout:
    too little for asyncio's buffer to drain (the kernel's queue in between is megabytes),
    yet each period it takes some, so it keeps its connection."""
    caplog.set_level(logging.INFO)
    caplog.clear()
    answer = Answer(server, _speech("slow"))
    answer.read_head()
    time.sleep(SEND_TIMEOUT / 2)
    started = time.monotonic()
    while time.monotonic() - started < 2.5 * SEND_TIMEOUT:
        assert answer.read(CLIENT_RCVBUF), "the server closed on a slow reader"
        time.sleep(SEND_TIMEOUT / 4)
    trickled = len(answer.body)
    answer.read_to_end()
    assert answer.complete
    assert trickled < len(answer.body) // 4  # the trickle left most of it waiting
    samples, rate, _ = decode(bytes(answer.body), "wav")
    assert rate == FAKE_RATE and len(samples) == WORDS * SAMPLES_PER_WORD
    assert _timeouts(caplog) == []


@pytest.mark.slow
def test_the_job_behind_a_stalled_stream_is_cancelled_and_its_copy_kept(server, caplog):
    """The engine holds its last chunk, so the job is still running when the reader
    stalls: the reset cancels it through the path of a client that leaves, and the saved
    copy the stream promised holds what was made."""
    caplog.set_level(logging.INFO)
    caplog.clear()
    engine = server.engine
    engine.gate.clear()
    try:
        body = _speech("kept", save=True)
        stalled = Answer(server, body)
        headers = stalled.read_head()
        assert wait_for(lambda: _timeouts(caplog)), "the stalled connection was kept"
        assert wait_for(lambda: body["input"] in engine.cancelled_jobs)
        assert body["input"] not in engine.finished_jobs
        with server.client() as c:
            kept: list[httpx.Response] = []
            url = headers["x-output-file-url"]
            assert wait_for(lambda: kept.append(c.get(url)) or kept[-1].status_code == 200)
        stalled.read_to_end()
    finally:
        engine.gate.set()
    copy = kept[-1].content
    assert int.from_bytes(copy[4:8], "little") == len(copy) - 8  # completed as a file
    samples, rate, _ = decode(copy, "wav")
    assert rate == FAKE_RATE and len(samples) % SAMPLES_PER_WORD == 0  # whole chunks
    assert 0 < len(samples) <= (WORDS - 1) * SAMPLES_PER_WORD  # not the held last chunk
    assert abs(dominant_frequency(samples, rate) - fake_frequency("beta", body["input"])) < 5
    lines = [r.getMessage() for r in _records(caplog)]
    assert len([m for m in lines if "client left mid-stream" in m]) == 1, lines
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in _records(caplog)), lines
