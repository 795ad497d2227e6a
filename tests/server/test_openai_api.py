"""Issue 2 over real HTTP: readiness, voices, /v1/audio/speech formats, streaming, bad input."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest

from lowvox.server.routes.openai import map_voice
from lowvox.settings import Settings
from tests.server.srv_audio import decode, dominant_frequency
from tests.server.srv_fixtures import CHUNK_SECONDS, FAKE_RATE, fake_frequency

FORMATS = ("wav", "mp3", "opus", "aac", "flac", "pcm")
# Codec facts, not lowvox choices: Opus always runs at 48 kHz; the others keep 24 kHz.
EXPECTED_RATE = {"opus": 48_000}


def test_ready_is_plain_text(client):
    r = client.get("/api/ready")
    assert r.status_code == 200
    assert r.text == "Ready"


def test_lifespan_loaded_and_warmed_default_engine(server):
    assert server.engine.loaded and server.engine.warmed


def test_voice_lists(client):
    r = client.get("/api/voices")
    assert r.json() == {"status": "success", "voices": ["alpha", "beta", "gamma"]}
    r = client.get("/v1/audio/voices")
    assert r.json() == {"voices": [{"id": v, "name": v} for v in ("alpha", "beta", "gamma")]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(client, fmt):
    text = "one two three four five six seven eight"  # 8 chunks of 0.1 s
    r = client.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": text, "voice": "beta", "response_format": fmt},
    )
    assert r.status_code == 200, r.text
    samples, rate, channels = decode(r.content, fmt)
    assert rate == EXPECTED_RATE.get(fmt, FAKE_RATE)
    assert channels == 1
    # Lossy codecs pad by a frame or two (< 0.1 s); the duration itself must survive.
    assert abs(len(samples) / rate - 8 * CHUNK_SECONDS) < 0.1
    assert abs(dominant_frequency(samples, rate) - fake_frequency("beta", text)) < 5


@pytest.mark.parametrize("fmt", ("wav", "pcm", "mp3", "opus"))
def test_streamed_formats_decode(client, fmt):
    text = "a b c d e"
    with client.stream(
        "POST",
        "/v1/audio/speech",
        json={"input": text, "voice": "alpha", "response_format": fmt, "stream": True},
    ) as r:
        assert r.status_code == 200
        assert r.headers["x-accel-buffering"] == "no"
        data = b"".join(r.iter_bytes())
    samples, rate, _ = decode(data, fmt)
    assert abs(len(samples) / rate - 5 * CHUNK_SECONDS) < 0.1
    if fmt == "wav":
        # Streamed WAV has unknown-size fields browsers accept.
        assert data[4:8] == b"\xff\xff\xff\xff" and data[40:44] == b"\xff\xff\xff\xff"


def test_stream_arrives_before_synthesis_ends(server, client):
    """The first bytes reach the client while the engine is still held before its last chunk."""
    engine = server.engine
    engine.gate.clear()
    done_before = len(engine.finished_jobs)
    text = "stream me please now"
    with client.stream(
        "POST",
        "/v1/audio/speech",
        json={"input": text, "voice": "gamma", "response_format": "pcm", "stream": True},
    ) as r:
        it = r.iter_raw()
        first = next(it)
        assert len(first) > 0
        # The engine cannot have finished: it is waiting on the gate.
        assert len(engine.finished_jobs) == done_before
        engine.gate.set()
        rest = b"".join(it)
    total = len(first) + len(rest)
    assert total == 4 * int(CHUNK_SECONDS * FAKE_RATE) * 2
    assert engine.finished_jobs[-1] == text


def sse_events(body: bytes) -> list:
    """An event stream's `data:` payloads: JSON objects, and the closing "[DONE]"."""
    events = []
    for block in body.decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block[:80]
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def sse_audio(events: list) -> bytes:
    deltas = [e for e in events if isinstance(e, dict) and e["type"] == "speech.audio.delta"]
    assert deltas
    return b"".join(base64.b64decode(e["audio"]) for e in deltas)


@pytest.mark.parametrize(("fmt", "stream"), [("pcm", None), ("mp3", None), ("wav", False)])
def test_sse_stream_format_sends_the_audio_as_events(client, fmt, stream):
    """OpenAI's `stream_format: "sse"`: speech.audio.delta events with the encoded audio in
    base64, then speech.audio.done with usage, then [DONE] (as api.openai.com sends it)."""
    text = "one two three four five"
    body = {"model": "gpt-4o-mini-tts", "input": text, "voice": "beta", "response_format": fmt}
    r = client.post("/v1/audio/speech", json={**body, "stream_format": "sse", "stream": stream})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = sse_events(r.content)
    assert events[-2:] == [
        {
            "type": "speech.audio.done",
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        },
        "[DONE]",
    ]
    assert all(e["type"] == "speech.audio.delta" for e in events[:-2])
    samples, rate, _ = decode(sse_audio(events), fmt)
    assert abs(len(samples) / rate - 5 * CHUNK_SECONDS) < 0.1
    assert abs(dominant_frequency(samples, rate) - fake_frequency("beta", text)) < 5


def test_sse_events_arrive_while_the_audio_is_made(server, client):
    engine = server.engine
    engine.gate.clear()
    done_before = len(engine.finished_jobs)
    body = {"input": "events as they come", "voice": "gamma", "response_format": "pcm"}
    with client.stream("POST", "/v1/audio/speech", json={**body, "stream_format": "sse"}) as r:
        lines = (line for line in r.iter_lines() if line)
        first = json.loads(next(lines).removeprefix("data: "))
        assert first["type"] == "speech.audio.delta" and first["audio"]
        # The engine is held before its last chunk: the event went out while it worked.
        assert len(engine.finished_jobs) == done_before
        engine.gate.set()
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["type"] == "speech.audio.done"


