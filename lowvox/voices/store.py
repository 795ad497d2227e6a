"""The voice library on disk: one folder per voice holding its reference clips.

Layout: `<root>/<voice name>/clip_01.wav ...` plus `voice.json`. Uploads are decoded and
checked (real audio, 2-60 s per clip, at most 8 channels, a sane sample rate, size limits
per upload, per voice and for the library) before anything is written, stored as 16-bit
mono WAV at the library's rate at most (48 kHz by default), and published with one atomic
rename of a temporary folder, so a failed or concurrent upload never leaves a half-made
voice behind. A lone
`<root>/<name>.wav` (AllTalk's layout) also counts as a one-clip voice. Symbolic links in
the library (a voice folder, a clip, a lone `.wav`) are not voices or clips.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.files import why_not_written
from lowvox.voices import fold_name

logger = logging.getLogger(__name__)

MIN_CLIP_SECONDS = 2.0
MAX_CLIP_SECONDS = 60.0
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8
MAX_CLIPS = 10
_WAV_HEADER_BYTES = 44

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()-]{0,63}$")


class VoiceNotFound(LowvoxError):
    status_code = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown voice: {name!r}")


class VoiceExists(LowvoxError):
    status_code = 409

    def __init__(self, name: str, what: str = "a voice") -> None:
        super().__init__(f"{what} called {name!r} already exists")


@dataclass(frozen=True)
class StoredVoice:
    name: str
    clips: list[Path]
    created: float

    @property
    def duration(self) -> float:
        total = 0.0
        for clip in self.clips:
            with contextlib.suppress(sf.LibsndfileError, RuntimeError):
                total += sf.info(str(clip)).duration
        return total


@dataclass(frozen=True)
class Clip:
    """A decoded, checked upload: mono float32 samples at their own rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def check_name(name: str) -> str:
    """A voice name that is safe as a folder name: no separators, no dots first, no `..`."""
    if not isinstance(name, str):
        raise InvalidRequest("voice name is missing", field="name")
    cleaned = name.strip().removesuffix(".wav")
    if not _NAME.match(cleaned) or ".." in cleaned:
        raise InvalidRequest(
            f"invalid voice name {name!r}: use 1-64 letters, digits, spaces or ._-() "
            "and start with a letter or digit",
            field="name",
        )
    return cleaned


@dataclass(frozen=True)
class VoiceLimits:
    """What one upload may cost: the rate clips are stored at (at most), the stored size
    of one voice, and of the whole library (0: no limit)."""

    sample_rate: int = 48_000
    max_voice_bytes: int = 64 * 1024 * 1024
    max_library_bytes: int = 2 * 1024**3

    @classmethod
    def from_settings(cls, settings: Any) -> VoiceLimits:
        return cls(
            sample_rate=settings.voice_sample_rate,
            max_voice_bytes=settings.max_voice_bytes,
            max_library_bytes=settings.max_library_bytes,
        )


class VoiceTooLarge(InvalidRequest):
    status_code = 413


def stored_size(clip: Clip) -> int:
    """Bytes `clip` takes as the library stores it: a 44-byte header, 16-bit mono."""
    return _WAV_HEADER_BYTES + 2 * len(clip.samples)


def decode_clip(data: bytes, label: str, max_bytes: int, limits: VoiceLimits | None = None) -> Clip:
    """Decode and check one uploaded clip; InvalidRequest says exactly what is wrong.

    The header is checked before anything is decoded (channels, rate); decoding goes in
    blocks, each downmixed to mono and brought down to the library's rate, and stops a
    little after the longest clip allowed, so a clip costs its stored size in memory
    whatever its channels, rate or length.
    """
    limits = limits or VoiceLimits()
    if len(data) == 0:
        raise InvalidRequest(f"{label} is empty", field="files")
    if len(data) > max_bytes:
        raise InvalidRequest(
            f"{label} is {len(data)} bytes, over the limit of {max_bytes}", field="files"
        )
    from lowvox.audio.io import DecodeLimits, read_audio  # PyAV loads on first use

    try:
        audio = read_audio(
            data,
            max_seconds=MAX_CLIP_SECONDS + 1,
            max_rate=limits.sample_rate,
            limits=DecodeLimits(MAX_CHANNELS, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE),
        )
    except InvalidRequest as e:
        reason = e.__cause__ if isinstance(e.__cause__, InvalidRequest) else e
        raise InvalidRequest(
            f"{label} is not a readable audio file ({reason})", field="files"
        ) from e
    clip = Clip(np.asarray(audio.samples, dtype=np.float32), int(audio.sample_rate))
    if clip.duration < MIN_CLIP_SECONDS or clip.duration > MAX_CLIP_SECONDS:
        raise InvalidRequest(
            f"{label} is {clip.duration:.1f} s long (allowed {MIN_CLIP_SECONDS:g}-{MAX_CLIP_SECONDS:g} s)",
            field="files",
        )
    if float(np.abs(clip.samples).max()) < 1e-4:
        raise InvalidRequest(f"{label} is silent", field="files")
    return clip


