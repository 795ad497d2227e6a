"""Weight-only int8 linear layers: accuracy and module swap."""

import pytest
import torch
from torch import nn

from lowvox.runtime import kernels
from lowvox.runtime.quant import Int8Linear, pack_panels, quantize_linears, quantize_per_channel
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


def test_pack_panels_packs_every_layer_into_one_buffer():
    """`pack_panels` gives each int8 layer the panels `kernel_weight` would pack, side by
    side in one buffer; a layer whose weights change afterwards packs them again."""
    if not kernels.available() or not kernels.int8_panels():
        pytest.skip("this build packs no int8 panels (AVX-512 VNNI without AMX only)")
    torch.manual_seed(2)
    # 200 outputs: the last panel is partly padding; 96 inputs: rows padded to 128 bytes.
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 200), nn.Linear(200, 40))
    quantize_linears(model)
    layers = [m for m in model if isinstance(m, Int8Linear)]
    x = torch.randn(3, 96)
    with torch.inference_mode():
        lazily = model(x)  # each layer packs its own panels on first use
    sizes = [kernels.panel_shape(m.out_features, m.in_features) for m in layers]
    assert pack_panels(model, release_rows=False) == sum(n * k for n, k in sizes)
    panels = [m.kernel_weight() for m in layers]
    storage = panels[0].untyped_storage().data_ptr()
    for m, p, shape in zip(layers, panels, sizes, strict=True):
        assert p is m._panels and tuple(p.shape) == shape and p.data_ptr() % 64 == 0
        assert p.untyped_storage().data_ptr() == storage  # one buffer for all of them
        assert torch.equal(p, kernels.pack_int8_panels(m.weight))
    with torch.inference_mode():
        assert torch.equal(model(x), lazily)
    layer = layers[1]
    with torch.no_grad():
        layer.weight[5].neg_()  # in place: the adopted panels are stale now
    repacked = layer.kernel_weight()
    assert repacked.untyped_storage().data_ptr() != storage
    assert torch.equal(repacked, kernels.pack_int8_panels(layer.weight))


def test_pack_panels_packs_nothing_where_the_kernels_take_no_panels(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 32))
    quantize_linears(model)
    monkeypatch.setattr(kernels, "int8_panels", lambda: False)
    assert pack_panels(model) == 0
    assert model[0]._panels is None
    assert model[0].kernel_weight() is model[0].weight


def test_released_rows_live_on_in_the_panels():
    """`pack_panels` lets the row-major weights go by default: `weight` keeps its shape and
    dtype but no memory, the layer computes what it did, and state dicts, loading and real
    moves see the real weights (unpacked from the panels)."""
    if not kernels.available() or not kernels.int8_panels():
        pytest.skip("this build packs no int8 panels (AVX-512 VNNI without AMX only)")
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(80, 200), nn.Linear(200, 64))
    quantize_linears(model)
    first = model[0]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 80)
    with torch.inference_mode():
        before = model(x)
    pack_panels(model)
    assert first._rows_released
    assert first.weight.shape == (200, 80) and first.weight.dtype == torch.int8
    assert first.weight.untyped_storage().nbytes() == 1  # the panels are the one copy
    with torch.inference_mode():
        assert torch.equal(model(x), before)
    saved = model.state_dict()
    assert saved.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(saved[key], value), key
    assert first._rows_released  # saving unpacks a copy, the layer stays as it was

    other = Int8Linear.from_linear(nn.Linear(80, 200))
    first.load_state_dict(other.state_dict())  # loading into released rows
    assert not first._rows_released and torch.equal(first.weight, other.weight)
    with torch.inference_mode():
        assert torch.equal(first(x), other(x))

    pack_panels(model)
    model.to("cpu")  # where it is already: nothing moves, the rows stay released
    assert first._rows_released
    first._apply(lambda t: t.clone())  # a real move (new tensors): of the real weights
    assert not first._rows_released and torch.equal(first.weight, other.weight)
    with torch.inference_mode():
        assert torch.equal(first(x), other(x))
