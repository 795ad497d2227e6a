"""The prefill path of int8 layers (weights widened to bf16) leaves nothing behind: running
a stack of layers for the first time must not grow the heap layer after layer."""

import ctypes
import ctypes.util

import pytest
import torch

from lowvox.runtime.memory import release_heap, return_freed_memory
from lowvox.runtime.quant import Int8Linear

# A transformer block's four linears at half the full model's width: [in, out].
SHAPES = [(512, 1536), (512, 512), (512, 2048), (2048, 512)]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (field, ctypes.c_size_t)
        for field in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def _heap_bytes() -> int:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2") or not return_freed_memory():
        pytest.skip("needs glibc's mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().arena


def _block(seed: int) -> list[Int8Linear]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for n_in, n_out in SHAPES:
        layer = Int8Linear(n_in, n_out)
        # In place: a big temporary here would leave free heap for the test to reuse.
        layer.weight.random_(-127, 128, generator=g)
        layer.scales.fill_(1e-3)
        layer.bias.zero_()
        layers.append(layer)
    return layers


def test_first_prefill_through_fresh_layers_does_not_grow_the_heap_per_layer():
    """With the pinned mmap threshold the widened weights (1.5-2 MB) come from the heap; if
    a call kept any small allocation (a cached scale tensor) after them, each layer would
    strand the freed space below it and grow the heap again (about 11 MB per block of the
    full-size GPT on its first prompt)."""
    blocks = [_block(i) for i in range(40)]
    x = torch.randn(96, 512)
    heap = []
    with torch.inference_mode():
        release_heap()
        for c_attn, c_proj, c_fc, c_out in blocks:
            h = c_proj._forward_bf16_matmul(c_attn._forward_bf16_matmul(x)[:, :512].contiguous())
            c_out._forward_bf16_matmul(c_fc._forward_bf16_matmul(h))
            heap.append(_heap_bytes())
    # The first blocks settle the heap's working set; after that it must stay flat.
    growth = heap[-1] - heap[4]
    assert growth < 8 << 20, f"heap grew {growth / 2**20:.1f} MB over {len(heap) - 5} blocks"