class VoiceStore:
    """Lists, adds, renames and deletes voices in one folder; every change is atomic."""

    def __init__(
        self,
        root: Path,
        max_upload_bytes: int = 20 * 1024 * 1024,
        limits: VoiceLimits | None = None,
    ) -> None:
        self.root = Path(root)
        self.max_upload_bytes = max_upload_bytes
        self.limits = limits or VoiceLimits()
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[StoredVoice]:
        voices = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name.lower())
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                clips = _clips(Path(entry.path))
                if clips:
                    voices.append(StoredVoice(entry.name, clips, entry.stat().st_mtime))
            elif entry.is_file(follow_symlinks=False) and entry.name.endswith(".wav"):
                voices.append(
                    StoredVoice(entry.name[:-4], [Path(entry.path)], entry.stat().st_mtime)
                )
        return voices

    def get(self, name: str) -> StoredVoice:
        """Look the name up among the stored voices (never build a path from it)."""
        wanted = str(name).strip().removesuffix(".wav")
        for voice in self.list():
            if voice.name == wanted:
                return voice
        for voice in self.list():
            if fold_name(voice.name) == fold_name(wanted):
                return voice
        raise VoiceNotFound(name)

    def add(self, name: str, uploads: Sequence[tuple[str, bytes]]) -> StoredVoice:
        """Validate every clip, then publish the voice in one rename."""
        name = check_name(name)
        if not uploads:
            raise InvalidRequest("no audio files were uploaded", field="files")
        if len(uploads) > MAX_CLIPS:
            raise InvalidRequest(f"at most {MAX_CLIPS} clips per voice", field="files")
        limits = self.limits
        clips: list[Clip] = []
        size = 0
        for i, (fname, data) in enumerate(uploads):
            label = f"file {i + 1} ({_label(fname)})"
            clips.append(decode_clip(data, label, self.max_upload_bytes, limits))
            size += stored_size(clips[-1])
            if size > limits.max_voice_bytes:
                raise VoiceTooLarge(
                    f"the voice would take {size} bytes as stored (up to {label}), over the "
                    f"limit of {limits.max_voice_bytes} per voice (max_voice_bytes)",
                    field="files",
                )
        self._check_room(size)
        tmp = self.root / f".upload-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            paths = []
            for i, clip in enumerate(clips, start=1):
                path = tmp / f"clip_{i:02d}.wav"
                path.write_bytes(_wav(clip))
                paths.append(path.name)
            meta = {"name": name, "clips": paths, "created": time.time()}
            (tmp / "voice.json").write_text(json.dumps(meta, indent=2))
            with self._lock:
                if self._exists(name):
                    raise VoiceExists(name)
                self._check_room(size)  # again: another upload may have landed meanwhile
                os.rename(tmp, self.root / name)
        except OSError as e:  # a full disk, say
            raise LowvoxError(f"cannot store the voice {name!r} ({why_not_written(e)})") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("stored voice %r (%d clips)", name, len(clips))
        return self.get(name)

    def rename(self, old: str, new: str) -> StoredVoice:
        voice = self.get(old)
        new = check_name(new)
        with self._lock:
            if self._exists(new) and new.lower() != voice.name.lower():
                raise VoiceExists(new)
            src = voice.clips[0] if _is_flat(voice, self.root) else voice.clips[0].parent
            dst = self.root / (f"{new}.wav" if _is_flat(voice, self.root) else new)
            try:
                os.rename(src, dst)
            except FileNotFoundError as e:  # renamed or deleted since it was looked up
                raise VoiceNotFound(old) from e
        return self.get(new)

    def delete(self, name: str) -> None:
        voice = self.get(name)
        with self._lock:
            if _is_flat(voice, self.root):
                voice.clips[0].unlink(missing_ok=True)
                return
            # Rename first so the voice disappears at once, then remove at leisure.
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            try:
                os.rename(voice.clips[0].parent, trash)
            except FileNotFoundError as e:  # renamed or deleted since it was looked up
                raise VoiceNotFound(name) from e
        shutil.rmtree(trash, ignore_errors=True)

    def size(self) -> int:
        """Bytes the stored voices take (clips and their metadata; not uploads in progress)."""
        total = 0
        for voice in self.list():
            folder = voice.clips[0].parent
            files = voice.clips if folder == self.root else list(folder.iterdir())
            for path in files:
                with contextlib.suppress(OSError):
                    if not path.is_symlink() and path.is_file():
                        total += path.stat().st_size
        return total

    def _check_room(self, size: int) -> None:
        cap = self.limits.max_library_bytes
        if not cap:
            return
        used = self.size()
        if used + size > cap:
            raise VoiceTooLarge(
                f"the voice library is full: {used} bytes stored, this voice needs {size} "
                f"more, the limit is {cap} (max_library_bytes); delete voices to make room",
                field="files",
            )

    def _exists(self, name: str) -> bool:
        """Whether `name` is a voice, or is taken by something that is not one (a folder
        without clips, a symbolic link someone put there): a rename onto it would fail or
        land in it."""
        lowered = name.lower()
        if any(v.name.lower() == lowered for v in self.list()):
            return True
        return any(os.path.lexists(self.root / n) for n in (name, f"{name}.wav"))


def _wav(clip: Clip) -> bytes:
    """The clip as stored: 16-bit WAV. Encoded in memory (a clip is bounded by the upload
    limits) so that a failed write is an OSError that says why, not libsndfile's
    "System error."."""
    buf = io.BytesIO()
    samples = np.clip(clip.samples, -1, 1)
    sf.write(buf, samples, clip.sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def _clips(folder: Path) -> list[Path]:
    """A voice folder's clips: its `.wav` files that are files of their own. A symbolic
    link is no clip, as a linked folder or `<name>.wav` is no voice: whoever may write to
    the library must not make the server read (clone from, or send) a file elsewhere."""
    try:
        with os.scandir(folder) as it:
            return sorted(
                Path(e.path)
                for e in it
                if Path(e.name).suffix == ".wav" and e.is_file(follow_symlinks=False)
            )
    except OSError:  # removed or renamed meanwhile
        return []


def _is_flat(voice: StoredVoice, root: Path) -> bool:
    return voice.clips[0].parent == root


def _label(filename: str) -> str:
    return re.sub(r"[^A-Za-z0-9 ._-]", "_", Path(str(filename or "upload")).name)[:60]
