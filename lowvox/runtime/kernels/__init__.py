"""lowvox's own CPU kernels (a linear layer with int8 or bf16 weights and float32
activations, one-query attention, a whole GPT block for one token of one or several
sequences, the vocoder's int8 convolutions), loaded through ctypes.

`load()` builds the C library on first use (see `build.py`); when that is impossible, or
`LOWVOX_CPU_KERNELS=0` is set, `available()` is False and callers use torch's kernels. The
wrappers take contiguous float32/int8 CPU tensors and check that before handing raw
pointers to C, so a wrong call is an exception, never a crash.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from lowvox.runtime.kernels.build import build_library

log = logging.getLogger(__name__)

ISA_NAMES = {2: "AVX-512", 1: "AVX2", 0: "portable C"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_path: Path | None = None


def enabled_by_env() -> bool:
    return os.environ.get("LOWVOX_CPU_KERNELS", "1").strip().lower() not in {
        "0",
        "off",
        "false",
        "no",
    }


def amx_enabled_by_env() -> bool:
    return os.environ.get("LOWVOX_AMX", "1").strip().lower() not in {"0", "off", "false", "no"}


def load() -> ctypes.CDLL | None:
    """The library (built and loaded on the first call), or None where it cannot be had."""
    global _lib, _tried, _path
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if enabled_by_env():
            path = build_library()
            if path is not None:
                try:
                    _lib = _bind(ctypes.CDLL(str(path)))
                    _path = path
                    _lib.lv_amx_enable(int(amx_enabled_by_env()))
                except OSError as e:
                    log.warning("could not load %s (torch's kernels are used): %s", path, e)
        _tried = True
    return _lib


def reset() -> None:
    """Forget the loaded library (tests switch kernels on and off)."""
    global _lib, _tried, _path
    with _lock:
        _lib, _tried, _path = None, False, None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.lv_isa.argtypes, lib.lv_isa.restype = [], i32
    lib.lv_amd_tuning.argtypes, lib.lv_amd_tuning.restype = [], i32
    lib.lv_avx_vnni.argtypes, lib.lv_avx_vnni.restype = [], i32
    lib.lv_activation_bits.argtypes, lib.lv_activation_bits.restype = [], i32
    lib.lv_activation_chunk.argtypes, lib.lv_activation_chunk.restype = [], i32
    lib.lv_amx_enable.argtypes, lib.lv_amx_enable.restype = [i32], i32
    lib.lv_int8_panels.argtypes, lib.lv_int8_panels.restype = [], i32
    lib.lv_panel_bytes.argtypes, lib.lv_panel_bytes.restype = [i64, i64], i64
    lib.lv_pack_panels.argtypes, lib.lv_pack_panels.restype = [p, i64, i64, p, i32], None
    lib.lv_linear_scratch.argtypes, lib.lv_linear_scratch.restype = [i32, i64, i64], i64
    lib.lv_block_work_floats.argtypes = [i32, i64, i64, i32]
    lib.lv_block_work_floats.restype = i64
    lib.lv_linear.argtypes = [i32, p, i64, i64, p, p, p, p, i64, p, i32]
    lib.lv_linear.restype = None
    lib.lv_attend_one.argtypes = [p, p, p, p, p, i32, i64, i64, i64, i64, f32, p, p, i32]
    lib.lv_attend_one.restype = None
    lib.lv_attend_prompt.argtypes = [p, p, p, i32, i64, i64, i64, i64, i64, f32, p, p, i32]
    lib.lv_attend_prompt.restype = None
    lib.lv_gelu_tanh.argtypes, lib.lv_gelu_tanh.restype = [p, i64, i32], None
    lib.lv_conv_q8_serves.argtypes, lib.lv_conv_q8_serves.restype = [], i32
    lib.lv_conv_q8_scratch.argtypes = [i64, i64, i64, i32]
    lib.lv_conv_q8_scratch.restype = i64
    lib.lv_conv_q8.argtypes = [
        p, i64, i64, i32, i32, f32, i32, p, p, p, p, i64, i64, i64, p, i32, f32, p, p, i32,
    ]  # fmt: skip
    lib.lv_conv_q8.restype = None
    lib.lv_blocks_decode.argtypes = [
        i32,  # weight kind
        p,  # x
        i64,  # rows
        i64,  # dim
        i64,  # heads
        i64,  # layers
        p,  # LayerNorm weights and biases [4 layers]
        p,  # eps [layers]
        p,  # weights [4 layers]
        p,  # scales [4 layers]
        p,  # biases [4 layers]
        i32,  # cache kind
        p,  # keys [layers]
        p,  # values [layers]
        p,  # positions (int64 per row, or NULL)
        i64,  # pos (every row's, or their maximum)
        i64,  # max_len
        p,  # work
        p,  # scratch
        i32,  # threads
    ]
    lib.lv_blocks_decode.restype = None
    return lib


def available() -> bool:
    return load() is not None


def isa() -> str | None:
    """The instruction set the loaded library was built for, or None when there is none."""
    lib = load()
    return ISA_NAMES.get(lib.lv_isa(), "?") if lib is not None else None


def avx_vnni() -> bool:
    """Whether the AVX2 path multiplies int8 weights and activations with AVX-VNNI's
    vpdpbusd (Intel Core since Alder Lake) rather than vpmaddubsw + vpmaddwd."""
    lib = load()
    return lib is not None and bool(lib.lv_avx_vnni())


def amd_tuning() -> bool:
    """Whether the loaded library takes the choices measured faster on AMD CPUs
    (non-temporal prefetch of the weights a decode step reads once, bf16 weight rows one
    after another for one activation row; build.tuning_defines)."""
    lib = load()
    return lib is not None and bool(lib.lv_amd_tuning())


def activation_bits() -> int:
    """The activations int8 weights meet in the C kernels: 8 (int8: AVX-512 VNNI without
    AMX, AVX2), 16 (int16: AVX-512 VNNI with AMX) or 32 (float32: elsewhere, and where
    there is no library)."""
    lib = load()
    return int(lib.lv_activation_bits()) if lib is not None else 32


def activation_chunk() -> int:
    """How many activation values share one scale in the int8 and int16 forms (0: float32)."""
    lib = load()
    return int(lib.lv_activation_chunk()) if lib is not None else 0


def int8_panels() -> bool:
    """Whether int8 weights can be packed as panels (`pack_int8_panels`) for a matrix
    product with int8 activations, whatever the number of rows (AVX-512 VNNI builds without
    AMX); unpacked int8 weights then also take it from 16 rows (prompts), repacked per call."""
    lib = load()
    return lib is not None and bool(lib.lv_int8_panels())


PANEL = 32  # rows per packed panel: int8 linears' and the int8 convolution's (cpu_kernels.c)


def panel_shape(n: int, k: int) -> tuple[int, int]:
    """The shape of int8 weights [n, k] packed as panels: rows rounded up to whole panels,
    each row's bytes to a multiple of 64."""
    return -(-n // PANEL) * PANEL, -(-k // 64) * 64


def pack_int8_panels(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 weights [n, k] -> uint8 `panel_shape(n, k)`: panels of 32 rows, four bytes of
    each row side by side ([k / 4][32][4] per panel, as w + 128), which `linear` and
    `FusedBlock` multiply as they are; written into `out` when given (contiguous uint8 of
    that shape, 64-byte aligned). Needs `int8_panels()`."""
    lib = load()
    if lib is None or not lib.lv_int8_panels():
        raise RuntimeError("this build of lowvox's CPU kernels packs no int8 panels")
    _check(weight, torch.int8, "weight")
    n, k = weight.shape
    if out is None:
        out = torch.empty(panel_shape(n, k), dtype=torch.uint8)
    else:
        _check(out, torch.uint8, "out")
        if tuple(out.shape) != panel_shape(n, k):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {panel_shape(n, k)}")
    assert out.numel() == lib.lv_panel_bytes(n, k)
    if out.data_ptr() % 64:  # the kernel's aligned loads
        raise RuntimeError("the packed int8 weight is not 64-byte aligned")
    lib.lv_pack_panels(weight.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def unpack_int8_panels(panels: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """`pack_int8_panels`' inverse: its uint8 panels of int8 weights [n, k] -> those int8
    weights (a new contiguous tensor; plain torch, any build)."""
    rows, cols = panel_shape(n, k)
    if panels.dtype != torch.uint8 or tuple(panels.shape) != (rows, cols):
        raise ValueError(
            f"panels of {tuple(panels.shape)} {panels.dtype} for [{n}, {k}] int8 weights: "
            f"{(rows, cols)} uint8 expected"
        )
    grouped = panels.view(rows // PANEL, cols // 4, PANEL, 4).permute(0, 2, 1, 3)
    return (grouped.reshape(rows, cols) ^ 0x80).view(torch.int8)[:n, :k].contiguous()


def amx() -> bool:
    """Whether int8 and bf16 linears of several rows (batched decode steps, prompts) run on
    the AMX tiles: built for a CPU with AMX, granted by the kernel, not switched off by
    `LOWVOX_AMX=0`."""
    lib = load()
    return lib is not None and bool(lib.lv_amx_enable(-1))


def set_amx(on: bool) -> bool:
    """Switch the AMX path on (where it can be) or off; returns whether it is on."""
    lib = load()
    return lib is not None and bool(lib.lv_amx_enable(1 if on else 0))


def describe(with_path: bool = True) -> str:
    """One line for `lowvox doctor`, the start-up log and `lowvox bench` (without the
    library's path)."""
    if not enabled_by_env():
        return "off (LOWVOX_CPU_KERNELS=0): torch's kernels"
    name = isa()
    if name is None:
        return "not built (no working C compiler): torch's kernels"
    bits = activation_bits()
    if bits < 32:
        vnni = " with VNNI" if name == "AVX-512" else " with AVX-VNNI" if avx_vnni() else ""
        name += f"{vnni} (int8 weights x int{bits} activations)"
    if amx():
        name += ", AMX tiles for several rows"
    elif int8_panels():
        name += ", packed int8 product for prompts"
    if int8_conv():
        name += ", int8 vocoder convolutions"
    return f"{name} ({_path})" if with_path else name


def _check(t: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(
            f"{what} must be a contiguous {dtype} CPU tensor, got {t.dtype} {t.device}"
        )


# The KV cache kinds the C attention knows (its KV_F32 and KV_BF16).
CACHE_KINDS = {torch.float32: 0, torch.bfloat16: 1}


def _check_cache(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu" or t.dtype not in CACHE_KINDS or not t.is_contiguous():
        raise ValueError(
            f"{what} must be a contiguous float32 or bfloat16 CPU tensor, got {t.dtype} {t.device}"
        )


# The weight kinds the C code knows (its W_INT8, W_BF16 and W_Q8P: int8 packed as panels,
# uint8 here), and the block's fourth: float32 weights as GPT-2 stores them, [in, out]
# (W_F32_IN_OUT).
WEIGHT_KINDS = {torch.int8: 0, torch.bfloat16: 1, torch.uint8: 3}
F32_IN_OUT = 2


def _weight_kind(weight: torch.Tensor, scales: torch.Tensor | None, k: int) -> int:
    """The C kind of a weight [n, k] (packed int8: `panel_shape(n, k)`, n from the scales);
    int8 needs float32 scales [n], bf16 takes none."""
    kind = WEIGHT_KINDS.get(weight.dtype)
    if kind is None or weight.device.type != "cpu" or not weight.is_contiguous():
        raise ValueError(
            f"weight must be a contiguous CPU tensor of int8 or bfloat16 (or uint8: int8 "
            f"packed as panels), got {weight.dtype} {weight.device}"
        )
    if weight.dtype in (torch.int8, torch.uint8):
        if scales is None:
            raise ValueError("int8 weights need their scales")
        _check(scales, torch.float32, "scales")
        if weight.dtype == torch.int8:
            if scales.shape != weight.shape[:1]:
                raise ValueError(f"{tuple(scales.shape)} scales for {weight.shape[0]} rows")
        else:
            if not int8_panels():
                raise ValueError("packed int8 weights need a build with int8 panels")
            want = panel_shape(scales.shape[0], k)
            if tuple(weight.shape) != want:
                raise ValueError(
                    f"packed weight of shape {tuple(weight.shape)} for {scales.shape[0]} rows of "
                    f"{k}: {want} expected"
                )
    elif scales is not None:
        raise ValueError("bfloat16 weights take no scales")
    return kind


def _out_features(weight: torch.Tensor, scales: torch.Tensor | None) -> int:
    """Rows n of a weight [n, k] (packed int8 weights: as many as their scales)."""
    return (
        scales.shape[0] if weight.dtype == torch.uint8 and scales is not None else weight.shape[0]
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [m, k] float32, weight [n, k] int8 (scales [n] float32; or packed as panels,
    `pack_int8_panels`) or bfloat16 (scales None), bias [n] float32 or None -> [m, n]
    float32: (x @ weight.T) * scales + bias."""
    lib = load()
    if lib is None:
        raise RuntimeError("lowvox's CPU kernels are not available")
    m, k = x.shape
    n = _out_features(weight, scales)
    _check(x, torch.float32, "x")
    kind = _weight_kind(weight, scales, k)
    if weight.dtype != torch.uint8 and weight.shape[1] != k:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        _check(bias, torch.float32, "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
    y = torch.empty(m, n, dtype=torch.float32)
    # int8 weights' int16 activations (VNNI builds), either kind's AMX tiles.
    scratch = torch.empty(lib.lv_linear_scratch(kind, m, k), dtype=torch.int16)
    lib.lv_linear(
        kind, x.data_ptr(), m, k, weight.data_ptr(), None if scales is None else scales.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), n, scratch.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return y


def attend_one(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    pos: int,
) -> torch.Tensor:
    """One decode step's attention: write k_new/v_new [H, D] at position `pos` of the
    [1, H, max_len, D] caches (float32, or bfloat16: the new key/value rounded to nearest
    even, as torch casts), then attend with q [H, D] over positions 0..pos -> [H, D]
    float32. Same as `scaled_dot_product_attention` over the filled cache (as float32),
    without a mask."""
    lib = load()
    if lib is None:
        raise RuntimeError("lowvox's CPU kernels are not available")
    heads, dim = q.shape
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        _check(t, torch.float32, name)
        if t.shape != (heads, dim):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({heads}, {dim})")
    for name, t in (("cache_k", cache_k), ("cache_v", cache_v)):
        _check_cache(t, name)
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != heads or t.shape[3] != dim:
            raise ValueError(f"{name} must be [1, {heads}, max_len, {dim}], got {tuple(t.shape)}")
    if cache_k.shape != cache_v.shape or cache_k.dtype != cache_v.dtype:
        raise ValueError("the key and value caches differ in shape or dtype")
    max_len = cache_k.shape[2]
    if not 0 <= pos < max_len:
        raise ValueError(f"position {pos} is outside a cache of {max_len}")
    threads = torch.get_num_threads()
    out = torch.empty(heads, dim, dtype=torch.float32)
    scratch = torch.empty(threads * (pos + 1), dtype=torch.float32)
    lib.lv_attend_one(
        q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), cache_k.data_ptr(),
        cache_v.data_ptr(), CACHE_KINDS[cache_k.dtype], heads, pos, dim, max_len, dim**-0.5,
        out.data_ptr(),
        scratch.data_ptr(), threads,
    )  # fmt: skip
    return out


def attend_prompt(
    qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int
) -> torch.Tensor:
    """A prompt's attention, one sequence: qkv [t, 3 * heads * dim] float32 (each token's
    query, key and value, as the input projection makes them) for positions start..start +
    t - 1. Their keys and values go into the [1, heads, max_len, dim] caches (bfloat16:
    rounded to nearest even), then each token attends causally over positions 0..its own
    -> [t, heads * dim] float32. Each token's attention is `attend_one`'s arithmetic."""
    lib = load()
    if lib is None:
        raise RuntimeError("lowvox's CPU kernels are not available")
    _check(qkv, torch.float32, "qkv")
    for name, c in (("cache_k", cache_k), ("cache_v", cache_v)):
        _check_cache(c, name)
        if c.dim() != 4 or c.shape[0] != 1:
            raise ValueError(f"{name} must be [1, heads, max_len, dim], got {tuple(c.shape)}")
    if cache_k.shape != cache_v.shape or cache_k.dtype != cache_v.dtype:
        raise ValueError("the key and value caches differ in shape or dtype")
    _, heads, max_len, dim = cache_k.shape
    if qkv.dim() != 2 or qkv.shape[1] != 3 * heads * dim:
        raise ValueError(f"qkv must be [t, {3 * heads * dim}], got {tuple(qkv.shape)}")
    t = qkv.shape[0]
    if start < 0 or start + t > max_len:
        raise ValueError(f"positions {start}..{start + t - 1} are outside a cache of {max_len}")
    threads = torch.get_num_threads()
    out = torch.empty(t, heads * dim, dtype=torch.float32)
    scratch = torch.empty(threads * (start + t), dtype=torch.float32)
    lib.lv_attend_prompt(
        qkv.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), CACHE_KINDS[cache_k.dtype],
        heads, start, t, dim, max_len, dim**-0.5, out.data_ptr(), scratch.data_ptr(), threads,
    )  # fmt: skip
    return out


def vector_gelu() -> bool:
    """Whether `gelu_tanh_` is vectorised (AVX-512 builds: ~4x torch's tanh-GELU on a
    prompt's [t, 4096] activations on Zen 4; AVX2 builds: [200, 4096] 0.23 ms against
    torch's 0.65 on 2 Xeon cores); elsewhere torch's is faster."""
    return isa() in ("AVX-512", "AVX2")


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU in place over a contiguous float32 CPU tensor (the
    fused decode blocks' arithmetic); returns x."""
    lib = load()
    if lib is None:
        raise RuntimeError("lowvox's CPU kernels are not available")
    _check(x, torch.float32, "x")
    lib.lv_gelu_tanh(x.data_ptr(), x.numel(), torch.get_num_threads())
    return x


def int8_conv() -> bool:
    """Whether `Int8Conv` runs here (AVX-512 VNNI builds: int8 weights and 8-bit time steps
    through vpdpbusd, ~1.5-1.8x oneDNN's bf16 convolutions of 128-256 channels on Zen 4)."""
    lib = load()
    return lib is not None and bool(lib.lv_conv_q8_serves())


class Int8Conv:
    """A stride-1, unpadded 1-D convolution (any dilation) with int8 weights, one float32
    scale per output channel and tap, on time-major activations `[T, C]`, float32 or bfloat16
    (`lv_conv_q8`).

    Each input time step is quantised to 8 bits at its own scale when the convolution runs,
    as codes around a zero point: 128 (symmetric) by default; `LRELU_ZERO` for the outputs
    of a leaky ReLU of slope 0.1, whose negatives are a tenth of its positives. The weight is
    quantised once (symmetric, per output channel and tap: a tap's weights need not share
    the loudest tap's steps) and packed for the kernel. Needs
    `int8_conv()`, C a multiple of 16 and O a multiple of 32 (`fits`).
    """

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        """Whether a Conv1d weight `[O, C, k]` has a shape the kernel takes."""
        return weight.dim() == 3 and weight.shape[0] % PANEL == 0 and weight.shape[1] % 16 == 0

    def __init__(self, weight: torch.Tensor, dilation: int = 1) -> None:
        if not self.fits(weight):
            raise ValueError(f"no int8 convolution for a weight of shape {tuple(weight.shape)}")
        o, c, k = weight.shape
        w = weight.detach().float()
        top = w.abs().amax(dim=1)  # [O, k]
        scale = torch.where(top > 0, top / 127, torch.ones_like(top))
        q = torch.round(w / scale[:, None, :]).clamp_(-127, 127)
        # [O/32, 32, C/4, 4, k] -> [O/32, k, C/4, 32, 4]
        packed = q.to(torch.int8).reshape(o // PANEL, PANEL, c // 4, 4, k)
        packed = packed.permute(0, 4, 2, 1, 3).contiguous()
        if packed.data_ptr() % 64:  # the kernel's aligned loads
            raise RuntimeError("the packed int8 weight is not 64-byte aligned")
        # each output's weight sum per tap (what a zero point adds): [O/32, k, 32]
        wsum = q.sum(dim=1).to(torch.int32).reshape(o // PANEL, PANEL, k)
        self.wsum = wsum.permute(0, 2, 1).contiguous()
        self.packed = packed
        # each output's scale per tap, as the panels hold outputs: [O/32, k, 32]
        self.scale = scale.reshape(o // PANEL, PANEL, k).permute(0, 2, 1).contiguous()
        self.out_channels, self.in_channels, self.taps = o, c, k
        self.dilation = dilation
        self.span = dilation * (k - 1)  # input steps an output needs beyond its own

    def dequantized(self) -> torch.Tensor:
        """The weight `[O, C, k]` the kernel computes with (float32)."""
        o, c, k = self.out_channels, self.in_channels, self.taps
        q = self.packed.permute(0, 3, 2, 4, 1).reshape(o, c, k).to(torch.float32)
        return q * self.scale.permute(0, 2, 1).reshape(o, 1, k)

    def __call__(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
        slope: float | None = None,
        out: torch.Tensor | None = None,
        slope_in: float | None = None,
        zero: int = 128,
    ) -> torch.Tensor:
        """x `[T, C]` -> `[T - span, O]` of x's dtype (float32 or bfloat16): conv(x) with
        the `dequantized()` weights + bias (float32), plus `res` (`[T - span, O]`, may be `out` itself), then leaky ReLU
        of `slope` (0 < slope < 1) if given; written into `out` when given. `slope_in`:
        convolve leaky_relu(x) instead (x itself is left as it is). `zero`: the codes' zero
        point, 1..254."""
        lib = load()
        if lib is None or not lib.lv_conv_q8_serves():
            raise RuntimeError("lowvox's int8 convolution is not available on this CPU")
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"x must be a contiguous float32 or bfloat16 tensor, got {x.dtype}")
        _check(x, x.dtype, "x")
        t_in, c = x.shape
        o = self.out_channels
        if c != self.in_channels:
            raise ValueError(f"x has {c} channels, the convolution takes {self.in_channels}")
        if not 1 <= zero <= 254:
            raise ValueError(f"zero point {zero} is outside 1..254")
        t_out = t_in - self.span
        if t_out <= 0:
            return torch.empty(0, o, dtype=x.dtype) if out is None else out
        if bias is not None:
            _check(bias, torch.float32, "bias")
            if tuple(bias.shape) != (o,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({o},)")
        for name, t in (("res", res), ("out", out)):
            if t is not None:
                _check(t, x.dtype, name)
                if tuple(t.shape) != (t_out, o):
                    raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(t_out, o)}")
        for a in (slope, slope_in):
            if a is not None and not 0 < a < 1:
                raise ValueError(f"leaky ReLU slope {a} is outside (0, 1)")
        y = torch.empty(t_out, o, dtype=x.dtype) if out is None else out
        threads = torch.get_num_threads()
        scratch = torch.empty(
            lib.lv_conv_q8_scratch(t_in, c, self.span, threads), dtype=torch.uint8
        )
        lib.lv_conv_q8(
            x.data_ptr(), t_in, c, int(x.dtype == torch.bfloat16), int(slope_in is not None),
            slope_in or 0.0, zero, self.packed.data_ptr(), self.wsum.data_ptr(),
            self.scale.data_ptr(), None if bias is None else bias.data_ptr(), o, self.taps,
            self.dilation, None if res is None else res.data_ptr(), int(slope is not None),
            0.0 if slope is None else slope, y.data_ptr(), scratch.data_ptr(), threads,
        )  # fmt: skip
        return y


# `Int8Conv`'s zero point for a leaky ReLU's output (slope 0.1: negatives down to a tenth
# of the largest positive): 32 of the 255 steps below zero, 223 above (~1.75x finer steps
# than symmetric codes where the negatives reach a tenth; as fine where they reach a
# seventh). On the full-size random vocoder: 29.7 -> 33.9 dB for the activations alone.
LRELU_ZERO = 32


class FusedBlock:
    """A pre-LN GPT-2 block with int8, bf16 or float32 linears, decoded one token at a time
    (of one sequence, or of each in a batch) by one C call (`lv_block_decode`). Built from
    the block's tensors, checked once; it keeps them alive.

    linears: (weight, scales, float32 bias [out]) for c_attn, attn c_proj, c_fc and mlp
    c_proj, in that order; all int8 [out, in] with float32 scales [out] (or all of them
    packed, `pack_int8_panels`), all bfloat16 [out, in] with scales None, or all float32
    [in, out] (GPT-2's Conv1D) with scales None.
    """

    def __init__(
        self,
        ln_1: tuple[torch.Tensor, torch.Tensor],
        ln_2: tuple[torch.Tensor, torch.Tensor],
        eps: float,
        linears: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],
        heads: int,
    ) -> None:
        dim = ln_1[0].shape[0]
        if dim % heads:
            raise ValueError(f"{dim} channels do not split into {heads} heads")
        shapes = [(3 * dim, dim), (dim, dim), (4 * dim, dim), (dim, 4 * dim)]
        for t in (*ln_1, *ln_2):
            _check(t, torch.float32, "a LayerNorm parameter")
            if t.shape != (dim,):
                raise ValueError(f"LayerNorm parameter of shape {tuple(t.shape)}, not ({dim},)")
        kinds = set()
        for (w, s, b), shape in zip(linears, shapes, strict=True):
            stored = shape
            if w.dtype == torch.float32:
                _check(w, torch.float32, "weight")
                if s is not None:
                    raise ValueError("float32 weights take no scales")
                stored = shape[::-1]  # [in, out]
                kinds.add(F32_IN_OUT)
            else:
                kinds.add(_weight_kind(w, s, shape[1]))
                if w.dtype == torch.uint8:
                    stored = panel_shape(*shape)
            if tuple(w.shape) != stored:
                raise ValueError(f"linear of shape {tuple(w.shape)} where {stored} was expected")
            _check(b, torch.float32, "bias")
            if b.shape != (shape[0],):
                raise ValueError(f"bias of shape {tuple(b.shape)} for {shape[0]} outputs")
        if len(kinds) != 1:
            raise ValueError("the four linears must have one weight dtype")
        self.kind = kinds.pop()
        self.dim, self.heads, self.eps = dim, heads, float(eps)
        self._tensors = (*ln_1, *ln_2, *(t for lin in linears for t in lin if t is not None))
        # This block's entries of lv_blocks_decode's tables.
        self.norms = [t.data_ptr() for t in (*ln_1, *ln_2)]
        self.weights = [w.data_ptr() for w, _, _ in linears]
        self.scales = [None if s is None else s.data_ptr() for _, s, _ in linears]
        self.biases = [b.data_ptr() for _, _, b in linears]
        self._alone: FusedStack | None = None

    def __call__(
        self,
        x: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        positions: int | torch.Tensor,
    ) -> torch.Tensor:
        """x [B, 1, dim] float32, one token of each of B sequences -> the block's output (a
        new tensor). Row b's token sits at sequence position positions[b] (int64 [B]; an int:
        every row's): its key/value is written there in row b of the [B, H, max_len, hd]
        caches, and it attends over positions 0..positions[b]."""
        if self._alone is None:
            self._alone = FusedStack([self])
        return self._alone(x, [cache_k], [cache_v], positions)


def _pointers(values: Iterable[int | None]) -> ctypes.Array[ctypes.c_void_p]:
    """A C array of pointers (None: NULL), one of `lv_blocks_decode`'s per-block tables."""
    items = list(values)
    return (ctypes.c_void_p * len(items))(*items)


def _floats(values: Iterable[float]) -> ctypes.Array[ctypes.c_float]:
    items = list(values)
    return (ctypes.c_float * len(items))(*items)


class FusedStack:
    """Consecutive `FusedBlock`s (a whole decoder stack) decoded by one C call: one thread
    start-up and no Python between blocks. They keep their tensors alive."""

    def __init__(self, blocks: list[FusedBlock]) -> None:
        if not blocks:
            raise ValueError("a stack needs at least one block")
        first = blocks[0]
        if any((b.kind, b.dim, b.heads) != (first.kind, first.dim, first.heads) for b in blocks):
            raise ValueError("the blocks of a stack must share weight kind, width and heads")
        self.blocks = list(blocks)
        self.kind, self.dim, self.heads = first.kind, first.dim, first.heads

        self._norms = _pointers(q for b in blocks for q in b.norms)
        self._eps = _floats(b.eps for b in blocks)
        self._weights = _pointers(q for b in blocks for q in b.weights)
        self._scales = _pointers(q for b in blocks for q in b.scales)
        self._biases = _pointers(q for b in blocks for q in b.biases)

    def __call__(
        self,
        x: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        positions: int | torch.Tensor,
    ) -> torch.Tensor:
        """x [B, 1, dim] float32 through every block in turn (see `FusedBlock.__call__`);
        block l writes and reads the caches keys[l], values[l], all [B, H, max_len, hd]."""
        lib = load()
        if lib is None:
            raise RuntimeError("lowvox's CPU kernels are not available")
        dim, heads, n = self.dim, self.heads, len(self.blocks)
        rows = x.shape[0]
        if x.shape != (rows, 1, dim) or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"x must be [B, 1, {dim}] float32 on the CPU")
        if len(keys) != n or len(values) != n:
            raise ValueError(f"{len(keys)} key and {len(values)} value caches for {n} blocks")
        shape = keys[0].shape
        if len(shape) != 4 or shape[:2] != (rows, heads) or shape[3] * heads != dim:
            raise ValueError(f"cache of shape {tuple(shape)} does not fit the block")
        for i, t in enumerate((*keys, *values)):
            if (
                t.shape != shape
                or t.dtype != keys[0].dtype
                or t.dtype not in CACHE_KINDS
                or t.device.type != "cpu"
                or not t.is_contiguous()
            ):
                raise ValueError(
                    f"cache {i % n} must be a contiguous float32 or bfloat16 CPU tensor of "
                    f"shape {tuple(shape)} (all of one dtype), got {t.dtype} {t.device} "
                    f"{tuple(t.shape)}"
                )
        max_len = shape[2]
        per_row: torch.Tensor | None = None
        if isinstance(positions, torch.Tensor):
            _check(positions, torch.int64, "positions")
            if positions.shape != (rows,):
                raise ValueError(f"{tuple(positions.shape)} positions for {rows} rows")
            per_row = positions
            pos, low = int(positions.max()), int(positions.min())
        else:
            pos = low = int(positions)
        if not (low >= 0 and pos < max_len):
            raise ValueError(f"positions {low}..{pos} are outside a cache of {max_len}")
        # Per call, not kept: a stack may serve two threads at once.
        key_ptrs = (ctypes.c_void_p * n)(*(t.data_ptr() for t in keys))
        value_ptrs = (ctypes.c_void_p * n)(*(t.data_ptr() for t in values))
        out = x.clone()
        threads = torch.get_num_threads()
        work = torch.empty(
            lib.lv_block_work_floats(self.kind, rows, dim, threads), dtype=torch.float32
        )
        scratch = torch.empty(threads * (pos + 1), dtype=torch.float32)
        lib.lv_blocks_decode(
            self.kind, out.data_ptr(), rows, dim, heads, n, self._norms, self._eps,
            self._weights, self._scales, self._biases, CACHE_KINDS[keys[0].dtype], key_ptrs,
        value_ptrs,
            None if per_row is None else per_row.data_ptr(), pos, max_len, work.data_ptr(),
            scratch.data_ptr(), threads,
        )  # fmt: skip
        return out
