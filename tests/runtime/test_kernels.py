"""lowvox's C kernels: built on first use, equal to float64 references, refused on bad input,
and optional (no compiler, or switched off: torch's kernels give the same results)."""

import os
import platform
import shutil
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowvox.runtime import kernels
from lowvox.runtime.kernels import build
from lowvox.runtime.quant import MATMUL_ROWS, Bf16Linear, Int8Linear, bf16_linears
from tests.tolerance import FP32_REORDER

needs_compiler = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler")
# The tests of the kernels themselves: a run with them switched off (LOWVOX_CPU_KERNELS=0,
# the torch fallback everywhere else) skips these rather than fail them.
needs_kernels = pytest.mark.skipif(
    build.find_compiler() is None or not kernels.enabled_by_env(),
    reason="no C compiler, or the kernels are switched off (LOWVOX_CPU_KERNELS=0)",
)


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """Kernels built into a private folder, with the default flag sets whatever
    `LOWVOX_KERNEL_FLAGS` the run was started with (a test may set its own); the
    process-wide state restored afterwards."""
    monkeypatch.setenv("LOWVOX_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv("LOWVOX_KERNEL_FLAGS", raising=False)
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


QCHUNK = 256  # activation values sharing one int16 scale (cpu_kernels.c)
Q8CHUNK = 128  # activation values sharing one int8 scale


def _quantised_activations(x: torch.Tensor, top_code: int, chunk: int) -> torch.Tensor:
    """Each row's values, per `chunk`, scaled so the largest magnitude is `top_code`,
    rounded to nearest (ties to even) and scaled back, in the kernel's float32 arithmetic
    (as float64)."""
    out = torch.empty_like(x, dtype=torch.float64)
    for c0 in range(0, x.shape[1], chunk):
        part = x[:, c0 : c0 + chunk]
        top = part.abs().amax(dim=1, keepdim=True)
        inv = torch.where(top > 0, torch.tensor(float(top_code)) / top, torch.zeros_like(top))
        q = torch.round(part * inv).clamp(-top_code - 1, top_code)
        out[:, c0 : c0 + chunk] = q.double() * (top / float(top_code)).double()
    return out


def _int16_activations(x: torch.Tensor) -> torch.Tensor:
    """What int8 weights meet on AVX-512 VNNI builds with AMX."""
    return _quantised_activations(x, 32767, QCHUNK)


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """What int8 weights meet on AVX-512 VNNI builds without AMX, and AVX2 builds."""
    return _quantised_activations(x, 127, Q8CHUNK)


def _int8_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """The activations as the int8 kernel of this build sees them (float64)."""
    bits = kernels.activation_bits()
    if bits == 8:
        return _int8_activations(x)
    return _int16_activations(x) if bits == 16 else x.double()


def test_the_kernels_chunk_as_the_tests_model_them():
    bits = kernels.activation_bits()
    assert bits in (8, 16, 32)
    assert kernels.activation_chunk() == {8: Q8CHUNK, 16: QCHUNK, 32: 0}[bits]


@pytest.mark.parametrize("quantise,top_code,chunk", [
    (_int16_activations, 32767, QCHUNK), (_int8_activations, 127, Q8CHUNK)])  # fmt: skip
def test_quantised_activations_are_close_to_the_floats(quantise, top_code, chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 700, generator=g) * torch.rand(3, 700, generator=g) * 10
    x[1, 5] = 1e4  # an outlier only coarsens its own chunk
    q = quantise(x)
    for c0 in range(0, 700, chunk):
        part = x[:, c0 : c0 + chunk].double()
        lsb = part.abs().amax(dim=1, keepdim=True) / top_code
        assert ((q[:, c0 : c0 + chunk] - part).abs() <= 0.5 * lsb * (1 + 1e-5)).all()
    assert (q[1, chunk:] - x[1, chunk:].double()).abs().max() < 1e-3 * 32767 / top_code


@needs_kernels
@pytest.mark.parametrize(
    "m,k,n",
    [(1, 1024, 3072), (1, 17, 1), (2, 100, 7), (3, 64, 9), (4, 48, 4), (5, 4096, 6),
     (8, 33, 5), (9, 250, 13), (40, 96, 30),
     # shapes the AMX path takes (k a multiple of 64, n of 16): one and several row groups
     (2, 128, 32), (8, 1024, 48), (16, 320, 16), (17, 256, 64), (40, 4096, 32),
     # the packed product of many rows (AVX-512 VNNI without AMX): a partial last panel
     # and row tile, k not a multiple of four or of a chunk
     (23, 1030, 70), (64, 130, 33), (19, 6, 3)],
)  # fmt: skip
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])  # weights as they are, or packed as panels
def test_int8_linear_matches_float64(m, k, n, with_bias, packed):
    if packed and not kernels.int8_panels():
        pytest.skip("this build packs no int8 panels (AVX-512 VNNI without AMX only)")
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) + 0.01
    bias = torch.randn(n, generator=g) if with_bias else None
    y = kernels.linear(x, kernels.pack_int8_panels(w) if packed else w, scales, bias)
    ref = _int8_reference(_int8_kernel_input(x), w, scales, bias)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # float32 accumulation over k terms: relative to the size of the terms summed.
    bound = 1e-6 * k * (x.abs().max() * 127 * scales.max()).item() + 1e-6
    assert (y.double() - ref).abs().max().item() <= bound
    # Against the float activations: within what their rounding (half a step of each
    # chunk's scale) can add, on top of that.
    exact = _int8_reference(x, w, scales, bias)
    rounding = (_int8_kernel_input(x) - x.double()).abs()
    allowed = (rounding @ w.double().abs().t()) * scales.double()
    assert ((y.double() - exact).abs() <= allowed + bound).all()


