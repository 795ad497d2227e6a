"""Weight-only int8 linear layers: accuracy and module swap."""

import torch
from torch import nn

from lowvox.runtime.quant import Int8Linear, quantize_linears, quantize_per_channel
from tests.tolerance import FP32_REORDER


def test_per_channel_roundtrip_error_is_bounded():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-2, 1, 64)[:, None]  # very different row scales
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    err = (q.float() * s[:, None] - w).abs()
    # Per-channel scales keep each row's error under half a step of that row.
    assert torch.all(err <= s[:, None] * 0.5 + 1e-6)


def test_int8_linear_matches_float_linear():
    torch.manual_seed(1)
    lin = nn.Linear(512, 384)
    x = torch.randn(2, 7, 512)
    q = Int8Linear.from_linear(lin)
    ref, out = lin(x), q(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)
    assert cos > 0.999


def test_quantize_linears_swaps_only_included():
    model = nn.ModuleDict(
        {
            "gpt": nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
            "vocoder": nn.Linear(8, 8),
        }
    )
    assert quantize_linears(model, include=("gpt",)) == 2
    assert isinstance(model["gpt"][0], Int8Linear)
    assert type(model["vocoder"]) is nn.Linear


def test_state_dict_roundtrip():
    lin = nn.Linear(16, 4)
    q = Int8Linear.from_linear(lin)
    q2 = Int8Linear(16, 4)
    q2.load_state_dict(q.state_dict())
    for key, value in q.state_dict().items():
        assert torch.equal(q2.state_dict()[key], value), key  # copied data: exact
    x = torch.randn(3, 16)
    FP32_REORDER.check(q2(x), q(x))  # another layer instance with the same weights
