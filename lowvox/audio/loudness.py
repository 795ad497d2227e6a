"""Loudness as ITU-R BS.1770-4 measures it: K-weighting, 400 ms blocks every 100 ms,
an absolute gate at -70 LUFS and a relative gate 10 LU below the ungated level.

`LoudnessMeter` is fed audio in pieces of any size (the filter state carries across them),
so a ten-hour book is measured keeping only one energy per 100 ms block. The filter's
analogue prototypes are libebur128's: rates other than 48 kHz get the standard's curve.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from lowvox.errors import InvalidRequest

__all__ = ["LoudnessMeter", "chapter_gain", "integrated_loudness"]


def _k_weighting(rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) of the K-weighting filter at `rate`: the BS.1770 high shelf then high pass,
    as one 4th-order filter. The analogue prototypes are libebur128's, so that rates other
    than 48 kHz get the same curve (at 48 kHz these are the standard's coefficients)."""
    f0, gain_db, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / rate)
    vh = 10.0 ** (gain_db / 20.0)
    vb = vh**0.4996667741545416
    a0 = 1.0 + k / q + k * k
    shelf_b = np.array([vh + vb * k / q + k * k, 2.0 * (k * k - vh), vh - vb * k / q + k * k]) / a0
    shelf_a = np.array([a0, 2.0 * (k * k - 1.0), 1.0 - k / q + k * k]) / a0
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / rate)
    a0 = 1.0 + k / q + k * k
    pass_b = np.array([1.0, -2.0, 1.0])
    pass_a = np.array([a0, 2.0 * (k * k - 1.0), 1.0 - k / q + k * k]) / a0
    return np.convolve(shelf_b, pass_b), np.convolve(shelf_a, pass_a)


def _impulse_response(b: np.ndarray, a: np.ndarray, n: int) -> np.ndarray:
    """The first `n` samples of b/a's impulse response (a[0] == 1), by direct recursion."""
    order = len(a) - 1
    y = np.zeros(n + order)  # `order` leading zeros stand for the time before the impulse
    for i in range(n):
        acc = b[i] if i < len(b) else 0.0
        for j in range(1, order + 1):
            acc -= a[j] * y[order + i - j]
        y[order + i] = acc
    return y[order:]


