"""Allocator tuning: harmless to call, idempotent, and reports whether it applied."""

import platform

from lowvox.runtime.memory import return_freed_memory


def test_return_freed_memory_is_idempotent():
    first = return_freed_memory()
    assert return_freed_memory() == first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True