@needs_kernels
@pytest.mark.parametrize(
    "m,k,n",
    [(1, 1024, 3072), (1, 17, 1), (3, 64, 9), (5, 4096, 6), (9, 250, 13),
     # shapes the AMX path takes (k a multiple of 64, n of 16): one and several row groups
     (3, 128, 32), (8, 1024, 48), (17, 256, 64), (40, 4096, 32)],
)  # fmt: skip
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_linear_matches_float64(m, k, n, with_bias):
    """bf16 weights widened exactly to float32, float32 activations and accumulation; on the
    AMX tiles each activation is hi + lo, two bf16 values, within 2^-17 of its own size."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g) if with_bias else None
    y = kernels.linear(x, w, None, bias)
    ref = x.double() @ w.double().t() + (bias.double() if with_bias else 0)
    assert y.shape == (m, n) and y.dtype == torch.float32
    bound = 1e-6 * k * (x.abs().max() * w.float().abs().max()).item() + 1e-6
    if kernels.amx() and m >= 3 and k % 64 == 0 and n % 16 == 0:
        split = 2.0**-17 * (x.double().abs() @ w.double().abs().t())
        assert ((y.double() - ref).abs() <= split + bound).all()
    else:
        assert (y.double() - ref).abs().max().item() <= bound


@needs_kernels
@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 300])
@pytest.mark.parametrize("heads,dim", [(16, 64), (3, 20), (2, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_one_writes_the_cache_and_matches_sdpa(length, heads, dim, dtype):
    """The new key/value land in the cache as torch would cast them (bfloat16: nearest
    even), and attention over the cache's values, as float64, matches SDPA."""
    g = torch.Generator().manual_seed(length + heads)
    cache_k = (torch.randn(1, heads, 320, dim, generator=g) * 2).to(dtype)
    cache_v = torch.randn(1, heads, 320, dim, generator=g).to(dtype)
    q, k_new, v_new = (torch.randn(heads, dim, generator=g) * 2 for _ in range(3))
    pos = length - 1
    ref_k, ref_v = cache_k.clone().double(), cache_v.clone().double()
    ref_k[0, :, pos] = k_new.to(dtype).double()
    ref_v[0, :, pos] = v_new.to(dtype).double()
    out = kernels.attend_one(q, k_new, v_new, cache_k, cache_v, pos)
    assert torch.equal(cache_k[0, :, pos], k_new.to(dtype))
    assert torch.equal(cache_v[0, :, pos], v_new.to(dtype))
    ref = F.scaled_dot_product_attention(
        q[None, :, None].double(), ref_k[:, :, :length], ref_v[:, :, :length]
    )[0, :, 0]
    assert (out.double() - ref).abs().max().item() < 1e-5
    # Positions past `pos` were neither read nor written.
    assert torch.equal(cache_k[0, :, length:].double(), ref_k[0, :, length:])


@needs_kernels
@pytest.mark.parametrize("start,t", [(0, 2), (0, 37), (5, 20)])
@pytest.mark.parametrize("heads,dim", [(16, 64), (3, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_prompt_is_attend_one_token_by_token(start, t, heads, dim, dtype):
    """A prompt's attention writes the cache as the decode steps would, and each token's
    output is exactly theirs (the same arithmetic per token); against float64 causal SDPA
    over the cached (rounded) keys and values it is within float32 reordering."""
    g = torch.Generator().manual_seed(start + t + heads)
    qkv = torch.randn(t, 3 * heads * dim, generator=g) * 2
    prefix = (torch.randn(1, heads, 64, dim, generator=g)).to(dtype)
    prefix[:, :, start:] = 0
    cache_k, cache_v = prefix.clone(), prefix.clone() * 0.5
    step_k, step_v = cache_k.clone(), cache_v.clone()
    out = kernels.attend_prompt(qkv, cache_k, cache_v, start)
    q, k, v = qkv.view(t, 3, heads, dim).unbind(1)  # [t, heads, dim] each
    steps = torch.stack([
        kernels.attend_one(q[i].contiguous(), k[i].contiguous(), v[i].contiguous(),
                           step_k, step_v, start + i).reshape(-1)
        for i in range(t)
    ])  # fmt: skip
    assert torch.equal(cache_k, step_k) and torch.equal(cache_v, step_v)
    assert torch.equal(out, steps)
    end = start + t
    keys, values = cache_k[:, :, :end].double(), cache_v[:, :, :end].double()
    seen = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]  # [t, end]
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None].double(), keys, values, attn_mask=seen
    )[0].transpose(0, 1).reshape(t, -1)  # fmt: skip
    FP32_REORDER.check(out.double(), ref)


@needs_kernels
def test_attend_prompt_refuses_what_does_not_fit():
    cache = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="outside"):
        kernels.attend_prompt(torch.randn(5, 24), cache, cache.clone(), 4)
    with pytest.raises(ValueError, match="qkv"):
        kernels.attend_prompt(torch.randn(5, 23), cache, cache.clone(), 0)
    with pytest.raises(ValueError, match="differ"):
        kernels.attend_prompt(torch.randn(2, 24), cache, cache.to(torch.bfloat16), 0)


@needs_kernels
def test_gelu_tanh_matches_torch():
    x = torch.randn(37, 1000) * 4
    x[0, :5] = torch.tensor([0.0, -30.0, 30.0, 1e-8, -1e-8])
    ref = F.gelu(x, approximate="tanh")
    out = kernels.gelu_tanh_(x.clone())
    FP32_REORDER.check(out, ref)


def test_amd_tuning_follows_the_cpu_vendor(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(build, "CPUINFO", str(info))
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n")
    assert build.tuning_defines() == ("-DLV_AMD=1",)
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2\n")
    assert build.tuning_defines() == ()
    info.unlink()  # no /proc/cpuinfo (not Linux): no vendor tuning
    assert build.tuning_defines() == ()


@needs_kernels
@pytest.mark.slow
def test_the_build_takes_this_cpus_vendor_tuning(fresh_kernels):
    vendor = build._cpuinfo_field("vendor_id") or ""
    assert kernels.amd_tuning() == vendor.endswith("AuthenticAMD")


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("amd", [0, 1])
def test_a_bf16_row_alone_equals_the_same_row_in_a_batch(amd, fresh_kernels, monkeypatch):
    """One activation row walks the weight rows one after another (AMD tuning) or four
    interleaved (Intel), several rows walk them interleaved; each output's sum runs in the
    same order either way (exact by construction). Built for each vendor's tuning, without
    AMX, whose tiles would take the several rows instead."""
    flags = "-O3 -march=native -fopenmp"
    if platform.machine() in ("x86_64", "AMD64"):
        flags += " -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    monkeypatch.setenv("LOWVOX_KERNEL_FLAGS", f"{flags} -DLV_AMD={amd}")
    if build.build_library() is None:
        pytest.skip("this compiler does not take the flags")
    kernels.reset()
    assert kernels.amd_tuning() == bool(amd) and not kernels.amx()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1000, generator=g)
    w = torch.randn(37, 1000, generator=g).to(torch.bfloat16)
    b = torch.randn(37, generator=g)
    together = kernels.linear(x, w, None, b)
    for i in range(3):
        assert torch.equal(
            kernels.linear(x[i : i + 1].contiguous(), w, None, b), together[i : i + 1]
        )


