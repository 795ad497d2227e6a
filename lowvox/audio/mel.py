"""STFT power spectrograms and mel filterbanks (HTK mel scale, optional Slaney area norm).

These reproduce the feature pipeline XTTS was trained with: a centred, reflect-padded STFT
with a periodic window of `win_length` zero-padded to `n_fft`, power 2, projected on
triangular mel filters spaced on the HTK mel scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def hz_to_mel(freq: float) -> float:
    """HTK mel scale."""
    return 2595.0 * math.log10(1.0 + freq / 700.0)


def mel_to_hz(mels: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sample_rate: int,
    norm: str | None = "slaney",
) -> torch.Tensor:
    """Triangular mel filters as a `[n_freqs, n_mels]` float32 matrix (spectrum @ fb = mel).

    With `norm="slaney"` each triangle is divided by its width in Hz (constant area), as in
    librosa's default filters; the centres are on the HTK mel scale either way.
    """
    if norm not in (None, "slaney"):
        raise ValueError(f"unknown mel norm {norm!r} (expected None or 'slaney')")
    freqs = torch.linspace(0, sample_rate // 2, n_freqs)  # STFT bin centres, Hz
    mel_pts = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    hz_pts = mel_to_hz(mel_pts)  # [n_mels + 2]: band edges and centres
    widths = hz_pts[1:] - hz_pts[:-1]  # [n_mels + 1]
    offsets = hz_pts.unsqueeze(0) - freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]  # [n_freqs, n_mels]
    falling = offsets[:, 2:] / widths[1:]
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if norm == "slaney":
        fb = fb * (2.0 / (hz_pts[2:] - hz_pts[:-2])).unsqueeze(0)
    return fb


def power_spectrogram(
    wave: torch.Tensor, n_fft: int, hop_length: int, window: torch.Tensor
) -> torch.Tensor:
    """|STFT|^2 of `[..., N]` audio -> `[..., n_fft // 2 + 1, frames]` (centred, reflect pad).

    `window` has the analysis window length; torch.stft centres it inside each n_fft frame.
    """
    shape = wave.shape
    spec = torch.stft(
        wave.reshape(-1, shape[-1]),
        n_fft=n_fft,
        hop_length=hop_length,
        win_length=window.shape[0],
        window=window,
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )  # [B, F, frames]
    power = spec.abs().square()
    return power.reshape(*shape[:-1], *power.shape[-2:])


@dataclass(frozen=True)
class MelConfig:
    """Parameters of a mel spectrogram (power 2, HTK scale)."""

    sample_rate: int
    n_fft: int
    hop_length: int
    win_length: int
    n_mels: int
    f_min: float = 0.0
    f_max: float | None = None  # None: Nyquist
    norm: str | None = "slaney"
    window: str = "hann"  # "hann" or "hamming" (periodic)

    def make_window(self) -> torch.Tensor:
        fns: dict[str, Callable[..., torch.Tensor]] = {
            "hann": torch.hann_window,
            "hamming": torch.hamming_window,
        }
        if self.window not in fns:
            raise ValueError(f"unknown window {self.window!r}")
        return fns[self.window](self.win_length)

    def make_filterbank(self) -> torch.Tensor:
        f_max = self.f_max if self.f_max is not None else float(self.sample_rate // 2)
        return mel_filterbank(
            self.n_fft // 2 + 1, self.f_min, f_max, self.n_mels, self.sample_rate, self.norm
        )


class MelSpectrogram(torch.nn.Module):
    """`[..., N]` audio -> `[..., n_mels, frames]` mel power spectrogram.

    The window and filterbank are buffers (`window`, `fb`), created from the config and
    overwritable from a checkpoint that stores its own copies.
    """

    window: torch.Tensor
    fb: torch.Tensor

    def __init__(self, config: MelConfig, persistent: bool = False) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("window", config.make_window(), persistent=persistent)
        self.register_buffer("fb", config.make_filterbank(), persistent=persistent)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        power = power_spectrogram(wave, self.config.n_fft, self.config.hop_length, self.window)
        # [..., F, frames] -> [..., frames, F] @ [F, n_mels] -> [..., n_mels, frames]
        return torch.matmul(power.transpose(-1, -2), self.fb).transpose(-1, -2)
