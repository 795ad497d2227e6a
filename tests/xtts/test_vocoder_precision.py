"""The vocoder's fused CPU path and its bf16 and int8 precisions: fidelity against float32
(random and golden weights), switching precision back and forth, and streaming/windowed
vocoding that still equals whole-utterance vocoding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowvox.engines.xtts import hifigan
from lowvox.engines.xtts.hifigan import INT8_STAGES, bf16_supported, int8_supported
from lowvox.engines.xtts.vocode import RowVocoder, vocode_in_windows
from lowvox.errors import EngineUnavailable, LowvoxError
from tests.tolerance import FP32_REORDER, MIN_REDUCED_VOCODER_SNR_DB, snr_db
from tests.xtts.test_voice_helpers import random_decoder

needs_bf16 = pytest.mark.skipif(not bf16_supported(), reason="no native bf16 on this CPU")
needs_int8 = pytest.mark.skipif(
    not int8_supported(), reason="no int8 vocoder convolutions on this CPU (AVX-512 VNNI)"
)
# A decoder whose first stages have channels the int8 kernel takes; its last stage (not in
# INT8_STAGES, and 16 channels wide) keeps oneDNN's convolutions: the int8 plan mixes both.
INT8_CHANNELS = 128


@pytest.fixture(scope="module")
def decoder():
    return random_decoder(seed=5)


@pytest.fixture(scope="module")
def speaker() -> torch.Tensor:
    torch.manual_seed(3)
    return F.normalize(torch.randn(1, 24, 1), dim=1)


def vocode(decoder, latents: torch.Tensor, speaker: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return decoder(latents, speaker)[0, 0].numpy()


def test_fused_fp32_matches_plain_path(decoder, speaker) -> None:
    latents = torch.randn(1, 37, 48)
    gen = decoder.waveform_decoder
    assert decoder.precision == "fp32"
    try:
        gen.fused = True  # this small decoder would take the plain path by default
        fused = vocode(decoder, latents, speaker)
        gen.fused = False
        plain = vocode(decoder, latents, speaker)
    finally:
        gen.fused = None
    assert fused.dtype == np.float32 and fused.shape == plain.shape
    # Other kernels (FP32_OTHER_KERNELS), yet held to 1e-5 of the peak, tighter than the row:
    # the fused path runs the same fp32 convolutions, and this bound has always held.
    assert np.abs(fused - plain).max() <= 1e-5 * np.abs(plain).max()


def test_fused_batch_items_are_vocoded_independently() -> None:
    decoder = random_decoder(seed=5)
    decoder.waveform_decoder.fused = True
    latents = torch.randn(2, 21, 48)
    g = F.normalize(torch.randn(2, 24, 1), dim=1)
    with torch.inference_mode():
        both = decoder(latents, g)
        one = decoder(latents[1:], g[1:])
    torch.testing.assert_close(both[1:], one)


@needs_bf16
def test_bf16_keeps_fidelity_on_random_decoder(speaker) -> None:
    decoder = random_decoder(seed=5)
    latents = torch.randn(1, 64, 48)
    fp32 = vocode(decoder, latents, speaker)
    decoder.set_precision("bf16")
    bf16 = vocode(decoder, latents, speaker)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    snr = snr_db(fp32, bf16)
    print(f"random decoder bf16 vs fp32 SNR {snr:.1f} dB")
    assert MIN_REDUCED_VOCODER_SNR_DB <= snr < 90.0  # close, yet really computed in bf16


@needs_int8
def test_int8_keeps_fidelity_on_random_decoder(speaker) -> None:
    decoder = random_decoder(seed=5, channels=INT8_CHANNELS)
    latents = torch.randn(1, 64, 48)
    fp32 = vocode(decoder, latents, speaker)
    decoder.set_precision("int8")
    plan = decoder.waveform_decoder._fused_plan()
    kinds = {type(c).__name__ for stage in plan.blocks for b in stage for pair in b for c in pair}
    assert kinds == {"_QConv", "_PackedConv"}  # int8 in INT8_STAGES, oneDNN's elsewhere
    assert plan.folds == [True, True, False]  # oneDNN needs its input's leaky ReLU made
    int8 = vocode(decoder, latents, speaker)
    assert int8.dtype == np.float32 and int8.shape == fp32.shape
    snr = snr_db(fp32, int8)
    print(f"random decoder int8 vs fp32 SNR {snr:.1f} dB")
    assert MIN_REDUCED_VOCODER_SNR_DB <= snr < 90.0  # close, yet really computed in int8


@needs_int8
def test_int8_plan_folds_the_leaky_relu(speaker, monkeypatch) -> None:
    """In the int8 stages the resblocks' input leaky ReLU is applied as the kernel reads
    it (no separate pass), with the same audio as a separate pass would give. With float32
    activations (as on CPUs with VNNI but no native bf16, e.g. Ice Lake) that is exact: in
    bf16 the separate pass would round its output first."""
    monkeypatch.setattr(hifigan, "bf16_supported", lambda: False)
    decoder = random_decoder(seed=7, channels=256)
    latents = torch.randn(1, 40, 48)
    fp32 = vocode(decoder, latents, speaker)
    decoder.set_precision("int8")
    plan = decoder.waveform_decoder._fused_plan()
    assert plan.dtype == torch.float32
    assert plan.folds == [i in hifigan.INT8_STAGES for i in range(3)]
    folded = vocode(decoder, latents, speaker)
    before = plan.folds
    plan.folds = [False] * 3  # the unfolded path: the same quantised inputs
    try:
        separate = vocode(decoder, latents, speaker)
    finally:
        plan.folds = before
    np.testing.assert_array_equal(folded, separate)
    assert snr_db(fp32, folded) >= MIN_REDUCED_VOCODER_SNR_DB


def test_int8_is_refused_where_the_kernel_is_missing(monkeypatch) -> None:
    decoder = random_decoder(seed=5)
    monkeypatch.setattr(hifigan.kernels, "int8_conv", lambda: False)
    with pytest.raises(EngineUnavailable, match="int8"):
        decoder.set_precision("int8")
    assert decoder.precision == "fp32"


@needs_bf16
def test_set_precision_round_trip(speaker) -> None:
    decoder = random_decoder(seed=5)
    latents = torch.randn(1, 30, 48)
    before = vocode(decoder, latents, speaker)
    decoder.set_precision("bf16")
    decoder.set_precision("bf16")  # idempotent
    assert decoder.precision == "bf16"
    bf16 = vocode(decoder, latents, speaker)
    # Weights stay float32 parameters: nothing a state_dict or the streaming buffer sees.
    assert all(p.dtype == torch.float32 for p in decoder.parameters())
    decoder.set_precision("fp32")
    assert decoder.precision == "fp32"
    # The same decoder instance repeating a computation: exact (determinism).
    np.testing.assert_array_equal(vocode(decoder, latents, speaker), before)
    decoder.set_precision("bf16")
    np.testing.assert_array_equal(vocode(decoder, latents, speaker), bf16)


def test_unknown_precision_is_refused(decoder) -> None:
    with pytest.raises(LowvoxError, match="fp8"):
        decoder.set_precision("fp8")
    assert decoder.precision == "fp32"


def test_edited_weights_are_used(speaker) -> None:
    """The packed weight copies follow edits of the module's weights."""
    decoder = random_decoder(seed=6)
    decoder.waveform_decoder.fused = True
    latents = torch.randn(1, 20, 48)
    vocode(decoder, latents, speaker)  # builds the packed copies
    with torch.no_grad():
        decoder.waveform_decoder.resblocks[0].convs1[0].weight.mul_(-2.0)
    fused = vocode(decoder, latents, speaker)
    decoder.waveform_decoder.fused = False
    plain = vocode(decoder, latents, speaker)
    assert np.abs(fused - plain).max() <= 1e-5 * np.abs(plain).max()  # as above


