"""STFT and mel filterbank: checked against a plain numpy DFT and the filters' definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowvox.audio.mel import (
    MelConfig,
    MelSpectrogram,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    power_spectrogram,
)


def numpy_power_spectrogram(x: np.ndarray, n_fft: int, hop: int, window: np.ndarray) -> np.ndarray:
    """Textbook centred STFT: reflect-pad n_fft/2, frame, window centred in n_fft, |rfft|^2."""
    pad = n_fft // 2
    xp = np.pad(x.astype(np.float64), pad, mode="reflect")
    w = np.zeros(n_fft)
    left = (n_fft - len(window)) // 2
    w[left : left + len(window)] = window
    frames = 1 + (len(xp) - n_fft) // hop
    out = np.empty((n_fft // 2 + 1, frames))
    for f in range(frames):
        seg = xp[f * hop : f * hop + n_fft] * w
        out[:, f] = np.abs(np.fft.rfft(seg)) ** 2
    return out


@pytest.mark.parametrize(
    ("n_fft", "hop", "win"), [(512, 160, 400), (2048, 256, 1024), (64, 16, 64)]
)
def test_power_spectrogram_matches_numpy_dft(n_fft: int, hop: int, win: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(5000).astype(np.float32)
    window = torch.hann_window(win)
    got = power_spectrogram(torch.from_numpy(x), n_fft, hop, window).numpy()
    want = numpy_power_spectrogram(x, n_fft, hop, window.numpy().astype(np.float64))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * want.max())


def test_mel_scale_round_trip() -> None:
    hz = torch.tensor([0.0, 100.0, 1000.0, 8000.0], dtype=torch.float64)
    mels = torch.tensor([hz_to_mel(float(f)) for f in hz], dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(mels), hz)
    assert hz_to_mel(700.0) == pytest.approx(2595.0 * np.log10(2.0))


def test_filterbank_triangles_and_slaney_area() -> None:
    sr, n_fft, n_mels, f_max = 22050, 2048, 80, 8000.0
    n_freqs = n_fft // 2 + 1
    fb = mel_filterbank(n_freqs, 0.0, f_max, n_mels, sr, norm=None)
    assert fb.shape == (n_freqs, n_mels)
    assert fb.min() >= 0 and fb.max() <= 1.0 + 1e-6
    freqs = np.linspace(0, sr // 2, n_freqs)
    centres = mel_to_hz(torch.linspace(hz_to_mel(0.0), hz_to_mel(f_max), n_mels + 2))[1:-1]
    # Each filter peaks at the STFT bin nearest its centre and is zero above f_max.
    peak_bins = fb.argmax(dim=0).numpy()
    nearest = np.abs(freqs[:, None] - centres.numpy()[None, :]).argmin(axis=0)
    assert np.all(np.abs(peak_bins - nearest) <= 1)
    assert float(fb[freqs > f_max + 1].abs().sum()) == 0.0
    # Slaney norm gives each triangle unit area in Hz (checked where bins resolve it well).
    slaney = mel_filterbank(n_freqs, 0.0, f_max, n_mels, sr, norm="slaney")
    areas = slaney.sum(dim=0).numpy() * (freqs[1] - freqs[0])
    np.testing.assert_allclose(areas[20:], 1.0, rtol=0.03)


def test_unknown_norm_is_rejected() -> None:
    with pytest.raises(ValueError):
        mel_filterbank(257, 0.0, 8000.0, 64, 16000, norm="htk")


def test_mel_spectrogram_puts_a_tone_in_the_right_band() -> None:
    cfg = MelConfig(sample_rate=16000, n_fft=512, hop_length=160, win_length=400, n_mels=64)
    mel = MelSpectrogram(cfg)
    t = torch.arange(16000) / 16000
    spec = mel(torch.sin(2 * np.pi * 1000.0 * t).unsqueeze(0))  # [1, 64, frames]
    assert spec.shape == (1, 64, 16000 // 160 + 1)
    band = int(spec[0, :, 50].argmax())
    lo, hi = mel_to_hz(torch.linspace(0, hz_to_mel(8000.0), 66))[band : band + 3][[0, 2]]
    assert lo <= 1000.0 <= hi
