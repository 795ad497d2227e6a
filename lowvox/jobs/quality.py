"""Is this take of a sentence good enough to keep?

A sampled TTS model now and then runs on after the text (a babbling or silent tail), stops
early, leaves a long hole mid-sentence, says nothing, or clips. `check_take` catches these
from the audio alone: its length against what the text should take at the language's
speaking rate, and a frame-energy analysis relative to the take's own level. An optional
speech recogniser adds a word-error-rate check. The `Verdict`'s score (0 when nothing is
wrong, more the worse) lets the caller keep the best of several takes.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import unicodedata
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lowvox.errors import EngineUnavailable, InvalidRequest

__all__ = [
    "SPEAKING_RATES",
    "QualityLimits",
    "Recognizer",
    "Verdict",
    "WhisperRecognizer",
    "check_take",
    "expected_duration",
    "word_error_rate",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityLimits:
    """Where a take stops being acceptable. The defaults are loose on purpose: a voice may
    speak 30 % faster or slower than the table's rate without being flagged; a runaway tail
    or a cut-off take is far outside that."""

    # too_long: the take lasts more than expected * too_long_factor + too_long_slack_s.
    too_long_factor: float = 1.8
    too_long_slack_s: float = 1.0
    # too_short: its speech (first to last voiced frame) lasts less than expected * this.
    too_short_factor: float = 0.5
    # The expected duration of any text is at least this (one word still takes a moment).
    min_expected_s: float = 0.6
    # long_silence: a pause inside the speech longer than this.
    max_internal_silence_s: float = 1.2
    # A frame is silent when it is this many dB below the take's loud frames (their 95th
    # percentile level) or below silence_floor_dbfs.
    silence_relative_db: float = 40.0
    silence_floor_dbfs: float = -60.0
    # silent: less voiced audio than this (or nothing above the floor).
    min_voiced_s: float = 0.15
    # clipped: more than this fraction of samples at |x| >= 0.999.
    clip_fraction: float = 0.001
    frame_s: float = 0.02


_DEFAULT_LIMITS = QualityLimits()


@dataclass(frozen=True)
class Verdict:
    """What the check found. `flags` name the problems ("too_long", "too_short",
    "long_silence", "silent", "clipped", "asr_mismatch"); `score` is 0 for a clean take and
    grows with how far outside the limits it is (lower is better). Durations in seconds."""

    flags: tuple[str, ...]
    score: float
    duration: float  # the whole take
    expected: float  # what the text should take at this speed
    speech: float = 0.0  # from the first to the last voiced frame
    longest_silence: float = 0.0  # the longest pause inside the speech
    wer: float | None = None  # word error rate against the recogniser, when one ran


# Characters (letters and digits) spoken per second at speed 1.0, for each XTTS language.
# Estimates of conversational reading rates; scripts that leave vowels out (Arabic) or
# write them as combining marks (Devanagari, not counted) read fewer characters per
# second, and Chinese, Japanese and Korean count each ideograph, kana or syllable block.
SPEAKING_RATES: dict[str, float] = {
    "en": 12.5,
    "es": 13.5,
    "fr": 13.0,
    "de": 12.5,
    "it": 13.5,
    "pt": 13.0,
    "pl": 12.0,
    "tr": 12.0,
    "ru": 12.0,
    "nl": 12.5,
    "cs": 11.5,
    "ar": 10.0,
    "zh-cn": 4.5,
    "hu": 12.0,
    "ko": 5.5,
    "ja": 6.5,
    "hi": 7.0,
}
_DEFAULT_RATE = 12.0
_CJK = frozenset({"zh-cn", "ja", "ko"})
# A digit is read as a word or more: "2024" is "twenty twenty-four" (about 4 letters a
# digit) but 二千零二十四 in Chinese (1.5 characters a digit).
_DIGIT_WEIGHT = 4.0
_CJK_DIGIT_WEIGHT = 1.5
# Marks inside a sentence where a reader pauses briefly.
_PAUSE_MARKS = frozenset(",;:—–…，、；：")
_PAUSE_S = 0.15


def _rate_key(language: str) -> str:
    key = (language or "").strip().lower().replace("_", "-")
    if key in SPEAKING_RATES:
        return key
    base = key.split("-")[0]
    if base == "zh":
        return "zh-cn"
    return base


def expected_duration(text: str, language: str, speed: float = 1.0, min_s: float = 0.6) -> float:
    """Seconds `text` should take to say at `speed`, from the language's speaking rate."""
    key = _rate_key(language)
    rate = SPEAKING_RATES.get(key, _DEFAULT_RATE)
    digit_weight = _CJK_DIGIT_WEIGHT if key in _CJK else _DIGIT_WEIGHT
    letters = sum(1 for c in text if c.isalpha())
    digits = sum(1 for c in text if c.isdigit())
    marks = sum(1 for c in text.rstrip(" .!?…。！？\"'”’»)") if c in _PAUSE_MARKS)
    seconds = (letters + digit_weight * digits) / rate + marks * _PAUSE_S
    return max(min_s, seconds / max(speed, 1e-3))


