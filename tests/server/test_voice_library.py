"""Voice library over HTTP: validated atomic uploads, rename, delete, preview, engine hook."""

from __future__ import annotations

import io
import shutil
import unicodedata

import numpy as np
import pytest
import soundfile as sf

from lowvox.engines.base import EngineCapabilities, VoiceInfo
from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.voices.store import VoiceNotFound, VoiceStore
from tests.full_disk import files_limited_to
from tests.server.srv_fixtures import FakeEngine, FakeFactory, live_server


def wav_bytes(seconds: float, rate: int = 22_050, freq: float = 220.0, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * freq * t), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


class CloningEngine(FakeEngine):
    capabilities = EngineCapabilities(streaming=True, cloning=True)

    def __init__(self) -> None:
        super().__init__()
        self.prepared: list[tuple[str, int]] = []
        self.forgotten: list[str] = []

    def prepare_voice(self, name, paths) -> None:
        if name.startswith("reject"):
            raise InvalidRequest("the speaker encoder found no voice in these clips")
        self.prepared.append((name, len(paths)))

    def forget_voice(self, name) -> None:
        self.forgotten.append(name)

    def voices(self):
        # Cloned voices join the engine's list once prepared, as XTTS's library voices do.
        gone = set(self.forgotten)
        extra = [VoiceInfo(id=n, name=n, kind="cloned") for n, _ in self.prepared if n not in gone]
        return super().voices() + extra


class CloningFactory(FakeFactory):
    def __call__(self, name, settings):
        self.engines.setdefault(name, CloningEngine())
        return self.engines[name]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    with live_server(
        tmp_path_factory.mktemp("lib"), CloningFactory(), max_upload_bytes=1_200_000
    ) as s:
        yield s


def stored(lib) -> list[str]:
    return sorted(p.name for p in lib.settings.voices_path.iterdir())


def upload(c, name, *clips):
    files = [("files", (f"clip{i}.wav", data, "audio/wav")) for i, data in enumerate(clips)]
    return c.post("/api/library/voices", data={"name": name}, files=files)


def test_upload_list_preview_rename_delete(lib):
    with lib.client() as c:
        r = upload(c, "Narrator One", wav_bytes(3), wav_bytes(4.5, 44_100, 330))
        assert r.status_code == 201, r.text
        v = r.json()["voice"]
        assert v["name"] == "Narrator One" and v["clips"] == 2
        assert abs(v["duration"] - 7.5) < 0.01
        # Latents were computed once, at upload, by the engine's hook.
        assert ("Narrator One", 2) in lib.engine.prepared
        names = [x["name"] for x in c.get("/api/library/voices").json()["voices"]]
        assert "Narrator One" in names
        # Quoted, as /speakers' are: a raw space is no URL (curl refuses it).
        assert v["preview_url"] == "/api/library/voices/Narrator%20One/preview"
        p = c.get(v["preview_url"])
        assert p.status_code == 200
        samples, rate = sf.read(io.BytesIO(p.content))
        assert rate == 22_050 and abs(len(samples) / rate - 3) < 0.01
        r = c.patch("/api/library/voices/Narrator One", json={"name": "Storyteller"})
        assert r.status_code == 200 and r.json()["voice"]["name"] == "Storyteller"
        assert "Narrator One" in lib.engine.forgotten
        assert c.get("/api/library/voices/Narrator One/preview").status_code == 404
        assert c.delete("/api/library/voices/Storyteller").status_code == 200
        assert c.delete("/api/library/voices/Storyteller").status_code == 404
        assert "Storyteller" not in stored(lib)


def test_mp3_and_flac_uploads_are_accepted(lib):
    with lib.client() as c:
        r = upload(c, "flac voice", wav_bytes(2.5, fmt="FLAC"))
        assert r.status_code == 201, r.text
        c.delete("/api/library/voices/flac voice")


