"""Reading audio files (wav, flac, ogg, mp3, and whatever FFmpeg decodes) into mono float32.

soundfile (libsndfile) reads the common lossless and Vorbis/Opus formats; MP3 and anything
libsndfile rejects goes through PyAV (FFmpeg), whose MP3 decoder handles encoder delay the
way FFmpeg-based loaders do. Multi-channel audio is downmixed by averaging the channels,
block by block: a file's channels and rate are checked from its header first, and only
the mono result is ever held whole.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import soundfile as sf

from lowvox.errors import InvalidRequest

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

AudioSource = str | Path | bytes | bytearray | memoryview | BinaryIO

# Resampling looks at most a few dozen samples ahead; this much extra audio read past a
# length limit makes the cut identical to resampling the whole file and cutting afterwards.
_READ_MARGIN_SECONDS = 0.5
# Frames decoded at a time: 64k frames of 8 channels are 2 MiB of float32.
_BLOCK_FRAMES = 65_536
# What any audio file may declare (a WAV header can claim 65535 channels or a 4 GHz rate).
MAX_CHANNELS = 32
MIN_RATE = 1_000
MAX_RATE = 384_000


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


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder may be asked to do, checked against the file's header before any
    audio is decoded: channels x rate x seconds is the work (and, undecoded in blocks, the
    memory) a file can demand."""

    max_channels: int = MAX_CHANNELS
    min_rate: int = MIN_RATE
    max_rate: int = MAX_RATE

    def check(self, channels: int, rate: int) -> None:
        if not 1 <= channels <= self.max_channels:
            raise InvalidRequest(
                f"the audio has {channels} channels (allowed 1-{self.max_channels})"
            )
        if not self.min_rate <= rate <= self.max_rate:
            raise InvalidRequest(
                f"the audio's sample rate is {rate} Hz (allowed {self.min_rate}-{self.max_rate})"
            )


class _Mono:
    """Decoded blocks in, mono float32 out: channels averaged block by block and, above
    `rate`, resampled as they come (libswresample, stateful), so what is kept is the mono
    audio at its final rate, never the file's channels at its own rate."""

    def __init__(self, rate: int, target: int | None, limit_seconds: float | None) -> None:
        self.rate = rate
        self.out_rate = target if target is not None and rate > target else rate
        self._resampler = None
        if self.out_rate != rate:
            from lowvox.audio.encode import _Resampler  # PyAV: only when resampling

            self._resampler = _Resampler(rate, self.out_rate)
        # Input frames to read: the limit plus a margin (see _READ_MARGIN_SECONDS).
        self.wanted = None
        if limit_seconds is not None:
            self.wanted = int((limit_seconds + _READ_MARGIN_SECONDS) * rate)
        self.taken = 0
        self.parts: list[np.ndarray] = []

    @property
    def full(self) -> bool:
        return self.wanted is not None and self.taken >= self.wanted

    def push(self, block: np.ndarray) -> None:
        """`block`: [C, n] float32."""
        if self.wanted is not None:
            block = block[:, : self.wanted - self.taken]
        self.taken += block.shape[1]
        mono = block[0] if block.shape[0] == 1 else block.mean(axis=0, dtype=np.float32)
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        self.parts.append(self._resampler.push(mono) if self._resampler is not None else mono)

    def audio(self) -> Audio:
        if self._resampler is not None:
            self.parts.append(self._resampler.flush())
        samples = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        return Audio(np.ascontiguousarray(samples, dtype=np.float32), int(self.out_rate))


def _read_soundfile(
    handle: str | BinaryIO, max_seconds: float | None, rate: int | None, limits: DecodeLimits
) -> Audio | None:
    """Decode with libsndfile; None when it cannot (or should not, for MP3) read the data."""
    try:
        f = sf.SoundFile(handle)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        logger.debug("soundfile could not read the audio (%s); trying PyAV", e)
        return None
    with f:
        if f.format == "MP3":
            return None
        limits.check(f.channels, f.samplerate)
        mono = _Mono(f.samplerate, rate, max_seconds)
        try:
            while not mono.full:
                block = f.read(frames=_BLOCK_FRAMES, dtype="float32", always_2d=True)  # [n, C]
                if not len(block):
                    break
                mono.push(block.T)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise InvalidRequest(f"could not decode audio: {e}") from e
    return mono.audio()