@dataclass(frozen=True)
class _Frames:
    voiced: np.ndarray  # [frames] bool
    frame_s: float
    loud_db: float  # the take's loud level: 95th percentile of frame levels, dBFS


def _frames(x: np.ndarray, sample_rate: int, limits: QualityLimits) -> _Frames:
    size = max(1, round(limits.frame_s * sample_rate))
    count = len(x) // size
    if count == 0:
        return _Frames(np.zeros(0, bool), size / sample_rate, -math.inf)
    frames = x[: count * size].astype(np.float64).reshape(count, size)  # [frames, size]
    # dBFS per frame; digital silence reads -200 rather than -inf
    level = 10.0 * np.log10(np.mean(frames**2, axis=1) + 1e-20)
    loud = float(np.percentile(level, 95))
    threshold = max(loud - limits.silence_relative_db, limits.silence_floor_dbfs)
    return _Frames(level > threshold, size / sample_rate, loud)


def _longest_false_run(mask: np.ndarray) -> int:
    """The longest run of False in a 1-D bool array."""
    if not len(mask):
        return 0
    edges = np.flatnonzero(np.diff(np.concatenate([[1], mask.astype(np.int8), [1]])))
    # edges alternate: start of a False run, end of it
    runs = edges[1::2] - edges[::2]
    return int(runs.max()) if len(runs) else 0


class Recognizer(Protocol):
    """Speech recognition for the optional intelligibility check."""

    def transcribe(self, samples: np.ndarray, sample_rate: int, language: str) -> str: ...


def _as_mono(samples: Any) -> np.ndarray:
    x = np.asarray(samples)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)  # [T, 1] or [1, T] -> [T]
    if x.ndim != 1:
        raise InvalidRequest(f"expected mono audio (1-D samples), got shape {x.shape}")
    return np.nan_to_num(x.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=-1.0)