@needs_kernels
def test_bad_inputs_are_errors_not_crashes():
    x = torch.randn(2, 32)
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    s = torch.rand(8)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.linear(x.t().contiguous().t(), w, s, None)
    with pytest.raises(ValueError):
        kernels.linear(x.double(), w, s, None)
    with pytest.raises(ValueError, match="shapes"):
        kernels.linear(x, w[:, :16].contiguous(), s, None)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear(x, w, s, torch.zeros(7))
    with pytest.raises(ValueError, match="need their scales"):
        kernels.linear(x, w, None, None)
    with pytest.raises(ValueError, match="no scales"):
        kernels.linear(x, w.to(torch.bfloat16), s, None)
    with pytest.raises(ValueError, match="int8 or bfloat16"):
        kernels.linear(x, w.float(), s, None)
    with pytest.raises(ValueError, match="scales"):
        kernels.linear(x, w, s[:7].contiguous(), None)
    cache = torch.randn(1, 4, 10, 8)
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="outside"):
        kernels.attend_one(q, q, q, cache, cache.clone(), 10)
    with pytest.raises(ValueError):
        kernels.attend_one(q, q, q, cache.transpose(2, 3), cache.clone(), 1)
    with pytest.raises(ValueError):
        kernels.attend_one(q, q[:3].contiguous(), q, cache, cache.clone(), 1)
    with pytest.raises(ValueError, match="differ"):
        kernels.attend_one(q, q, q, cache, cache[:, :, :5].contiguous(), 1)


