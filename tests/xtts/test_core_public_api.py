"""The issue's documented Python API on the model itself: `XttsModel.load`,
`model.synthesize`, `model.synthesize_stream`, `model.clone_voice`, `model.speakers` and
`model.tokenizer`, checked against the golden bundle (codes exactly, audio within the
bundle's tolerance)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lowvox.engines.xtts import XttsModel
from lowvox.errors import InvalidRequest, UnknownVoice
from tests.tolerance import MIN_STREAM_SNR_DB, snr_db


@pytest.fixture(scope="module")
def model(golden_dir, tmp_path_factory) -> XttsModel:
    return XttsModel.load(golden_dir, "cpu", "fp32", cache_dir=tmp_path_factory.mktemp("c"))


def _greedy(golden_cases) -> dict:
    g = golden_cases["generation"]
    return dict(do_sample=False, repetition_penalty=g["repetition_penalty"],
                max_new_tokens=g["max_new_tokens"], split_sentences=False)  # fmt: skip


def test_load_gives_a_ready_model(model, golden_dir) -> None:
    assert isinstance(model, XttsModel) and model.precision == "fp32"
    assert model.model_dir == golden_dir and model.sample_rate == 24000
    assert set(model.speakers) == {"Alpha Voice", "Beta Voice"}
    assert model.tokenizer is not None and model.tokenizer.encode("hello", "en")


@pytest.mark.slow
def test_synthesize_and_stream_match_the_reference(
    model, golden_ref, golden_cases, golden_voice, close
) -> None:
    case_id = golden_cases["generation_case_ids"][0]
    c = next(t for t in golden_cases["text_cases"] if t["id"] == case_id)
    result = model.synthesize(
        c["text"], language=c["language"], voice=golden_voice, **_greedy(golden_cases)
    )
    assert result.sample_rate == 24000 and result.wav.dtype == np.float32
    assert len(result.codes) == 1
    assert np.array_equal(result.codes[0], golden_ref[f"gen{case_id}.codes"][0].numpy())
    close(torch.from_numpy(result.wav), golden_ref[f"infer{case_id}.wav"], "infer.wav")

    chunks = list(
        model.synthesize_stream(
            c["text"], language=c["language"], voice=golden_voice, **_greedy(golden_cases)
        )
    )
    assert len(chunks) > 1 and all(ch.wav.dtype == np.float32 for ch in chunks)
    streamed = np.concatenate([ch.wav for ch in chunks])
    assert streamed.shape == result.wav.shape
    assert snr_db(result.wav, streamed) >= MIN_STREAM_SNR_DB


def test_clone_voice_and_studio_speakers_speak(model, golden_dir, golden_ref, close) -> None:
    voice = model.clone_voice([golden_dir / "ref_a.wav"])
    assert voice.gpt_cond_latent.shape == golden_ref["voice0.gpt_cond_latent"].shape
    close(voice.gpt_cond_latent, golden_ref["voice0.gpt_cond_latent"], "gpt_cond_latent")
    by_name = model.synthesize("Hi.", language="en", voice="Beta Voice", seed=3, max_new_tokens=12)
    again = model.synthesize("Hi.", language="en", voice="Beta Voice", seed=3, max_new_tokens=12)
    assert by_name.wav.size and np.array_equal(by_name.codes[0], again.codes[0])


def test_stream_cadence_and_cancel(model, golden_voice) -> None:
    opts = dict(language="en", voice=golden_voice, do_sample=False, max_new_tokens=30)
    chunks = list(model.synthesize_stream("Hello there.", first_chunk_tokens=5, **opts))
    assert len(chunks) >= 2
    # The first chunk holds 5 tokens' audio (1024 samples each at 24 kHz, less the context
    # the vocoder keeps back), the whole less than 30 tokens' worth.
    assert 0 < chunks[0].wav.size <= 5 * 1024 < sum(ch.wav.size for ch in chunks)
    cancel = threading.Event()
    cancel.set()
    assert list(model.synthesize_stream("Hello there.", cancel=cancel, **opts)) == []


def test_bad_requests_fail_before_any_audio(model) -> None:
    with pytest.raises(InvalidRequest):
        model.synthesize_stream("", language="en")
    with pytest.raises(InvalidRequest, match="temperature"):
        model.synthesize("Hi.", language="en", temperature=0)
    with pytest.raises(UnknownVoice):
        model.synthesize_stream("Hi.", language="en", voice="Nobody")
