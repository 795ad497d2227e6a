"""The outputs folder: generated files are named safely, served safely and expire.

A file name from a client is only ever looked up among the folder's own entries, so no
`..`, absolute path, symlink or odd character can reach anything outside it. Retention
(age and total size) runs after every write and on a timer, not only at start-up; the
temporaries of writes that never finished count towards the size and are removed once
stale. `served_file` is the same rule for files found in other folders (voice clips).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import uuid
from pathlib import Path

from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.files import PARTIAL_GLOB, sweep_partials, write_atomic

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")

# A temporary older than this belongs to a write that will never finish (outputs are
# written whole, in well under a second).
STALE_PARTIAL_S = 600.0


class OutputNotFound(LowvoxError):
    status_code = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"no such output file: {name!r}")


class FileRefused(LowvoxError):
    status_code = 403


class FileMissing(LowvoxError):
    status_code = 404


def served_file(path: Path, root: Path) -> Path:
    """`path` when it is a regular file inside `root` reached without a symbolic link (the
    file itself or any folder between); FileRefused otherwise. For files a route sends
    from a folder that people and other programs also write to (the voice library): a
    link placed there must not hand out what it points at."""
    root, path = Path(root), Path(path)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise FileRefused(f"refusing to serve {path.name!r}: it is not in its folder") from None
    if not parts or any(part in (".", "..") for part in parts):
        raise FileRefused(f"refusing to serve {path.name!r}: it is not in its folder")
    current = root
    for part in parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            raise FileMissing(f"{'/'.join(parts)!r} is gone") from None
        if stat.S_ISLNK(mode):
            raise FileRefused(f"refusing to serve {'/'.join(parts)!r}: {part!r} is a symbolic link")
    if not stat.S_ISREG(mode):
        raise FileRefused(f"refusing to serve {'/'.join(parts)!r}: not a regular file")
    return current


def safe_stem(hint: str | None, default: str = "output") -> str:
    """A file-name stem built from a client's hint: letters, digits, `._-` only, no dots first."""
    stem = Path(str(hint or "")).name  # drop any directories the client sent
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    stem = _UNSAFE.sub("_", stem).strip("._-")[:80]
    return stem or default


class OutputStore:
    """Writes, finds and expires generated audio files in one folder."""

    def __init__(self, root: Path, max_age_hours: float = 0, max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.max_age_s = max_age_hours * 3600
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    def new_name(self, hint: str | None, ext: str, timestamp: bool = True) -> str:
        """A fresh file name; with `timestamp` a unique suffix keeps concurrent requests apart."""
        stem = safe_stem(hint)
        ext = _UNSAFE.sub("", ext.lstrip("."))[:8] or "bin"
        if timestamp:
            stem = f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:8]}"
        return f"{stem}.{ext}"

    def path_for(self, name: str) -> Path:
        if not _NAME_OK.match(name):
            raise InvalidRequest(f"invalid output file name: {name!r}", field="file")
        return self.root / name

    def write(self, name: str, data: bytes) -> Path:
        """Write atomically (temp file + rename): a reader never sees a half-written file."""
        path = self.path_for(name)
        write_atomic(path, data, fsync=False)
        self.enforce_retention(keep=name)
        return path

    def find(self, name: str) -> Path:
        """The file called `name` in the folder, or OutputNotFound; no path tricks reach outside."""
        if not isinstance(name, str) or not _NAME_OK.match(name):
            raise OutputNotFound(str(name))
        try:
            with os.scandir(self.root) as it:
                for entry in it:
                    if entry.name == name and entry.is_file(follow_symlinks=False):
                        return self.root / entry.name
        except FileNotFoundError:
            pass
        raise OutputNotFound(name)

    def files(self) -> list[tuple[str, int, float]]:
        """(name, size, mtime) of every finished file, newest first."""
        return self._scan()[0]

    def _scan(self) -> tuple[list[tuple[str, int, float]], int]:
        """The finished files (as `files`), and the bytes held by hidden files: the
        temporaries of writes in progress or of writes a crash cut short."""
        out = []
        hidden = 0
        try:
            with os.scandir(self.root) as it:
                for entry in it:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # published or removed meanwhile
                        continue
                    if entry.name.startswith("."):
                        hidden += st.st_size
                    else:
                        out.append((entry.name, st.st_size, st.st_mtime))
        except FileNotFoundError:
            return [], 0
        out.sort(key=lambda t: t[2], reverse=True)
        return out, hidden

    def sweep_partials(self, older_than_s: float = STALE_PARTIAL_S) -> int:
        """Remove temporaries of writes that never finished; how many."""
        removed = sweep_partials(self.root, older_than_s, (PARTIAL_GLOB,))
        if removed:
            logger.info("removed %d unfinished output file(s)", removed)
        return removed

    def enforce_retention(self, keep: str | None = None) -> int:
        """Delete files older than the age limit, then the oldest until under the size limit
        (which the temporaries of unfinished writes count towards)."""
        if not self.max_age_s and not self.max_bytes:
            return 0
        removed = 0
        with self._lock:
            files, hidden = self._scan()
            now = time.time()
            survivors = []
            for name, size, mtime in files:
                if self.max_age_s and now - mtime > self.max_age_s and name != keep:
                    removed += self._remove(name)
                else:
                    survivors.append((name, size, mtime))
            if self.max_bytes:
                total = hidden + sum(size for _, size, _ in survivors)
                for name, size, _ in reversed(survivors):  # oldest first
                    if total <= self.max_bytes:
                        break
                    if name == keep:
                        continue
                    removed += self._remove(name)
                    total -= size
        if removed:
            logger.info("retention removed %d output file(s)", removed)
        return removed

    def _remove(self, name: str) -> int:
        try:
            (self.root / name).unlink()
            return 1
        except FileNotFoundError:
            return 0
        except OSError as e:
            logger.warning("could not remove %s: %s", name, e)
            return 0
