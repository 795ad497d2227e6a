"""Audio encoders: float32 mono samples in, file bytes out, whole or as a stream.

WAV and raw PCM are 16-bit little-endian samples behind at most a 44-byte header (a
whole WAV file is written by libsndfile through soundfile; a streamed one starts with a
header of unknown sizes). FLAC and the lossy formats go through FFmpeg's libraries (PyAV),
whose resampler converts the rate where an encoder does not take the input's (Opus is
always encoded at 48 kHz, the rate its decoders play at).
"""

from __future__ import annotations

import functools
import io
import logging
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
import soundfile as sf

from lowvox.audio.formats import FORMATS, AudioFormat, format_from_path, get_format
from lowvox.errors import InvalidRequest, LowvoxError

__all__ = [
    "FORMATS",
    "AudioFormat",
    "FileEncoder",
    "StreamEncoder",
    "encode_audio",
    "format_from_path",
    "get_format",
    "output_rate",
    "streaming_wav_header",
    "wav_header",
]

logger = logging.getLogger(__name__)

# RIFF and data sizes of a WAV whose length is not known yet; browsers, FFmpeg and
# libsndfile read such a file up to its end.
_UNKNOWN_SIZE = 0xFFFFFFFF


@dataclass(frozen=True)
class _AvSpec:
    """How one format is made with FFmpeg: muxer, encoder and its settings."""

    muxer: str
    codec: str
    sample_format: str  # what the encoder takes; the resampler converts to it
    force_rate: int | None = None  # else the input rate, if the encoder takes it
    bit_rate: int | None = None
    container_options: tuple[tuple[str, str], ...] = ()
    stream_options: tuple[tuple[str, str], ...] = ()  # added when streaming
    pad_empty: bool = True  # give empty input a few ms of silence (see `_AvEncoder.close`)

    def output_rate(self, rate: int) -> int:
        if self.force_rate is not None:
            return self.force_rate
        rates = _encoder_rates(self.codec)
        if rates is None or rate in rates:
            return rate
        # The nearest rate at or above the input keeps all of its bandwidth.
        higher = [r for r in rates if r >= rate]
        return min(higher) if higher else max(rates)


@functools.cache
def _encoder_rates(codec: str) -> tuple[int, ...] | None:
    """The sample rates an FFmpeg encoder accepts; None when it takes any."""
    rates = av.Codec(codec, "w").audio_rates
    return tuple(rates) if rates else None


_AV_SPECS: dict[str, _AvSpec] = {
    "mp3": _AvSpec("mp3", "libmp3lame", "s16p", bit_rate=64_000),
    # Ogg pages are cut every 100 ms (default: 1 s) so that a stream starts promptly.
    "opus": _AvSpec(
        "ogg",
        "libopus",
        "flt",
        force_rate=48_000,
        bit_rate=48_000,
        container_options=(("page_duration", "100000"),),
    ),
    "aac": _AvSpec("adts", "aac", "fltp", bit_rate=64_000),
    # AAC in MP4. A stream is a fragmented MP4: an empty 'moov' up front, then a
    # fragment every 0.5 s, since a plain MP4 needs its index written at the end.
    "m4a": _AvSpec(
        "ipod",
        "aac",
        "fltp",
        bit_rate=64_000,
        stream_options=(
            ("movflags", "frag_keyframe+empty_moov+default_base_moof"),
            ("frag_duration", "500000"),
        ),
    ),
    # No 8 KiB padding block reserved for later tag edits.
    "flac": _AvSpec(
        "flac",
        "flac",
        "s16",
        container_options=(("metadata_header_padding", "0"),),
        pad_empty=False,
    ),
}
# An audiobook without chapters (a request's audio) is AAC in MP4, as m4a; books with
# chapters and a cover are written by `lowvox.jobs.assemble`.
_AV_SPECS["m4b"] = _AV_SPECS["m4a"]

# Small I/O buffer and one flush per packet, so that encoded bytes reach `write`'s
# caller as soon as FFmpeg has them instead of 32 KiB later.
_AV_BUFFER_SIZE = 4096


