"""The `xtts` engine behind lowvox's engine interface."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from lowvox.engines import SynthesisRequest, create_engine
from lowvox.engines.xtts.engine import XttsEngine
from lowvox.engines.xtts.options import XttsOptions
from lowvox.errors import EngineUnavailable, InvalidRequest, UnknownVoice
from lowvox.settings import Settings

FAST = {"max_new_tokens": 6, "seed": 3}


@pytest.fixture(scope="module")
def engine(random_bundle, golden_dir, tmp_path_factory) -> XttsEngine:
    home = tmp_path_factory.mktemp("home")
    voices = home / "voices"
    (voices / "Bob").mkdir(parents=True)
    shutil.copy(golden_dir / "ref_b.wav", voices / "Bob" / "clip_01.wav")
    shutil.copy(golden_dir / "ref_a.wav", voices / "Alice.wav")
    settings = Settings(home=home, model_dir=random_bundle.path, engine="xtts")
    engine = create_engine("xtts", settings, voice_files=True)  # as `lowvox say` makes it
    assert isinstance(engine, XttsEngine)
    return engine


def test_no_model_is_a_clear_unavailable_error(tmp_path) -> None:
    settings = Settings(home=tmp_path)
    with pytest.raises(EngineUnavailable, match="lowvox models download xtts-v2"):
        XttsEngine.from_settings(settings)
    # The models folder is used when no model_dir is set.
    with pytest.raises(EngineUnavailable, match=str(tmp_path / "models" / "xtts-v2")):
        create_engine("xtts", settings)


def test_models_folder_is_found(tmp_path, random_bundle) -> None:
    target = tmp_path / "models" / "xtts-v2"
    shutil.copytree(random_bundle.path, target)
    engine = XttsEngine.from_settings(Settings(home=tmp_path))
    assert engine.model_dir == target


def test_catalogue_without_loading(engine) -> None:
    fresh = XttsEngine(engine.model_dir, voices_dir=engine.voices_dir)
    assert fresh.sample_rate == 24000
    assert "zh-cn" in fresh.languages() and "en" in fresh.languages()
    kinds = {v.id: v.kind for v in fresh.voices()}
    assert kinds == {"Test Speaker": "studio", "Alice": "cloned", "Bob": "cloned"}
    assert fresh._model is None  # listing voices did not load the weights


@pytest.mark.slow
def test_warmup(engine) -> None:
    engine.warmup()
    assert engine._model is not None


@pytest.mark.slow
def test_synthesize_studio_library_and_path_voices(engine, golden_dir) -> None:
    for voice in ("Test Speaker", "alice", "Bob", str(golden_dir / "ref_c.wav")):
        request = engine.validate(SynthesisRequest("Hello there.", voice=voice, options=FAST))
        audio = engine.synthesize(request)
        assert audio.sample_rate == 24000
        assert audio.samples.dtype == np.float32 and audio.samples.size > 0


def test_voice_paths_can_be_refused(engine, golden_dir) -> None:
    locked = XttsEngine(engine.model_dir, voices_dir=engine.voices_dir, allow_voice_paths=False)
    with pytest.raises(UnknownVoice):
        locked.validate(SynthesisRequest("Hi.", voice=str(golden_dir / "ref_c.wav")))


def test_engines_open_voice_files_only_when_asked(
    engine, golden_dir, tmp_path, monkeypatch
) -> None:
    """What the server and jobs make (`create_engine` by default) takes no audio file for
    a voice, absolute or relative to where it runs; `lowvox say` asks for it."""
    settings = Settings(home=tmp_path, model_dir=engine.model_dir, voices_dir=engine.voices_dir)
    shutil.copy(golden_dir / "ref_c.wav", tmp_path / "here.wav")
    monkeypatch.chdir(tmp_path)
    paths = (str(golden_dir / "ref_c.wav"), "here.wav")
    served = create_engine("xtts", settings)
    for voice in paths:
        with pytest.raises(UnknownVoice):
            served.validate(SynthesisRequest("Hi.", voice=voice))
    said = create_engine("xtts", settings, voice_files=True)
    for voice in paths:
        assert said.validate(SynthesisRequest("Hi.", voice=voice)).voice == voice


def test_stream_matches_whole_and_respects_cancel(engine) -> None:
    request = engine.validate(SynthesisRequest("One. Two.", voice="Test Speaker", options=FAST))
    whole = engine.synthesize(request).samples
    streamed = np.concatenate([c.samples for c in engine.synthesize_stream(request)])
    # Streamed vs whole of one engine, held to atol 1e-5 with numpy's rtol of 1e-7: tighter
    # than FP32_REORDER (and MIN_STREAM_SNR_DB), a bound this short request has always met.
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
    cancel = threading.Event()
    cancel.set()
    assert list(engine.synthesize_stream(request, cancel)) == []


def test_bad_requests(engine) -> None:
    with pytest.raises(UnknownVoice):
        engine.validate(SynthesisRequest("Hi.", voice="Nobody"))
    with pytest.raises(InvalidRequest, match="unknown option 'pitch'"):
        engine.validate(SynthesisRequest("Hi.", voice="Bob", options={"pitch": 50}))
    with pytest.raises(InvalidRequest):
        engine.validate(SynthesisRequest("Hi.", voice="Bob", options={"temperature": -1}))
    with pytest.raises(InvalidRequest):
        engine.validate(SynthesisRequest("Hi.", voice="Bob", options={"top_k": "ten"}))
    with pytest.raises(InvalidRequest):
        engine.validate(SynthesisRequest("Hi.", voice="Bob", language="xx"))


def test_options_from_a_request_are_typed() -> None:
    opts = XttsOptions.from_mapping({"temperature": 0.5, "top_k": 3, "seed": None}, speed=1.5)
    assert opts == XttsOptions(temperature=0.5, top_k=3, speed=1.5)
    for bad in ({"top_k": True}, {"seed": 1.5}, {"nonsense": 1}, {"do_sample": "yes"}):
        with pytest.raises(InvalidRequest):
            XttsOptions.from_mapping(bad)


@pytest.mark.parametrize(
    "bad",
    [{"seed": 2**70}, {"seed": -1}, {"max_new_tokens": 0}, {"temperature": 0}, {"top_p": 1.5}],
)
def test_out_of_range_options_are_refused_before_queueing(random_bundle, bad) -> None:
    engine = XttsEngine(random_bundle.path)
    with pytest.raises(InvalidRequest):
        engine.validate(SynthesisRequest("Hi.", voice="Test Speaker", options=bad))
    assert not engine.loaded  # validation needs no model


@pytest.mark.parametrize(
    ("asked", "text", "expected"),
    [("zh", "你好", "zh-cn"), ("zh_CN", "你好", "zh-cn"), ("zh-cn", "你好", "zh-cn"),
     ("auto", "Bonjour tout le monde, comment allez-vous ?", "fr"), ("pt_BR", "Olá.", "pt"),
     ("EN", "Hi.", "en"), (None, "Hi.", "en")],
)  # fmt: skip
def test_every_spelling_of_a_language_resolves(random_bundle, asked, text, expected) -> None:
    engine = XttsEngine(random_bundle.path)
    checked = engine.validate(SynthesisRequest(text, voice="Test Speaker", language=asked))
    assert checked.language == expected
