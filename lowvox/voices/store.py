"""The voice library on disk: one folder per voice holding its reference clips.

Layout: `<root>/<voice name>/clip_01.wav ...` plus `voice.json`. Uploads are decoded and
checked (real audio, 2-60 s per clip, sane sample rate, size limit) before anything is
written, re-encoded as 16-bit WAV, and published with one atomic rename of a temporary
folder, so a failed or concurrent upload never leaves a half-made voice behind. A lone
`<root>/<name>.wav` (AllTalk's layout) also counts as a one-clip voice.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from lowvox.errors import InvalidRequest, LowvoxError

logger = logging.getLogger(__name__)

MIN_CLIP_SECONDS = 2.0
MAX_CLIP_SECONDS = 60.0
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_CLIPS = 10

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()-]{0,63}$")


class VoiceNotFound(LowvoxError):
    status_code = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown voice: {name!r}")


class VoiceExists(LowvoxError):
    status_code = 409

    def __init__(self, name: str) -> None:
        super().__init__(f"a voice called {name!r} already exists")


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


def decode_clip(data: bytes, label: str, max_bytes: int) -> Clip:
    """Decode and check one uploaded clip; InvalidRequest says exactly what is wrong."""
    if len(data) == 0:
        raise InvalidRequest(f"{label} is empty", field="files")
    if len(data) > max_bytes:
        raise InvalidRequest(
            f"{label} is {len(data)} bytes, over the limit of {max_bytes}", field="files"
        )
    try:
        from lowvox.audio.io import read_audio  # decoders pull in torch; only uploads need them
    except ImportError:  # pragma: no cover - the audio package is part of lowvox
        read_audio = None
    if read_audio is not None:
        try:
            audio = read_audio(data, max_seconds=MAX_CLIP_SECONDS + 1)
        except InvalidRequest as e:
            raise InvalidRequest(f"{label} is not a readable audio file", field="files") from e
        samples, rate = audio.samples, audio.sample_rate
    else:
        try:
            samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise InvalidRequest(f"{label} is not a readable audio file", field="files") from e
        samples = samples.mean(axis=1)
    if not (MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE):
        raise InvalidRequest(
            f"{label} has sample rate {rate} Hz (allowed {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE})",
            field="files",
        )
    clip = Clip(np.asarray(samples, dtype=np.float32), int(rate))
    if clip.duration < MIN_CLIP_SECONDS or clip.duration > MAX_CLIP_SECONDS:
        raise InvalidRequest(
            f"{label} is {clip.duration:.1f} s long (allowed {MIN_CLIP_SECONDS:g}-{MAX_CLIP_SECONDS:g} s)",
            field="files",
        )
    if not np.isfinite(clip.samples).all() or float(np.abs(clip.samples).max()) < 1e-4:
        raise InvalidRequest(f"{label} is silent", field="files")
    return clip


class VoiceStore:
    """Lists, adds, renames and deletes voices in one folder; every change is atomic."""

    def __init__(self, root: Path, max_upload_bytes: int = 20 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.max_upload_bytes = max_upload_bytes
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
                clips = sorted(
                    p for p in Path(entry.path).iterdir() if p.suffix == ".wav" and p.is_file()
                )
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
            if voice.name.lower() == wanted.lower():
                return voice
        raise VoiceNotFound(name)

    def add(self, name: str, uploads: list[tuple[str, bytes]]) -> StoredVoice:
        """Validate every clip, then publish the voice in one rename."""
        name = check_name(name)
        if not uploads:
            raise InvalidRequest("no audio files were uploaded", field="files")
        if len(uploads) > MAX_CLIPS:
            raise InvalidRequest(f"at most {MAX_CLIPS} clips per voice", field="files")
        clips = [
            decode_clip(data, f"file {i + 1} ({_label(fname)})", self.max_upload_bytes)
            for i, (fname, data) in enumerate(uploads)
        ]
        tmp = self.root / f".upload-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            paths = []
            for i, clip in enumerate(clips, start=1):
                path = tmp / f"clip_{i:02d}.wav"
                sf.write(
                    str(path), np.clip(clip.samples, -1, 1), clip.sample_rate, subtype="PCM_16"
                )
                paths.append(path.name)
            meta = {"name": name, "clips": paths, "created": time.time()}
            (tmp / "voice.json").write_text(json.dumps(meta, indent=2))
            with self._lock:
                if self._exists(name):
                    raise VoiceExists(name)
                os.rename(tmp, self.root / name)
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
            os.rename(src, dst)
        return self.get(new)

    def delete(self, name: str) -> None:
        voice = self.get(name)
        with self._lock:
            if _is_flat(voice, self.root):
                voice.clips[0].unlink(missing_ok=True)
                return
            # Rename first so the voice disappears at once, then remove at leisure.
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            os.rename(voice.clips[0].parent, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _exists(self, name: str) -> bool:
        lowered = name.lower()
        return any(v.name.lower() == lowered for v in self.list())


def _is_flat(voice: StoredVoice, root: Path) -> bool:
    return voice.clips[0].parent == root


def _label(filename: str) -> str:
    return re.sub(r"[^A-Za-z0-9 ._-]", "_", Path(str(filename or "upload")).name)[:60]