def _read_pyav(
    handle: str | BinaryIO, max_seconds: float | None, rate: int | None, limits: DecodeLimits
) -> Audio:
    import av  # imported lazily: only MP3 and exotic formats need FFmpeg

    try:
        with av.open(handle, mode="r") as container:
            if not container.streams.audio:
                raise InvalidRequest("the file has no audio stream")
            stream = container.streams.audio[0]
            context = stream.codec_context
            if context is None:
                raise InvalidRequest("the audio stream has no decoder")
            file_rate = int(context.sample_rate or stream.rate or 0)
            limits.check(int(context.channels or 0), file_rate)
            mono = _Mono(file_rate, rate, max_seconds)
            # Planar float keeps channels apart ([C, n] per frame) without changing the rate.
            converter = av.AudioResampler(format="fltp")
            for frame in container.decode(stream):
                if (
                    frame.sample_rate != file_rate
                    or len(frame.layout.channels) > limits.max_channels
                ):
                    raise InvalidRequest("the audio changes its rate or channels midway")
                for out in converter.resample(frame):
                    mono.push(out.to_ndarray())
                if mono.full:
                    break
    except InvalidRequest:
        raise
    except Exception as e:  # noqa: BLE001 -- FFmpeg on hostile input: any failure is a bad file
        raise InvalidRequest(f"could not decode audio: {e}") from e
    return mono.audio()


def read_audio(
    source: AudioSource,
    *,
    max_seconds: float | None = None,
    max_rate: int | None = None,
    limits: DecodeLimits | None = None,
    name: str | None = None,
) -> Audio:
    """Decode an audio file, bytes or binary file object to mono float32.

    The file's header is checked against `limits` (channels, sample rate) before any
    audio is decoded; decoding then goes block by block, each block averaged to mono
    (and resampled to `max_rate` when the file's rate is above it), so memory follows the
    mono result, not the file. `max_seconds` stops decoding a little after that much
    audio (long uploads stay cheap). Raises InvalidRequest for missing, empty, non-audio,
    out-of-limits or corrupt input, naming the source (`name`: what to call bytes or a file
    object, e.g. the file they were read from).
    """
    name = name or _describe(source)
    handle = _open(source)
    limits = limits or DecodeLimits()
    try:
        audio = _read_soundfile(handle, max_seconds, max_rate, limits)
        if audio is None:
            _rewind(handle)
            audio = _read_pyav(handle, max_seconds, max_rate, limits)
    except InvalidRequest as e:
        raise InvalidRequest(f"not a readable audio file: {name} ({e})") from e
    if audio.samples.size == 0:
        raise InvalidRequest(f"audio is empty: {name}")
    if not np.isfinite(audio.samples).all():
        raise InvalidRequest(f"audio contains invalid (NaN or infinite) samples: {name}")
    return audio


def load_audio(
    source: AudioSource | Audio,
    sample_rate: int,
    *,
    max_seconds: float | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Audio as a `[1, N]` float32 tensor at `sample_rate`, clipped to [-1, 1].

    With `max_seconds`, N is at most `max_seconds * sample_rate` (the cut is made after
    resampling, so it matches resampling the whole file). `name`: as for `read_audio`.
    """
    import torch  # the engines' path: reading alone (voice uploads) needs no torch

    from lowvox.audio.resample import resample

    if isinstance(source, Audio):
        audio = source
    else:
        audio = read_audio(source, max_seconds=max_seconds, name=name)
    wave = torch.from_numpy(audio.samples).unsqueeze(0)  # [1, N]
    wave = resample(wave, audio.sample_rate, sample_rate)
    if max_seconds is not None:
        wave = wave[:, : int(max_seconds * sample_rate)]
    return wave.clamp(-1.0, 1.0)
