"""The outputs folder: served safely, nothing outside it reachable, retention enforced."""

from __future__ import annotations

import os
import time

import pytest

from lowvox.server import app as app_module
from lowvox.server.outputs import OutputNotFound, OutputStore, safe_stem
from tests.full_disk import files_limited_to
from tests.server.srv_audio import decode
from tests.server.srv_fixtures import CHUNK_SECONDS, FAKE_RATE, fake_chunks, live_server


@pytest.mark.parametrize(
    "path",
    [
        "/audio/../settings.py",
        "/audio/..%2F..%2Fetc%2Fpasswd",
        "/audio/%2e%2e%2fsecret.txt",
        "/audio/%2Fetc%2Fpasswd",
        "/audio/.hidden.wav",
        "/audiocache/..%5C..%5Cwindows",
        "/audio/secret_link.wav",
    ],
)
def test_path_tricks_do_not_escape(server, client, path):
    secret = server.settings.home / "secret.txt"
    secret.write_text("top secret")
    link = server.settings.outputs_path / "secret_link.wav"
    if not link.exists():
        link.symlink_to(secret)
    (server.settings.outputs_path / ".hidden.wav").write_bytes(b"hidden")
    r = client.get(path)
    assert r.status_code in (400, 404)
    assert "top secret" not in r.text and r.text != "hidden"


def test_generated_file_is_served(client):
    r = client.post(
        "/api/tts-generate", data={"text_input": "serve me", "character_voice_gen": "alpha"}
    )
    url = r.json()["output_file_url"]
    audio = client.get(url)
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"


def test_a_full_disk_while_saving_says_so_and_leaves_nothing(tmp_path):
    form = {"text_input": "Hello there. " * 20, "character_voice_gen": "alpha"}
    with live_server(tmp_path) as s, s.client() as c:
        with files_limited_to(2000):
            r = c.post("/api/tts-generate", data=form)
        assert r.status_code == 500
        assert r.json()["detail"].startswith("cannot save ")
        assert list(s.settings.outputs_path.iterdir()) == []  # not even a temporary


def test_unknown_output_is_404(client):
    r = client.get("/audio/never_made.wav")
    assert r.status_code == 404
    assert "no such output file" in r.json()["detail"]


def test_safe_stem_strips_directories_and_odd_characters():
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("my file (1).wav") == "my_file_1"
    assert safe_stem("....") == "output"
    assert safe_stem(None) == "output"


def test_retention_by_size_keeps_the_newest(tmp_path):
    store = OutputStore(tmp_path, max_age_hours=0, max_bytes=2500)
    for i in range(4):
        store.write(f"f{i}.wav", b"x" * 1000)
        os.utime(tmp_path / f"f{i}.wav", (time.time() - 100 + i, time.time() - 100 + i))
    store.enforce_retention()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f2.wav", "f3.wav"]


def test_retention_by_age(tmp_path):
    store = OutputStore(tmp_path, max_age_hours=1, max_bytes=0)
    store.write("old.wav", b"o")
    store.write("new.wav", b"n")
    past = time.time() - 2 * 3600
    os.utime(tmp_path / "old.wav", (past, past))
    store.enforce_retention()
    assert [p.name for p in tmp_path.iterdir()] == ["new.wav"]
    with pytest.raises(OutputNotFound):
        store.find("old.wav")


def test_retention_runs_while_the_server_is_up(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "RETENTION_INTERVAL_S", 0.05)
    with live_server(tmp_path, outputs_max_age_hours=1) as s:
        old = s.settings.outputs_path / "stale.wav"
        old.write_bytes(b"stale")
        past = time.time() - 3 * 3600
        os.utime(old, (past, past))
        deadline = time.monotonic() + 10
        while old.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not old.exists()


def test_a_saved_answer_is_sent_whole_when_retention_removes_its_file_at_once(tmp_path):
    """With outputs_max_bytes under one answer's size, a sweep (the periodic one, or
    another request's) removes a file as soon as it is published. The answer that saved
    it was read back from the published file: a 500 when the sweep came first."""
    with live_server(tmp_path, outputs_max_bytes=1) as s, s.client() as c:
        store = s.state.outputs
        sweep = store.enforce_retention
        # Every sweep keeps nothing, as the periodic one: it removes the file at once.
        store.enforce_retention = lambda keep=None: sweep()
        text = "saved then swept"
        body = {"input": text, "voice": "alpha", "response_format": "wav", "save": True}
        r = c.post("/v1/audio/speech", json={**body, "stream": False})
        assert r.status_code == 200, r.text
        samples, rate, _ = decode(r.content, "wav")
        assert len(samples) == fake_chunks(text) * int(CHUNK_SECONDS * FAKE_RATE)
        assert not (s.settings.outputs_path / r.headers["x-output-file"]).exists()
