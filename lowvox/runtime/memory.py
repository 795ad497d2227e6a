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
above one vocoder window's activations (a few MB each: see `streaming.vocode_in_windows`),
which the heap then recycles window after window, and below the tensors that are big and
rare (weights, whole-utterance buffers), which keep their own mappings. The heap keeps up to
`TRIM_THRESHOLD_BYTES` free at its top between windows; `release_heap` hands every free heap
page back when a piece of work is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 << 20
TRIM_THRESHOLD_BYTES = 32 << 20

_done = False


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