@pytest.mark.parametrize(
    ("name", "clips", "status", "words"),
    [
        ("short", [wav_bytes(1.0)], 400, "allowed 2-60 s"),
        ("long", [wav_bytes(61, rate=8_000)], 400, "allowed 2-60 s"),
        ("text", [b"this is not audio at all, just text" * 50], 400, "not a readable audio file"),
        ("empty", [b""], 400, "empty"),
        ("huge", [wav_bytes(14, rate=48_000)], 400, "over the limit"),
        ("silent", [wav_bytes(3, freq=0)], 400, "silent"),
        ("none", [], 400, "no audio files"),
        ("../escape", [wav_bytes(3)], 400, "invalid voice name"),
        ("a/b", [wav_bytes(3)], 400, "invalid voice name"),
        (".hidden", [wav_bytes(3)], 400, "invalid voice name"),
        ("..", [wav_bytes(3)], 400, "invalid voice name"),
        ("reject me", [wav_bytes(3)], 400, "no voice in these clips"),
        ("x" * 65, [wav_bytes(3)], 400, "invalid voice name"),
    ],
)
def test_bad_uploads_store_nothing(lib, name, clips, status, words):
    before = stored(lib)
    with lib.client() as c:
        r = upload(c, name, *clips)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert stored(lib) == before


def test_one_bad_clip_rejects_the_whole_voice(lib):
    with lib.client() as c:
        r = upload(c, "mixed", wav_bytes(3), wav_bytes(0.5))
        assert r.status_code == 400 and "file 2" in r.json()["detail"]
    assert "mixed" not in stored(lib)


def test_duplicate_and_bad_rename(lib):
    with lib.client() as c:
        assert upload(c, "dup", wav_bytes(3)).status_code == 201
        assert upload(c, "DUP", wav_bytes(3)).status_code == 409
        assert upload(c, "other", wav_bytes(3)).status_code == 201
        assert c.patch("/api/library/voices/dup", json={"name": "other"}).status_code == 409
        assert c.patch("/api/library/voices/dup", json={"name": "../../x"}).status_code == 400
        assert c.patch("/api/library/voices/dup", content=b"nope").status_code == 400
        assert c.delete("/api/library/voices/..%2F..%2Fetc").status_code == 404
        c.delete("/api/library/voices/dup")
        c.delete("/api/library/voices/other")


def test_a_built_in_voice_name_is_a_409(lib):
    # The cloning engine looks its own voices up first (XTTS: its studio speakers), so a
    # library voice called "Alpha" was stored, listed and previewed as the uploaded clips
    # while every request for it spoke the built-in voice.
    with lib.client() as c:
        r = upload(c, "ALPHA", wav_bytes(3))
        assert r.status_code == 409, r.text
        assert "built-in" in r.json()["detail"]
        assert upload(c, "mine2", wav_bytes(3)).status_code == 201
        r = c.patch("/api/library/voices/mine2", json={"name": "beta"})
        assert r.status_code == 409, r.text
        names = [v["name"] for v in c.get("/api/library/voices").json()["voices"]]
        assert "ALPHA" not in names and "beta" not in names and "mine2" in names
        c.delete("/api/library/voices/mine2")


def test_a_name_taken_by_something_that_is_no_voice_is_a_409(lib, tmp_path):
    # A folder without clips, or a link someone put in the library, is no voice, but an
    # upload or rename onto its name was a 500 (the rename failed) and closed the
    # connection; into the link's target nothing may go.
    root = lib.settings.voices_path
    (root / "Notes").mkdir()
    (root / "Notes" / "readme.txt").write_text("not a voice")
    (root / "Elsewhere").symlink_to(tmp_path)
    try:
        with lib.client() as c:
            for name in ("Notes", "Elsewhere"):
                assert upload(c, name, wav_bytes(3)).status_code == 409
            assert upload(c, "mine", wav_bytes(3)).status_code == 201
            for name in ("Notes", "Elsewhere"):
                r = c.patch("/api/library/voices/mine", json={"name": name})
                assert r.status_code == 409, r.text
            assert c.get("/api/ready").text == "Ready"
            c.delete("/api/library/voices/mine")
        assert list(tmp_path.iterdir()) == []
    finally:
        (root / "Elsewhere").unlink()
        (root / "Notes" / "readme.txt").unlink()
        (root / "Notes").rmdir()


def test_not_multipart_and_malformed_multipart(lib):
    with lib.client() as c:
        assert c.post("/api/library/voices", json={"name": "x"}).status_code == 400
        r = c.post(
            "/api/library/voices",
            content=b'--zzz\r\nContent-Disposition: form-data; name="name"\r\n\r\nbroken',
            headers={"Content-Type": "multipart/form-data; boundary=zzz"},
        )
        assert 400 <= r.status_code < 500


