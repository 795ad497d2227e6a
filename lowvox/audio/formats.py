"""The audio output formats lowvox can produce, and how to name them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from lowvox.errors import UnsupportedFormat


@dataclass(frozen=True)
class AudioFormat:
    """One output format: its canonical name, what to call it on the wire and on disk."""

    name: str
    media_type: str
    extension: str  # with the dot, as written for files of this format
    streamable: bool  # bytes can be sent while the audio is still being produced
    lossless: bool


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("wav", "audio/wav", ".wav", streamable=True, lossless=True),
        AudioFormat("pcm", "audio/pcm", ".pcm", streamable=True, lossless=True),
        AudioFormat("flac", "audio/flac", ".flac", streamable=True, lossless=True),
        AudioFormat("mp3", "audio/mpeg", ".mp3", streamable=True, lossless=False),
        AudioFormat("opus", "audio/ogg", ".opus", streamable=True, lossless=False),
        AudioFormat("aac", "audio/aac", ".aac", streamable=True, lossless=False),
        AudioFormat("m4a", "audio/mp4", ".m4a", streamable=True, lossless=False),
        # An audiobook: AAC in MP4 with chapter marks, written whole by lowvox.jobs.assemble
        # (its index comes first, so it is not made as a stream).
        AudioFormat("m4b", "audio/mp4", ".m4b", streamable=False, lossless=False),
    )
}

# Other names people use for the same formats (API fields, ffmpeg muxer names).
_ALIASES = {
    "wave": "wav",
    "raw": "pcm",
    "s16le": "pcm",
    "mpeg": "mp3",
    "ogg": "opus",
    "adts": "aac",
    "mp4": "m4a",
}

_EXTENSIONS = {
    ".wav": "wav",
    ".wave": "wav",
    ".pcm": "pcm",
    ".raw": "pcm",
    ".flac": "flac",
    ".mp3": "mp3",
    ".opus": "opus",
    ".ogg": "opus",
    ".oga": "opus",
    ".aac": "aac",
    ".m4a": "m4a",
    ".m4b": "m4b",
}


def get_format(fmt: str) -> AudioFormat:
    """Look a format up by name or alias, case-insensitively."""
    key = (fmt or "").strip().lower().lstrip(".")
    key = _ALIASES.get(key, key)
    try:
        return FORMATS[key]
    except KeyError:
        raise UnsupportedFormat(fmt, list(FORMATS)) from None


def format_from_path(path: str | PurePath) -> str:
    """The canonical format name for a file name, from its extension."""
    suffix = PurePath(path).suffix.lower()
    try:
        return _EXTENSIONS[suffix]
    except KeyError:
        raise UnsupportedFormat(suffix or str(path), list(FORMATS)) from None
