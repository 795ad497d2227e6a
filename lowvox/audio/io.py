"""Reading audio files (wav, flac, ogg, mp3, and whatever FFmpeg decodes) into mono float32.

soundfile (libsndfile) reads the common lossless and Vorbis/Opus formats; MP3 and anything
libsndfile rejects goes through PyAV (FFmpeg), whose MP3 decoder handles encoder delay the
way FFmpeg-based loaders do. Multi-channel audio is downmixed by averaging the channels.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch

from lowvox.audio.resample import resample
from lowvox.errors import InvalidRequest

logger = logging.getLogger(__name__)

AudioSource = str | Path | bytes | bytearray | memoryview | BinaryIO

# Resampling looks at most a few dozen samples ahead; this much extra audio read past a
# length limit makes the cut identical to resampling the whole file and cutting afterwards.
_READ_MARGIN_SECONDS = 0.5


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples (not clipped) and their sample rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def _describe(source: AudioSource) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return "<audio data>"


def _open(source: AudioSource) -> str | BinaryIO:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source))
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise InvalidRequest(f"audio file not found: {path}")
        return str(path)
    return source


def _rewind(handle: str | BinaryIO) -> None:
    if not isinstance(handle, str):
        handle.seek(0)


def _read_soundfile(handle: str | BinaryIO, max_seconds: float | None) -> Audio | None:
    """Decode with libsndfile; None when it cannot (or should not, for MP3) read the data."""
    try:
        with sf.SoundFile(handle) as f:
            if f.format == "MP3":
                return None
            frames = -1
            if max_seconds is not None:
                frames = int((max_seconds + _READ_MARGIN_SECONDS) * f.samplerate)
            data = f.read(frames=frames, dtype="float32", always_2d=True)  # [N, C]
            rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        logger.debug("soundfile could not read the audio (%s); trying PyAV", e)
        return None
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return Audio(np.ascontiguousarray(mono, dtype=np.float32), int(rate))


def _read_pyav(handle: str | BinaryIO, max_seconds: float | None) -> Audio:
    import av  # imported lazily: only MP3 and exotic formats need FFmpeg

    try:
        with av.open(handle, mode="r") as container:
            if not container.streams.audio:
                raise InvalidRequest("the file has no audio stream")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            if rate <= 0:
                raise InvalidRequest("the audio stream has no sample rate")
            limit = None
            if max_seconds is not None:
                limit = int((max_seconds + _READ_MARGIN_SECONDS) * rate)
            # Planar float keeps channels apart ([C, n] per frame) without changing the rate.
            converter = av.AudioResampler(format="fltp")
            parts: list[np.ndarray] = []
            total = 0
            for frame in container.decode(stream):
                for out in converter.resample(frame):
                    block = out.to_ndarray()  # [C, n]
                    parts.append(block.mean(axis=0, dtype=np.float32))
                    total += block.shape[1]
                if limit is not None and total >= limit:
                    break
    except InvalidRequest:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise InvalidRequest(f"could not decode audio: {e}") from e
    samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if limit is not None:
        samples = samples[:limit]
    return Audio(np.ascontiguousarray(samples, dtype=np.float32), rate)


def read_audio(source: AudioSource, *, max_seconds: float | None = None) -> Audio:
    """Decode an audio file, bytes or binary file object to mono float32 at its own rate.

    `max_seconds` stops decoding a little after that much audio (long uploads stay cheap).
    Raises InvalidRequest for missing, empty, non-audio or corrupt input.
    """
    name = _describe(source)
    handle = _open(source)
    audio = _read_soundfile(handle, max_seconds)
    if audio is None:
        _rewind(handle)
        try:
            audio = _read_pyav(handle, max_seconds)
        except InvalidRequest as e:
            raise InvalidRequest(f"not a readable audio file: {name} ({e})") from e
    if audio.samples.size == 0:
        raise InvalidRequest(f"audio is empty: {name}")
    if not np.isfinite(audio.samples).all():
        raise InvalidRequest(f"audio contains invalid (NaN or infinite) samples: {name}")
    return audio


def load_audio(
    source: AudioSource | Audio, sample_rate: int, *, max_seconds: float | None = None
) -> torch.Tensor:
    """Audio as a `[1, N]` float32 tensor at `sample_rate`, clipped to [-1, 1].

    With `max_seconds`, N is at most `max_seconds * sample_rate` (the cut is made after
    resampling, so it matches resampling the whole file).
    """
    audio = source if isinstance(source, Audio) else read_audio(source, max_seconds=max_seconds)
    wave = torch.from_numpy(audio.samples).unsqueeze(0)  # [1, N]
    wave = resample(wave, audio.sample_rate, sample_rate)
    if max_seconds is not None:
        wave = wave[:, : int(max_seconds * sample_rate)]
    return wave.clamp(-1.0, 1.0)
