"""The real default engine (espeak) behind the real server."""

from __future__ import annotations

import threading

import pytest

from lowvox.errors import LowvoxError
from tests.server.srv_audio import decode
from tests.server.srv_fixtures import LiveServer, make_settings


@pytest.fixture(scope="module")
def espeak_server(tmp_path_factory):
    try:
        from lowvox.engines.espeak import EspeakEngine

        EspeakEngine().load()
    except (ImportError, LowvoxError, OSError) as e:
        pytest.skip(f"espeak is not available: {e}")
    with LiveServer(make_settings(tmp_path_factory.mktemp("espeak")), None) as s:
        yield s


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus", "flac"])
def test_speech_in_every_format(espeak_server, fmt):
    with espeak_server.client() as c:
        r = c.post("/v1/audio/speech", json={"input": "Hello from lowvox.", "response_format": fmt})
    assert r.status_code == 200, r.text
    samples, rate, channels = decode(r.content, fmt, pcm_rate=int(r.headers["x-sample-rate"]))
    assert channels == 1 and rate == int(r.headers["x-sample-rate"])
    assert 0.3 < len(samples) / rate < 5
    assert abs(samples).max() > 0.05  # it said something


def test_streaming_wav_and_saved_copy(espeak_server):
    with espeak_server.client() as c:
        with c.stream(
            "GET",
            "/api/tts-generate-streaming",
            params={"text": "Streaming with espeak works.", "voice": "en", "language": "en"},
        ) as r:
            assert r.status_code == 200
            body = b"".join(r.iter_bytes())
            url = r.headers["x-output-file-url"]
        streamed, rate, _ = decode(body, "wav")
        saved, rate2, _ = decode(c.get(url).content, "wav")
    assert rate == rate2 and len(streamed) == len(saved) and len(saved) / rate > 0.5


def test_alltalk_generate_and_languages(espeak_server):
    with espeak_server.client() as c:
        voices = c.get("/api/voices").json()["voices"]
        assert "en" in voices
        r = c.post(
            "/api/tts-generate",
            data={"text_input": "Guten Tag.", "character_voice_gen": "de", "language": "de"},
        )
        assert r.json()["status"] == "generate-success"
        r = c.post("/v1/audio/speech", json={"input": "x", "language": "tlh"})
        assert r.status_code == 400 and "unknown language" in r.json()["detail"]


def test_concurrent_requests_get_their_own_audio(espeak_server):
    # Lengths far apart, so that an answer holding another request's audio would show.
    texts = [
        ("en", "Hi."),
        ("de", "Der zweite Satz ist schon etwas länger."),
        ("fr", "La troisième phrase est encore bien plus longue que la deuxième, vraiment."),
        (
            "en",
            "Number four is the longest of them all, by a wide margin, with many, many more words to say.",
        ),
    ]
    got: dict[int, bytes] = {}

    def one(i: int) -> None:
        lang, text = texts[i]
        with espeak_server.client() as c:
            got[i] = c.post(
                "/v1/audio/speech",
                json={
                    "input": text,
                    "language": lang,
                    "voice": lang,
                    "response_format": "pcm",
                    "stream": i % 2 == 0,
                },
            ).content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # espeak-ng's output varies by a few samples from call to call, so compare lengths:
    # each answer must match its own request made alone, not a neighbour's.
    with espeak_server.client() as c:
        alone = [
            len(
                c.post(
                    "/v1/audio/speech",
                    json={"input": t, "language": lang, "voice": lang, "response_format": "pcm"},
                ).content
            )
            for lang, t in texts
        ]
    for i, n in enumerate(alone):
        assert abs(len(got[i]) - n) < 0.01 * n
        others = [m for j, m in enumerate(alone) if j != i]
        assert all(abs(len(got[i]) - m) > 0.01 * m for m in others)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_pcm_is_24khz_whatever_the_engine_rate(espeak_server, stream):
    """OpenAI clients play headerless pcm at 24 kHz; espeak makes 22.05 kHz audio."""
    body = {"input": "Hello from lowvox.", "response_format": "pcm", "stream": stream}
    with espeak_server.client() as c:
        pcm = c.post("/v1/audio/speech", json=body)
        wav = c.post("/v1/audio/speech", json={**body, "response_format": "wav"})
    assert pcm.status_code == 200 and wav.headers["x-sample-rate"] == "22050"
    assert pcm.headers["x-sample-rate"] == "24000"
    samples, _, _ = decode(pcm.content, "pcm")
    reference, rate, _ = decode(wav.content, "wav")
    # Same duration as the engine's own audio, so it plays at the right speed.
    assert abs(len(samples) / 24_000 - len(reference) / rate) < 0.05
