"""Replay of SillyTavern's XTTSv2 provider (xtts-api-server API) against a running server."""

from __future__ import annotations

import pytest

from lowvox.engines.base import EngineCapabilities
from lowvox.server.routes.xtts_api import _request_options
from tests.server.srv_audio import decode, dominant_frequency
from tests.server.srv_fixtures import (
    CHUNK_SECONDS,
    FakeEngine,
    FakeFactory,
    fake_chunks,
    fake_frequency,
    live_server,
)

ST_JSON = {"Content-Type": "application/json", "Cache-Control": "no-cache"}
# What the provider sends from its sliders: jQuery .val() gives strings.
ST_SETTINGS = {
    "temperature": "0.75",
    "speed": "1.5",
    "length_penalty": "1",
    "repetition_penalty": "5",
    "top_p": "0.85",
    "top_k": "0",
    "enable_text_splitting": True,
    "stream_chunk_size": "100",
}


class OptionsEngine(FakeEngine):
    """Takes the options XTTS takes, and remembers those each request brought."""

    capabilities = EngineCapabilities(
        streaming=True, temperature=True, repetition_penalty=True, sentence_splitting=True
    )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.options_seen: list[dict] = []

    def synthesize_stream(self, request, cancel=None):
        self.options_seen.append(dict(request.options))
        yield from super().synthesize_stream(request, cancel)


@pytest.fixture(scope="module")
def options_server(tmp_path_factory):
    factory = FakeFactory()
    factory.engines = {"espeak": OptionsEngine(), "xtts": OptionsEngine()}
    with live_server(tmp_path_factory.mktemp("xtts-api-options"), factory) as s:
        yield s


def test_sillytavern_xtts_sequence(server, client):
    # checkReady(): speakers and settings in parallel
    speakers = client.get("/speakers").json()
    assert [s["name"] for s in speakers] == ["alpha", "beta", "gamma"]
    assert all({"name", "voice_id", "preview_url"} <= set(s) for s in speakers)
    r = client.post("/set_tts_settings", json=ST_SETTINGS, headers=ST_JSON)
    assert r.status_code == 200, r.text
    opts = server.state.tts_options
    assert opts["speed"] == 1.5 and opts["top_k"] == 0 and opts["temperature"] == 0.75
    # What each request then asks the engine for: top_k 0, which the sampler reads as "off"
    # (None would be the checkpoint's default of 50).
    speed, request_options = _request_options(server.state)
    assert speed == 1.5 and request_options["top_k"] == 0
    # generateTts(): non-streaming
    voice = speakers[2]["voice_id"]
    text = "the provider strips quotes"
    r = client.post(
        "/tts_to_audio/",
        json={"text": text, "speaker_wav": voice, "language": "en"},
        headers=ST_JSON,
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "audio/wav"
    # The real server.py answers with FileResponse(..., filename="output.wav").
    assert r.headers["content-disposition"] == 'attachment; filename="output.wav"'
    samples, rate, _ = decode(r.content, "wav")
    assert abs(len(samples) / rate - fake_chunks(text) * CHUNK_SECONDS) < 0.01
    # The speed set through /set_tts_settings applies (the fake engine scales its pitch).
    assert abs(dominant_frequency(samples, rate) - 1.5 * fake_frequency(voice, text)) < 10
    client.post("/set_tts_settings", json={"speed": "1"}, headers=ST_JSON)


def test_streaming_url_the_provider_builds(client):
    for path in ("/tts_stream/", "/tts_stream"):
        params = {"text": "streaming for the audio tag", "speaker_wav": "beta", "language": "en"}
        with client.stream("GET", path, params=params) as r:
            assert r.status_code == 200
            assert r.headers["x-accel-buffering"] == "no"
            body = b"".join(r.iter_bytes())
        samples, rate, _ = decode(body, "wav")
        assert abs(len(samples) / rate - fake_chunks(params["text"]) * CHUNK_SECONDS) < 0.01


def test_lists_and_languages(client):
    assert client.get("/speakers_list").json() == ["alpha", "beta", "gamma"]
    langs = client.get("/languages").json()["languages"]
    assert langs["English"] == "en" and langs["German"] == "de"


def test_tts_to_file_stays_in_outputs(server, client):
    r = client.post(
        "/tts_to_file",
        json={
            "text": "save me",
            "speaker_wav": "alpha",
            "language": "en",
            "file_name_or_path": "../../etc/evil.wav",
        },
    )
    assert r.status_code == 200
    out = r.json()["output_path"]
    assert out.startswith(str(server.settings.outputs_path))
    assert "evil" in out and ".." not in out


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"temperature": "warm"}, 400),
        ({"top_p": "2"}, 400),
        ({"speed": "0"}, 400),
        # The XTTS sampler needs a penalty above 0: accepted, it would fail every request.
        ({"repetition_penalty": "0"}, 400),
        ({"enable_text_splitting": "perhaps"}, 400),
        # Integer settings: a fraction is refused, not cut to an integer.
        ({"top_k": "2.5"}, 400),
        ({"stream_chunk_size": 10.5}, 400),
    ],
)
def test_bad_settings(client, body, status):
    r = client.post("/set_tts_settings", json=body)
    assert r.status_code == status
    assert list(body)[0] in r.json()["detail"]