def check_take(
    samples: np.ndarray,
    sample_rate: int,
    text: str,
    language: str,
    speed: float = 1.0,
    limits: QualityLimits = _DEFAULT_LIMITS,
    *,
    recognizer: Recognizer | None = None,
    max_wer: float = 0.35,
) -> Verdict:
    """Check one take of `text` (mono float samples at `sample_rate`, spoken at `speed`).

    With a `recognizer`, the take is also transcribed and flagged "asr_mismatch" when the
    word error rate against `text` is over `max_wer` (not for a silent take)."""
    if sample_rate <= 0:
        raise InvalidRequest(f"sample rate must be positive, got {sample_rate}")
    x = _as_mono(samples)
    duration = len(x) / sample_rate
    expected = expected_duration(text, language, speed, limits.min_expected_s)
    frames = _frames(x, sample_rate, limits)
    voiced = np.flatnonzero(frames.voiced)
    flags: list[str] = []
    score = 0.0

    voiced_s = len(voiced) * frames.frame_s
    if voiced_s < limits.min_voiced_s or frames.loud_db <= limits.silence_floor_dbfs:
        # Nothing was said: every other measure is meaningless.
        return Verdict(("silent",), 100.0, duration, expected)
    speech = (voiced[-1] + 1 - voiced[0]) * frames.frame_s
    longest = _longest_false_run(frames.voiced[voiced[0] : voiced[-1] + 1]) * frames.frame_s

    upper = expected * limits.too_long_factor + limits.too_long_slack_s
    if duration > upper:
        flags.append("too_long")
        score += 1.0 + (duration - upper) / expected
    lower = expected * limits.too_short_factor
    if speech < lower:
        flags.append("too_short")
        score += 1.0 + (lower - speech) / expected
    if longest > limits.max_internal_silence_s:
        flags.append("long_silence")
        score += 1.0 + (longest - limits.max_internal_silence_s)
    clipped = float(np.count_nonzero(np.abs(x) >= 0.999)) / max(1, len(x))
    if clipped > limits.clip_fraction:
        flags.append("clipped")
        score += 0.5 + 10.0 * clipped

    wer = None
    if recognizer is not None:
        hypothesis = recognizer.transcribe(x, sample_rate, language)
        wer = word_error_rate(text, hypothesis)
        if wer > max_wer:
            flags.append("asr_mismatch")
            score += 1.0 + 2.0 * (wer - max_wer)
            logger.debug("asr mismatch (WER %.2f): %r heard as %r", wer, text, hypothesis)
    return Verdict(tuple(flags), score, duration, expected, speech, longest, wer)


# -- word error rate -------------------------------------------------------------------

# Scripts written without spaces between words: each character counts as a word.
_NO_SPACES = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")
_APOSTROPHES = re.compile(r"['’ʼ`´]")


def _words(text: str) -> list[str]:
    """Words for comparison: NFKC, case-folded, apostrophes dropped (don't = dont), other
    punctuation and symbols as spaces, CJK split into characters."""
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", text).casefold())
    text = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return _NO_SPACES.sub(r" \1 ", text).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, over normalised words;
    0 when both are empty, 1 when only the reference is."""
    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, heard in enumerate(hyp, start=1):
            current[j] = min(
                previous[j] + 1,  # deletion
                current[j - 1] + 1,  # insertion
                previous[j - 1] + (word != heard),  # substitution or match
            )
        previous = current
    return previous[-1] / len(ref)


# -- faster-whisper --------------------------------------------------------------------

_WHISPER_RATE = 16_000
# XTTS language codes Whisper spells differently.
_WHISPER_LANGUAGES = {"zh-cn": "zh"}


class WhisperRecognizer:
    """A `Recognizer` on faster-whisper (`pip install 'lowvox[asr]'`). The model is loaded
    on first use (faster-whisper fetches it from the Hugging Face hub unless
    `local_files_only`); a missing package is an EngineUnavailable at construction."""

    def __init__(
        self,
        model: str = "tiny",
        device: str = "cpu",
        compute_type: str = "int8",
        *,
        download_root: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        try:
            import faster_whisper
        except ImportError as e:
            raise EngineUnavailable(
                "the speech recognition check needs faster-whisper: pip install 'lowvox[asr]'"
            ) from e
        self._module = faster_whisper
        self.model_name = model
        self.device = device
        self.compute_type = compute_type
        self.download_root = download_root
        self.local_files_only = local_files_only
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    self._model = self._module.WhisperModel(
                        self.model_name,
                        device=self.device,
                        compute_type=self.compute_type,
                        download_root=self.download_root,
                        local_files_only=self.local_files_only,
                    )
                except Exception as e:  # faster-whisper raises plain errors of many kinds
                    raise EngineUnavailable(
                        f"cannot load the Whisper model {self.model_name!r}: {e}"
                    ) from e
            return self._model

    def transcribe(self, samples: np.ndarray, sample_rate: int, language: str) -> str:
        from lowvox.audio.resample import resample  # torch: only when a check runs

        model = self.load()
        audio = resample(_as_mono(samples), sample_rate, _WHISPER_RATE).numpy()
        key = _rate_key(language)
        segments, _ = model.transcribe(
            audio,
            language=_WHISPER_LANGUAGES.get(key, key) or None,
            beam_size=1,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        return " ".join(segment.text.strip() for segment in segments).strip()
