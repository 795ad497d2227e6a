"""Replays of SillyTavern's AllTalk provider (v1 and v2 modes) against a running server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lowvox.engines.base import EngineCapabilities
from tests.server.srv_audio import decode, dominant_frequency
from tests.server.srv_fixtures import (
    CHUNK_SECONDS,
    FakeFactory,
    fake_chunks,
    fake_frequency,
    live_server,
    st_form,
)

ST_HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "Cache-Control": "no-cache"}


def st_startup(c) -> list[str]:
    """loadSettings(): ready check, current settings, voices, RVC voices."""
    r = c.get("/api/ready")
    assert r.text == "Ready"
    settings = c.get("/api/currentsettings").json()
    # The provider sorts models_available by `name` and reads these keys.
    names = sorted(m["name"] for m in settings["models_available"])
    assert names and all("model_name" in m for m in settings["models_available"])
    for key in (
        "engines_available", "current_engine_loaded", "current_model_loaded",
        "deepspeed_capable", "deepspeed_available", "deepspeed_enabled",
        "lowvram_capable", "lowvram_enabled",
    ):  # fmt: skip
        assert key in settings
    voices = c.get("/api/voices").json()
    assert voices["status"] == "success"
    rvc = c.get("/api/rvcvoices").json()
    assert rvc == {"status": "success", "rvcvoices": ["Disabled"]}
    return voices["voices"]


def st_generate(c, text, voice, **extra) -> dict:
    """fetchTtsGeneration(): exactly the fields SillyTavern sends."""
    form = st_form(text, voice, **extra)
    r = c.post("/api/tts-generate", data=form, headers=ST_HEADERS)
    assert r.status_code == 200, r.text
    return r.json()


def test_sillytavern_v2_sequence(client):
    voices = st_startup(client)
    voice = voices[1]
    text = "Hello there traveller"
    data = st_generate(client, text, voice, rvccharacter_voice_gen="Disabled")
    assert data["status"] == "generate-success"
    # v2 prefixes the endpoint: the URL must be relative.
    assert data["output_file_url"].startswith("/audio/st_output_")
    assert data["output_cache_url"].startswith("/audiocache/")
    audio = client.get(data["output_file_url"])
    assert audio.status_code == 200
    samples, rate, channels = decode(audio.content, "wav")
    assert channels == 1
    assert abs(len(samples) / rate - fake_chunks(text) * CHUNK_SECONDS) < 0.01
    assert abs(dominant_frequency(samples, rate) - fake_frequency(voice, text)) < 5
    assert client.get(data["output_cache_url"]).content == audio.content


def test_sillytavern_v1_sequence_gets_absolute_urls(tmp_path):
    with live_server(tmp_path, public_url="http://127.0.0.1:7851") as s, s.client() as c:
        voices = st_startup(c)
        data = st_generate(c, "absolute please", voices[0] + ".wav")  # v1 names carry .wav
        assert data["output_file_url"].startswith("http://127.0.0.1:7851/audio/st_output_")
        path = data["output_file_url"].removeprefix("http://127.0.0.1:7851")
        assert c.get(path).status_code == 200


def test_sillytavern_streaming_mode(client):
    url = "/api/tts-generate-streaming"
    params = {
        "text": "stream this text now",
        "voice": "beta",
        "language": "en",
        "output_file": "stream_output.wav",
    }
    with client.stream("GET", url, params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("audio/wav")
        assert r.headers["x-accel-buffering"] == "no"
        saved = r.headers["x-output-file-url"]
        body = b"".join(r.iter_bytes())
    assert body[:4] == b"RIFF" and body[4:8] == b"\xff\xff\xff\xff"
    # The streamed audio was also saved as a proper file.
    kept = client.get(saved)
    assert kept.status_code == 200
    a, _, _ = decode(body, "wav")
    b, _, _ = decode(kept.content, "wav")
    assert np.array_equal(a, b)


def test_narrator_renders_segments_in_order(client):
    text = '*The door creaks open slowly.* "Who goes there?" *A pause.*'
    data = st_generate(
        client,
        text,
        "alpha",
        narrator_enabled="true",
        narrator_voice_gen="gamma",
        text_not_inside="narrator",
    )
    samples, rate, _ = decode(client.get(data["output_file_url"]).content, "wav")
    first = "The door creaks open slowly."
    second = "Who goes there?"
    third = "A pause."
    n1 = fake_chunks(first) * int(CHUNK_SECONDS * rate)
    n2 = fake_chunks(second) * int(CHUNK_SECONDS * rate)
    assert len(samples) == n1 + n2 + fake_chunks(third) * int(CHUNK_SECONDS * rate)
    assert abs(dominant_frequency(samples[:n1], rate) - fake_frequency("gamma", first)) < 5
    assert (
        abs(dominant_frequency(samples[n1 : n1 + n2], rate) - fake_frequency("alpha", second)) < 5
    )
    assert abs(dominant_frequency(samples[n1 + n2 :], rate) - fake_frequency("gamma", third)) < 5


def test_silent_narrator_skips_narration(client):
    text = '*He waves.* "Goodbye friend"'
    data = st_generate(client, text, "beta", narrator_enabled="silent", narrator_voice_gen="gamma")
    samples, rate, _ = decode(client.get(data["output_file_url"]).content, "wav")
    assert len(samples) == fake_chunks("Goodbye friend") * int(CHUNK_SECONDS * rate)


def test_settings_toggles_and_reload(client):
    assert (
        client.post("/api/lowvramsetting?new_low_vram_value=True").json()["status"]
        == "lowvram-success"
    )
    assert client.get("/api/currentsettings").json()["lowvram_enabled"] is True
    assert client.post("/api/lowvramsetting?new_low_vram_value=False").status_code == 200
    assert (
        client.post("/api/deepspeed?new_deepspeed_value=True").json()["status"]
        == "deepspeed-success"
    )
    assert client.get("/api/currentsettings").json()["deepspeed_enabled"] is True
    client.post("/api/deepspeed?new_deepspeed_value=False")
    r = client.post("/api/reload?tts_method=espeak")
    assert r.json()["status"] == "model-success"
    assert client.post("/api/reload?tts_method=nonsense").status_code == 404
    assert client.get("/api/ready").text == "Ready"


class PitchFactory(FakeFactory):
    """Engines with a pitch control of their own, as espeak has."""

    def __call__(self, name, settings):
        engine = super().__call__(name, settings)
        engine.capabilities = EngineCapabilities(streaming=True, speed=True, pitch=True)
        return engine


def test_pitch_is_not_offered_where_alltalks_pitch_field_is_not_applied(tmp_path):
    """Real AllTalk v2 (tts_server.py, `apifunction_get_current_settings`) says
    `pitch_capable` when the `pitch` field of /api/tts-generate changes the voice, and
    text-generation-webui's extension (TGWUI_Extension/script.py) offers its pitch slider
    only then. lowvox's AllTalk routes do not pass that field on (AllTalk's -10..10 is not
    espeak's 0..100), so the slider must not be offered for a pitch-capable engine."""
    with live_server(tmp_path, PitchFactory()) as s, s.client() as c:
        settings = c.get("/api/currentsettings").json()
        assert settings["pitch_capable"] is False
        assert settings["generationspeed_capable"] is True  # the speed field is applied