def test_bad_generation_requests(client):
    r = client.post(
        "/tts_to_audio/", json={"text": "hi", "speaker_wav": "nobody", "language": "en"}
    )
    assert r.status_code == 404 and "unknown voice" in r.json()["detail"]
    r = client.post("/tts_to_audio/", json={"text": "  ", "speaker_wav": "alpha", "language": "en"})
    assert r.status_code == 400
    r = client.get("/tts_stream", params={"text": "hi", "speaker_wav": "alpha", "language": "zz"})
    assert r.status_code == 400 and "language" in r.json()["detail"]
    r = client.post(
        "/tts_to_audio/", content=b"{oops", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "json" in r.json()["detail"].lower()
    r = client.post("/tts_to_audio/", json=["not", "an", "object"])
    assert r.status_code == 400


def test_sample_of_unknown_voice_is_404(client):
    assert client.get("/sample/nobody.wav").status_code == 404
    assert client.get("/sample/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_settings_reach_an_engine_that_takes_them(options_server):
    # xtts-api-server hands its settings to XTTS's inference(): enable_text_splitting false
    # speaks the whole text in one generation (real tts_funcs.py, coqui's xtts.py).
    engine = options_server.factory.engines["espeak"]
    speech = {"text": "One sentence. And another one.", "speaker_wav": "alpha", "language": "en"}
    with options_server.client() as c:
        for splitting in (False, True):
            settings = {**ST_SETTINGS, "top_k": "40", "enable_text_splitting": splitting}
            assert c.post("/set_tts_settings", json=settings, headers=ST_JSON).status_code == 200
            assert c.post("/tts_to_audio/", json=speech, headers=ST_JSON).status_code == 200
            with c.stream("GET", "/tts_stream/", params=speech) as r:
                assert r.status_code == 200
                r.read()
            for seen in engine.options_seen[-2:]:
                assert seen == {
                    "temperature": 0.75,
                    "repetition_penalty": 5.0,
                    "top_p": 0.85,
                    "top_k": 40,
                    "split_sentences": splitting,
                }


def test_get_tts_settings_and_the_defaults_requests_use(tmp_path):
    # Real server.py: GET /get_tts_settings answers tts_settings plus stream_chunk_size;
    # tts_funcs.py starts from its own table and hands it to every inference call.
    defaults = {
        "temperature": 0.75,
        "length_penalty": 1.0,
        "repetition_penalty": 5.0,
        "top_k": 50,
        "top_p": 0.85,
        "speed": 1.0,
        "enable_text_splitting": True,
        "stream_chunk_size": 100,
    }
    factory = FakeFactory()
    factory.engines = {"espeak": OptionsEngine()}
    speech = {"text": "hello there", "speaker_wav": "alpha", "language": "en"}
    with live_server(tmp_path, factory) as s, s.client() as c:
        got = c.get("/get_tts_settings").json()
        assert got == defaults
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in defaults.items()}
        assert c.post("/tts_to_audio/", json=speech).status_code == 200
        assert factory.engines["espeak"].options_seen[-1] == {
            "temperature": 0.75,
            "repetition_penalty": 5.0,
            "top_k": 50,
            "top_p": 0.85,
            "split_sentences": True,
        }
        # A script's round trip: read the settings, change two, post them all back.
        changed = {**got, "speed": 1.25, "enable_text_splitting": False}
        assert c.post("/set_tts_settings", json=changed).status_code == 200
        assert c.get("/get_tts_settings").json() == changed
        # SillyTavern's slider strings come back as numbers.
        assert c.post("/set_tts_settings", json=ST_SETTINGS, headers=ST_JSON).status_code == 200
        got = c.get("/get_tts_settings").json()
        assert got["temperature"] == 0.75 and got["top_k"] == 0 and got["stream_chunk_size"] == 100


def test_get_models_list_and_switch_model(tmp_path):
    # Real server.py/tts_funcs.py: the list is what can be loaded; switching to the model
    # already loaded, or to one not listed, is a 400 with a detail; else "Model switched".
    with live_server(tmp_path) as s, s.client() as c:
        assert c.get("/get_models_list").json() == ["espeak", "xtts"]
        r = c.post("/switch_model", json={"model_name": "espeak"})
        assert r.status_code == 400 and "already loaded" in r.json()["detail"]
        r = c.post("/switch_model", json={"model_name": "v2.0.2"})
        assert r.status_code == 400 and "espeak, xtts" in r.json()["detail"]
        assert c.post("/switch_model", json={}).status_code == 400
        r = c.post("/switch_model", json={"model_name": "xtts"})
        assert r.status_code == 200 and r.json() == {"message": "Model switched to xtts"}
        speech = {"text": "now the other one", "speaker_wav": "alpha", "language": "en"}
        assert c.post("/tts_to_audio/", json=speech).status_code == 200
        assert s.factory.engines["xtts"].finished_jobs == ["now the other one"]


def test_folder_routes_never_move_a_folder(server, client, tmp_path):
    # Real server.py: /get_folders gives the three folders; /set_output and
    # /set_speaker_folder take any existing directory (400 otherwise). lowvox keeps its
    # folders: the one in use is agreed to, anything else is a 400 the client handles.
    state = server.state
    folders = {
        "speaker_folder": str(state.voices.root),
        "output_folder": str(state.outputs.root),
        "model_folder": str(server.settings.models_path),
    }
    assert client.get("/get_folders").json() == folders
    link = tmp_path / "link"
    for route, key, word in (
        ("/set_output", "output_folder", "Output"),
        ("/set_speaker_folder", "speaker_folder", "Speaker"),
    ):
        current = folders[key]
        for same in (current, current + "/"):
            r = client.post(route, json={key: same})
            assert r.status_code == 200 and r.json() == {"message": f"{word} folder set to {same}"}
        link.unlink(missing_ok=True)
        link.symlink_to(current)  # the same folder, but only by following a link: not looked at
        for elsewhere in (str(tmp_path), "/etc", "speakers/", "../..", "a\x00b", str(link), ""):
            r = client.post(route, json={key: elsewhere})
            assert r.status_code == 400, (route, elsewhere)
            assert key in r.json()["detail"]
        assert client.post(route, json={key: {"path": current}}).status_code == 400
    assert client.get("/get_folders").json() == folders
