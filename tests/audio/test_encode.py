"""Every output format must decode back (with FFmpeg/libsndfile) to the signal that went in."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest
import soundfile as sf

from lowvox.audio.encode import (
    FORMATS,
    StreamEncoder,
    encode_audio,
    format_from_path,
    get_format,
    output_rate,
    streaming_wav_header,
    wav_header,
)
from lowvox.errors import InvalidRequest, LowvoxError, UnsupportedFormat

ALL_FORMATS = ["wav", "pcm", "flac", "mp3", "opus", "aac", "m4a"]
LOSSLESS = {"wav", "pcm", "flac"}
RATES = [22050, 24000]
FREQ = 440.0
AMPLITUDE = 0.5
DURATION = 1.5


def sine(rate: int, seconds: float = DURATION, freq: float = FREQ) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (AMPLITUDE * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode(data: bytes, fmt: str, rate: int) -> tuple[np.ndarray, int, int]:
    """Samples [T] as float, sample rate and channel count, read by a decoder of its own."""
    if fmt == "pcm":
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        return x, rate, 1
    # ADTS is named, as its media type names it to players: FFmpeg's guess from the bytes
    # alone wants more than the few frames of a very short file.
    with av.open(io.BytesIO(data), format="aac" if fmt == "aac" else None) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray() for f in container.decode(stream)]
        out_rate = stream.codec_context.sample_rate
        channels = stream.codec_context.channels
    if not frames:
        return np.zeros(0, np.float32), out_rate, channels
    x = np.concatenate(frames, axis=1)  # [C, T] (planar) or [1, T*C] (packed)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    return x.reshape(-1).astype(np.float32), out_rate, channels


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    mid = x[len(x) // 4 : 3 * len(x) // 4]  # away from codec fade-in/out
    spectrum = np.abs(np.fft.rfft(mid * np.hanning(len(mid))))
    return float(np.fft.rfftfreq(len(mid), 1 / rate)[np.argmax(spectrum)])


def check_same_signal(data: bytes, fmt: str, rate: int, expected: np.ndarray) -> None:
    x, out_rate, channels = decode(data, fmt, rate)
    assert channels == 1
    assert out_rate == output_rate(fmt, rate)
    if fmt != "opus" and rate in RATES:
        assert out_rate == rate  # these rates need no conversion
    duration = len(x) / out_rate
    want = len(expected) / rate
    # Lossy codecs may add up to a few frames of encoder delay/padding, never lose audio.
    assert want - 0.01 <= duration <= want + 0.1, (fmt, duration)
    if fmt in LOSSLESS:
        assert len(x) == len(expected)
        np.testing.assert_allclose(x, expected, atol=2e-4)
    else:
        assert abs(dominant_frequency(x, out_rate) - FREQ) < 5
        rms = float(np.sqrt(np.mean(x[len(x) // 4 : 3 * len(x) // 4] ** 2)))
        assert abs(rms - AMPLITUDE / np.sqrt(2)) < 0.05, rms


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_whole_file_round_trip(fmt: str, rate: int) -> None:
    signal = sine(rate)
    check_same_signal(encode_audio(signal, rate, fmt), fmt, rate, signal)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_stream_round_trip(fmt: str, rate: int) -> None:
    signal = sine(rate)
    encoder = StreamEncoder(fmt, rate)
    block = rate // 10
    parts = [encoder.write(signal[i : i + block]) for i in range(0, len(signal), block)]
    data = b"".join(parts) + encoder.close()
    check_same_signal(data, fmt, rate, signal)
    assert encoder.media_type == FORMATS[fmt].media_type


@pytest.mark.parametrize("fmt", ["mp3", "aac", "opus", "m4a"])
def test_rate_the_encoder_does_not_take_is_resampled(fmt: str) -> None:
    rate = 50_000  # no MP3, AAC or Opus encoder takes this rate
    assert output_rate(fmt, rate) != rate
    signal = sine(rate)
    check_same_signal(encode_audio(signal, rate, fmt), fmt, rate, signal)
    encoder = StreamEncoder(fmt, rate)
    assert encoder.output_rate == output_rate(fmt, rate)
    data = encoder.write(signal) + encoder.close()
    check_same_signal(data, fmt, rate, signal)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_stream_emits_bytes_before_close(fmt: str) -> None:
    rate = 24000
    seconds = 8
    signal = sine(rate, seconds=seconds)
    encoder = StreamEncoder(fmt, rate)
    block = rate // 10
    parts = [encoder.write(signal[i : i + block]) for i in range(0, len(signal), block)]
    tail = encoder.close()
    early = sum(len(p) for p in parts)
    # Most of the file must have left before the end, at least a piece per second.
    assert early > 0.8 * (early + len(tail))
    assert sum(1 for p in parts if p) >= seconds


def test_whole_wav_has_exact_sizes() -> None:
    signal = sine(22050)
    data = encode_audio(signal, 22050, "wav")
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.frames) == (22050, 1, len(signal))
    assert info.subtype == "PCM_16"


def test_streaming_wav_header_has_unknown_sizes() -> None:
    encoder = StreamEncoder("wav", 24000)
    first = encoder.write(sine(24000, 0.1))
    riff, riff_size, wave = struct.unpack("<4sI4s", first[:12])
    assert (riff, wave) == (b"RIFF", b"WAVE")
    assert riff_size == 0xFFFFFFFF
    assert first[36:40] == b"data"
    assert struct.unpack("<I", first[40:44])[0] == 0xFFFFFFFF
    (rate,) = struct.unpack("<I", first[24:28])
    assert rate == 24000
    # Only the first piece carries the header.
    second = encoder.write(sine(24000, 0.1))
    assert len(second) == 2 * 2400
    assert encoder.close() == b""
    # libsndfile reads such a stream to its end.
    x, sr = sf.read(io.BytesIO(first + second), dtype="float32")
    assert sr == 24000 and len(x) == 4800


def test_wav_header_past_riffs_32_bits_marks_the_length_unknown() -> None:
    # The largest file RIFF can size (36 + 2 * n <= 2**32 - 1) keeps exact sizes; one
    # sample more (a FileEncoder closing ~24.8 h of 24 kHz audio) gets the streaming
    # header, which FFmpeg reads to the end of the file, instead of failing at the end.
    largest = (0xFFFFFFFF - 36) // 2
    riff_size, data_size = struct.unpack("<4xI32xI", wav_header(24000, largest))
    assert (riff_size, data_size) == (36 + 2 * largest, 2 * largest)
    assert wav_header(24000, largest + 1) == streaming_wav_header(24000)
    assert wav_header(24000, 2**40) == streaming_wav_header(24000)


def test_pcm_is_headerless_s16le() -> None:
    signal = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0], dtype=np.float32)
    data = encode_audio(signal, 24000, "pcm")
    assert np.frombuffer(data, "<i2").tolist() == [0, 16384, -16384, 32767, -32767, 32767]


@pytest.mark.parametrize("samples", [0, 3])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_empty_input_gives_a_valid_file(fmt: str, samples: int) -> None:
    """No audio, or a few samples (which a resampler and an encoder may hold back
    entirely: Opus made a file without one packet), still make a file that decodes."""
    empty = np.full(samples, 0.1, dtype=np.float32)
    whole = encode_audio(empty, 24000, fmt)
    encoder = StreamEncoder(fmt, 24000)
    streamed = encoder.write(empty) + encoder.close()
    for data in (whole, streamed):
        if not data:
            assert fmt == "pcm"  # the only format without any header
            continue
        x, _, channels = decode(data, fmt, 24000)
        assert channels == 1
        assert len(x) < 0.1 * output_rate(fmt, 24000)


def test_unknown_format_is_rejected() -> None:
    signal = sine(24000, 0.1)
    with pytest.raises(UnsupportedFormat):
        encode_audio(signal, 24000, "xyz")
    with pytest.raises(UnsupportedFormat):
        StreamEncoder("wma", 24000)
    with pytest.raises(UnsupportedFormat):
        get_format("")
    with pytest.raises(UnsupportedFormat):
        format_from_path("speech.wma")
    with pytest.raises(UnsupportedFormat):
        format_from_path("speech")


def test_format_names_and_paths() -> None:
    assert get_format("WAV").name == "wav"
    assert get_format("ogg").name == "opus"
    assert get_format("raw").name == "pcm"
    expected = {
        "a.wav": "wav",
        "a.pcm": "pcm",
        "a.raw": "pcm",
        "a.flac": "flac",
        "a.MP3": "mp3",
        "a.ogg": "opus",
        "a.opus": "opus",
        "a.aac": "aac",
        "a.m4a": "m4a",
        "dir.v2/out.flac": "flac",
    }
    for path, fmt in expected.items():
        assert format_from_path(path) == fmt
    for name, spec in FORMATS.items():
        assert spec.name == name and spec.media_type.startswith("audio/")
        assert format_from_path("x" + spec.extension) == name


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequest):
        encode_audio(np.zeros((100, 2), np.float32), 24000, "wav")  # stereo
    with pytest.raises(InvalidRequest):
        encode_audio(np.zeros(100, np.int16), 24000, "wav")
    with pytest.raises(InvalidRequest):
        encode_audio(np.zeros(100, np.float32), 0, "wav")
    encoder = StreamEncoder("mp3", 24000)
    encoder.close()
    with pytest.raises(LowvoxError):
        encoder.write(np.zeros(10, np.float32))


def test_out_of_range_and_non_finite_samples_are_clipped() -> None:
    signal = np.array([np.nan, np.inf, -np.inf, 3.0, -3.0], dtype=np.float32)
    data = encode_audio(signal, 24000, "wav")
    x, _ = sf.read(io.BytesIO(data), dtype="int16")
    assert x.tolist() == [0, 32767, -32767, 32767, -32767]


@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3"])
def test_resampling_to_a_fixed_rate_whole_and_streamed(fmt):
    """A caller may ask for a rate (OpenAI's pcm is 24 kHz): duration and pitch survive."""
    rate_in, rate_out = 22_050, 24_000
    x = sine(rate_in)
    whole = encode_audio(x, rate_in, fmt, rate=rate_out)
    enc = StreamEncoder(fmt, rate_in, rate=rate_out)
    streamed = b"".join(enc.write(x[i : i + 1000]) for i in range(0, len(x), 1000)) + enc.close()
    assert enc.output_rate == rate_out
    for data in (whole, streamed):
        y, rate, channels = decode(data, fmt, rate_out)
        assert (rate, channels) == (rate_out, 1)
        assert abs(len(y) / rate - DURATION) < 0.08
        assert abs(dominant_frequency(y, rate) - FREQ) < 5