def test_gradients_take_the_plain_path(decoder, speaker) -> None:
    latents = torch.randn(1, 12, 48, requires_grad=True)
    wav = decoder(latents, speaker)
    wav.square().sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("precision", "fused"),
    [
        ("fp32", True),
        pytest.param("bf16", None, marks=needs_bf16),
        pytest.param("int8", None, marks=needs_int8),
    ],
)
def test_streamed_equals_whole_in_each_precision(speaker, precision, fused) -> None:
    decoder = random_decoder(seed=5, channels=INT8_CHANNELS if precision == "int8" else 32)
    decoder.set_precision(precision)
    decoder.waveform_decoder.fused = fused
    latents = torch.randn(1, 75, 48)
    whole = vocode(decoder, latents, speaker)
    vocoder = RowVocoder(decoder, speaker, 1.0, 12, 9)
    parts = [vocoder.push(latents[:, i : i + 5]) for i in range(0, latents.shape[1], 5)]
    parts.append(vocoder.finish())
    streamed = np.concatenate(parts)
    assert streamed.shape == whole.shape
    assert snr_db(whole, streamed) >= 60.0  # stricter than MIN_STREAM_SNR_DB on this decoder
    if precision != "int8":
        assert np.abs(streamed - whole).max() <= 1e-3 * np.abs(whole).max()
    # In int8 the frames' last-bit differences (streamed frames are interpolated piece by
    # piece) can round a time step's int8 value the other way: one level, 1/127 of that
    # step's largest value, moves a few samples by up to ~0.5% of the peak; the SNR holds.


