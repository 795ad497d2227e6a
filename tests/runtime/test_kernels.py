"""lowvox's C kernels: built on first use, equal to float64 references, refused on bad input,
and optional (no compiler, or switched off: torch's kernels give the same results)."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowvox.runtime import kernels
from lowvox.runtime.kernels import build
from lowvox.runtime.quant import MATMUL_ROWS, Int8Linear

needs_compiler = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler")


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """Kernels built into a private folder; the process-wide state restored afterwards."""
    monkeypatch.setenv("LOWVOX_KERNEL_DIR", str(tmp_path / "kernels"))
    kernels.reset()
    yield tmp_path / "kernels"
    monkeypatch.undo()
    kernels.reset()


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setenv("LOWVOX_CPU_KERNELS", "0")
    kernels.reset()
    yield
    monkeypatch.undo()
    kernels.reset()


def _int8_reference(x, w, scales, bias):
    y = (x.double() @ w.double().t()) * scales.double()
    return y + bias.double() if bias is not None else y


@needs_compiler
@pytest.mark.parametrize(
    "m,k,n",
    [(1, 1024, 3072), (1, 17, 1), (2, 100, 7), (3, 64, 9), (4, 48, 4), (5, 4096, 6),
     (8, 33, 5), (9, 250, 13), (40, 96, 30)],
)  # fmt: skip
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_linear_matches_float64(m, k, n, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) + 0.01
    bias = torch.randn(n, generator=g) if with_bias else None
    y = kernels.int8_linear(x, w, scales, bias)
    ref = _int8_reference(x, w, scales, bias)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # float32 accumulation over k terms: relative to the size of the terms summed.
    bound = 1e-6 * k * (x.abs().max() * 127 * scales.max()).item() + 1e-6
    assert (y.double() - ref).abs().max().item() <= bound


@needs_compiler
@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 300])
@pytest.mark.parametrize("heads,dim", [(16, 64), (3, 20)])
def test_attend_one_matches_sdpa_over_a_cache_prefix(length, heads, dim):
    g = torch.Generator().manual_seed(length + heads)
    cache_k = torch.randn(1, heads, 320, dim, generator=g)
    cache_v = torch.randn(1, heads, 320, dim, generator=g)
    q = torch.randn(heads, dim, generator=g)
    out = kernels.attend_one(q, cache_k[0, :, :length], cache_v[0, :, :length])
    ref = F.scaled_dot_product_attention(
        q[None, :, None].double(), cache_k[:, :, :length].double(), cache_v[:, :, :length].double()
    )[0, :, 0]
    assert (out.double() - ref).abs().max().item() < 1e-5


@needs_compiler
def test_bad_inputs_are_errors_not_crashes():
    x = torch.randn(2, 32)
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    s = torch.rand(8)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.int8_linear(x.t().contiguous().t(), w, s, None)
    with pytest.raises(ValueError):
        kernels.int8_linear(x.double(), w, s, None)
    with pytest.raises(ValueError, match="shapes"):
        kernels.int8_linear(x, w[:, :16].contiguous(), s, None)
    with pytest.raises(ValueError, match="bias"):
        kernels.int8_linear(x, w, s, torch.zeros(7))
    cache = torch.randn(1, 4, 10, 8)
    with pytest.raises(ValueError):
        kernels.attend_one(torch.randn(4, 8), cache[0].transpose(1, 2), cache[0])
    with pytest.raises(ValueError):
        kernels.attend_one(torch.randn(4, 8), cache[0, :, :5], cache[0, :, :6])


@needs_compiler
def test_built_once_then_reused(fresh_kernels):
    assert kernels.available()
    built = list(fresh_kernels.glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels.reset()
    assert kernels.available()
    assert [p.stat().st_mtime_ns for p in fresh_kernels.glob("*.so")] == [stamp]
    assert not list(fresh_kernels.glob("tmp*"))  # no temporary file left behind
    assert kernels.isa() in kernels.ISA_NAMES.values()
    assert str(fresh_kernels) in kernels.describe()


def test_without_a_compiler_there_is_no_library(fresh_kernels, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert build.build_library() is None
    kernels.reset()
    assert not kernels.available()
    assert "torch" in kernels.describe()


@needs_compiler
def test_a_compiler_that_fails_leaves_no_library(fresh_kernels, monkeypatch, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc 1.0'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert build.build_library() is None
    assert not list(fresh_kernels.glob("*"))


def test_switched_off_by_environment(no_kernels):
    assert not kernels.available()
    assert "LOWVOX_CPU_KERNELS=0" in kernels.describe()
    with pytest.raises(RuntimeError):
        kernels.int8_linear(torch.randn(1, 4), torch.zeros(2, 4, dtype=torch.int8),
                            torch.ones(2), None)  # fmt: skip


def _int8_layer(seed: int = 3) -> Int8Linear:
    torch.manual_seed(seed)
    return Int8Linear.from_linear(nn.Linear(256, 96))


def _dequantised_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight.double() * layer.scales.double()[:, None]
    return x.double() @ w.t() + layer.bias.double()


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 8, MATMUL_ROWS, 40])
def test_every_int8_path_computes_the_dequantised_layer(rows, monkeypatch):
    """The C kernel (few rows), the bf16 matmul (many rows, on CPUs with bf16 units) and
    torch's fused kernel all compute x @ (q * s).T + b; only the last two round x to bf16."""
    layer = _int8_layer()
    x = torch.randn(rows, 256)
    ref = _dequantised_reference(layer, x)
    scale = ref.abs().max().item()
    kernel = layer(x).double()
    if rows < MATMUL_ROWS and kernels.available():
        assert (kernel - ref).abs().max().item() < 1e-5 * scale
    fused = layer._forward_fused(x).double()
    matmul = layer._forward_bf16_matmul(x).double()
    for y in (kernel, fused, matmul):
        assert (y - ref).abs().max().item() < 2e-2 * scale  # bf16 activations: ~3 digits


