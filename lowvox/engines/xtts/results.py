"""The typed results and settings of XTTS synthesis (shared by the single and batch APIs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowvox.engines.xtts.sampling import SamplingOptions
from lowvox.engines.xtts.voice import Voice


@dataclass(frozen=True)
class SynthesisResult:
    """Whole-utterance audio: float32 samples at `sample_rate`, and the audio codes of each
    sentence (without the stop token)."""

    wav: np.ndarray
    sample_rate: int
    codes: list[np.ndarray]


@dataclass(frozen=True)
class StreamChunk:
    """A piece of audio from `synthesize_stream`; `sentence` is the index it belongs to."""

    wav: np.ndarray
    sample_rate: int
    sentence: int


@dataclass(frozen=True)
class BatchItem:
    """One request of `stream_batch`: text, language, voice and its own settings."""

    text: str
    language: str | None = None
    voice: Voice | str | None = None
    settings: GenerationSettings | None = None  # None: the config's defaults


@dataclass(frozen=True)
class GenerationSettings:
    """Everything `synthesize` needs besides text and voice, with config defaults filled in."""

    sampling: SamplingOptions
    max_new_tokens: int
    speed: float
    split_sentences: bool
    seed: int | None
