"""Band-limited resampling with a Hann-windowed sinc filter.

The filter is the one XTTS's reference pipeline uses for its voice references (a windowed sinc
that crosses zero `lowpass_filter_width` times on each side, cut off at `rolloff` of the lower
Nyquist rate), so conditioning latents computed from resampled audio match the reference.
Resampling from `orig` to `new` Hz is a strided convolution: after dividing both rates by their
gcd, each block of `orig` input samples yields `new` output samples, one filter per output phase.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from lowvox.errors import InvalidRequest


@lru_cache(maxsize=16)
def _sinc_kernel(
    orig: int, new: int, lowpass_filter_width: int, rolloff: float, dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """Filter bank for reduced rates `orig` -> `new`: ([new, 1, 2 * width + orig], width).

    Computed in the audio's own dtype, as the reference does: in float32 the taps carry
    ~1e-7 rounding that shows up as ~1e-5 differences in the output, so the order of the
    operations below is kept as it is on purpose.
    """
    cutoff = min(orig, new) * rolloff  # in units of the reduced rates
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    # Input sample offsets (in input periods) covered by one output block.
    offsets = torch.arange(-width, width + orig, dtype=dtype)[None, :] / orig  # [1, K]
    # Output phase j sits at time j / new.
    phases = torch.arange(0, -new, -1, dtype=dtype)[:, None] / new  # [new, 1]
    t = (phases + offsets) * cutoff  # [new, K], in zero crossings of the filter
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
    kernel = sinc * (window * (cutoff / orig))
    return kernel.unsqueeze(1), width  # [new, 1, K]


def resampled_length(length: int, orig_sr: int, new_sr: int) -> int:
    """Number of samples `resample` returns for `length` input samples."""
    if orig_sr == new_sr:
        return length
    g = math.gcd(orig_sr, new_sr)
    return math.ceil((new_sr // g) * length / (orig_sr // g))


def resample(
    wave: torch.Tensor | np.ndarray,
    orig_sr: int,
    new_sr: int,
    *,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
) -> torch.Tensor:
    """Resample float audio `[..., N]` from `orig_sr` to `new_sr` Hz (returns a float tensor).

    The output has ceil(N * new_sr / orig_sr) samples; sample k sits at time k / new_sr.
    """
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if not wave.is_floating_point():
        raise TypeError(f"resample expects floating-point audio, got {wave.dtype}")
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise InvalidRequest(f"invalid sample rates for resampling: {orig_sr} -> {new_sr}")
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    kernel, width = _sinc_kernel(orig, new, lowpass_filter_width, float(rolloff), wave.dtype)
    kernel = kernel.to(device=wave.device)

    shape = wave.shape
    flat = wave.reshape(-1, 1, shape[-1])  # [B, 1, N]
    padded = F.pad(flat, (width, width + orig))
    out = F.conv1d(padded, kernel, stride=orig)  # [B, new, blocks]: one row per output phase
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)  # interleave phases: [B, blocks * new]
    out = out[:, : resampled_length(shape[-1], orig_sr, new_sr)]
    return out.reshape(*shape[:-1], out.shape[-1])