def test_without_kernels_int8_layers_still_work(no_kernels):
    layer = _int8_layer()
    x = torch.randn(2, 256)
    ref = _dequantised_reference(layer, x)
    assert (layer(x).double() - ref).abs().max().item() < 2e-2 * ref.abs().max().item()


def test_float_scales_follow_in_place_loads():
    a, b = _int8_layer(1), _int8_layer(2)
    x = torch.randn(1, 256)
    before = b(x)
    b.load_state_dict(a.state_dict())  # copies into b's existing buffers
    assert torch.equal(b(x), a(x))
    assert not torch.equal(b(x), before)


@needs_compiler
def test_decode_attention_kernel_matches_sdpa_in_the_gpt(monkeypatch):
    """A decode step through the GPT's attention with and without the C kernel."""
    from lowvox.engines.xtts.gpt import Attention, KVCache

    torch.manual_seed(0)
    attn = Attention(64, 4)
    for p in attn.parameters():
        nn.init.normal_(p, std=0.1)
    cache = KVCache(1, 4, 32, 16)
    with torch.no_grad():
        attn(torch.randn(1, 10, 64), 0, cache)
        x = torch.randn(1, 1, 64)
        k_saved, v_saved = cache.k.clone(), cache.v.clone()
        with_kernel = attn(x, 10, cache)
        cache.k.copy_(k_saved)
        cache.v.copy_(v_saved)
        monkeypatch.setenv("LOWVOX_CPU_KERNELS", "0")
        kernels.reset()
        try:
            without = attn(x, 10, cache)
        finally:
            monkeypatch.undo()
            kernels.reset()
    assert torch.allclose(with_kernel, without, atol=1e-5)


def test_kernel_folder_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWVOX_KERNEL_DIR", str(tmp_path))
    assert build.kernel_dir() == tmp_path
    monkeypatch.delenv("LOWVOX_KERNEL_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.kernel_dir() == tmp_path / "xdg" / "lowvox" / "kernels"


@needs_compiler
def test_portable_build_without_native_flags_is_correct(fresh_kernels, monkeypatch):
    """The fallback flag sets (no -march=native, no OpenMP) still give right answers."""
    monkeypatch.setattr(build, "FLAG_SETS", (("-O2",),))
    path = build.build_library()
    assert path is not None and os.path.getsize(path) > 0
    kernels.reset()
    monkeypatch.setattr(kernels, "build_library", lambda: path)
    assert kernels.isa() == "portable C"
    x = torch.randn(3, 50)
    w = torch.randint(-127, 128, (7, 50), dtype=torch.int8)
    s = torch.rand(7)
    y = kernels.int8_linear(x, w, s, None)
    assert (y.double() - _int8_reference(x, w, s, None)).abs().max().item() < 1e-3
    assert shutil.which(build.find_compiler() or "") is not None
