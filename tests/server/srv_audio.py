"""Decoding helpers for the server tests: what a client would do with the bytes."""

from __future__ import annotations

import io

import av
import numpy as np
import soundfile as sf


def decode(data: bytes, fmt: str, pcm_rate: int = 24_000) -> tuple[np.ndarray, int, int]:
    """(mono float32 samples, sample rate, channels) of an encoded file."""
    if fmt == "pcm":
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768
        return samples, pcm_rate, 1
    if fmt == "wav":
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return samples.mean(axis=1), rate, samples.shape[1]
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        channels = stream.codec_context.channels
        parts, rate = [], None
        for frame in container.decode(stream):
            arr = frame.to_ndarray()
            if arr.ndim == 2 and frame.format.is_planar:
                arr = arr.mean(axis=0)
            else:
                arr = arr.reshape(-1, channels).mean(axis=1)
            if arr.dtype == np.int16:
                arr = arr / 32768
            parts.append(arr.astype(np.float32))
            rate = frame.sample_rate
    return np.concatenate(parts), rate, channels


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])
