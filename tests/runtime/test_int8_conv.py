"""The vocoder's int8 convolution kernel (`kernels.Int8Conv`, `lv_conv_q8`): equal to a
float64 model of its arithmetic, close to the float convolution, refused on bad input."""

import pytest
import torch
import torch.nn.functional as F

from lowvox.runtime import kernels
from tests.tolerance import BF16, FP32_REORDER, snr_db

needs_int8_conv = pytest.mark.skipif(
    not kernels.int8_conv(), reason="no int8 convolution kernel on this CPU or build"
)


def _quantised_steps(x: torch.Tensor, slope_in: float | None, zero: int = 128) -> torch.Tensor:
    """x `[T, C]` as the kernel reads it: leaky ReLU'd if asked, then each time step's codes
    around `zero`: the smallest step that keeps its largest value within 255 - zero steps
    above and its most negative within zero below, values rounded to nearest (ties to even),
    in the kernel's float32 arithmetic."""
    x = x.float()
    if slope_in is not None:
        x = torch.maximum(x, x * slope_in)
    up = x.amax(dim=1, keepdim=True).clamp(min=0) / (255 - zero)
    down = -x.amin(dim=1, keepdim=True).clamp(max=0) / zero
    step = torch.maximum(up, down)
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    q = (torch.round(x * inv) + zero).clamp(0, 255)
    return (q - zero) * step


def _reference(conv, x, bias, res, slope, slope_in, zero=128) -> torch.Tensor:
    """The kernel's arithmetic in float64: quantised steps against the int8 weights."""
    xq = _quantised_steps(x, slope_in, zero).double()
    y = F.conv1d(xq.T[None], conv.dequantized().double(), dilation=conv.dilation)[0].T
    if bias is not None:
        y = y + bias.double()
    if res is not None:
        y = y + res.double()  # float32 or bf16 values, exact in float64
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
        for b, slope, slope_in, zero in [
            (bias, None, None, 128),
            (None, 0.1, 0.1, 32),  # a leaky ReLU's output, codes around a low zero point
            (bias, 0.01, None, 128),
            (bias, None, None, 200),
        ]:
            y = conv(x, b, slope=slope, slope_in=slope_in, zero=zero)
            assert y.shape == (t, o) and y.dtype == torch.float32
            ref = _reference(conv, x, b, None, slope, slope_in, zero).float()
            FP32_REORDER.check(y, ref)
    finally:
        torch.set_num_threads(before)


@needs_int8_conv
def test_each_tap_has_its_own_weight_scale() -> None:
    """A tap a thousand times quieter than the others keeps its precision (a scale per
    output and tap, not per output), and the kernel computes with it."""
    torch.manual_seed(6)
    w = torch.randn(32, 32, 3)
    w[:, :, 0] *= 1e-3
    conv = kernels.Int8Conv(w)
    quiet = conv.dequantized()[:, :, 0]
    assert (quiet - w[:, :, 0]).norm() < 0.01 * w[:, :, 0].norm()
    x = torch.zeros(3, 32)
    x[0] = torch.randn(32)  # only the quiet tap sees the one output step's input
    y = conv(x)
    assert snr_db(w[:, :, 0] @ x[0], y[0]) >= 35.0


@needs_int8_conv
def test_int8_conv_reads_and_writes_bf16() -> None:
    """bf16 activations in and out (the vocoder's bf16 plan): the same arithmetic on the
    bf16 values, the result rounded to bf16."""
    torch.manual_seed(4)
    w = torch.randn(64, 48, 5) / 10
    x = torch.randn(80, 48).to(torch.bfloat16)
    res = torch.randn(72, 64).to(torch.bfloat16)
    bias = torch.randn(64)
    conv = kernels.Int8Conv(w, 2)
    y = conv(x, bias, res=res, slope=0.1, slope_in=0.1, zero=32)
    assert y.dtype == torch.bfloat16 and y.shape == (72, 64)
    ref = _reference(conv, x, bias, res, 0.1, 0.1, 32)
    BF16.check(y.float(), ref.float())
    # the kernel's float32 result rounded once: within half a bf16 step of float64's
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    with pytest.raises(ValueError, match="res"):
        conv(x, None, res=res.float())  # one dtype for all activations


@needs_int8_conv
def test_a_leaky_relus_output_is_finer_around_a_low_zero_point() -> None:
    """Negatives a tenth of the positives: codes around 32 resolve them ~1.75x finer than
    symmetric ones (the error of the quantised steps, without the weights)."""
    torch.manual_seed(5)
    x = torch.randn(500, 64)
    x = torch.maximum(x, 0.1 * x)
    err = {z: (_quantised_steps(x, None, z) - x).pow(2).mean().item() for z in (128, 32)}
    assert err[32] < err[128] / 2.5  # ~(1.75)^2 less noise power


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
    with pytest.raises(ValueError, match="zero point"):
        conv(torch.randn(10, 16), zero=0)
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