def test_sse_stream_cut_short_ends_with_an_error_event(server, client, monkeypatch):
    made = server.engine.synthesize_stream

    def fails_after_one_chunk(request, cancel=None):
        chunks = made(request, cancel)
        yield next(chunks)
        chunks.close()
        raise RuntimeError("secret internals /home/x/model.py")

    monkeypatch.setattr(server.engine, "synthesize_stream", fails_after_one_chunk)
    body = {"input": "this will not end well", "voice": "alpha", "response_format": "pcm"}
    r = client.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
    assert r.status_code == 200  # the headers went out with the first audio
    events = sse_events(r.content)
    assert events[0]["type"] == "speech.audio.delta"
    # The error in OpenAI's shape, which its SDKs read in other event streams.
    error = events[-1]["error"]
    assert events[-1]["type"] == "error"
    assert (error["message"], error["type"]) == ("synthesis failed", "server_error")
    assert "secret" not in r.text
    assert not any(e == "[DONE]" or e["type"] == "speech.audio.done" for e in events)


@pytest.mark.parametrize(
    ("fields", "words"),
    [({"stream_format": "frames"}, "stream_format"), ({"response_format": "m4b"}, "made whole")],
)
def test_sse_refusals_name_stream_format(client, fields, words):
    body = {"input": "hi", "voice": "alpha", "stream_format": "sse", **fields}
    r = client.post("/v1/audio/speech", json=body)
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]
    assert r.json()["error"]["param"] == "stream_format"


def test_speed_is_passed_to_the_engine(client):
    text = "speed test here"
    r = client.post(
        "/v1/audio/speech",
        json={"input": text, "voice": "alpha", "response_format": "wav", "speed": 2.0},
    )
    samples, rate, _ = decode(r.content, "wav")
    assert abs(dominant_frequency(samples, rate) - 2 * fake_frequency("alpha", text)) < 10


def test_openai_voice_names_fall_back_to_default(client):
    r = client.post(
        "/v1/audio/speech",
        json={"input": "hello there", "voice": "alloy", "response_format": "wav"},
    )
    assert r.status_code == 200
    samples, rate, _ = decode(r.content, "wav")
    assert abs(dominant_frequency(samples, rate) - fake_frequency("alpha", "hello there")) < 5


def test_the_voice_map_matches_names_in_any_case():
    state = SimpleNamespace(settings=Settings(openai_voice_map={"Nova": "alpha", "echo": "beta"}))
    assert map_voice("nova", state, set()) == "alpha"
    assert map_voice("NOVA", state, set()) == "alpha"
    assert map_voice("Echo", state, set()) == "beta"
    assert map_voice("alloy", state, set()) is None  # unmapped OpenAI name: the default voice
    assert map_voice("gamma", state, {"gamma"}) == "gamma"


def test_models_list(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "tts-1" in ids and "espeak" in ids and "xtts" in ids
    # Open WebUI's model lookup for OpenAI-compatible TTS servers
    ids = [m["id"] for m in client.get("/v1/audio/models").json()["models"]]
    assert "tts-1" in ids


@pytest.mark.parametrize(
    ("body", "status", "words", "param"),
    [
        ({"input": "", "voice": "alpha"}, 400, "text is empty", "input"),
        ({"input": "   \n\t ", "voice": "alpha"}, 400, "text is empty", "input"),
        ({"input": "hi", "voice": "nobody"}, 404, "unknown voice", "voice"),
        ({"input": "hi", "voice": "alpha", "language": "xx"}, 400, "unknown language", "language"),
        (
            {"input": "hi", "voice": "alpha", "response_format": "ogg-vorbis"},
            400,
            "unsupported audio format",
            "response_format",
        ),
        ({"input": "hi", "voice": "alpha", "speed": 0.1}, 400, "speed", "speed"),
        ({"input": "hi", "voice": "alpha", "speed": 4.5}, 400, "speed", "speed"),
        # OpenAI answers a mistyped or missing field with 400 too, never 422.
        ({"input": "hi", "voice": "alpha", "speed": "fast"}, 400, "speed", "speed"),
        ({"voice": "alpha"}, 400, "input", "input"),
        ({"input": "hi", "model": "gpt-9"}, 404, "unknown model", "model"),
    ],
)
def test_bad_input_is_a_clear_4xx(client, body, status, words, param):
    r = client.post("/v1/audio/speech", json={"response_format": "wav", **body})
    assert r.status_code == status, r.text
    message = r.json()["detail"]
    assert words in message.lower()
    assert "Traceback" not in r.text
    # OpenAI's error object: `param` by its field names, `code` a string or null.
    error = r.json()["error"]
    assert (error["message"], error["type"]) == (message, "invalid_request_error")
    assert error["param"] == param
    assert error["code"] is None


def test_text_over_the_limit(tmp_path):
    from tests.server.srv_fixtures import live_server

    with live_server(tmp_path, max_text_chars=50) as s, s.client() as c:
        r = c.post("/v1/audio/speech", json={"input": "word " * 20, "voice": "alpha"})
        assert r.status_code == 400
        assert "over the limit of 50" in r.json()["detail"]


def test_malformed_json(client):
    r = client.post(
        "/v1/audio/speech", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert "json" in r.json()["detail"].lower()


def test_unexpected_errors_are_500_without_traceback(server, client, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret internals /home/x/model.py line 12")

    monkeypatch.setattr(server.engine, "synthesize_stream", boom)
    r = client.post("/v1/audio/speech", json={"input": "hi", "voice": "alpha"})
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text
