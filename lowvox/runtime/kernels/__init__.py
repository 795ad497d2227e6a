"""lowvox's own CPU kernels (int8-weight linear, one-query attention), loaded through ctypes.

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
    lib.lv_int8_linear.argtypes = [p, i64, i64, p, p, p, p, i64, i32]
    lib.lv_int8_linear.restype = None
    lib.lv_attend_one.argtypes = [p, p, p, i64, i64, i64, i64, f32, p, p, i32]
    lib.lv_attend_one.restype = None
    return lib


def available() -> bool:
    return load() is not None


def isa() -> str | None:
    """The instruction set the loaded library was built for, or None when there is none."""
    lib = load()
    return ISA_NAMES.get(lib.lv_isa(), "?") if lib is not None else None


def describe() -> str:
    """One line for `lowvox doctor` and the start-up log."""
    if not enabled_by_env():
        return "off (LOWVOX_CPU_KERNELS=0): torch's kernels"
    name = isa()
    if name is None:
        return "not built (no working C compiler): torch's kernels"
    return f"{name} ({_path})"


def _check(t: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(
            f"{what} must be a contiguous {dtype} CPU tensor, got {t.dtype} {t.device}"
        )


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [m, k] float32, weight [n, k] int8, scales [n] float32, bias [n] float32 or None
    -> [m, n] float32: (x @ weight.T) * scales + bias."""
    lib = load()
    if lib is None:
        raise RuntimeError("lowvox's CPU kernels are not available")
    m, k = x.shape
    n = weight.shape[0]
    _check(x, torch.float32, "x")
    _check(weight, torch.int8, "weight")
    _check(scales, torch.float32, "scales")
    if weight.shape[1] != k or scales.shape != (n,):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        _check(bias, torch.float32, "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
    y = torch.empty(m, n, dtype=torch.float32)
    lib.lv_int8_linear(
        x.data_ptr(), m, k, weight.data_ptr(), scales.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), n, torch.get_num_threads(),
    )  # fmt: skip
    return y


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query per head over a cache: q [H, D], keys/values [H, L, D] views whose rows
    are contiguous (a prefix of a [1, H, max_len, D] cache) -> [H, D] float32.
    Same as `scaled_dot_product_attention` without a mask."""
    lib = load()
    if lib is None:
        raise RuntimeError("lowvox's CPU kernels are not available")
    heads, dim = q.shape
    _check(q, torch.float32, "q")
    for name, t in (("keys", keys), ("values", values)):
        if (
            t.device.type != "cpu"
            or t.dtype != torch.float32
            or t.dim() != 3
            or t.shape[0] != heads
            or t.shape[2] != dim
            or t.stride(2) != 1
            or t.stride(1) != dim
        ):
            raise ValueError(f"{name} must be [H, L, D] float32 with contiguous rows")
    if keys.shape[1] != values.shape[1] or keys.stride(0) != values.stride(0):
        raise ValueError("keys and values must have the same length and layout")
    length = keys.shape[1]
    threads = torch.get_num_threads()
    out = torch.empty(heads, dim, dtype=torch.float32)
    scratch = torch.empty(threads * max(length, 1), dtype=torch.float32)
    lib.lv_attend_one(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), heads, length, dim, keys.stride(0),
        dim**-0.5, out.data_ptr(), scratch.data_ptr(), threads,
    )  # fmt: skip
    return out
