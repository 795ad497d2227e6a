"""Reading reference audio: formats, downmix, bytes and file objects, and bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lowvox.audio.io import Audio, load_audio, read_audio
from lowvox.audio.resample import resample
from lowvox.errors import InvalidRequest
from tests.tolerance import snr_db

RATE = 22050


def signal(seconds: float = 1.0, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    chans = [0.4 * np.sin(2 * np.pi * (220.0 * (c + 1)) * t) for c in range(channels)]
    return np.stack(chans, axis=1).astype(np.float32)  # [N, C]


def test_wav_int16_reads_as_scaled_floats(tmp_path: Path) -> None:
    pcm = (signal()[:, 0] * 32767).astype(np.int16)
    path = tmp_path / "a.wav"
    sf.write(path, pcm, RATE, subtype="PCM_16")
    audio = read_audio(path)
    assert audio.sample_rate == RATE and audio.samples.dtype == np.float32
    np.testing.assert_array_equal(audio.samples, pcm.astype(np.float32) / 32768)


def test_stereo_is_downmixed_by_averaging(tmp_path: Path) -> None:
    x = signal(channels=2)
    path = tmp_path / "s.wav"
    sf.write(path, x, RATE, subtype="FLOAT")
    audio = read_audio(path)
    np.testing.assert_allclose(audio.samples, x.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize(
    ("fmt", "subtype", "min_snr"), [("FLAC", "PCM_16", 80), ("OGG", "VORBIS", 15)]
)
def test_flac_and_ogg(tmp_path: Path, fmt: str, subtype: str, min_snr: float) -> None:
    x = signal()[:, 0]
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, x, RATE, format=fmt, subtype=subtype)
    audio = read_audio(path)
    assert audio.sample_rate == RATE
    n = min(len(x), len(audio.samples))
    assert abs(len(audio.samples) - len(x)) < RATE // 10
    assert snr_db(x[:n], audio.samples[:n]) > min_snr


def aligned_snr_db(reference: np.ndarray, decoded: np.ndarray) -> float:
    """SNR after removing the codec's delay (found by cross-correlation)."""
    lag = int(np.argmax(np.correlate(decoded[:6000], reference[:3000], mode="valid")))
    seg = decoded[lag : lag + len(reference) - 4000]
    return snr_db(reference[: len(seg)], seg)


def _encoded_bytes(
    x: np.ndarray, rate: int, channels: int, container: str = "mp3", codec: str = "libmp3lame"
) -> bytes:
    """Encode `[N, C]` float audio with FFmpeg into a container, in memory."""
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo" if channels == 2 else "mono")
        # Packed float frames; PyAV converts them to the codec's own sample format/framing.
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(x.reshape(1, -1)), format="flt", layout=stream.layout.name
        )
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_mp3_stereo_bytes_decode_via_ffmpeg() -> None:
    x = signal(channels=2, rate=24000)
    try:
        data = _encoded_bytes(x, 24000, 2)
    except Exception as e:  # no MP3 encoder in this FFmpeg build
        pytest.skip(f"cannot encode mp3 here: {e}")
    audio = read_audio(data)
    assert audio.sample_rate == 24000
    assert aligned_snr_db(x.mean(axis=1), audio.samples) > 15


def test_aac_in_mp4_is_read_through_ffmpeg(tmp_path: Path) -> None:
    # libsndfile cannot read MP4/AAC at all, so this exercises the FFmpeg fallback.
    x = signal(channels=1, rate=22050)
    try:
        data = _encoded_bytes(x, 22050, 1, container="mp4", codec="aac")
    except Exception as e:  # no AAC encoder in this FFmpeg build
        pytest.skip(f"cannot encode aac here: {e}")
    path = tmp_path / "voice.m4a"
    path.write_bytes(data)
    audio = read_audio(path)
    assert audio.sample_rate == 22050
    assert abs(len(audio.samples) - len(x)) < 22050 // 5
    assert aligned_snr_db(x[:, 0], audio.samples) > 10


def test_bytes_and_file_objects_read_like_paths(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, signal()[:, 0], 16000)
    from_path = read_audio(path)
    from_bytes = read_audio(path.read_bytes())
    with path.open("rb") as f:
        from_file = read_audio(f)
    for other in (from_bytes, from_file):
        assert other.sample_rate == from_path.sample_rate
        np.testing.assert_array_equal(other.samples, from_path.samples)


@pytest.mark.parametrize(
    "data",
    [b"", b"this is not audio at all, just some text\n" * 20, bytes(range(256)) * 40],
    ids=["empty", "text", "noise"],
)
def test_non_audio_is_invalid_request(data: bytes, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        read_audio(data)
    path = tmp_path / "bad.wav"
    path.write_bytes(data)
    with pytest.raises(InvalidRequest):
        read_audio(path)


def test_truncated_wav_and_missing_file_are_invalid_requests(tmp_path: Path) -> None:
    buf = io.BytesIO()
    sf.write(buf, signal()[:, 0], RATE, format="WAV")
    with pytest.raises(InvalidRequest):
        read_audio(buf.getvalue()[:30])  # header cut in the middle
    with pytest.raises(InvalidRequest):
        read_audio(tmp_path / "missing.wav")


def test_wav_without_samples_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), RATE)
    with pytest.raises(InvalidRequest, match="empty"):
        read_audio(path)


def test_load_audio_resamples_clips_and_cuts(tmp_path: Path) -> None:
    x = signal(seconds=3.0, rate=44100)[:, 0] * 3.0  # peaks above 1 get clipped
    path = tmp_path / "loud.wav"
    sf.write(path, x, 44100, subtype="FLOAT")
    full = load_audio(path, 16000)
    assert full.shape == (1, int(np.ceil(len(x) * 16000 / 44100)))
    assert float(full.abs().max()) <= 1.0
    expected = resample(torch.from_numpy(x), 44100, 16000).clamp(-1, 1)
    torch.testing.assert_close(full[0], expected)
    # Reading only what max_seconds needs gives the same samples as cutting afterwards.
    cut = load_audio(path, 16000, max_seconds=1)
    assert cut.shape == (1, 16000)
    torch.testing.assert_close(cut, full[:, :16000])
    # Already-decoded audio is accepted too.
    again = load_audio(Audio(x.astype(np.float32), 44100), 16000)
    torch.testing.assert_close(again, full)
