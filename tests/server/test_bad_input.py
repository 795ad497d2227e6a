"""Bad input on every API: malformed bodies, huge texts and bodies, path tricks in names."""

from __future__ import annotations

import pytest

from tests.server.srv_fixtures import live_server


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    with live_server(
        tmp_path_factory.mktemp("small"), max_text_chars=100, max_upload_bytes=50_000
    ) as s:
        yield s


HUGE = "word " * 1000  # 5000 characters, over the 100 allowed


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/v1/audio/speech", {"json": {"input": HUGE, "voice": "alpha"}}),
        ("POST", "/v1/audio/speech", {"json": {"input": HUGE, "voice": "alpha", "stream": True}}),
        (
            "POST",
            "/api/tts-generate",
            {"data": {"text_input": HUGE, "character_voice_gen": "alpha"}},
        ),
        ("GET", "/api/tts-generate-streaming", {"params": {"text": HUGE, "voice": "alpha"}}),
        (
            "POST",
            "/tts_to_audio/",
            {"json": {"text": HUGE, "speaker_wav": "alpha", "language": "en"}},
        ),
        (
            "GET",
            "/tts_stream",
            {"params": {"text": HUGE, "speaker_wav": "alpha", "language": "en"}},
        ),
        (
            "POST",
            "/tts_to_file",
            {
                "json": {
                    "text": HUGE,
                    "speaker_wav": "alpha",
                    "language": "en",
                    "file_name_or_path": "x",
                }
            },
        ),
    ],
)
def test_huge_text_is_refused_everywhere_and_nothing_is_stored(small, method, path, kwargs):
    before = sorted(small.settings.outputs_path.iterdir())
    with small.client() as c:
        r = c.request(method, path, **kwargs)
    assert r.status_code == 400, r.text
    assert "over the limit of 100" in r.text
    assert sorted(small.settings.outputs_path.iterdir()) == before


def test_huge_body_is_413_before_it_is_read(small):
    with small.client() as c:
        r = c.post(
            "/v1/audio/speech",
            content=b"x" * 2_000_000,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 413
        assert "over the limit" in r.json()["detail"]

        def chunks():
            for _ in range(40):
                yield b"y" * 50_000

        r = c.post("/tts_to_audio/", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        (
            "/v1/audio/speech",
            {"content": b"[1, 2", "headers": {"Content-Type": "application/json"}},
        ),
        ("/v1/audio/speech", {"json": ["a", "list"]}),
        ("/v1/audio/speech", {"json": {"input": 12, "voice": "alpha"}}),
        ("/v1/audio/speech", {"json": {"input": "hi", "voice": 3.5}}),
        ("/v1/audio/speech", {"json": {"input": "hi", "stream": "sometimes"}}),
        (
            "/api/tts-generate",
            {
                "content": b"--b\r\nbroken",
                "headers": {"Content-Type": "multipart/form-data; boundary=b"},
            },
        ),
        (
            "/api/tts-generate",
            {
                "data": {
                    "text_input": "hi",
                    "character_voice_gen": "alpha",
                    "output_file_timestamp": "maybe",
                }
            },
        ),
        (
            "/api/tts-generate",
            {"data": {"text_input": "hi", "character_voice_gen": "alpha", "speed": "nan"}},
        ),
        (
            "/set_tts_settings",
            {"content": b"{bad", "headers": {"Content-Type": "application/json"}},
        ),
        ("/api/reload?tts_method=../../etc", {}),
        ("/api/lowvramsetting?new_low_vram_value=sometimes", {}),
        ("/api/runtime", {"json": {"device": "quantum"}}),
        ("/api/runtime", {"json": {"precision": "fp8"}}),
        ("/api/runtime", {"json": {"warp": 9}}),
    ],
)
def test_malformed_requests_are_clear_4xx(client, path, kwargs):
    r = client.post(path, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert body.get("detail") or body.get("error")
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    ("path", "data", "field"),
    [
        (
            "/api/tts-generate",
            {
                "text_input": "hi",
                "character_voice_gen": "alpha",
                "output_file_name": "../../../outside",
            },
            "output_file_path",
        ),
        (
            "/api/tts-generate",
            {"text_input": "hi", "character_voice_gen": "alpha", "output_file_name": "/etc/passwd"},
            "output_file_path",
        ),
    ],
)
def test_output_names_cannot_escape(server, client, path, data, field):
    r = client.post(path, data=data)
    out = r.json()[field]
    assert out.startswith(str(server.settings.outputs_path) + "/")
    assert "/" not in out.removeprefix(str(server.settings.outputs_path) + "/")


def test_streaming_output_name_cannot_escape(server, client):
    params = {"text": "hi there", "voice": "alpha", "output_file": "../../evil.wav"}
    with client.stream("GET", "/api/tts-generate-streaming", params=params) as r:
        b"".join(r.iter_bytes())
        name = r.headers["x-output-file"]
    assert "/" not in name and ".." not in name
    assert (server.settings.outputs_path / name).is_file()
    assert not (server.settings.home.parent / "evil.wav").exists()


def test_posted_streaming_output_name_cannot_escape(server, client):
    """The POST form keeps the name the client asked for (as AllTalk does), made safe."""
    form = {"text": "hi there", "voice": "alpha", "output_file": "../../evil.wav"}
    r = client.post("/api/tts-generate-streaming", data=form)
    assert r.status_code == 200, r.text
    name = r.json()["output_file_path"]
    assert name == "evil.wav"
    assert (server.settings.outputs_path / name).is_file()
    assert not (server.settings.home.parent / "evil.wav").exists()


def test_unknown_routes_are_404_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and "not found" in r.json()["detail"]


def test_runtime_change_reloads_the_engine(tmp_path):
    with live_server(tmp_path) as s, s.client() as c:
        r = c.post("/api/runtime", json={"precision": "fp32", "device": "cpu"})
        assert r.status_code == 200
        assert r.json()["precision"] == "fp32" and r.json()["device"] == "cpu"
        assert s.state.settings.precision == "fp32"
        assert c.get("/api/ready").text == "Ready"


@pytest.mark.parametrize(
    "voice", ["../../etc/passwd", "/etc/hosts", "..\\secret", ".hidden", "sub/dir"]
)
def test_voice_names_that_look_like_paths_are_refused(client, voice):
    for r in (
        client.post("/v1/audio/speech", json={"input": "hi", "voice": voice}),
        client.post("/tts_to_audio/", json={"text": "hi", "speaker_wav": voice, "language": "en"}),
        client.post("/api/tts-generate", data={"text_input": "hi", "character_voice_gen": voice}),
    ):
        assert r.status_code == 400, r.text
        assert "voice" in r.text


def test_file_like_voice_names_map_to_voices_or_fail(server, client, tmp_path, monkeypatch):
    # A file called like a voice in the server's working directory is never read.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stranger.wav").write_bytes(b"RIFF")
    r = client.post(
        "/tts_to_audio/", json={"text": "hi", "speaker_wav": "stranger.wav", "language": "en"}
    )
    assert r.status_code == 404 and "unknown voice" in r.text
    r = client.post(
        "/tts_to_audio/", json={"text": "hi", "speaker_wav": "Beta.wav", "language": "en"}
    )
    assert r.status_code == 200