def test_preview_voice(client):
    r = client.post("/api/previewvoice/", data={"voice": "gamma"}, headers=ST_HEADERS)
    assert r.status_code == 200
    url = r.json()["output_file_url"]
    assert url.startswith("/audio/preview_")
    assert client.get(url).status_code == 200


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"text_input": ""}, "text is empty"),
        ({"text_input": "hi", "character_voice_gen": "nobody"}, "unknown voice"),
        ({"text_input": "hi", "language": "klingon"}, "unknown language"),
        ({"text_input": "hi", "speed": "9"}, "speed"),
        ({"text_input": "hi", "narrator_enabled": "maybe"}, "narrator_enabled"),
        ({"text_input": "hi", "text_filtering": "weird"}, "text filter"),
        ({"text_input": "hi", "temperature": "hot"}, "temperature"),
    ],
)
def test_generate_failures_are_clear(client, form, words):
    r = client.post("/api/tts-generate", data={"character_voice_gen": "alpha", **form})
    assert 400 <= r.status_code < 500
    body = r.json()
    assert body["status"] == "generate-failure"
    assert words in body["error"].lower()


def test_stop_generation_stops_a_running_generation(server, client):
    engine = server.engine
    engine.gate.clear()
    answers = []

    def send():
        with server.client() as c:
            answers.append(
                c.post(
                    "/api/tts-generate",
                    data={"text_input": "long speech here", "character_voice_gen": "beta"},
                )
            )

    t = threading.Thread(target=send)
    t.start()
    deadline = time.monotonic() + 10
    while engine.active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    r = client.put("/api/stop-generation")
    assert r.status_code == 200 and r.json()["cancelled"] == 1
    t.join(60)
    assert not t.is_alive(), "the cancelled request never answered"
    assert answers[0].status_code == 499
    assert answers[0].json()["status"] == "generate-failure"
    deadline = time.monotonic() + 10  # the engine's thread may notice the cancel a bit later
    while "long speech here" not in engine.cancelled_jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "long speech here" in engine.cancelled_jobs
    engine.gate.set()


