"""The XTTS engine behind the real server, with the tiny random golden model.

The random model rarely stops on its own, so requests cap `max_new_tokens` to stay fast.
Skips when the golden bundle is absent.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.golden import GOLDEN
from tests.server.srv_audio import decode
from tests.server.srv_fixtures import LiveServer, make_settings

GREEDY = {"do_sample": False, "max_new_tokens": 30}

# A real (tiny) model behind a real server: the module's shared server alone takes ~10 s.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def xtts_server(tmp_path_factory):
    if not (GOLDEN / "model.pth").is_file():
        pytest.skip("golden xtts-tiny bundle not found")
    try:
        from lowvox.engines.base import SynthesisRequest
        from lowvox.engines.xtts.engine import XttsEngine

        # Its converted weights go to a temporary folder, never into the shared bundle
        # (which the default, beside the checkpoint, would write to where it is writable).
        probe = XttsEngine(GOLDEN, cache_dir=tmp_path_factory.mktemp("probe-cache"))
        voice = probe.voices()[0].id
        list(probe.synthesize_stream(SynthesisRequest(text="Hi.", voice=voice, language="en")))
    except ImportError as e:
        pytest.skip(f"the xtts engine is not complete yet: {e}")
    # An fp32 vocoder: the batching test compares waveforms made with different batch
    # shapes and chunkings to 2 LSB; bf16 vocoding rounds differently per window (~9 LSB).
    settings = make_settings(
        tmp_path_factory.mktemp("xtts"), engine="xtts", model_dir=GOLDEN, vocoder_precision="fp32"
    )
    with LiveServer(settings, None) as s:
        s.timeout = 900
        yield s


def speech(c, **body):
    payload = {"input": "Hello there.", "response_format": "pcm", "options": GREEDY, **body}
    r = c.post("/v1/audio/speech", json=payload)
    assert r.status_code == 200, r.text
    return r


def test_studio_voice_and_formats(xtts_server):
    with xtts_server.client() as c:
        voices = [v["id"] for v in c.get("/v1/audio/voices").json()["voices"]]
        assert voices
        r = speech(c, voice=voices[0], response_format="wav")
        samples, rate, _ = decode(r.content, "wav")
        assert rate == 24_000 and len(samples) > 0


def test_upload_clones_once_and_the_voice_speaks(xtts_server):
    clip = (GOLDEN / "ref_a.wav").read_bytes()
    cache = xtts_server.settings.cache_path
    before = {p for p in cache.rglob("*") if p.is_file()}
    with xtts_server.client() as c:
        r = c.post(
            "/api/library/voices",
            data={"name": "Cloned"},
            files=[("files", ("a.wav", clip, "audio/wav"))],
        )
        assert r.status_code == 201, r.text
        # Latents were computed at upload and stored in the voice cache.
        new = {p for p in cache.rglob("*") if p.is_file()} - before
        assert any("voices" in p.parts for p in new), new
        assert "Cloned" in [v["id"] for v in c.get("/v1/audio/voices").json()["voices"]]
        r = speech(c, voice="Cloned")
        assert len(r.content) > 0


def test_concurrent_greedy_requests_are_batched_and_match_alone(xtts_server, monkeypatch):
    from lowvox.engines.xtts.pipeline import Batch

    with xtts_server.client() as c:
        voices = [v["id"] for v in c.get("/v1/audio/voices").json()["voices"]]
    batch_sizes: list[int] = []
    real_step = Batch.step

    def counting_step(self):
        batch_sizes.append(len(self))  # utterances sharing this step
        return real_step(self)

    monkeypatch.setattr(Batch, "step", counting_step)
    texts = ["One two.", "Three.", "Four five six.", "Seven.", "Eight nine.", "Ten."]
    cases = [{"input": t, "voice": voices[i % len(voices)]} for i, t in enumerate(texts)]
    together: dict[int, bytes] = {}

    def one(i: int) -> None:
        with xtts_server.client() as c:
            together[i] = speech(c, **cases[i], stream=i % 2 == 0).content

    # A long request is running when the six arrive: they join its batch as it goes.
    busy = threading.Thread(
        target=lambda: speech(
            xtts_server.client(), input="Busy.", voice=voices[0],
            options={"do_sample": False, "max_new_tokens": 400},
        )
    )  # fmt: skip
    busy.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in [busy, *threads]:
        t.join()
    assert max(batch_sizes, default=0) > 1, batch_sizes  # decoded together, not one by one
    with xtts_server.client() as c:
        for i, case in enumerate(cases):
            alone = speech(c, **case).content
            a = np.frombuffer(together[i], "<i2").astype(np.float32)
            b = np.frombuffer(alone, "<i2").astype(np.float32)
            assert len(a) == len(b), f"request {i} got audio of another length"
            # Same tokens; the waveform may differ by float rounding between batch shapes.
            assert np.abs(a - b).max() <= 2, f"request {i} got other audio"


def test_impossible_runtime_change_keeps_the_engine(xtts_server):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: cuda is a possible choice here")
    with xtts_server.client() as c:
        before = c.get("/api/runtime").json()
        r = c.post("/api/runtime", json={"device": "cuda"})
        assert r.status_code == 400, r.text
        assert "no such GPU" in r.text
        assert c.get("/api/runtime").json()["device"] == before["device"]
        voice = c.get("/v1/audio/voices").json()["voices"][0]["id"]
        assert len(speech(c, voice=voice).content) > 0  # the engine still speaks


def test_xtts_api_text_splitting_off_reaches_the_model(xtts_server):
    # xtts-api-server's enable_text_splitting=false speaks the text in one generation; one
    # over XTTS's 400 text tokens is then refused (as coqui asserts), before any generation.
    long_text = "This sentence is spoken again and again. " * 40
    with xtts_server.client() as c:
        voice = c.get("/speakers_list").json()[0]
        body = {"text": long_text, "speaker_wav": voice, "language": "en"}
        assert c.post("/set_tts_settings", json={"enable_text_splitting": False}).status_code == 200
        try:
            r = c.post("/tts_to_audio/", json=body)
            assert r.status_code == 400, r.text
            assert "turn sentence splitting on" in r.json()["detail"]
        finally:
            c.post("/set_tts_settings", json={"enable_text_splitting": True})
