"""Allocator tuning: harmless to call, idempotent, reports whether it applied, and
`own_mappings` switches big temporaries to their own mappings only inside its block;
`lazy_zeros` costs memory only where written."""

import ctypes
import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowvox.runtime.memory import lazy_zeros, return_freed_memory


def test_return_freed_memory_is_idempotent():
    first = return_freed_memory()
    assert return_freed_memory() == first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True


# Run in a fresh interpreter: glibc serves a request from any free heap chunk that fits
# before it considers a mapping, and a long test session's heap has plenty of those.
_PROBE = """
import ctypes, ctypes.util, json, torch
from lowvox.runtime.memory import own_mappings, return_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in "arena ordblks smblks hblks hblkhd usmblks "
                "fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2

def mapped(extra=32):
    # Hold 1 MB tensors: as many as the heap's free space could take, and `extra` more.
    # How many more than `extra` became separate mappings?
    info = libc.mallinfo2()
    before, fits = info.hblks, info.fordblks >> 20
    held = [torch.empty(1 << 20, dtype=torch.uint8) for _ in range(fits + extra)]
    during = libc.mallinfo2().hblks
    del held
    return during - before - extra

out = {"pinned": return_freed_memory(), "before": mapped()}
with own_mappings() as active:
    out["active"] = active
    with own_mappings():
        out["nested"] = mapped()
    out["inside"] = mapped()
out["after"] = mapped()
try:
    with own_mappings():
        raise RuntimeError("boom")
except RuntimeError:
    pass
out["after_error"] = mapped()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    """What glibc did with 1 MB tensors beyond what the free heap holds, at each point of
    the probe script: about 0 when they were mapped, -32 when the heap grew instead."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc's mallinfo2")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_own_mappings_maps_big_temporaries_and_restores_the_threshold(probe):
    """Inside the block 1 MB tensors are their own mappings (freed straight back to the
    system); before and after it they come from the heap (the pinned 16 MB threshold)."""
    assert probe["pinned"] is True and probe["active"] is True
    assert probe["before"] < -24  # the heap grew
    assert probe["inside"] >= -4  # what the free heap could not hold was mapped
    assert probe["after"] < -24


def test_own_mappings_nested_blocks_restore_only_when_the_last_leaves(probe):
    assert probe["nested"] >= -4
    assert probe["inside"] >= -4  # after the inner block left, the outer one still maps


def test_own_mappings_restores_the_threshold_when_the_block_raises(probe):
    assert probe["after_error"] < -24


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_lazy_zeros_are_zeros_of_the_asked_shape():
    small = lazy_zeros((3, 5), torch.float32)  # under the threshold: plain zeros
    big = lazy_zeros((4, 2, 300, 64), torch.float32)
    for t in (small, big):
        assert t.dtype == torch.float32 and t.is_contiguous() and not t.any()
    assert big.shape == (4, 2, 300, 64)
    big[1, 1, 7] = 2.5
    assert big.sum().item() == 2.5 * 64
    assert lazy_zeros((1 << 20,), torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_lazy_zeros_cost_memory_only_where_written():
    """A cache sized for the longest generation costs only the positions written."""
    before = _resident_bytes()
    t = lazy_zeros(((256 << 20) // 4,), torch.float32)  # 256 MB
    assert _resident_bytes() - before < 16 << 20
    t[: (64 << 20) // 4] = 1.0  # write the first quarter
    grown = _resident_bytes() - before
    assert 60 << 20 < grown < 100 << 20
    del t
    assert _resident_bytes() - before < 16 << 20  # the mapping went back with the tensor
