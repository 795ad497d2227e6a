"""The one atomic-write helper: what it publishes, and with which permissions."""

from __future__ import annotations

import os
import stat

import pytest

from lowvox.files import atomic_path, write_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    """A file lowvox writes (`lowvox say -o`, a book, a server output) gets the permissions
    of any new file, not mkstemp's private 0600 (a web server could not read it)."""
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "out.wav", b"RIFF")
        with atomic_path(tmp_path / "other.flac") as tmp:
            tmp.write_bytes(b"fLaC")
    finally:
        os.umask(old)
    for name in ("out.wav", "other.flac"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.flac", "out.wav"]
