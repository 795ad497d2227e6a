"""A full disk for writers that Python cannot intercept (safetensors' Rust writer):
`RLIMIT_FSIZE` makes every write past `nbytes` into a regular file fail, as a full disk
would (EFBIG rather than ENOSPC; both are OSErrors to Python)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def files_limited_to(nbytes: int) -> Iterator[None]:
    resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE needs POSIX")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Past the limit the kernel sends SIGXFSZ, which would kill the test run.
    before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, before)
