"""The typed results of XTTS synthesis: a streamed chunk, and whole-utterance audio."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SynthesisResult:
    """Whole-utterance audio: float32 samples at `sample_rate`, and the audio codes of each
    sentence (without the stop token)."""

    wav: np.ndarray
    sample_rate: int
    codes: list[np.ndarray]


@dataclass(frozen=True)
class StreamChunk:
    """A piece of audio of sentence `sentence`; the sentence's last chunk also carries its
    audio codes (without the stop token)."""

    wav: np.ndarray
    sample_rate: int
    sentence: int
    codes: np.ndarray | None = None
