"""The take check: a plausible take passes; runaway, cut-off, gapped, silent and clipped
takes are flagged; the score picks the best take; WER and the recogniser hook."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from lowvox.errors import EngineUnavailable, InvalidRequest
from lowvox.jobs.quality import (
    QualityLimits,
    Verdict,
    WhisperRecognizer,
    check_take,
    expected_duration,
    word_error_rate,
)

RATE = 24000
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away."


def _speech(seconds: float, seed: int = 0, level: float = 0.3) -> np.ndarray:
    """Speech-like audio: noise syllables of 120-220 ms under a Hann envelope, 30-90 ms
    apart with an occasional longer word gap, over a faint noise floor; ~`seconds` long
    with 100 ms of lead-in and tail."""
    rng = np.random.default_rng(seed)
    n = round(seconds * RATE)
    x = rng.standard_normal(n) * 3e-4  # the floor: about -70 dBFS
    pos = end = round(0.1 * RATE)
    while True:
        length = round(rng.uniform(0.12, 0.22) * RATE)
        if pos + length > n - round(0.1 * RATE):
            break
        x[pos : pos + length] += rng.standard_normal(length) * np.hanning(length) * level
        end = pos + length
        pos = end + round(rng.choice([rng.uniform(0.03, 0.09), rng.uniform(0.15, 0.3)]) * RATE)
    # The tail ends 100 ms after the last syllable (a few tenths short of `seconds`).
    return np.clip(x[: end + round(0.1 * RATE)], -1, 1).astype(np.float32)


def _silence(seconds: float, seed: int = 9) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(round(seconds * RATE)) * 3e-4).astype(
        np.float32
    )


def _check(x: np.ndarray, text: str = TEXT, **kw) -> Verdict:
    return check_take(x, RATE, text, "en", **kw)


def test_a_plausible_take_passes() -> None:
    expected = expected_duration(TEXT, "en")
    assert 3.5 < expected < 6.0  # 52 letters and a comma
    for seed, factor in enumerate((0.75, 1.0, 1.3)):  # slow and fast voices too
        take = _speech(expected * factor, seed)
        verdict = _check(take)
        assert verdict.flags == (), (factor, verdict)
        assert verdict.score == 0.0
        assert verdict.duration == len(take) / RATE
        assert verdict.speech == pytest.approx(verdict.duration - 0.2, abs=0.05)
        assert verdict.expected == pytest.approx(expected)
        assert verdict.longest_silence < 0.5


def test_each_fault_gets_its_flag() -> None:
    expected = expected_duration(TEXT, "en")
    good = _speech(expected, 1)
    cases = {
        "too_long": np.concatenate([good, _speech(expected * 1.5, 2)]),  # babbling on
        "too_short": good[: round(len(good) * 0.3)],  # cut off
        "long_silence": np.concatenate(
            [good[: len(good) // 2], _silence(2.0), good[len(good) // 2 :]]
        ),
        "silent": _silence(expected),
        "clipped": np.clip(good * 8, -1, 1),
    }
    for flag, take in cases.items():
        verdict = _check(take)
        assert verdict.flags == (flag,), (flag, verdict)
        assert verdict.score > 0
    # A silent tail is a runaway too, not an internal pause.
    assert _check(np.concatenate([good, _silence(8.0)])).flags == ("too_long",)
    assert _check(np.zeros(RATE * 3, np.float32)).flags == ("silent",)
    assert _check(np.zeros(0, np.float32)).flags == ("silent",)


def test_score_prefers_the_good_take_and_grows_with_the_fault() -> None:
    expected = expected_duration(TEXT, "en")
    good = _speech(expected, 3)
    a_bit_long = np.concatenate([good, _speech(expected * 1.2, 4)])
    much_longer = np.concatenate([good, _speech(expected * 3, 5)])
    truncated = good[: len(good) // 4]
    takes = [much_longer, truncated, good, _silence(2.0), a_bit_long]
    scores = [_check(t).score for t in takes]
    assert min(range(len(takes)), key=scores.__getitem__) == 2
    assert scores[2] == 0.0
    assert 0 < scores[4] < scores[0]
    assert scores[3] == max(scores)  # nothing said is the worst


def test_expected_duration_by_language_and_speed() -> None:
    english = expected_duration(TEXT, "en")
    assert expected_duration(TEXT, "en", speed=2.0) == pytest.approx(english / 2)
    assert expected_duration(TEXT, "EN-us") == english
    # Chinese counts characters at a few a second; digits are read out.
    assert expected_duration("我们今天去公园散步吧", "zh-cn") == pytest.approx(10 / 4.5)
    assert expected_duration("Call 1999.", "en") > expected_duration("Call it.", "en")
    # A one-word sentence still takes the floor.
    assert expected_duration("Yes.", "en") == pytest.approx(0.6)
    assert expected_duration("Yes.", "en", min_s=1.0) == pytest.approx(1.0)
    # A take at double speed is fine at double speed, and too long at speed 1 is not.
    fast = _speech(english / 2, 6)
    assert check_take(fast, RATE, TEXT, "en", speed=2.0).flags == ()


def test_limits_are_configurable_and_input_is_checked() -> None:
    expected = expected_duration(TEXT, "en")
    # A 0.8 s pause (1 s with the halves' own lead-in and tail) is within the limit...
    take = np.concatenate([_speech(expected / 2, 7), _silence(0.8), _speech(expected / 2, 8)])
    verdict = _check(take)
    assert verdict.flags == () and verdict.longest_silence == pytest.approx(1.0, abs=0.06)
    # ...and over a stricter one.
    strict = QualityLimits(max_internal_silence_s=0.7)
    assert _check(take, limits=strict).flags == ("long_silence",)
    with pytest.raises(InvalidRequest):
        check_take(np.zeros((2, 100), np.float32), RATE, TEXT, "en")
    assert _check(_speech(expected, 1)[:, None]).flags == ()  # [T, 1] is mono


# -- word error rate and the recogniser ------------------------------------------------


def test_word_error_rate() -> None:
    assert word_error_rate("Hello, world!", "hello world") == 0.0
    assert word_error_rate("Don't stop — forty-two.", "dont stop forty two") == 0.0
    assert word_error_rate("the cat sat", "the cat sat down") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "the dog sat") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "cat") == pytest.approx(2 / 3)
    assert word_error_rate("a b c d", "") == 1.0
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "uh") == 1.0
    assert word_error_rate("Ça va? Très bien.", "ça va très bien") == 0.0
    # Chinese and Japanese have no spaces: characters are the words.
    assert word_error_rate("我们去公园。", "我们去公园") == 0.0
    assert word_error_rate("我们去公园", "我们在公园") == pytest.approx(1 / 5)


class _FakeRecognizer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.calls: list[tuple[int, int, str]] = []

    def transcribe(self, samples: np.ndarray, sample_rate: int, language: str) -> str:
        self.calls.append((len(samples), sample_rate, language))
        return self.text


def test_recognizer_hook() -> None:
    take = _speech(expected_duration(TEXT, "en"), 10)
    right = _FakeRecognizer("the quick brown fox jumps over the lazy dog and then it runs away")
    verdict = _check(take, recognizer=right)
    assert verdict.flags == () and verdict.wer == 0.0
    assert right.calls == [(len(take), RATE, "en")]

    wrong = _FakeRecognizer("the quick brown fox was eaten by a bear")
    verdict = _check(take, recognizer=wrong)
    assert verdict.flags == ("asr_mismatch",) and verdict.wer > 0.35 and verdict.score > 1
    assert _check(take, recognizer=wrong, max_wer=0.9).flags == ()
    assert _check(take).wer is None

    unused = _FakeRecognizer("")
    assert _check(_silence(3.0), recognizer=unused).flags == ("silent",)
    assert unused.calls == []  # nothing to hear


@pytest.mark.skipif(
    importlib.util.find_spec("faster_whisper") is not None, reason="faster-whisper is installed"
)
def test_whisper_recognizer_without_the_package_is_a_clear_error() -> None:
    with pytest.raises(EngineUnavailable, match=r"lowvox\[asr\]"):
        WhisperRecognizer()


def test_whisper_recognizer_runs_when_installed_with_its_model() -> None:
    pytest.importorskip("faster_whisper")
    recognizer = WhisperRecognizer("tiny", local_files_only=True)
    try:
        recognizer.load()
    except EngineUnavailable as e:
        pytest.skip(f"the Whisper tiny model is not available offline: {e}")
    text = recognizer.transcribe(_silence(1.0), RATE, "en")
    assert isinstance(text, str)