@needs_kernels
@pytest.mark.slow
def test_built_once_then_reused(fresh_kernels):
    assert kernels.available()
    built = list(fresh_kernels.glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels.reset()
    assert kernels.available()
    assert [p.stat().st_mtime_ns for p in fresh_kernels.glob("*.so")] == [stamp]
    assert [p.name for p in fresh_kernels.iterdir()] == [built[0].name]  # no temporary left
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
    assert not list(fresh_kernels.iterdir())  # not even a hidden temporary


@needs_compiler
def test_builds_that_a_killed_process_left_are_swept(fresh_kernels, monkeypatch, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc 1.0'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    fresh_kernels.mkdir()
    stale = fresh_kernels / ".lowvox_cpu_0123456789abcdef.so.x1y2z3.part"
    live = fresh_kernels / ".lowvox_cpu_0123456789abcdef.so.a4b5c6.part"  # another build's
    foreign = fresh_kernels / ".download.zip.part"  # another program's, in a shared folder
    for path in (stale, live, foreign):
        path.write_bytes(b"\x7fELF")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(foreign, (hour_ago, hour_ago))
    assert build.build_library() is None
    assert not stale.exists() and live.exists() and foreign.exists()


@needs_kernels
@pytest.mark.slow
def test_a_damaged_library_is_built_again(fresh_kernels):
    """Loading a library cut short kills the process with SIGBUS; one that is no library
    at all never loads. Either is built again rather than taken as good."""
    built = build.build_library()
    assert built is not None
    whole = built.read_bytes()
    for damaged in (whole[: len(whole) // 2], os.urandom(1000)):
        built.write_bytes(damaged)
        assert build.build_library() == built
        assert built.stat().st_size == len(whole)  # checked before loading it can crash
    kernels.reset()
    assert kernels.available()


def test_switched_off_by_environment(no_kernels):
    assert not kernels.available()
    assert "LOWVOX_CPU_KERNELS=0" in kernels.describe()
    with pytest.raises(RuntimeError):
        kernels.linear(torch.randn(1, 4), torch.zeros(2, 4, dtype=torch.int8),
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
    """The C kernel (few rows, or any number on AMX), the bf16 matmul (many rows, on CPUs
    with bf16 units) and torch's fused kernel all compute x @ (q * s).T + b; only the last
    two round x to bf16."""
    layer = _int8_layer()
    x = torch.randn(rows, 256)
    ref = _dequantised_reference(layer, x)
    scale = ref.abs().max().item()
    kernel = layer(x).double()
    if (rows < MATMUL_ROWS or layer._kernel_takes_many_rows()) and kernels.available():
        exact = _dequantised_reference(layer, _int8_kernel_input(x))
        assert (kernel - exact).abs().max().item() < 1e-5 * scale
    fused = layer._forward_fused(x).double()
    matmul = layer._forward_bf16_matmul(x).double()
    for y in (kernel, fused, matmul):
        assert (y - ref).abs().max().item() < 2e-2 * scale  # bf16 activations: ~3 digits


def test_without_kernels_int8_layers_still_work(no_kernels):
    layer = _int8_layer()
    x = torch.randn(2, 256)
    ref = _dequantised_reference(layer, x)
    assert (layer(x).double() - ref).abs().max().item() < 2e-2 * ref.abs().max().item()


def _bf16_layer(seed: int = 3) -> tuple[nn.Linear, Bf16Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(256, 96)
    return linear, Bf16Linear.from_linear(linear)


@pytest.mark.parametrize("rows", [1, 3, MATMUL_ROWS, 40])
@pytest.mark.parametrize("with_kernels", [True, False])
def test_every_bf16_path_computes_the_rounded_layer(rows, with_kernels, monkeypatch):
    """x @ bf16(W).T + b, float32 in and out: exactly (kernel) or with x rounded to bf16
    (a prompt's matmul, torch's fallback)."""
    linear, layer = _bf16_layer()
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    assert torch.equal(layer.bias, linear.bias.detach())
    if not with_kernels:
        monkeypatch.setenv("LOWVOX_CPU_KERNELS", "0")
    kernels.reset()
    try:
        x = torch.randn(2, rows, 256)
        y = layer(x)
    finally:
        monkeypatch.undo()
        kernels.reset()
    assert y.shape == (2, rows, 96) and y.dtype == torch.float32
    ref = x.double() @ layer.weight.double().t() + layer.bias.double()
    scale = ref.abs().max().item()
    err = (y.double() - ref).abs().max().item()
    exact = with_kernels and kernels.available() and 2 * rows < MATMUL_ROWS
    assert err < (1e-5 if exact else 2e-2) * scale
    # bf16 weights are close to the float layer they came from.
    assert (y.double() - linear(x).double()).abs().max().item() < 2e-2 * scale


def test_float_scales_follow_in_place_loads():
    a, b = _int8_layer(1), _int8_layer(2)
    x = torch.randn(1, 256)
    before = b(x)
    b.load_state_dict(a.state_dict())  # copies into b's existing buffers
    FP32_REORDER.check(b(x), a(x))  # two layer instances, the same weights
    assert not FP32_REORDER.holds(b(x), before)


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
    # The C kernel against torch's ops, held to FP32_REORDER (tighter than
    # FP32_OTHER_KERNELS) as it always was: one attention step sums few terms.
    FP32_REORDER.check(with_kernel, without)


def test_kernel_folder_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWVOX_KERNEL_DIR", str(tmp_path))
    assert build.kernel_dir() == tmp_path
    monkeypatch.delenv("LOWVOX_KERNEL_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.kernel_dir() == tmp_path / "xdg" / "lowvox" / "kernels"


@needs_kernels
def test_portable_build_without_native_flags_is_correct(fresh_kernels, monkeypatch):
    """The fallback flag sets (no -march=native, no OpenMP) still give right answers."""
    monkeypatch.setenv("LOWVOX_KERNEL_FLAGS", "-O2")
    path = build.build_library()
    assert path is not None and os.path.getsize(path) > 0
    kernels.reset()
    assert kernels.isa() == "portable C"
    assert kernels.describe().endswith(f"({path})")  # the library just built, loaded
    x = torch.randn(3, 50)
    w = torch.randint(-127, 128, (7, 50), dtype=torch.int8)
    s = torch.rand(7)
    y = kernels.linear(x, w, s, None)
    assert kernels.activation_bits() == 32  # integer activations need AVX2 or AVX-512 VNNI
    assert (y.double() - _int8_reference(x, w, s, None)).abs().max().item() < 1e-3
    assert shutil.which(build.find_compiler() or "") is not None
    wb = torch.randn(7, 50).to(torch.bfloat16)
    yb = kernels.linear(x, wb, None, None)
    assert (yb.double() - x.double() @ wb.double().t()).abs().max().item() < 1e-3
    # The fused block (portable attention, scalar GELU) against the module path.
    from lowvox.engines.xtts.gpt import KVCache

    token = torch.randn(1, 1, 64)
    for kind in WEIGHT_KINDS:
        block = _reduced_block(kind=kind)
        with torch.inference_mode():
            fused = block(token, 0, KVCache(1, 4, 4, 16))
            assert block._fused is not None
            with monkeypatch.context() as m:
                m.setattr(type(block), "_fused_decoder", lambda *a: None)
                plain = block(token, 0, KVCache(1, 4, 4, 16))
        assert torch.allclose(fused, plain, atol=1e-4), kind


WEIGHT_KINDS = ("int8", "bf16", "fp32")


def _reduced_block(dim: int = 64, heads: int = 4, seed: int = 0, kind: str = "int8"):
    """A random block whose four linears hold int8 (`Int8Linear`) or bf16 (`Bf16Linear`)
    weights, or stay float32 GPT-2 `Conv1D`s ([in, out])."""
    from lowvox.engines.xtts.gpt import Block, conv1d_to_linear
    from lowvox.runtime.quant import quantize_linears

    torch.manual_seed(seed)
    block = Block(dim, heads)
    for name, p in block.named_parameters():
        with torch.no_grad():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    if kind != "fp32":
        conv1d_to_linear(block)
        (quantize_linears if kind == "int8" else bf16_linears)(block)
    return block


@needs_kernels
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("dim,heads", [(64, 4), (96, 3)])
def test_fused_block_decode_equals_the_module_path(dim, heads, kind, monkeypatch):
    """One C call per block gives the same output and cache contents as the torch ops."""
    from lowvox.engines.xtts.gpt import Block, Conv1D, KVCache

    block = _reduced_block(dim, heads, kind=kind)
    layer = {"int8": Int8Linear, "bf16": Bf16Linear, "fp32": Conv1D}[kind]
    assert isinstance(block.mlp.c_fc, layer)
    prompt = torch.randn(1, 9, dim)
    token = torch.randn(1, 1, dim)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Block, "_fused_decoder", lambda *a: None)
        cache = KVCache(1, heads, 16, dim // heads, dtype=torch.float32)
        with torch.inference_mode():
            block(prompt, 0, cache)  # prefill: always the module path
            before = token.clone()
            out = block(token, 9, cache)
            assert torch.equal(token, before)  # the input is not modified
        results.append((out, cache.k.clone(), cache.v.clone()))
    (a, ka, va), (b, kb, vb) = results
    assert block._fused is not None  # the fused path did run
    assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())
    # Other kernels, yet the caches (one linear's output each) keep the FP32_REORDER bound
    # they always met, tighter than FP32_OTHER_KERNELS.
    FP32_REORDER.check(ka, kb, "keys")
    FP32_REORDER.check(va, vb, "values")
    assert not torch.equal(ka[0, :, 9], torch.zeros_like(ka[0, :, 9]))


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_fused_block_decode_with_a_bf16_cache_equals_the_module_path(kind, monkeypatch):
    """Weight-only models keep keys and values in bfloat16: the C block writes and reads
    them as the torch ops do (both round the new key/value to nearest even; the two
    paths' float32 keys differ in their last bits, so a rounding may land one bfloat16
    step apart: the BF16 row)."""
    from lowvox.engines.xtts.gpt import Block, KVCache
    from tests.tolerance import BF16

    dim, heads = 64, 4
    block = _reduced_block(dim, heads, kind=kind)
    prompt, token = torch.randn(1, 9, dim), torch.randn(1, 1, dim)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Block, "_fused_decoder", lambda *a: None)
        cache = KVCache(1, heads, 16, dim // heads, dtype=torch.bfloat16)
        with torch.inference_mode():
            block(prompt, 0, cache)
            out = block(token, 9, cache)
        results.append((out, cache.k.clone(), cache.v.clone()))
    (a, ka, va), (b, kb, vb) = results
    assert block._fused is not None  # the fused path did run
    assert ka.dtype == torch.bfloat16 and not torch.equal(
        ka[0, :, 9], torch.zeros_like(ka[0, :, 9])
    )
    BF16.check(a, b, "block output")
    BF16.check(ka.float(), kb.float(), "keys")
    BF16.check(va.float(), vb.float(), "values")


def _prefill_rows(block_or_stack, prompts, cache_or_caches):
    """Each prompt [1, L_r, D] into its own row of the batch cache(s), at its own length."""
    for r, prompt in enumerate(prompts):
        if isinstance(cache_or_caches, list):
            block_or_stack(prompt, 0, [c.rows(r, r + 1) for c in cache_or_caches])
        else:
            block_or_stack(prompt, 0, cache_or_caches.rows(r, r + 1))


@needs_kernels
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("rows", [2, 5])
def test_fused_block_decodes_rows_at_their_own_positions(rows, kind, monkeypatch):
    """A batch step as one C call, each row a sequence of its own length: outputs and
    caches equal the torch ops, and each row equals its lone run."""
    from lowvox.engines.xtts.gpt import Block, KVCache

    dim, heads = 64, 4
    block = _reduced_block(dim, heads, kind=kind)
    prompts = [torch.randn(1, 3 + 2 * r, dim) for r in range(rows)]  # lengths differ
    positions = torch.tensor([p.shape[1] for p in prompts])
    token = torch.randn(rows, 1, dim)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Block, "_fused_decoder", lambda *a: None)
        cache = KVCache(rows, heads, 16, dim // heads)
        with torch.inference_mode():
            _prefill_rows(block, prompts, cache)
            out = block(token, positions, cache)
        results.append((out, cache.k.clone(), cache.v.clone()))
    monkeypatch.undo()
    (a, ka, va), (b, kb, vb) = results
    assert block._fused is not None  # the fused path did run
    assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())
    FP32_REORDER.check(ka, kb, "keys")
    FP32_REORDER.check(va, vb, "values")
    for r, prompt in enumerate(prompts):  # each row alone, at an int position
        cache = KVCache(1, heads, 16, dim // heads)
        with torch.inference_mode():
            block(prompt, 0, cache)
            alone = block(token[r : r + 1], prompt.shape[1], cache)
        assert (a[r] - alone[0]).abs().max().item() < 1e-4 * max(1.0, alone.abs().max().item())


@needs_kernels
def test_fused_block_refuses_bad_batches():
    from lowvox.engines.xtts.gpt import KVCache

    block = _reduced_block(kind="int8")
    with torch.inference_mode():
        fused = block._fused_decoder(torch.zeros(1, 1, 64), KVCache(1, 4, 8, 16))
    cache = torch.zeros(2, 4, 8, 16)
    x = torch.zeros(2, 1, 64)
    with pytest.raises(ValueError, match="cache"):
        fused(x, cache[:1].clone(), cache[:1].clone(), 3)  # one cache row for two
    with pytest.raises(ValueError, match="positions"):
        fused(x, cache, cache.clone(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="positions"):
        fused(x, cache, cache.clone(), torch.zeros(2, dtype=torch.int32))
    for outside in (torch.tensor([-1, 3]), torch.tensor([2, 8]), 8):
        with pytest.raises(ValueError, match="outside"):
            fused(x, cache, cache.clone(), outside)  # never read or written past the cache


def _reduced_stack(layers: int = 3, kind: str = "int8", seed: int = 0):
    """A small Transformer whose blocks are `_reduced_block`s."""
    from lowvox.engines.xtts.gpt import Transformer

    stack = Transformer(layers, 64, 4)
    for i in range(layers):
        stack.h[i] = _reduced_block(64, 4, seed=seed + i, kind=kind)
    return stack


@needs_kernels
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_whole_stack_decodes_in_one_call(kind, monkeypatch):
    """A decode step's blocks as one C call give what block-by-block calls and the torch
    ops give, for one sequence and for a batch of rows at their own lengths, step after
    step."""
    from lowvox.engines.xtts.gpt import Block, KVCache, Transformer

    stack = _reduced_stack(kind=kind)
    rows = 3
    prompts = [torch.randn(1, n, 64) for n in (6, 4, 2)]
    tokens = torch.randn(4, rows, 1, 64)
    calls = []
    real = kernels.FusedStack.__call__
    monkeypatch.setattr(
        kernels.FusedStack,
        "__call__",
        lambda self, *a: calls.append(len(self.blocks)) or real(self, *a),
    )

    def run(batch: int) -> list[torch.Tensor]:
        caches = [KVCache(batch, 4, 16, 16) for _ in stack.h]
        outs = []
        with torch.inference_mode():
            _prefill_rows(stack, prompts[:batch], caches)
            lengths = torch.tensor([p.shape[1] for p in prompts[:batch]])
            for i, token in enumerate(tokens):
                at = int(lengths[0]) + i if batch == 1 else lengths + i
                outs.append(stack(token[:batch], at, caches))
        return outs + [c.k.clone() for c in caches]

    results = {}
    for batch in (1, rows):
        calls.clear()
        results["stack", batch] = run(batch)
        assert calls == [3] * len(tokens)  # one call per step, for all three blocks
        monkeypatch.setattr(Transformer, "_fused_stack", lambda *a: None)
        calls.clear()
        results["blocks", batch] = run(batch)
        assert calls == [1] * 3 * len(tokens)
        monkeypatch.setattr(Block, "_fused_decoder", lambda *a: None)
        results["torch", batch] = run(batch)
        monkeypatch.undo()
        monkeypatch.setattr(
            kernels.FusedStack, "__call__",
            lambda self, *a: calls.append(len(self.blocks)) or real(self, *a),
        )  # fmt: skip
        for way in ("blocks", "torch"):
            for a, b in zip(results["stack", batch], results[way, batch], strict=True):
                assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_kernels_agree_across_thread_counts(kind):
    """Every thread count splits the rows into other bands (whole AMX tiles, ROWS blocks):
    one, two and three threads give the same linears and the same stack steps."""
    from lowvox.engines.xtts.gpt import KVCache

    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 256, generator=g)
    if kind == "int8":
        w = torch.randint(-127, 128, (96, 256), dtype=torch.int8, generator=g)
        s = torch.rand(96, generator=g) + 0.01
    else:
        w, s = torch.randn(96, 256, generator=g).to(torch.bfloat16), None
    stack = _reduced_stack(kind=kind)
    token = torch.randn(5, 1, 64, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            caches = [KVCache(5, 4, 8, 16) for _ in stack.h]
            with torch.inference_mode():
                step = stack(token, 0, caches)
            results.append((kernels.linear(x, w, s, None), step))
    finally:
        torch.set_num_threads(before)
    for y, step in results[1:]:
        FP32_REORDER.check(y, results[0][0], "linear")
        FP32_REORDER.check(step, results[0][1], "stack step")


@needs_kernels
def test_a_stack_of_mixed_blocks_decodes_block_by_block():
    from lowvox.engines.xtts.gpt import KVCache

    stack = _reduced_stack(kind="int8")
    stack.h[1] = _reduced_block(64, 4, seed=7, kind="bf16")
    caches = [KVCache(1, 4, 8, 16) for _ in stack.h]
    with torch.inference_mode():
        out = stack(torch.randn(1, 1, 64), 0, caches)
    assert stack._stack is None and out.shape == (1, 1, 64)
    assert all(block._fused is not None for block in stack.h)  # still fused, one at a time
    with pytest.raises(ValueError, match="share"):
        kernels.FusedStack([block._fused[1] for block in stack.h])


@needs_kernels
def test_fused_stack_refuses_bad_calls():
    from lowvox.engines.xtts.gpt import KVCache

    stack = _reduced_stack(kind="int8")
    caches = [KVCache(1, 4, 8, 16) for _ in stack.h]
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        stack(x, 0, caches)
    fused = stack._stack
    assert fused is not None
    keys, values = [c.k for c in caches], [c.v for c in caches]
    with pytest.raises(ValueError, match="caches for 3 blocks"):
        fused(x, keys[:2], values[:2], 1)
    with pytest.raises(ValueError, match="cache 1"):
        fused(x, [keys[0], keys[1][:, :, :4].contiguous(), keys[2]], values, 1)
    with pytest.raises(ValueError, match="cache 2"):
        fused(x, keys, [values[0], values[1], values[2].double()], 1)
    with pytest.raises(ValueError, match="position"):
        fused(x, keys, values, 8)
    with pytest.raises(ValueError, match="x must be"):
        fused(torch.randn(1, 2, 64), keys, values, 1)
    with pytest.raises(ValueError, match="at least one"):
        kernels.FusedStack([])


@needs_compiler
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_fused_block_follows_new_weights_and_moves(kind):
    from lowvox.engines.xtts.gpt import KVCache

    block, other = _reduced_block(seed=1, kind=kind), _reduced_block(seed=2, kind=kind)
    cache = KVCache(1, 4, 8, 16)
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        first = block(x, 0, cache)
    block.load_state_dict(other.state_dict())  # in place: new weights, same buffers
    with torch.inference_mode():
        again = block(x, 0, KVCache(1, 4, 8, 16))
        expected = other(x, 0, KVCache(1, 4, 8, 16))
    assert not torch.allclose(first, again)
    FP32_REORDER.check(again, expected)  # another block instance with the same weights
    block.to(torch.device("cpu"))
    assert block._fused is None


@needs_compiler
def test_fused_block_refuses_mismatched_tensors():
    w = torch.zeros(3 * 64, 64, dtype=torch.int8)
    s, b = torch.ones(3 * 64), torch.zeros(3 * 64)
    ln = (torch.ones(64), torch.zeros(64))
    with pytest.raises(ValueError, match="shape"):
        kernels.FusedBlock(ln, ln, 1e-5, [(w, s, b)] * 4, 4)
    with pytest.raises(ValueError, match="heads"):
        kernels.FusedBlock(ln, ln, 1e-5, [(w, s, b)] * 4, 5)
    shapes = [(3 * 64, 64), (64, 64), (4 * 64, 64), (64, 4 * 64)]
    int8 = [(torch.zeros(o, i, dtype=torch.int8), torch.ones(o), torch.zeros(o)) for o, i in shapes]
    bf16 = [(torch.zeros(o, i, dtype=torch.bfloat16), None, torch.zeros(o)) for o, i in shapes]
    assert (
        kernels.FusedBlock(ln, ln, 1e-5, int8, 4).kind
        != kernels.FusedBlock(ln, ln, 1e-5, bf16, 4).kind
    )
    with pytest.raises(ValueError, match="one weight dtype"):
        kernels.FusedBlock(ln, ln, 1e-5, int8[:2] + bf16[2:], 4)
    fp32 = [(torch.zeros(i, o), None, torch.zeros(o)) for o, i in shapes]  # [in, out]
    assert kernels.FusedBlock(ln, ln, 1e-5, fp32, 4).kind == kernels.F32_IN_OUT
    with pytest.raises(ValueError, match="no scales"):
        kernels.FusedBlock(ln, ln, 1e-5, [(w, torch.ones(w.shape[1]), b) for w, _, b in fp32], 4)
    with pytest.raises(ValueError, match="shape"):  # float32 [out, in] is not GPT-2's layout
        kernels.FusedBlock(ln, ln, 1e-5, [(w.t().contiguous(), None, b) for w, _, b in fp32], 4)


@needs_compiler
def test_amx_bf16_path_is_close_to_the_vector_path():
    if not kernels.amx():
        pytest.skip("needs a CPU with AMX (and a kernel that grants it)")
    g = torch.Generator().manual_seed(12)
    x = torch.randn(12, 512, generator=g) * 3
    w = torch.randn(80, 512, generator=g).to(torch.bfloat16)
    try:
        on = kernels.linear(x, w, None, None)
        kernels.set_amx(False)
        off = kernels.linear(x, w, None, None)
    finally:
        kernels.set_amx(True)
    split = 2.0**-17 * (x.double().abs() @ w.double().abs().t())
    assert ((on.double() - off.double()).abs() <= split + 1e-4).all()
    assert not torch.equal(on, off)  # it did run another path


@needs_compiler
def test_amx_path_equals_the_vnni_path():
    """Where AMX serves several rows it computes what the VNNI path does (the same int16
    activations, exact int32 sums per chunk); switched off, the VNNI path takes over."""
    if not kernels.amx():
        pytest.skip("needs a CPU with AMX-INT8 (and a kernel that grants it)")
    g = torch.Generator().manual_seed(11)
    for m, k, n in [(2, 64, 16), (8, 1024, 96), (33, 512, 48)]:
        x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s, b = torch.rand(n, generator=g) + 0.01, torch.randn(n, generator=g)
        try:
            on = kernels.linear(x, w, s, b)
            assert not kernels.set_amx(False) and not kernels.amx()
            off = kernels.linear(x, w, s, b)
        finally:
            assert kernels.set_amx(True)
        bound = 1e-6 * k * (x.abs().max() * 127 * s.max()).item()
        assert (on - off).abs().max().item() <= bound
        ref = _int8_reference(_int16_activations(x), w, s, b)
        assert (on.double() - ref).abs().max().item() <= bound
    assert "AMX" in kernels.describe()


@needs_kernels
def test_amx_switched_off_by_environment(monkeypatch):
    from lowvox.runtime.quant import cpu_has_fast_bf16

    monkeypatch.setenv("LOWVOX_AMX", "0")
    kernels.reset()
    try:
        assert kernels.available() and not kernels.amx()
        assert "AMX" not in kernels.describe()
        layer = _int8_layer()
        x = torch.randn(MATMUL_ROWS + 4, 256)
        y = layer(x).double()
    finally:
        monkeypatch.undo()
        kernels.reset()
    exact = _dequantised_reference(layer, _int8_kernel_input(x))
    if kernels.int8_panels():
        # Without AMX a prompt takes the packed int8 product (AVX-512 VNNI)...
        assert (y - exact).abs().max().item() < 1e-5 * exact.abs().max().item()
    elif cpu_has_fast_bf16():
        # ... or goes back to the bf16 matmul: x rounded to bf16.
        assert (y - exact).abs().max().item() > 1e-5 * exact.abs().max().item()


@needs_compiler
def test_integer_activations_exactly_where_the_build_targets_them():
    """int8 activations on AVX-512 VNNI builds without AMX and on AVX2 builds, int16 ones
    on AVX-512 VNNI builds with AMX (the tiles' form), float32 elsewhere: for a native
    build where the CPU has those, for another CPU's flags (`LOWVOX_KERNEL_FLAGS`) where
    they target them."""
    flags = os.environ.get("LOWVOX_KERNEL_FLAGS", "").split() or ["-O3", "-march=native"]
    vnni = kernels.isa() == "AVX-512" and _flags_define(flags, "__AVX512VNNI__")
    amx = vnni and all(
        _flags_define(flags, m)
        for m in ("__AMX_TILE__", "__AMX_INT8__", "__AMX_BF16__", "__AVX512BF16__")
    )
    expected = 16 if amx else 8 if vnni or kernels.isa() == "AVX2" else 32
    assert kernels.activation_bits() == expected
    # Prompts' packed int8 product: the int8 form on AVX-512 (VNNI) only.
    assert kernels.int8_panels() == (expected == 8 and kernels.isa() == "AVX-512")
    assert ("packed int8 product" in kernels.describe()) == kernels.int8_panels()
    assert ("with VNNI" in kernels.describe()) == vnni
    # The AVX2 path's int8 products: AVX-VNNI's vpdpbusd where the build targets it.
    avx_vnni = kernels.isa() == "AVX2" and _flags_define(flags, "__AVXVNNI__")
    assert kernels.avx_vnni() == avx_vnni
    assert ("with AVX-VNNI" in kernels.describe()) == avx_vnni
    assert (f"int{expected} activations" in kernels.describe()) == (expected < 32)


def _flags_define(flags: list[str], macro: str) -> bool:
    """Whether the C compiler defines `macro` under `flags` (what a build with them targets)."""
    cc = build.find_compiler()
    assert cc is not None
    out = subprocess.run(
        [cc, *flags, "-dM", "-E", "-x", "c", os.devnull],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return f"#define {macro} " in out.stdout


@needs_compiler
def test_fused_block_is_checked_once_per_cache(monkeypatch):
    """Decode steps into one cache reuse the fused decoder found for its first step; a new
    cache (the next generation) looks again and sees new weights."""
    from lowvox.engines.xtts.gpt import Block, KVCache

    block, other = _reduced_block(seed=1), _reduced_block(seed=2)
    looked = []
    real = Block._fused_decoder
    monkeypatch.setattr(
        Block, "_fused_decoder", lambda self, *a: looked.append(1) or real(self, *a)
    )
    cache = KVCache(1, 4, 8, 16)
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        for pos in range(4):
            block(x, pos, cache)
        assert len(looked) == 1
        block.load_state_dict(other.state_dict())
        again = block(x, 0, KVCache(1, 4, 8, 16))
        assert len(looked) == 2
        expected = other(x, 0, KVCache(1, 4, 8, 16))
    FP32_REORDER.check(again, expected)  # another block instance with the same weights


def _fused_int8_block_equals_the_module_path(monkeypatch) -> None:
    """One decode step of a reduced int8 block: the fused C block against the modules."""
    from lowvox.engines.xtts.gpt import KVCache

    block = _reduced_block(kind="int8")
    token = torch.randn(1, 1, 64)
    with torch.inference_mode():
        fused = block(token, 0, KVCache(1, 4, 4, 16))
        assert block._fused is not None
        monkeypatch.setattr(type(block), "_fused_decoder", lambda *a: None)
        plain = block(token, 0, KVCache(1, 4, 4, 16))
    assert torch.allclose(fused, plain, atol=1e-4)


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("avx_vnni", [False, True])
def test_avx2_builds_match_float64(avx_vnni, fresh_kernels, monkeypatch):
    """The AVX2 path (CPUs without AVX-512), with vpmaddubsw or with AVX-VNNI's vpdpbusd
    (Intel Core since Alder Lake), built here for such a CPU: int8 linears within the
    float32 bound of the float64 reference on int8 activations, its vectorised attention
    and GELU against float64, and the fused int8 block equal to the module path."""
    from lowvox.runtime.devices import probe_machine

    need = "avx_vnni" if avx_vnni else "avx2"
    if need not in probe_machine(with_gpus=False).cpu_flags:
        pytest.skip(f"needs a CPU with {need}")
    flags = "-O3 -march=haswell -fopenmp" + (" -mavxvnni" if avx_vnni else "")
    monkeypatch.setenv("LOWVOX_KERNEL_FLAGS", flags)
    if build.build_library() is None:
        pytest.skip(f"this compiler does not take {flags}")
    kernels.reset()
    assert kernels.isa() == "AVX2" and kernels.activation_bits() == 8
    assert kernels.avx_vnni() == avx_vnni
    for m, k, n in [(1, 1024, 40), (1, 17, 3), (3, 250, 13), (9, 4096, 6), (40, 96, 30)]:
        g = torch.Generator().manual_seed(m * 1000 + k + n)
        x = torch.randn(m, k, generator=g)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) + 0.01
        b = torch.randn(n, generator=g)
        y = kernels.linear(x, w, s, b)
        ref = _int8_reference(_int8_activations(x), w, s, b)
        bound = 1e-6 * k * (x.abs().max() * 127 * s.max()).item() + 1e-6
        assert (y.double() - ref).abs().max().item() <= bound, (m, k, n)
    for length, dim, dtype in [(1, 64, torch.bfloat16), (7, 64, torch.float32),
                               (37, 64, torch.bfloat16), (300, 24, torch.float32)]:  # fmt: skip
        g = torch.Generator().manual_seed(length)
        cache_k = (torch.randn(1, 4, 320, dim, generator=g) * 2).to(dtype)
        cache_v = torch.randn(1, 4, 320, dim, generator=g).to(dtype)
        q, k_new, v_new = (torch.randn(4, dim, generator=g) * 2 for _ in range(3))
        out = kernels.attend_one(q, k_new, v_new, cache_k, cache_v, length - 1)
        ref = F.scaled_dot_product_attention(
            q[None, :, None].double(),
            cache_k[:, :, :length].double(),
            cache_v[:, :, :length].double(),
        )[0, :, 0]
        assert (out.double() - ref).abs().max().item() < 1e-5, (length, dim, dtype)
    x = torch.linspace(-30, 30, 1003)
    FP32_REORDER.check(kernels.gelu_tanh_(x.clone()), F.gelu(x, approximate="tanh"))
    _fused_int8_block_equals_the_module_path(monkeypatch)


@needs_kernels
@pytest.mark.slow
def test_avx512_build_without_vnni_keeps_float_activations(fresh_kernels, monkeypatch):
    """CPUs with AVX-512 but no VNNI (Skylake servers) take the float32 path: exact
    against float64, and the fused int8 block still equals the module path."""
    from lowvox.runtime.devices import probe_machine

    if "avx512f" not in probe_machine(with_gpus=False).cpu_flags:
        pytest.skip("needs an AVX-512 CPU")
    monkeypatch.setenv("LOWVOX_KERNEL_FLAGS", "-O3 -march=native -mno-avx512vnni -fopenmp")
    path = build.build_library()
    assert path is not None
    kernels.reset()
    assert kernels.describe().endswith(f"({path})")  # the library just built, loaded
    assert kernels.isa() == "AVX-512" and kernels.activation_bits() == 32
    assert not kernels.amx()  # AMX rides on the int16 activations
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 300, generator=g)
    w = torch.randint(-127, 128, (9, 300), dtype=torch.int8, generator=g)
    s = torch.rand(9, generator=g) + 0.01
    y = kernels.linear(x, w, s, None)
    bound = 1e-6 * 300 * (x.abs().max() * 127 * s.max()).item()
    assert (y.double() - _int8_reference(x, w, s, None)).abs().max().item() <= bound
    _fused_int8_block_equals_the_module_path(monkeypatch)


@needs_kernels
def test_packed_int8_weights_are_checked():
    if not kernels.int8_panels():
        pytest.skip("this build packs no int8 panels (AVX-512 VNNI without AMX only)")
    w = torch.randint(-127, 128, (40, 100), dtype=torch.int8)
    packed = kernels.pack_int8_panels(w)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == kernels.panel_shape(40, 100)
    assert tuple(packed.shape) == (64, 128)  # whole panels of 32 rows, rows of 64 bytes
    out = torch.empty(64, 128, dtype=torch.uint8)
    assert kernels.pack_int8_panels(w, out=out) is out and torch.equal(out, packed)
    assert torch.equal(kernels.unpack_int8_panels(packed, 40, 100), w)  # padding dropped
    with pytest.raises(ValueError, match="panels of"):
        kernels.unpack_int8_panels(packed, 40, 200)
    with pytest.raises(ValueError, match="out has shape"):
        kernels.pack_int8_panels(w, out=torch.empty(32, 128, dtype=torch.uint8))
    s = torch.rand(40)
    with pytest.raises(ValueError, match="packed weight of shape"):
        kernels.linear(torch.randn(2, 40), packed, s, None)  # packed for another k
    with pytest.raises(ValueError, match="packed weight of shape"):
        kernels.linear(torch.randn(2, 100), packed, torch.rand(70), None)
    with pytest.raises(ValueError, match="scales"):
        kernels.linear(torch.randn(2, 100), packed, None, None)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_packed_and_unpacked_int8_blocks_agree(rows, monkeypatch):
    """Where int8 layers pack their weights (`Int8Linear.kernel_weight`), a decode step of
    the fused block multiplies panels; it computes what the weight rows give, but for the
    order of the float sums."""
    from lowvox.engines.xtts.gpt import KVCache

    if not kernels.int8_panels():
        pytest.skip("this build packs no int8 panels (AVX-512 VNNI without AMX only)")
    dim, heads = 96, 3
    block = _reduced_block(dim, heads, kind="int8")
    prompt = torch.randn(rows, 9, dim)
    token = torch.randn(rows, 1, dim)
    results = []
    for packed in (True, False):
        if not packed:
            monkeypatch.setattr(Int8Linear, "kernel_weight", lambda self: self.weight)
        cache = KVCache(rows, heads, 16, dim // heads, dtype=torch.float32)
        with torch.inference_mode():
            block(prompt, 0, cache)
            out = block(token, 9, cache)
        assert block.mlp.c_fc.kernel_weight().dtype == (torch.uint8 if packed else torch.int8)
        results.append((out, cache.k.clone()))
    (a, ka), (b, kb) = results
    FP32_REORDER.check(a, b, "outputs")
    FP32_REORDER.check(ka, kb, "keys")
