"""Writing files so that a reader, a crash or a second process never sees half of one.

Every file lowvox writes goes through here: the data lands in a temporary file with a
unique name in the target's own folder (so the rename stays on one file system), is
flushed to disk, and is published with one `os.replace`. Leftover temporaries of a killed
process start with `.` and end with `.part`; `sweep_partials` removes them (and, given
their patterns, other writers' leftovers such as the voice library's temporary folders)
at start-up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from lowvox.errors import LowvoxError

PART_SUFFIX = ".part"
# The names `atomic_path` gives its temporaries (a glob).
PARTIAL_GLOB = f".*{PART_SUFFIX}"


def _proc_umask() -> int | None:
    """The process's umask as Linux shows it (reading it needs no change to it)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_umask_once() -> int:
    # Elsewhere the umask is only read by setting it, which races with threads making
    # files; so it is read once, at import.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_PROC_UMASK_AT_IMPORT = _proc_umask()
_IMPORT_UMASK: int = _read_umask_once() if _PROC_UMASK_AT_IMPORT is None else _PROC_UMASK_AT_IMPORT


def _umask() -> int:
    mask = _proc_umask()
    return _IMPORT_UMASK if mask is None else mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; published when the block ends
    without an error, removed when it fails. For writers that need a file name (PyAV,
    soundfile, sqlite backups)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PART_SUFFIX)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        # mkstemp makes the file 0600; the published file gets the permissions any new
        # file gets (0644 under the usual umask 022), as `lowvox say -o` users expect.
        os.chmod(tmp_path, 0o666 & ~_umask())
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` when the block ends cleanly."""
    with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Replace `path` with `data` in one step."""
    with atomic_open(path, fsync=fsync) as f:
        f.write(data)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Refuse now, before the work that makes it (a model load, hours of speech), a file
    that `write_atomic` could not write at `path`: a folder, a place under a file, or a
    folder that takes no new files. Nothing is made: the nearest folder that exists is
    tried with an unnamed temporary file, and missing folders are left to the writer."""
    target = Path(path)
    if target.is_dir():
        raise LowvoxError(f"cannot write {target}: it is a folder")
    folder = next((p for p in target.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise LowvoxError(f"cannot write {target}: {folder} is a file")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise LowvoxError(f"cannot write {target}: {e.strerror or e}") from e


def why_not_written(e: BaseException) -> str:
    """Why a write failed, in words for the user: "the disk is full" when it (or the error
    it was raised from) is ENOSPC, else the error's own message."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__  # writers (assembly, say) wrap their OSErrors
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return "the disk is full"
    return str(e)


def sweep_partials(
    folder: str | os.PathLike[str],
    older_than_s: float = 0.0,
    patterns: Sequence[str] = (PARTIAL_GLOB,),
    *,
    recursive: bool = True,
) -> int:
    """Remove the temporaries that killed writers left under `folder` (recursively, unless
    not `recursive`): files and folders whose names match one of the glob `patterns`;
    returns how many. `older_than_s` spares those a live writer may still be using.
    Symbolic links are neither removed nor followed."""
    root = Path(folder)
    if not root.is_dir():
        return 0
    now = time.time()
    removed = 0
    for pattern in patterns:
        for tmp in list(root.rglob(pattern) if recursive else root.glob(pattern)):
            try:
                st = tmp.lstat()
                if now - st.st_mtime < older_than_s:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(tmp)
                elif stat.S_ISREG(st.st_mode):
                    tmp.unlink()
                else:
                    continue
                removed += 1
            except OSError:  # gone already, or not ours to remove
                continue
    return removed