def test_alltalk_flat_wav_voices_are_listed(tmp_path):
    with live_server(tmp_path) as s, s.client() as c:
        (s.settings.voices_path / "female_01.wav").write_bytes(wav_bytes(3))
        voices = c.get("/api/library/voices").json()["voices"]
        assert [v["name"] for v in voices] == ["female_01"]
        assert c.get("/sample/female_01.wav").status_code == 200


def test_sillytavern_xtts_lists_library_voices_with_absolute_previews(lib):
    with lib.client() as c:
        assert upload(c, "Library Lady", wav_bytes(3)).status_code == 201
        speakers = {s["voice_id"]: s for s in c.get("/speakers").json()}
        url = speakers["Library Lady"]["preview_url"]
        assert url.startswith(lib.url + "/sample/")
        assert speakers["alpha"]["preview_url"] == lib.url + "/sample/alpha.wav"  # built-in too
        assert c.get(url.removeprefix(lib.url)).status_code == 200
        c.delete("/api/library/voices/Library Lady")


def test_a_full_disk_stores_no_voice_and_says_why(tmp_path):
    store = VoiceStore(tmp_path / "voices")
    clip = wav_bytes(2.0)
    with files_limited_to(len(clip) // 2), pytest.raises(LowvoxError) as caught:
        store.add("Bob", [("bob.wav", clip)])
    assert str(caught.value).startswith("cannot store the voice 'Bob' ([Errno 27]")
    assert list(store.root.iterdir()) == []  # no half-made voice, no leftover
    store.add("Bob", [("bob.wav", clip)])  # room again: stored, as a plain write would
    assert sf.info(store.get("Bob").clips[0]).frames == sf.info(io.BytesIO(clip)).frames


def test_a_voice_gone_between_lookup_and_change_is_a_404(tmp_path, monkeypatch):
    # Two deletes (or a rename and a delete) of one voice at once: both looked it up, the
    # first moved it away, and the second's rename of the folder raised FileNotFoundError,
    # a 500 instead of the 404 a voice that is gone is.
    store = VoiceStore(tmp_path)
    store.add("Twice", [("a.wav", wav_bytes(3))])
    stale = store.get("Twice")
    store.delete("Twice")
    monkeypatch.setattr(store, "get", lambda name: stale)
    with pytest.raises(VoiceNotFound):
        store.delete("Twice")
    with pytest.raises(VoiceNotFound):
        store.rename("Twice", "Other")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_name_in_another_unicode_form_finds_the_voice(lib):
    # A voice file named on one system ("Zoë", NFC) and asked for from another that spells
    # the ë as e + a combining diaeresis (NFD, as macOS does) was an unknown voice: 404.
    nfc, nfd = (unicodedata.normalize(form, "Zoë") for form in ("NFC", "NFD"))
    assert nfc != nfd
    path = lib.settings.voices_path / f"{nfc}.wav"
    path.write_bytes(wav_bytes(3))
    try:
        assert VoiceStore(lib.settings.voices_path).get(nfd.upper()).name == nfc
        engine = CloningEngine()
        engine.prepared.append((nfc, 1))
        assert engine.resolve_voice(nfd) == nfc
        with lib.client() as c:
            assert c.get(f"/api/library/voices/{nfd}/preview").status_code == 200
    finally:
        path.unlink()


def test_a_preview_sends_a_readable_clip_or_says_the_voice_is_damaged(lib):
    # The first clip was sent as audio/wav whatever it held: a damaged one (garbage, a
    # file cut short by a copy) reached the player as a 200 that no player plays.
    root = lib.settings.voices_path
    broken, half = root / "Broken", root / "Half"
    for folder in (broken, half):
        folder.mkdir()
    (broken / "clip_01.wav").write_bytes(b"not audio at all" * 100)
    (half / "clip_01.wav").write_bytes(b"")
    (half / "clip_02.wav").write_bytes(good := wav_bytes(3))
    try:
        with lib.client() as c:
            for url in ("/api/library/voices/Broken/preview", "/sample/Broken.wav"):
                r = c.get(url)
                assert r.status_code == 400 and "no readable clip" in r.json()["detail"], url
            for url in ("/api/library/voices/Half/preview", "/sample/Half.wav"):
                r = c.get(url)
                assert r.status_code == 200 and r.content == good, url
    finally:
        for folder in (broken, half):
            shutil.rmtree(folder)