def output_rate(fmt: str, sample_rate: int) -> int:
    """The sample rate a file of format `fmt` made from `sample_rate` audio will have."""
    spec = _AV_SPECS.get(get_format(fmt).name)
    return spec.output_rate(sample_rate) if spec is not None else sample_rate


def _check_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise InvalidRequest(f"sample rate must be an integer, got {sample_rate!r}")
    if not 1000 <= int(sample_rate) <= 384_000:
        raise InvalidRequest(f"sample rate {sample_rate} Hz is out of range (1000-384000)")
    return int(sample_rate)


def _as_mono(samples: Any) -> np.ndarray:
    """float32 mono samples in [-1, 1]; NaN/inf become silence/full scale."""
    x = np.asarray(samples)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)  # [T, 1] or [1, T] -> [T]
    if x.ndim != 1:
        raise InvalidRequest(f"expected mono audio (1-D samples), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidRequest(f"expected float samples, got {x.dtype}")
    x = np.nan_to_num(x.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(x, -1.0, 1.0)


def _to_s16le(x: np.ndarray) -> bytes:
    return np.round(x * 32767.0).astype("<i2").tobytes()


def wav_header(sample_rate: int, num_samples: int | None) -> bytes:
    """A 44-byte header for mono 16-bit PCM; `num_samples=None` marks the length unknown.
    So does a length whose sizes do not fit RIFF's 32 bits (a file over 4 GiB, ~24.8 h
    at 24 kHz): FFmpeg reads such a file to its end, as it reads a stream, where exact
    sizes would not fit the header at all (closing the file used to fail)."""
    data_size = None if num_samples is None else 2 * num_samples
    if data_size is None or 36 + data_size > _UNKNOWN_SIZE:
        riff_size = data_size = _UNKNOWN_SIZE
    else:
        riff_size = 36 + data_size
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        riff_size,
        b"WAVE",
        b"fmt ",
        16,  # fmt chunk size
        1,  # PCM
        1,  # channels
        sample_rate,
        sample_rate * 2,  # byte rate
        2,  # block align
        16,  # bits per sample
        b"data",
        data_size,
    )


def streaming_wav_header(sample_rate: int) -> bytes:
    return wav_header(sample_rate, None)


def _encode_wav(x: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    pcm = np.round(x * 32767.0).astype(np.int16)
    try:
        sf.write(buf, pcm, sample_rate, format="WAV", subtype="PCM_16")
    except (sf.LibsndfileError, RuntimeError) as e:
        raise LowvoxError(f"could not encode WAV audio: {e}") from e
    return buf.getvalue()


class _Sink:
    """A write-only file for FFmpeg: collects bytes until they are taken.

    It has no seek/tell, so muxers write a stream they never come back to patch.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes | memoryview) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


class _AvEncoder:
    """One FFmpeg output: resampler -> encoder -> muxer -> file object."""

    def __init__(self, spec: _AvSpec, sample_rate: int, file: Any, *, streaming: bool) -> None:
        self.input_rate = sample_rate
        self.output_rate = spec.output_rate(sample_rate)
        self._time_base = Fraction(1, sample_rate)
        self._next_pts = 0
        self._pad_empty = spec.pad_empty
        options = {"flush_packets": "1", **dict(spec.container_options)}
        if streaming:
            options.update(spec.stream_options)
        try:
            self._container = av.open(
                file,
                "w",
                format=spec.muxer,
                buffer_size=_AV_BUFFER_SIZE,
                container_options=options,
            )
        except (av.FFmpegError, ValueError) as e:
            raise LowvoxError(f"cannot open a {spec.muxer} output: {e}") from e
        try:
            stream = self._container.add_stream(spec.codec, rate=self.output_rate, layout="mono")
            assert isinstance(stream, av.AudioStream)
            self._stream = stream
            self._stream.codec_context.format = spec.sample_format
            if spec.bit_rate is not None:
                self._stream.codec_context.bit_rate = spec.bit_rate
            # The encoder itself cuts what it gets into its frame size; this only changes
            # rate and sample format.
            self._resampler = av.AudioResampler(
                format=spec.sample_format, layout="mono", rate=self.output_rate
            )
            # Write the container header now: a stream starts with it, and a file of
            # no samples is still a valid (empty) file rather than zero bytes.
            self._container.start_encoding()
        except (av.FFmpegError, ValueError) as e:
            self._container.close()
            raise LowvoxError(f"cannot set up the {spec.codec} encoder: {e}") from e

    def write(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.input_rate
        frame.time_base = self._time_base
        frame.pts = self._next_pts
        self._next_pts += len(x)
        self._encode(self._resampler.resample(frame))

    def close(self) -> None:
        try:
            short = self.input_rate // 100 - self._next_pts
            if short > 0 and self._pad_empty:
                # A lossy stream of no frames is unreadable for most decoders (FFmpeg
                # included), and a few samples can be held back whole by the resampler
                # and the encoder; silence up to 10 ms makes it a valid, near-empty file.
                self.write(np.zeros(short, np.float32))
            self._encode(self._resampler.resample(None))
            self._mux(self._stream.encode(None))
        finally:
            self._container.close()

    def _encode(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            self._mux(self._stream.encode(frame))

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)


class _Resampler:
    """Stateful rate conversion of float32 mono audio through libswresample, for callers
    that need a fixed rate (OpenAI's pcm is 24 kHz whatever the engine makes)."""

    def __init__(self, source_rate: int, target_rate: int) -> None:
        self.source_rate = source_rate
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
        self._pts = 0

    @staticmethod
    def _samples(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros(0, np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32)

    def push(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.zeros(0, np.float32)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(x, np.float32).reshape(1, -1), format="flt", layout="mono"
        )
        frame.sample_rate = self.source_rate
        frame.pts = self._pts
        self._pts += len(x)
        return self._samples(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        return self._samples(self._resampler.resample(None))


def _mono_at_rate(samples: Any, resampler: _Resampler | None) -> np.ndarray:
    """An encoder's input as it encodes it: mono float32, resampled where it must be."""
    x = _as_mono(samples)
    return resampler.push(x) if resampler is not None else x


def _resampling(sample_rate: int, rate: int | None) -> tuple[int, _Resampler | None]:
    """The rate audio at `sample_rate` is encoded at, and the resampler that gets it
    there (None when `rate` is None or already `sample_rate`)."""
    source = _check_rate(sample_rate)
    if rate is None or _check_rate(rate) == source:
        return source, None
    return rate, _Resampler(source, rate)


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str, rate: int | None = None) -> bytes:
    """A complete file of format `fmt` (name or alias) holding `samples`.

    `samples` is float32 mono in [-1, 1] at `sample_rate`; with `rate` the audio is
    resampled to that rate first. Sizes in headers are exact (a WAV here has real sizes;
    the streaming variant is `StreamEncoder`).
    """
    spec_format = get_format(fmt)
    x = _as_mono(samples)
    rate, resampler = _resampling(sample_rate, rate)
    if resampler is not None:
        x = np.concatenate([resampler.push(x), resampler.flush()])
    name = spec_format.name
    if name == "pcm":
        return _to_s16le(x)
    if name == "wav":
        return _encode_wav(x, rate)
    # A seekable BytesIO lets muxers go back and fill in what they learn at the end
    # (FLAC's STREAMINFO length and checksum, the MP3 Xing/LAME frame with the length
    # and encoder delay).
    buf = io.BytesIO()
    encoder = _AvEncoder(_AV_SPECS[name], rate, buf, streaming=False)
    try:
        encoder.write(x)
    finally:
        encoder.close()
    return buf.getvalue()


class FileEncoder:
    """Encodes audio that arrives in pieces into a complete file, as `encode_audio` would
    make it from the whole audio, written to a seekable binary file as it comes.

    Nothing but the encoder's own small buffers is held: a long output costs the file's
    size on `file` (a disk file, a spooled temporary), not memory. `close` fills in what
    is only known at the end (WAV sizes, FLAC's STREAMINFO, MP3's length frame).
    """

    def __init__(self, fmt: str, sample_rate: int, file: Any, rate: int | None = None) -> None:
        """`rate`: resample to this rate first (default: keep `sample_rate`)."""
        self.format: AudioFormat = get_format(fmt)
        self.sample_rate, self._resampler = _resampling(sample_rate, rate)
        self._file = file
        self._start = file.tell()
        self._samples = 0
        self._closed = False
        self._av: _AvEncoder | None = None
        spec = _AV_SPECS.get(self.format.name)
        if spec is not None:
            self._av = _AvEncoder(spec, self.sample_rate, file, streaming=False)
        elif self.format.name == "wav":
            file.write(wav_header(self.sample_rate, 0))  # sizes filled in by close()
        self.output_rate = self._av.output_rate if self._av is not None else self.sample_rate

    def write(self, samples: np.ndarray) -> None:
        if self._closed:
            raise LowvoxError("write to a closed FileEncoder")
        self._encode(_mono_at_rate(samples, self._resampler))

    def _encode(self, x: np.ndarray) -> None:
        if self._av is not None:
            try:
                self._av.write(x)
            except av.FFmpegError as e:
                raise LowvoxError(f"{self.format.name} encoding failed: {e}") from e
            return
        self._file.write(_to_s16le(x))
        self._samples += len(x)

    def close(self) -> None:
        """Finish the file (closing twice does nothing) and free the FFmpeg objects, even
        when finishing fails. The file object stays open."""
        if self._closed:
            return
        try:
            if self._resampler is not None:
                self._encode(self._resampler.flush())
            if self._av is not None:
                try:
                    self._av.close()
                except av.FFmpegError as e:
                    raise LowvoxError(f"{self.format.name} encoding failed: {e}") from e
            elif self.format.name == "wav":
                end = self._file.tell()
                self._file.seek(self._start)
                self._file.write(wav_header(self.sample_rate, self._samples))
                self._file.seek(end)
        finally:
            self._closed = True
            # Their codec and resampler threads end now, not when a reference cycle that
            # holds this encoder (a cut stream's) is collected.
            self._av = self._resampler = None


class StreamEncoder:
    """Encodes audio that arrives in pieces; every call returns the bytes ready to send.

    `write` returns what can go on the wire now (possibly b"" while an encoder fills a
    frame); `close` returns the tail. Concatenated, the outputs are one valid file.
    """

    def __init__(self, fmt: str, sample_rate: int, rate: int | None = None) -> None:
        """`rate`: resample to this rate first (default: keep `sample_rate`)."""
        self.format: AudioFormat = get_format(fmt)
        self.sample_rate, self._resampler = _resampling(sample_rate, rate)
        self._header_sent = False
        self._closed = False
        self._av: _AvEncoder | None = None
        self._sink = _Sink()  # the encoder's output, taken after each write
        spec = _AV_SPECS.get(self.format.name)
        if spec is not None:
            self._av = _AvEncoder(spec, self.sample_rate, self._sink, streaming=True)
        self.output_rate = self._av.output_rate if self._av is not None else self.sample_rate

    @property
    def media_type(self) -> str:
        return self.format.media_type

    def write(self, samples: np.ndarray) -> bytes:
        if self._closed:
            raise LowvoxError("write to a closed StreamEncoder")
        return self._encode(_mono_at_rate(samples, self._resampler))

    def _encode(self, x: np.ndarray) -> bytes:
        if self._av is not None:
            try:
                self._av.write(x)
            except av.FFmpegError as e:
                raise LowvoxError(f"{self.format.name} encoding failed: {e}") from e
            return self._sink.take()
        return self._start() + _to_s16le(x)

    def close(self) -> bytes:
        """Finish the stream and free the FFmpeg objects, even when finishing fails;
        returns the last bytes. Closing twice returns b""."""
        if self._closed:
            return b""
        try:
            tail = self._encode(self._resampler.flush()) if self._resampler is not None else b""
            if self._av is not None:
                try:
                    self._av.close()
                except av.FFmpegError as e:
                    raise LowvoxError(f"{self.format.name} encoding failed: {e}") from e
                return tail + self._sink.take()
            return tail + self._start()
        finally:
            self._closed = True
            # Their codec and resampler threads end now, not when a reference cycle that
            # holds this encoder (a cut stream's) is collected.
            self._av = self._resampler = None

    def _start(self) -> bytes:
        """The WAV header, once, before the first samples (or at close when there were none)."""
        if self._header_sent or self.format.name != "wav":
            return b""
        self._header_sent = True
        return streaming_wav_header(self.sample_rate)

    def __enter__(self) -> StreamEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
