"""XttsModel end to end: loading, golden audio parity, streaming, options and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowvox.engines.xtts.loader import load_model
from lowvox.engines.xtts.voices import Voice
from lowvox.errors import InvalidRequest, LowvoxError, UnknownLanguage, UnknownVoice
from lowvox.text.languages import pick_language
from tests.tolerance import MIN_STREAM_SNR_DB, snr_db
from tests.xtts.speak import say, say_stream


def reference_options(golden_cases) -> dict:
    g = golden_cases["generation"]
    return dict(
        do_sample=g["do_sample"],
        repetition_penalty=g["repetition_penalty"],
        max_new_tokens=g["max_new_tokens"],
        split_sentences=False,  # the reference's inference() default
    )


def case(golden_cases, case_id: int) -> dict:
    return next(c for c in golden_cases["text_cases"] if c["id"] == case_id)


# ---------------------------------------------------------------------------------------------
# Golden parity


def test_golden_loads_through_the_public_api(golden_model) -> None:
    assert golden_model.sample_rate == 24000
    assert golden_model.fingerprint and len(golden_model.fingerprint) == 64
    assert set(golden_model.speakers) == {"Alpha Voice", "Beta Voice"}
    assert "zh-cn" in golden_model.config.languages


@pytest.mark.slow
def test_synthesize_matches_reference_inference(
    golden_model, golden_ref, golden_cases, golden_voice, close, gen_case: int, infer_speed: float
) -> None:
    case_id, speed = gen_case, infer_speed
    c = case(golden_cases, case_id)
    result = say(golden_model,
        c["text"], language=c["language"], voice=golden_voice, speed=speed,
        **reference_options(golden_cases),
    )  # fmt: skip
    assert result.sample_rate == 24000 and result.wav.dtype == np.float32
    assert len(result.codes) == 1
    assert np.array_equal(result.codes[0], golden_ref[f"gen{case_id}.codes"][0].numpy())
    key = f"infer{case_id}.wav" if speed == 1.0 else f"infer{case_id}.speed{speed:g}.wav"
    close(torch.from_numpy(result.wav), golden_ref[key], key)
    if speed == 1.0:
        # gen*.wav is the vocoder run on gen*.latents: the same audio, another route.
        close(torch.from_numpy(result.wav), golden_ref[f"gen{case_id}.wav"], f"gen{case_id}.wav")


def test_tokenizer_reproduces_generation_case_ids(golden_model, golden_cases) -> None:
    for case_id in golden_cases["generation_case_ids"]:
        c = case(golden_cases, case_id)
        ids = golden_model.tokenizer.encode(c["text"].strip().lower(), c["language"])
        assert ids == c["token_ids"], case_id


@pytest.mark.slow
def test_stream_equals_whole_utterance(
    golden_model, golden_ref, golden_cases, golden_voice
) -> None:
    case_id = golden_cases["generation_case_ids"][-1]
    c = case(golden_cases, case_id)
    options = reference_options(golden_cases)
    chunks = list(
        say_stream(golden_model, c["text"], language=c["language"], voice=golden_voice, **options)
    )
    whole = golden_ref[f"infer{case_id}.wav"].numpy()
    streamed = np.concatenate([ch.wav for ch in chunks])
    assert streamed.shape == whole.shape
    assert snr_db(whole, streamed) >= MIN_STREAM_SNR_DB
    # A chunk after 12 tokens, then every 20 (e.g. 90 tokens: at 12, 32, 52, 72), then the rest.
    tokens = golden_ref[f"gen{case_id}.latents"].shape[1]
    assert len(chunks) == 1 + (tokens - 12) // 20 + 1
    assert all(ch.sample_rate == 24000 and ch.wav.dtype == np.float32 for ch in chunks)


# ---------------------------------------------------------------------------------------------
# The test-made random bundle


def test_random_bundle_loads_every_weight(random_model, random_bundle) -> None:
    state = random_model.state_dict()
    assert sorted(state) == sorted(random_bundle.state)
    # Weight-normed convolutions are refolded from fp16 halves (g * v / |v|), ~5e-4 of their
    # size apart; no row is about fp16 storage, and the BF16 row would be far looser.
    for key, expected in random_bundle.state.items():
        torch.testing.assert_close(state[key], expected, atol=2e-3, rtol=2e-3, msg=key)
    assert random_model.config.model_args.gpt_layers == 3
    assert random_model.config.sampling.repetition_penalty == 3.0  # defaults from config.json
    assert list(random_model.speakers) == ["Test Speaker"]


@pytest.mark.slow
def test_random_bundle_synthesis_is_seeded_and_streams(random_model) -> None:
    # Over the 250-character limit of English, so the splitter must cut it in two.
    text = (
        "Hello world, this first sentence goes on for quite a while so that the two of them "
        "together are too long for one piece, and it keeps going with more and more words. "
        "This is the second sentence, which is also rather long and wordy, as it must be, "
        "since together they have to pass the limit."
    )
    kwargs = dict(language="en", voice="Test Speaker", max_new_tokens=12, seed=11)
    a = say(random_model, text, **kwargs)
    b = say(random_model, text, **kwargs)
    assert len(a.codes) == 2  # split into sentences
    # The same instance, seed and threads: codes and audio repeat exactly (determinism).
    assert all(np.array_equal(x, y) for x, y in zip(a.codes, b.codes, strict=True))
    np.testing.assert_array_equal(a.wav, b.wav)
    c = say(random_model, text, **{**kwargs, "seed": 12})
    assert not all(np.array_equal(x, y) for x, y in zip(a.codes, c.codes, strict=True))

    chunks = list(say_stream(random_model, text, first_chunk_tokens=5, **kwargs))
    assert {ch.sentence for ch in chunks} == {0, 1}
    streamed = np.concatenate([ch.wav for ch in chunks])
    assert streamed.shape == a.wav.shape
    assert snr_db(a.wav, streamed) >= MIN_STREAM_SNR_DB


def test_unsplit_text_is_one_piece(random_model) -> None:
    result = say(
        random_model,
        "One. Two.",
        voice="Test Speaker",
        max_new_tokens=5,
        split_sentences=False,
        seed=1,
    )
    assert len(result.codes) == 1


@pytest.mark.parametrize("speed", [0.8, 1.5])
@pytest.mark.slow
def test_speed_changes_length_and_streams_identically(random_model, speed: float) -> None:
    kwargs = dict(voice="Test Speaker", max_new_tokens=24, do_sample=False, split_sentences=False)
    base = say(random_model, "Speed test.", **kwargs)
    fast = say(random_model, "Speed test.", speed=speed, **kwargs)
    frames = len(base.wav) / 24
    assert abs(len(fast.wav) / len(base.wav) - 1 / speed) < 4 / frames + 0.02
    streamed = np.concatenate(
        [c.wav for c in say_stream(random_model, "Speed test.", speed=speed, **kwargs)]
    )
    assert streamed.shape == fast.wav.shape
    assert snr_db(fast.wav, streamed) >= MIN_STREAM_SNR_DB


@pytest.mark.slow
def test_stream_vocoder_work_per_chunk_is_flat(random_model) -> None:
    """Each chunk vocodes a bounded number of frames, however long the utterance is."""
    from lowvox.engines.xtts.hifigan import FusedStream

    sizes: list[int] = []  # frames per HiFi-GAN run: a whole window, or a fused piece
    hook = random_model.hifigan_decoder.waveform_decoder.register_forward_pre_hook(
        lambda _m, args: sizes.append(args[0].shape[-1])
    )
    push = FusedStream.push
    FusedStream.push = lambda self, x, *a: sizes.append(x.shape[-1]) or push(self, x, *a)  # type: ignore[method-assign]
    bias = random_model.gpt.mel_head.bias
    stop = random_model.config.model_args.gpt_stop_audio_token
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[stop] = -1e4  # never stop early: lengths are exactly max_new_tokens
        per_run = {}
        for n in (24, 60):
            sizes.clear()
            list(say_stream(random_model,
                "A long utterance.", voice="Test Speaker", max_new_tokens=n, do_sample=False,
                first_chunk_tokens=12, chunk_tokens=12,
            ))  # fmt: skip
            per_run[n] = list(sizes)
    finally:
        hook.remove()
        FusedStream.push = push  # type: ignore[method-assign]
        with torch.no_grad():
            bias.copy_(saved)
    frames_long = random_model.hifigan_decoder.num_frames(60)
    assert len(per_run[60]) >= 2 * len(per_run[24])  # more chunks...
    # ...but none bigger (up to a frame or two of interpolation rounding), and each far
    # smaller than vocoding the whole utterance at once.
    assert max(per_run[60]) <= max(per_run[24]) + 2
    assert max(per_run[60]) < frames_long / 2


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_requests_are_clear_errors(random_model) -> None:
    m = random_model
    with pytest.raises(InvalidRequest, match="empty"):
        say(m, "   ", voice="Test Speaker")
    with pytest.raises(UnknownVoice):
        say(m, "Hi.", voice="Nobody")
    with pytest.raises(UnknownLanguage):
        say(m, "Hi.", language="xx", voice="Test Speaker")
    for bad in (
        {"temperature": 0},
        {"top_p": 2.0},
        {"max_new_tokens": 0},
        {"max_new_tokens": 10**6},
        {"speed": 0.0},
        {"seed": "x"},
    ):
        with pytest.raises(InvalidRequest):
            say(m, "Hi.", voice="Test Speaker", **bad)
    # Streams validate everything before the first chunk is asked for.
    with pytest.raises(InvalidRequest):
        say_stream(m, "Hi.", voice="Test Speaker", first_chunk_tokens=0)
    # A cadence that is not a whole number of tokens too (2.5 used to fail mid-stream as
    # "synthesis failed", NaN to mean "never", "3" to raise a TypeError).
    for name in ("first_chunk_tokens", "chunk_tokens"):
        for bad in (2.5, float("nan"), "3", True, 0):
            with pytest.raises(InvalidRequest, match=name):
                say_stream(m, "Hi.", voice="Test Speaker", **{name: bad})
    with pytest.raises(InvalidRequest, match="tokens long"):
        say_stream(m, "word " * 400, voice="Test Speaker", split_sentences=False)
    # A voice that does not fit the model, or is not a voice, before the stream starts
    # too (they used to fail at its first step).
    studio = m.speakers["Test Speaker"]
    nan = Voice(torch.full_like(studio.gpt_cond_latent, math.nan), studio.speaker_embedding)
    narrow = Voice(studio.gpt_cond_latent[..., :7], studio.speaker_embedding)
    for bad_voice, why in ((nan, "NaN"), (narrow, "do not fit"), (["x"], "must be a Voice")):
        with pytest.raises(InvalidRequest, match=why):
            say_stream(m, "Hi.", voice=bad_voice)
    assert pick_language("en-US", m.config.languages) == "en"
    assert pick_language("zh_CN", m.config.languages) == "zh-cn"


def test_load_errors(tmp_path, random_bundle) -> None:
    with pytest.raises(LowvoxError, match="not found"):
        load_model(tmp_path / "nothing")
    with pytest.raises(LowvoxError, match="precision"):
        load_model(random_bundle.path, precision="fp8")


def test_clone_voice_uses_config_defaults(random_model, golden_dir) -> None:
    voice = random_model.clone_voice([golden_dir / "ref_a.wav"])
    assert isinstance(voice, Voice)
    assert voice.gpt_cond_latent.shape == (1, 32, random_model.gpt.dim)
    assert voice.speaker_embedding.shape == (1, 512, 1)
    result = say(random_model, "Hi.", voice=voice, max_new_tokens=5, seed=0)
    assert result.wav.size > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_half_precision_gpt(random_bundle, random_model, precision: str) -> None:
    if precision == "fp16" and not torch.cuda.is_available():
        pytest.skip("fp16 matmuls are a GPU feature")
    device = "cuda" if precision == "fp16" else "cpu"
    model = load_model(random_bundle.path, device=device, precision=precision)
    # The transformer's linears are half precision (mel_head and the norms stay float32).
    assert model.gpt.gpt.h[0].attn.c_attn.weight.dtype == (
        torch.bfloat16 if precision == "bf16" else torch.float16
    )
    assert model.hifigan_decoder.waveform_decoder.conv_pre.weight.dtype == torch.float32
    kwargs = dict(voice="Test Speaker", max_new_tokens=8, do_sample=False, split_sentences=False)
    half = say(model, "Precision.", **kwargs)
    full = say(random_model, "Precision.", **kwargs)
    assert np.isfinite(half.wav).all() and half.wav.shape == full.wav.shape
    # Random weights make greedy codes fragile; the first token should still agree.
    assert half.codes[0][0] == full.codes[0][0]


@pytest.mark.slow
def test_stream_cadence_is_a_short_first_chunk_then_longer_ones(random_model, monkeypatch):
    """The vocoder is pushed after 12 tokens, then every 20 (unless asked otherwise)."""
    from lowvox.engines.xtts import vocode

    pushed: list[int] = []
    real, real_flush = vocode.StreamingVocoder.push, vocode.StreamingVocoder.flush

    def spy(self, latents):
        pushed.append(latents.shape[1])
        return real(self, latents)

    def spy_flush(self, last=None):  # the end's latents come with the flush
        if last is not None:
            pushed.append(last.shape[1])
        return real_flush(self, last)

    monkeypatch.setattr(vocode.StreamingVocoder, "push", spy)
    monkeypatch.setattr(vocode.StreamingVocoder, "flush", spy_flush)
    kwargs = dict(voice="Test Speaker", max_new_tokens=55, do_sample=False, split_sentences=False)
    chunks = list(say_stream(random_model, "A cadence test.", **kwargs))
    assert chunks and pushed[:3] == [12, 20, 20]
    pushed.clear()
    list(say_stream(random_model, "A cadence test.", first_chunk_tokens=30, **kwargs))
    assert pushed[0] == 30 and pushed[1] == 25  # later chunks never shorter than the first
    pushed.clear()
    list(say_stream(random_model, "A cadence test.", first_chunk_tokens=4,
                                        chunk_tokens=7, **kwargs))  # fmt: skip
    assert pushed[:3] == [4, 7, 7]
