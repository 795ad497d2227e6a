"""Process memory habits that keep peak RSS close to what the model really needs, without
paying for it in page faults.

glibc serves large allocations from mmap only above a threshold that it raises each time
such a block is freed (up to 32 MB). After a few vocoder runs, tensors of several MB then
come from the heap, and freed heap memory is rarely returned to the system: RSS keeps the
high-water mark of every differently-sized activation.

Pinning the threshold very low (every tensor over 1 MB its own mapping) fixes RSS but makes
every activation fresh memory: the kernel faults in and zeroes each 4 KiB page on first
touch, and the vocoder writes ~2 GB of activations per 10 s of audio - 450k faults, which
cost as much as the bf16 vocoder's own arithmetic on a 2-core VM. So the threshold is pinned
above one vocoder window's activations (a few MB each: see `vocode.StreamingVocoder`),
which the heap then recycles window after window, and below the tensors that are big and
rare (weights, whole-utterance buffers), which keep their own mappings. The heap keeps up to
`TRIM_THRESHOLD_BYTES` free at its top between windows; `release_heap` hands every free heap
page back when a piece of work is done.

Work that runs for the first time is the exception (`own_mappings`): oneDNN builds its
kernels for a new input shape while the activations come and go, and the small objects it
keeps (kernel descriptors, cache entries) land in the heap between them, so the freed
activations can no longer be reused for the next, slightly larger, request: the heap grew by
~0.14 GB over the first vocoder window (nothing on later ones). Inside `own_mappings` an
allocation of 128 KB and up that the heap's free chunks cannot hold gets its own mapping
(instead of growing the heap) and goes back to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 << 20
TRIM_THRESHOLD_BYTES = 32 << 20
# Inside `own_mappings`: glibc's own default threshold, below any activation of note.
OWN_MAPPING_BYTES = 128 << 10

_done = False
_own_lock = threading.Lock()
_own_depth = 0  # nested or concurrent `own_mappings` blocks in progress


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only (not musl, not macOS)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory() -> bool:
    """Pin glibc's mmap and trim thresholds (once per process); False where that is not glibc."""
    global _done
    if _done:
        return True
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    ok = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and ok
    _done = ok
    log.debug(
        "glibc mmap threshold %d, trim threshold %d bytes: %s",
        MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES, ok,
    )  # fmt: skip
    return ok


def release_heap() -> bool:
    """Give every free heap page back to the system (glibc's malloc_trim); False elsewhere.

    Costs a few milliseconds, and the next vocoding faults its working set in again (~10k
    pages): call it when a request or batch is done, not per window.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


@contextmanager
def own_mappings() -> Iterator[bool]:
    """Within the block the heap does not grow for allocations from `OWN_MAPPING_BYTES` up:
    glibc serves them from free heap chunks that fit, else from a mapping of their own,
    returned to the system as soon as it is freed. On leaving, the pinned threshold is back
    and the heap is released. Yields False (and changes nothing) where that is not glibc.

    For one-off work that keeps small objects while big temporaries come and go (a first
    vocoding at a new window length, a warm-up): the heap then cannot fragment. Every page
    of those temporaries is faulted in afresh, so not for work that repeats. Process-wide,
    like every malloc setting; nested and concurrent blocks restore it when the last leaves.
    """
    global _own_depth
    libc = _libc() if return_freed_memory() else None
    if libc is None:
        yield False
        return
    with _own_lock:
        _own_depth += 1
        if _own_depth == 1:
            libc.mallopt(M_MMAP_THRESHOLD, OWN_MAPPING_BYTES)
    try:
        yield True
    finally:
        with _own_lock:
            _own_depth -= 1
            if _own_depth == 0:
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        release_heap()


# Below this a buffer is not worth a mapping of its own.
LAZY_ZEROS_MIN_BYTES = 1 << 20


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor whose memory follows what is written, not its size.

    `torch.zeros` writes every byte, so every page is resident at once. Here a buffer of
    LAZY_ZEROS_MIN_BYTES and up is an anonymous mapping of its own, and the kernel hands
    over each page, zeroed, on first touch. A KV cache sized for the longest generation
    (~170 MB per sequence for the full-size model) then costs only the positions reached.
    The mapping goes back to the system with the tensor.
    """
    import torch

    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < LAZY_ZEROS_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)