@pytest.mark.parametrize("multipart", [False, True])
def test_streaming_endpoint_post_saves_the_file_and_answers_json(server, client, multipart):
    """Real AllTalk (v1 and v2 tts_server.py, the POST `tts_generate_streaming`) does not
    stream on POST: it writes the file and answers `{"output_file_path": <name>}`. Its
    documented call is a urlencoded form; v1's own demo page (system/admin.html) posts
    multipart FormData and then plays `/audio/<output_file_path>`."""
    name = f"posted_{int(multipart)}.wav"
    form = {"text": "posted stream", "voice": "gamma", "language": "en", "output_file": name}
    if multipart:
        r = client.post(
            "/api/tts-generate-streaming", files={k: (None, v) for k, v in form.items()}
        )
    else:
        r = client.post("/api/tts-generate-streaming", data=form, headers=ST_HEADERS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"output_file_path": name}
    audio = client.get(f"/audio/{name}")
    assert audio.status_code == 200
    samples, rate, _ = decode(audio.content, "wav")
    assert len(samples) == fake_chunks("posted stream") * int(CHUNK_SECONDS * rate)
    assert (server.settings.outputs_path / name).is_file()


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_streaming_endpoint_failures_carry_an_error_string(client, method):
    """Real AllTalk v2 (tts_server.py, `apifunction_generate_streaming`) answers a failed
    stream with `{"error": "<text>"}`, and its POST form with FastAPI's `{"detail": ...}`;
    AllTalk's own test_server.py reads `error_data.get("error", "").lower()`."""
    fields = {"text": "hi", "voice": "nobody", "language": "en", "output_file": "x"}
    if method == "GET":
        r = client.get("/api/tts-generate-streaming", params=fields)
    else:
        r = client.post("/api/tts-generate-streaming", data=fields)
    assert r.status_code == 404
    body = r.json()
    assert isinstance(body["error"], str) and "unknown voice" in body["error"].lower()
    assert isinstance(body["detail"], str) and "unknown voice" in body["detail"].lower()


def test_narrator_streams_too(client):
    text = '*She smiles.* "Nice to meet you"'
    form = {
        "text_input": text,
        "character_voice_gen": "alpha",
        "narrator_enabled": "true",
        "narrator_voice_gen": "gamma",
        "text_not_inside": "narrator",
        "streaming": "true",
    }
    with client.stream("POST", "/api/tts-generate", data=form) as r:
        assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
        body = b"".join(r.iter_bytes())
        saved = r.headers["x-output-file-url"]
    samples, rate, _ = decode(body, "wav")
    n1 = fake_chunks("She smiles.") * int(CHUNK_SECONDS * rate)
    assert abs(dominant_frequency(samples[:n1], rate) - fake_frequency("gamma", "She smiles.")) < 5
    assert (
        abs(dominant_frequency(samples[n1:], rate) - fake_frequency("alpha", "Nice to meet you"))
        < 5
    )
    kept, _, _ = decode(client.get(saved).content, "wav")
    assert np.array_equal(kept, samples)


@pytest.mark.slow
def test_language_auto_detects_the_text_language(server, client):
    st_generate(
        client,
        "Guten Tag, wie geht es dir heute? Ich hoffe, es geht dir gut.",
        "alpha",
        language="auto",
    )
    assert server.engine.languages_seen[-1] == "de"
    st_generate(client, "Good morning, how are you doing today?", "alpha", language="auto")
    assert server.engine.languages_seen[-1] == "en"


def test_region_and_case_spellings_of_a_language_resolve(server, client):
    for asked, expected in (("de_DE", "de"), ("FR", "fr"), ("fr-CA", "fr")):
        st_generate(client, "Bonjour, comment allez-vous?", "alpha", language=asked)
        assert server.engine.languages_seen[-1] == expected
