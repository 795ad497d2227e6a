"""Scheduling over real HTTP: queue bound, own audio per request, cancel and disconnect."""

from __future__ import annotations

import gc
import threading

import httpx
import numpy as np
import pytest

from tests.server.srv_audio import decode, dominant_frequency
from tests.server.srv_fixtures import (
    CHUNK_SECONDS,
    FAKE_RATE,
    fake_frequency,
    live_server,
    wait_for,
)

API_KINDS = ("openai", "openai-stream", "alltalk", "alltalk-stream", "xtts", "xtts-stream")


def run_case(c: httpx.Client, kind: str, text: str, voice: str, fmt: str) -> tuple[bytes, str]:
    """One request the way each API's clients make it; returns (audio bytes, format)."""
    if kind.startswith("openai"):
        body = {
            "input": text,
            "voice": voice,
            "response_format": fmt,
            "stream": kind.endswith("stream"),
        }
        r = c.post("/v1/audio/speech", json=body)
        assert r.status_code == 200, r.text
        return r.content, fmt
    if kind == "alltalk":
        r = c.post(
            "/api/tts-generate",
            data={"text_input": text, "character_voice_gen": voice, "language": "en"},
        )
        assert r.status_code == 200, r.text
        return c.get(r.json()["output_file_url"]).content, "wav"
    if kind == "alltalk-stream":
        r = c.get(
            "/api/tts-generate-streaming", params={"text": text, "voice": voice, "language": "en"}
        )
    elif kind == "xtts":
        r = c.post("/tts_to_audio/", json={"text": text, "speaker_wav": voice, "language": "en"})
    else:
        r = c.get("/tts_stream", params={"text": text, "speaker_wav": voice, "language": "en"})
    assert r.status_code == 200, r.text
    return r.content, "wav"