def test_last_stream_window_takes_the_middle_windows_length(decoder, speaker) -> None:
    """The final chunk is padded with already-emitted context to the length of the chunks
    before it, so a new utterance length brings no new input shape."""
    lengths = set()
    for n in (50, 61, 77):
        vocoder = RowVocoder(decoder, speaker, 1.0, 10, 10)
        for i in range(0, n, 10):
            vocoder.push(torch.randn(1, min(10, n - i), 48))
        vocoder.finish()
        first, *later = vocoder.vocoder.frames_vocoded
        assert len(later) >= 3
        lengths.update(later[1:])  # the second window may be narrower than those after it
    assert len(lengths) == 1, lengths


@pytest.mark.parametrize("n", [3, 40, 97, 160])
def test_windowed_vocoding_equals_whole(decoder, speaker, n) -> None:
    latents = torch.randn(1, n, 48)
    whole = vocode(decoder, latents, speaker)
    sizes: list[int] = []
    hook = decoder.waveform_decoder.register_forward_pre_hook(
        lambda _m, args: sizes.append(args[0].shape[-1])
    )
    try:
        windowed = vocode_in_windows(decoder, latents, speaker, window=72)
    finally:
        hook.remove()
    assert windowed.dtype == np.float32 and windowed.shape == whole.shape
    FP32_REORDER.check(windowed, whole)  # another chunking of one operation
    frames = decoder.num_frames(n)
    assert sizes == [frames] if frames <= 72 else set(sizes) == {72}


def test_windowed_vocoding_validates(decoder, speaker) -> None:
    assert vocode_in_windows(decoder, torch.zeros(1, 0, 48), speaker).size == 0
    with pytest.raises(ValueError):
        vocode_in_windows(decoder, torch.zeros(1, 5, 48), speaker, window=4)
    with pytest.raises(ValueError):
        vocode_in_windows(decoder, torch.zeros(5, 48), speaker)


@needs_bf16
@pytest.mark.slow
def test_bf16_keeps_fidelity_on_golden_latents(golden_model, golden_ref) -> None:
    """The released-size HiFi-GAN (golden weights) on the reference's generation latents
    (the first half of them, to keep the test short)."""
    decoder = copy.deepcopy(golden_model.hifigan_decoder)
    emb = golden_ref["voice0.speaker_embedding"]
    gid = sorted(k.split(".")[0] for k in golden_ref if k.endswith(".latents"))[0]
    latents = golden_ref[f"{gid}.latents"]
    latents = latents[:, : latents.shape[1] // 2]
    fp32 = vocode(decoder, latents, emb)
    decoder.set_precision("bf16")
    bf16 = vocode(decoder, latents, emb)
    # Away from the cut, the audio is the reference's own (the receptive field is finite).
    keep = decoder.num_frames(latents.shape[1]) - 2 * decoder.waveform_decoder.receptive_radius()
    keep *= decoder.hop_length
    reference = golden_ref[f"{gid}.wav"].reshape(-1)[:keep].numpy()
    snr, snr_ref = snr_db(fp32, bf16), snr_db(reference, bf16[:keep])
    print(f"golden {gid} bf16 SNR {snr:.1f} dB vs our fp32, {snr_ref:.1f} dB vs the reference")
    assert snr >= MIN_REDUCED_VOCODER_SNR_DB and snr_ref >= MIN_REDUCED_VOCODER_SNR_DB


@needs_int8
@pytest.mark.slow
def test_int8_keeps_fidelity_on_golden_latents(golden_model, golden_ref) -> None:
    """As the bf16 test above: the released-size HiFi-GAN, the stages of INT8_STAGES in
    int8 (their resblocks' input leaky ReLU folded into the kernel's reads)."""
    decoder = copy.deepcopy(golden_model.hifigan_decoder)
    emb = golden_ref["voice0.speaker_embedding"]
    gid = sorted(k.split(".")[0] for k in golden_ref if k.endswith(".latents"))[0]
    latents = golden_ref[f"{gid}.latents"]
    latents = latents[:, : latents.shape[1] // 2]
    fp32 = vocode(decoder, latents, emb)
    decoder.set_precision("int8")
    assert decoder.waveform_decoder._fused_plan().folds == [i in INT8_STAGES for i in range(4)]
    int8 = vocode(decoder, latents, emb)
    keep = decoder.num_frames(latents.shape[1]) - 2 * decoder.waveform_decoder.receptive_radius()
    keep *= decoder.hop_length
    reference = golden_ref[f"{gid}.wav"].reshape(-1)[:keep].numpy()
    snr, snr_ref = snr_db(fp32, int8), snr_db(reference, int8[:keep])
    print(f"golden {gid} int8 SNR {snr:.1f} dB vs our fp32, {snr_ref:.1f} dB vs the reference")
    assert snr >= MIN_REDUCED_VOCODER_SNR_DB and snr_ref >= MIN_REDUCED_VOCODER_SNR_DB
