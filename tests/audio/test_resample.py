"""Windowed-sinc resampling: lengths, band-limited accuracy, anti-aliasing, reference parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowvox.audio.resample import resample, resampled_length
from lowvox.errors import InvalidRequest
from tests.golden import GOLDEN

RATE_PAIRS = [(44100, 16000), (16000, 22050), (22050, 16000), (48000, 24000), (8000, 22050)]


def tone(freq: float, rate: int, seconds: float = 0.5, phase: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def test_same_rate_is_identity() -> None:
    x = torch.randn(2, 100)
    assert torch.equal(resample(x, 16000, 16000), x)


@pytest.mark.parametrize(("orig", "new"), RATE_PAIRS)
def test_length_and_band_limited_tone(orig: int, new: int) -> None:
    # A tone well inside both pass bands must come out as the same tone at the new rate.
    freq = 440.0
    x = tone(freq, orig)
    y = resample(x, orig, new).numpy()
    assert y.shape == (resampled_length(len(x), orig, new),)
    assert y.shape[0] == int(np.ceil(len(x) * new / orig))
    expected = tone(freq, new, seconds=len(y) / new)[: len(y)]
    interior = slice(len(y) // 10, -len(y) // 10)  # the ends see the implicit zero padding
    assert np.abs(y[interior] - expected[interior]).max() < 2e-3


def test_anti_aliasing_removes_content_above_new_nyquist() -> None:
    # 10 kHz cannot exist at 16 kHz; without a low-pass it would alias to 6 kHz at full level.
    y = resample(tone(10_000.0, 44100), 44100, 16000).numpy()
    interior = y[len(y) // 10 : -len(y) // 10]
    assert np.sqrt(np.mean(interior**2)) < 0.5 / np.sqrt(2) * 10 ** (-40 / 20)


def test_batched_and_numpy_inputs() -> None:
    x = torch.randn(2, 3, 1000)
    y = resample(x, 22050, 16000)
    assert y.shape == (2, 3, resampled_length(1000, 22050, 16000))
    torch.testing.assert_close(y[1, 2], resample(x[1, 2].numpy(), 22050, 16000))


def test_float64_audio_stays_float64() -> None:
    y = resample(torch.randn(500, dtype=torch.float64), 16000, 22050)
    assert y.dtype == torch.float64


@pytest.mark.parametrize(("orig", "new"), [(0, 16000), (16000, -1), (22050.5, 16000)])
def test_bad_rates_are_rejected(orig: float, new: float) -> None:
    with pytest.raises(InvalidRequest):
        resample(torch.zeros(10), orig, new)  # type: ignore[arg-type]


def test_matches_reference_resampling_of_golden_voices() -> None:
    """The golden bundle stores each reference at 22.05 kHz and its 16 kHz resampling."""
    if not (GOLDEN / "reference.safetensors").is_file():
        pytest.skip("golden bundle not found")
    from safetensors.torch import load_file

    ref = load_file(GOLDEN / "reference.safetensors")
    voices = sorted({k.split(".")[0] for k in ref if k.endswith(".audio16k")})
    assert voices
    for v in voices:
        y = resample(ref[f"{v}.audio22k"], 22050, 16000)
        assert y.shape == ref[f"{v}.audio16k"].shape
        err = float((y - ref[f"{v}.audio16k"]).abs().max())
        assert err < 1e-6, f"{v}: max abs error {err:.3g}"