@pytest.mark.slow
def test_twenty_mixed_requests_each_get_their_own_audio(server, client):
    """20 simultaneous requests over every API (streamed and whole, several formats) all
    succeed, and each one's audio equals the same request made alone."""
    formats = ["pcm", "wav", "flac", "mp3"]
    voices = ["alpha", "beta", "gamma"]
    cases = [
        (
            API_KINDS[i % 6],
            f"request {i} says {' '.join(['word'] * (1 + i % 4))}",
            voices[i % 3],
            formats[i % 4],
        )
        for i in range(20)
    ]
    results: dict[int, tuple[bytes, str]] = {}
    barrier = threading.Barrier(20)

    def one(i: int) -> None:
        with server.client() as c:
            barrier.wait()
            results[i] = run_case(c, *cases[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(20))
    for i, (kind, text, voice, fmt) in enumerate(cases):
        data, got_fmt = results[i]
        samples, rate, _ = decode(data, got_fmt)
        alone, alone_fmt = run_case(client, kind, text, voice, fmt)
        ref, _, _ = decode(alone, alone_fmt)
        # Lossless formats are bit-identical; mp3 frames may be cut differently when streamed.
        if got_fmt != "mp3":
            assert np.array_equal(samples, ref), (kind, text)
        assert abs(dominant_frequency(samples, rate) - fake_frequency(voice, text)) < 5
    # One worker owns the model: never two syntheses at once.
    assert server.engine.max_active == 1


def test_full_queue_answers_429_with_retry_after(tmp_path):
    with live_server(tmp_path, max_queue=1) as s:
        s.engine.gate.clear()
        answers: list[httpx.Response] = []

        def send(text: str) -> None:
            with s.client() as c:
                answers.append(
                    c.post(
                        "/v1/audio/speech",
                        json={"input": text, "voice": "alpha", "response_format": "pcm"},
                    )
                )

        running = threading.Thread(target=send, args=("first one",))
        running.start()
        assert wait_for(lambda: s.engine.active == 1)
        queued = threading.Thread(target=send, args=("second one",))
        queued.start()
        assert wait_for(lambda: s.state.hub.loaded()["espeak"].scheduler.queued == 1)
        with s.client() as c:
            r = c.post("/v1/audio/speech", json={"input": "third", "voice": "alpha"})
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["detail"]
        s.engine.gate.set()
        running.join()
        queued.join()
        assert [a.status_code for a in answers] == [200, 200]


def test_cancel_a_non_streaming_request_by_id(server, client):
    engine = server.engine
    engine.gate.clear()
    text = "cancel me by my id"
    answer: list[httpx.Response] = []

    def send() -> None:
        with server.client() as c:
            answer.append(
                c.post(
                    "/v1/audio/speech",
                    json={"input": text, "voice": "alpha", "stream": False},
                    headers={"X-Request-Id": "job-42"},
                )
            )

    t = threading.Thread(target=send)
    t.start()
    assert wait_for(lambda: engine.active == 1)
    r = client.post("/api/cancel/job-42")
    assert r.json() == {"cancelled": 1}
    t.join(60)
    assert not t.is_alive(), "the cancelled request never answered"
    assert answer[0].status_code == 499
    assert "cancelled" in answer[0].json()["detail"]
    # The answer can leave before the engine's thread notices the cancel: wait for it.
    assert wait_for(lambda: text in engine.cancelled_jobs)
    assert text not in engine.finished_jobs


def test_stream_disconnect_cancels_the_job(server, client):
    engine = server.engine
    engine.gate.clear()
    text = "i will hang up early"
    with client.stream(
        "POST",
        "/v1/audio/speech",
        json={"input": text, "voice": "beta", "response_format": "pcm", "stream": True},
    ) as r:
        assert next(r.iter_raw())
    # The client closed the connection while the engine waited on the gate.
    assert wait_for(lambda: text in engine.cancelled_jobs)
    assert text not in engine.finished_jobs
    # The slot is free again: the next request runs.
    engine.gate.set()
    assert (
        client.post("/v1/audio/speech", json={"input": "next", "voice": "beta"}).status_code == 200
    )


@pytest.fixture()
def collector_off():
    """Only reference counting frees objects meanwhile: what a request leaves in a
    reference cycle stays, as it would until the collector's next full pass."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _live_ffmpeg_encoders() -> int:
    from lowvox.audio.encode import _AvEncoder

    return sum(isinstance(o, _AvEncoder) for o in gc.get_objects())


@pytest.mark.parametrize("case", ["before audio", "mid-stream", "mid-stream, saved"])
def test_a_stream_cut_short_frees_its_encoders_at_once(server, client, collector_off, case):
    """An FFmpeg encoder holds native threads (two for the codec and two for its
    resampler on a 2-core machine) and buffers. A client that leaves an mp3 stream,
    before its first audio or during it, frees them with its request: they were kept
    in reference cycles until a full garbage collection (60 threads after 30 clients)."""
    engine = server.engine
    engine.gate.clear()  # the engine holds its last chunk
    text = "leave" if case == "before audio" else f"leave this stream early ({case})"
    body = {"input": text, "voice": "alpha", "response_format": "mp3", "stream": True}
    if case.endswith("saved"):
        body["save"] = True
    if case == "before audio":
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/audio/speech", json=body, timeout=httpx.Timeout(30, read=0.5))
    else:
        with client.stream("POST", "/v1/audio/speech", json=body) as r:
            assert next(r.iter_raw())
    assert wait_for(lambda: text in engine.cancelled_jobs)
    assert wait_for(lambda: _live_ffmpeg_encoders() == 0)
    engine.gate.set()


def _fetch_kept(client: httpx.Client, url: str) -> bytes:
    """The kept copy at `url`: published as soon as the job has stopped."""
    answers: list[httpx.Response] = []
    assert wait_for(lambda: answers.append(client.get(url)) or answers[-1].status_code == 200)
    return answers[-1].content


def test_stream_cut_short_by_its_client_keeps_a_playable_file(server, client):
    """SillyTavern's AllTalk streaming URL (a browser <audio> element): the listener skips
    the message after four chunks. The slot is freed, and the file the stream promised
    (X-Output-File-Url) holds, as a complete WAV, exactly the audio that was sent."""
    engine = server.engine
    engine.gate.clear()  # the engine holds its last chunk: the client leaves before it
    text = "one two three four five six"
    params = {"text": text, "voice": "beta", "language": "en", "output_file": "stream_output.wav"}
    got = b""
    with client.stream("GET", "/api/tts-generate-streaming", params=params) as r:
        url = r.headers["x-output-file-url"]
        wanted = 44 + 4 * int(CHUNK_SECONDS * FAKE_RATE) * 2  # header + four chunks
        for data in r.iter_raw():
            got += data
            if len(got) >= wanted:
                break
    assert wait_for(lambda: text in engine.cancelled_jobs)
    assert text not in engine.finished_jobs
    kept = _fetch_kept(client, url)
    assert kept[:4] == b"RIFF" and int.from_bytes(kept[4:8], "little") == len(kept) - 8
    assert int.from_bytes(kept[40:44], "little") == len(kept) - 44  # sizes filled in
    samples, rate, _ = decode(kept, "wav")
    sent = np.frombuffer(got[44:wanted], dtype="<i2").astype(np.float32) / 32768
    assert rate == FAKE_RATE and np.array_equal(samples, sent)
    assert abs(dominant_frequency(samples, rate) - fake_frequency("beta", text)) < 5
    engine.gate.set()


def test_cancelled_stream_keeps_what_it_made_in_its_format(server, client):
    """A saved mp3 stream stopped by its id: the copy is a complete, decodable mp3."""
    engine = server.engine
    engine.gate.clear()
    text = "stop this saved stream soon"
    body = {"input": text, "voice": "gamma", "response_format": "mp3", "save": True}
    with client.stream(
        "POST", "/v1/audio/speech", json=body, headers={"X-Request-Id": "kept-1"}
    ) as r:
        url = r.headers["x-output-file-url"]
        it = r.iter_raw()
        assert next(it)
        assert wait_for(lambda: engine.active == 1)
        with server.client() as other:
            assert other.post("/api/cancel/kept-1").json() == {"cancelled": 1}
        b"".join(it)  # the stream ends early instead of hanging
    assert wait_for(lambda: text in engine.cancelled_jobs)
    samples, rate, _ = decode(_fetch_kept(client, url), "mp3")
    # The engine holds the last of its five chunks: at most four were made.
    assert 0 < len(samples) / rate <= 4 * CHUNK_SECONDS + 0.1
    assert abs(dominant_frequency(samples, rate) - fake_frequency("gamma", text)) < 10
    engine.gate.set()


def test_non_streaming_disconnect_cancels_the_job(server):
    engine = server.engine
    engine.gate.clear()
    text = "nobody waits for me"
    with server.client() as c, pytest.raises(httpx.ReadTimeout):
        c.post(
            "/v1/audio/speech",
            json={"input": text, "voice": "gamma"},
            timeout=httpx.Timeout(30, read=0.5),
        )
    assert wait_for(lambda: text in engine.cancelled_jobs)
    assert text not in engine.finished_jobs
    engine.gate.set()


def test_stop_all_cancels_running_and_queued(server, client):
    engine = server.engine
    engine.gate.clear()
    answers: list[int] = []

    def send(text: str) -> None:
        with server.client() as c:
            answers.append(
                c.post(
                    "/v1/audio/speech", json={"input": text, "voice": "alpha", "stream": False}
                ).status_code
            )

    threads = [threading.Thread(target=send, args=(f"stop number {i}",)) for i in range(3)]
    for t in threads:
        t.start()
    assert wait_for(
        lambda: engine.active == 1 and server.state.hub.loaded()["espeak"].scheduler.queued == 2
    )
    assert client.post("/api/stop").json()["cancelled"] == 3
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "the cancelled request never answered"
    assert answers == [499, 499, 499]
    engine.gate.set()


def test_pcm_frequency_sanity():
    # Guards the helper the tests above rely on.
    t = np.arange(FAKE_RATE) / FAKE_RATE
    assert abs(dominant_frequency(np.sin(2 * np.pi * 321 * t), FAKE_RATE) - 321) < 2


def test_cancel_a_stream_by_id(server, client):
    engine = server.engine
    engine.gate.clear()
    text = "cancel my stream please"
    body = {"input": text, "voice": "beta", "response_format": "pcm", "stream": True}
    with client.stream("POST", "/v1/audio/speech", json=body, headers={"X-Request-Id": "s-1"}) as r:
        assert r.headers["x-request-id"] == "s-1"
        it = r.iter_raw()
        assert next(it)
        with server.client() as other:
            assert other.post("/api/cancel/s-1").json() == {"cancelled": 1}
        rest = b"".join(it)  # the stream ends early instead of hanging
    assert len(rest) < 4 * 2400 * 2
    assert wait_for(lambda: text in engine.cancelled_jobs)
    engine.gate.set()


def test_stream_failing_before_audio_gets_a_status_code(server, client, monkeypatch):
    def broken(request, cancel=None):
        raise RuntimeError("engine exploded with /secret/path")
        yield  # pragma: no cover

    monkeypatch.setattr(server.engine, "synthesize_stream", broken)
    r = client.post("/v1/audio/speech", json={"input": "x", "voice": "alpha", "stream": True})
    assert r.status_code == 500
    assert "secret" not in r.text


@pytest.mark.slow
def test_keep_alive_unloads_an_idle_engine_and_reloads_on_demand(tmp_path):
    with live_server(tmp_path, keep_alive=0.3) as s, s.client() as c:
        assert (
            c.post("/v1/audio/speech", json={"input": "warm", "voice": "alpha"}).status_code == 200
        )
        assert wait_for(lambda: "espeak" not in s.state.hub.loaded())
        r = c.post("/v1/audio/speech", json={"input": "back again", "voice": "alpha"})
        assert r.status_code == 200
        assert s.engine.finished_jobs[-1] == "back again"
