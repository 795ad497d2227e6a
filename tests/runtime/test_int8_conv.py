"""The vocoder's int8 convolution kernel (`kernels.Int8Conv`, `lv_conv_q8`): equal to a
float64 model of its arithmetic, close to the float convolution, refused on bad input."""

import pytest
import torch
import torch.nn.functional as F

from lowvox.runtime import kernels
from tests.tolerance import FP32_REORDER, snr_db

needs_int8_conv = pytest.mark.skipif(
    not kernels.int8_conv(), reason="no int8 convolution kernel on this CPU or build"
)


def _quantised_steps(x: torch.Tensor, slope_in: float | None) -> torch.Tensor:
    """x `[T, C]` as the kernel reads it: leaky ReLU'd if asked, then each time step scaled
    so that its largest magnitude is 127, rounded to nearest (ties to even) and scaled
    back, in the kernel's float32 arithmetic."""
    if slope_in is not None:
        x = torch.maximum(x, x * slope_in)
    top = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    return torch.round(x * inv) * (top / 127.0)


def _reference(conv, x, bias, res, slope, slope_in) -> torch.Tensor:
    """The kernel's arithmetic in float64: quantised steps against the int8 weights."""
    xq = _quantised_steps(x, slope_in).double()
    y = F.conv1d(xq.T[None], conv.dequantized().double(), dilation=conv.dilation)[0].T
    if bias is not None:
        y = y + bias.double()
    if res is not None:
        y = y + res.double()
    if slope is not None:
        y = torch.maximum(y, y * slope)
    return y


@needs_int8_conv
@pytest.mark.parametrize(
    "c,o,k,dil,t",
    [
        (16, 32, 1, 1, 1),  # one step, one tap
        (32, 32, 3, 1, 7),  # fewer output steps than a tile
        (32, 64, 3, 5, 40),
        (64, 32, 7, 3, 101),
        (128, 96, 11, 5, 300),  # three panels, several blocks
        (256, 64, 11, 1, 500),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_conv_matches_float64(c, o, k, dil, t, threads) -> None:
    torch.manual_seed(c + o + k + t)
    w = torch.randn(o, c, k) / (c * k) ** 0.5
    # loud and quiet steps, an all-zero one (scale 0)
    x = torch.randn(t + dil * (k - 1), c) * torch.logspace(-3, 1, t + dil * (k - 1))[:, None]
    x[len(x) // 2] = 0
    bias = torch.randn(o)
    conv = kernels.Int8Conv(w, dil)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b, slope, slope_in in [(bias, None, None), (None, 0.1, 0.1), (bias, 0.01, None)]:
            y = conv(x, b, slope=slope, slope_in=slope_in)
            assert y.shape == (t, o) and y.dtype == torch.float32
            FP32_REORDER.check(y, _reference(conv, x, b, None, slope, slope_in).float())
    finally:
        torch.set_num_threads(before)


@needs_int8_conv
def test_int8_conv_adds_a_residual_in_place() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 32, 3) / 10
    x = torch.randn(50, 32)
    res = torch.randn(46, 64)
    conv = kernels.Int8Conv(w, 2)
    fresh = conv(x, None, res=res)
    expected = _reference(conv, x, None, res, None, None).float()
    FP32_REORDER.check(fresh, expected)
    out = res.clone()
    assert conv(x, None, res=out, out=out) is out  # out += conv(x)
    torch.testing.assert_close(out, fresh, rtol=0, atol=0)  # the same sums, exact


@needs_int8_conv
def test_int8_conv_is_close_to_the_float_convolution() -> None:
    """Per-channel int8 weights and per-step int8 activations: one layer stays ~40 dB
    from float32 (the vocoder's bound, MIN_REDUCED_VOCODER_SNR_DB, is for whole audio)."""
    torch.manual_seed(2)
    w = torch.randn(128, 128, 7) / (128 * 7) ** 0.5
    x = torch.randn(400, 128)
    y = kernels.Int8Conv(w, 3)(x)
    exact = F.conv1d(x.T[None], w, dilation=3)[0].T
    assert snr_db(exact.numpy(), y.numpy()) >= 38.0


def test_int8_conv_takes_only_shapes_it_fits() -> None:
    assert kernels.Int8Conv.fits(torch.zeros(32, 16, 3))
    assert not kernels.Int8Conv.fits(torch.zeros(16, 16, 3))  # outputs: a multiple of 32
    assert not kernels.Int8Conv.fits(torch.zeros(32, 8, 3))  # inputs: a multiple of 16
    with pytest.raises(ValueError, match="shape"):
        kernels.Int8Conv(torch.zeros(16, 16, 3))


@needs_int8_conv
def test_int8_conv_refuses_bad_input() -> None:
    conv = kernels.Int8Conv(torch.randn(32, 16, 3), 1)
    with pytest.raises(ValueError, match="channels"):
        conv(torch.randn(10, 32))
    with pytest.raises(ValueError, match="contiguous"):
        conv(torch.randn(16, 10).T)
    with pytest.raises(ValueError, match="contiguous"):
        conv(torch.randn(10, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias"):
        conv(torch.randn(10, 16), torch.zeros(16))
    with pytest.raises(ValueError, match="res"):
        conv(torch.randn(10, 16), None, res=torch.zeros(10, 32))
    with pytest.raises(ValueError, match="slope"):
        conv(torch.randn(10, 16), slope=1.5)
    assert conv(torch.randn(2, 16)).shape == (0, 32)  # shorter than the kernel: no output


def test_dequantized_weight_is_the_quantised_float() -> None:
    torch.manual_seed(3)
    w = torch.randn(64, 32, 5)
    conv = kernels.Int8Conv(w, 1)
    q = conv.dequantized()
    # per output channel: 255 levels at most, the largest magnitude kept
    top = w.abs().amax(dim=(1, 2))
    torch.testing.assert_close(q.abs().amax(dim=(1, 2)), top)
    assert (q - w).abs().max() <= (top / 127 / 2).max() * 1.0001
