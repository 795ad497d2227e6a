"""Process memory habits that keep peak RSS close to what the model really needs.

glibc serves large allocations from mmap only up to a threshold that it raises each time
such a block is freed (up to 32 MB). After a few vocoder runs, tensors of several MB then
come from the heap, and freed heap memory is rarely returned to the system: RSS keeps the
high-water mark of every differently-sized activation. Pinning the threshold at 1 MB makes
every large tensor its own mapping, returned to the system when freed. Per-token decode
tensors are far smaller and unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20

_done = False


def return_freed_memory() -> bool:
    """Pin glibc's mmap threshold (once per process); False where that is not glibc."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _done = ok
    log.debug("glibc mmap threshold pinned at %d bytes: %s", MMAP_THRESHOLD_BYTES, ok)
    return ok