@functools.cache
def _responses(b: tuple[float, ...], a: tuple[float, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` samples of the impulse responses of b/a and of 1/a (read-only, shared
    by every filter of the same design)."""
    h = _impulse_response(np.array(b), np.array(a), n)
    g = _impulse_response(np.array([1.0]), np.array(a), n)
    h.flags.writeable = g.flags.writeable = False
    return h, g


class _IirFilter:
    """An IIR filter run block by block with numpy's FFT, exactly (to rounding).

    Within a block of m samples the output is the input convolved with the first m taps of
    the impulse response (zero initial state), plus what the previous block's last inputs
    and outputs ring into this one: that equals a short excitation `e` (order samples) fed
    through the all-pole part 1/a. Both parts are exact, so the filter state carries across
    sentence files and silences with no seams."""

    _BLOCK = 16384

    def __init__(self, b: np.ndarray, a: np.ndarray) -> None:
        if a[0] != 1.0:
            b, a = b / a[0], a / a[0]
        self._order = len(a) - 1
        self._b = np.concatenate([b, np.zeros(max(0, len(a) - len(b)))])
        self._a = a
        self._h, self._g = _responses(tuple(b), tuple(a), self._BLOCK)
        self._spectra: dict[int, np.ndarray] = {}
        self._x_tail = np.zeros(self._order)  # last inputs, oldest first
        self._y_tail = np.zeros(self._order)  # last outputs, oldest first

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        out = np.empty_like(x)
        for start in range(0, len(x), self._BLOCK):
            out[start : start + self._BLOCK] = self._block(x[start : start + self._BLOCK])
        return out

    def _spectrum(self, nfft: int) -> np.ndarray:
        spectrum = self._spectra.get(nfft)
        if spectrum is None:
            # nfft/2 taps: a block of m <= nfft/2 samples never wraps around the FFT.
            spectrum = self._spectra[nfft] = np.fft.rfft(self._h[: nfft // 2], nfft)
        return spectrum

    def _block(self, x: np.ndarray) -> np.ndarray:
        m = len(x)
        nfft = 1 << max(6, (2 * m - 1).bit_length())
        y = np.fft.irfft(np.fft.rfft(x, nfft) * self._spectrum(nfft), nfft)[:m]
        n = self._order
        for k in range(min(n, m)):
            # e[k] = sum_{j>k} b[j] x[k-j] - a[j] y[k-j], over the samples before this block
            e = 0.0
            for j in range(k + 1, n + 1):
                e += self._b[j] * self._x_tail[n + k - j] - self._a[j] * self._y_tail[n + k - j]
            if e:
                y[k:] += e * self._g[: m - k]
        self._x_tail = np.concatenate([self._x_tail, x])[-n:]
        self._y_tail = np.concatenate([self._y_tail, y])[-n:]
        return y


@functools.cache
def _k_filter_design(rate: int) -> tuple[np.ndarray, np.ndarray]:
    return _k_weighting(rate)


class LoudnessMeter:
    """BS.1770-4 integrated loudness and sample peak of mono audio pushed in pieces.

    Only the energy of each 100 ms step is kept (36,000 floats for ten hours), so a chapter
    of any length is measured in constant memory. Call `push` with consecutive samples
    (silence included: it moves the blocks and rings the filter) and read `loudness`."""

    _ABSOLUTE_GATE = -70.0
    _RELATIVE_GATE = -10.0

    def __init__(self, sample_rate: int) -> None:
        if sample_rate < 8000:
            raise InvalidRequest(
                f"loudness needs a sample rate of 8 kHz or more, got {sample_rate}"
            )
        self.sample_rate = sample_rate
        b, a = _k_filter_design(sample_rate)
        self._filter = _IirFilter(b, a)
        self._step = round(0.1 * sample_rate)  # blocks are 4 steps: 400 ms, 75 % overlap
        self._steps: list[float] = []
        self._partial = 0.0
        self._partial_len = 0
        self.samples = 0
        self.peak = 0.0

    def push(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if not len(x):
            return
        self.samples += len(x)
        self.peak = max(self.peak, float(np.max(np.abs(x))))
        energy = self._filter(x) ** 2
        i = 0
        if self._partial_len:
            take = min(self._step - self._partial_len, len(energy))
            self._partial += float(energy[:take].sum())
            self._partial_len += take
            i = take
            if self._partial_len == self._step:
                self._steps.append(self._partial)
                self._partial, self._partial_len = 0.0, 0
        whole = (len(energy) - i) // self._step
        if whole:
            block = energy[i : i + whole * self._step].reshape(whole, self._step)  # [steps, step]
            self._steps.extend(block.sum(axis=1).tolist())
            i += whole * self._step
        if i < len(energy):
            self._partial += float(energy[i:].sum())
            self._partial_len += len(energy) - i

    @property
    def loudness(self) -> float:
        """Integrated loudness in LUFS; -inf when nothing passes the absolute gate. Audio
        shorter than one block is measured as a single block of its own length."""
        steps = np.asarray(self._steps)
        if len(steps) >= 4:
            # mean square of each 400 ms block  [blocks]
            z = (steps[:-3] + steps[1:-2] + steps[2:-1] + steps[3:]) / (4 * self._step)
        elif self.samples:
            z = np.array([(steps.sum() + self._partial) / self.samples])
        else:
            return -math.inf
        with np.errstate(divide="ignore"):
            levels = -0.691 + 10.0 * np.log10(z)
        z = z[levels > self._ABSOLUTE_GATE]
        if not len(z):
            return -math.inf
        relative = -0.691 + 10.0 * math.log10(float(z.mean())) + self._RELATIVE_GATE
        z = z[-0.691 + 10.0 * np.log10(z) > relative]
        return -0.691 + 10.0 * math.log10(float(z.mean()))


def integrated_loudness(samples: np.ndarray, sample_rate: int) -> float:
    """BS.1770-4 integrated loudness (LUFS) of mono samples held in memory."""
    meter = LoudnessMeter(sample_rate)
    meter.push(samples)
    return meter.loudness


def chapter_gain(loudness: float, peak: float, target_lufs: float, max_peak_dbfs: float) -> float:
    """The linear gain that brings audio of `loudness` to `target_lufs`, lowered so that its
    sample `peak` stays at or under `max_peak_dbfs`; 1.0 for silence."""
    if not math.isfinite(loudness) or peak <= 0.0:
        return 1.0
    gain_db = min(target_lufs - loudness, max_peak_dbfs - 20.0 * math.log10(peak))
    return 10.0 ** (gain_db / 20.0)
