"""The embedded espeak-ng engine: voices, audio, speed/pitch, streaming, threads, cancel."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")

from lowvox.engines import create_engine  # noqa: E402
from lowvox.engines.base import SynthesisRequest  # noqa: E402
from lowvox.engines.espeak import EspeakEngine  # noqa: E402
from lowvox.engines.espeak.binding import LIBRARY_LOCK, get_library  # noqa: E402
from lowvox.engines.espeak.engine import speed_to_rate  # noqa: E402
from lowvox.errors import InvalidRequest, UnknownLanguage, UnknownVoice  # noqa: E402
from lowvox.settings import Settings  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog."
# About two and a half minutes of speech: long enough to be read while it is synthesised.
LONG_TEXT = " ".join(f"This is sentence number {i} of a rather long text." for i in range(60))
# Generous: only there so that a deadlock fails the test instead of hanging the run.
HANG_GUARD_S = 60


@pytest.fixture(scope="module")
def engine() -> EspeakEngine:
    e = EspeakEngine()
    e.load()
    return e


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def envelope(x: np.ndarray, frame: int = 1102) -> np.ndarray:
    """RMS per 50 ms frame at 22.05 kHz: the shape of an utterance, robust to tiny shifts."""
    n = len(x) // frame
    return np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1))


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    ea, eb = envelope(a), envelope(b)
    n = min(len(ea), len(eb))
    return float(np.corrcoef(ea[:n], eb[:n])[0, 1])


def pitch_hz(x: np.ndarray, rate: int) -> float:
    """Median autocorrelation pitch over loud frames."""
    n = 1024
    estimates = []
    lo, hi = rate // 400, rate // 60
    for start in range(0, len(x) - n, n // 2):
        frame = x[start : start + n]
        if rms(frame) < 0.03:
            continue
        frame = frame - frame.mean()
        ac = np.correlate(frame, frame, "full")[n - 1 :]
        estimates.append(rate / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(estimates))


def speak(engine: EspeakEngine, text: str, **kwargs) -> np.ndarray:
    request = engine.validate(SynthesisRequest(text=text, **kwargs))
    chunk = engine.synthesize(request)
    assert chunk.sample_rate == engine.sample_rate
    return chunk.samples


def espeak_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "espeak-synth"]


# -- catalogue ----------------------------------------------------------------------------


def test_voices_and_languages(engine: EspeakEngine) -> None:
    voices = engine.voices()
    assert len(voices) > 50
    ids = [v.id for v in voices]
    assert len(ids) == len(set(ids))
    assert {"en-us", "fr", "de"} <= set(ids)
    assert all(v.name and v.language for v in voices)
    langs = engine.languages()
    assert {"en", "en-us", "en-gb", "fr", "de", "es"} <= set(langs)
    assert all(code == code.lower() for code in langs)
    assert engine.default_voice == "en-us"
    assert engine.sample_rate == get_library().sample_rate > 0
    assert "f3" in engine.variants()


def test_registry_creates_it() -> None:
    assert isinstance(create_engine("espeak", Settings()), EspeakEngine)


# -- audio --------------------------------------------------------------------------------


def test_hello_is_speech_of_plausible_length(engine: EspeakEngine) -> None:
    x = speak(engine, "Hello from lowvox")
    assert x.dtype == np.float32
    assert np.abs(x).max() <= 1.0
    assert rms(x) > 0.02
    assert 0.5 < len(x) / engine.sample_rate < 3.0


def test_speed_changes_duration(engine: EspeakEngine) -> None:
    normal = len(speak(engine, SENTENCE, speed=1.0))
    assert len(speak(engine, SENTENCE, speed=2.0)) < 0.7 * normal
    assert len(speak(engine, SENTENCE, speed=0.5)) > 1.4 * normal
    # The slowest speed is clamped to espeak's minimum rate, not rejected.
    assert len(speak(engine, "Hi.", speed=0.25)) > 0
    assert speed_to_rate(1.0) == 175 and speed_to_rate(0.25) == 80


def test_pitch_changes_the_voice(engine: EspeakEngine) -> None:
    low = speak(engine, SENTENCE, options={"pitch": 20})
    high = speak(engine, SENTENCE, options={"pitch": 80})
    rate = engine.sample_rate
    assert pitch_hz(high, rate) > 1.3 * pitch_hz(low, rate)


def test_french_voice(engine: EspeakEngine) -> None:
    request = engine.validate(SynthesisRequest(text="Bonjour tout le monde", language="fr"))
    assert request.voice == "fr"
    x = engine.synthesize(request).samples
    assert rms(x) > 0.02
    assert 0.5 < len(x) / engine.sample_rate < 4.0


def test_variant_voice(engine: EspeakEngine) -> None:
    request = engine.validate(SynthesisRequest(text=SENTENCE, voice="en-us+f3"))
    assert request.voice == "en-us+f3"
    female = engine.synthesize(request).samples
    male = speak(engine, SENTENCE, voice="en-us")
    rate = engine.sample_rate
    assert pitch_hz(female, rate) > 1.3 * pitch_hz(male, rate)


def test_language_and_voice_resolution(engine: EspeakEngine) -> None:
    assert engine.validate(SynthesisRequest(text="x")).voice == "en-us"
    assert engine.validate(SynthesisRequest(text="x", language="de-AT")).voice == "de"
    by_voice = engine.validate(SynthesisRequest(text="x", voice="English (America)"))
    assert (by_voice.voice, by_voice.language) == ("en-us", "en-us")
    assert engine.validate(SynthesisRequest(text="x", voice="fr")).language == "fr-fr"


# -- streaming ----------------------------------------------------------------------------


def test_stream_yields_chunks_while_synthesising(engine: EspeakEngine) -> None:
    request = engine.validate(SynthesisRequest(text=LONG_TEXT))
    chunks = []
    during = 0  # chunks received while the library was still busy with this text
    for chunk in engine.synthesize_stream(request):
        chunks.append(chunk)
        if LIBRARY_LOCK.locked():
            during += 1
    assert len(chunks) > 1
    assert during >= 1
    assert all(c.sample_rate == engine.sample_rate and len(c.samples) > 0 for c in chunks)
    total = sum(c.duration for c in chunks)
    assert total > 60  # the whole text, not just a prefix
    assert not LIBRARY_LOCK.locked()


def test_cancel_stops_early(engine: EspeakEngine) -> None:
    request = engine.validate(SynthesisRequest(text=LONG_TEXT))
    cancel = threading.Event()
    got = 0.0
    for chunk in engine.synthesize_stream(request, cancel):
        got += chunk.duration
        cancel.set()
    assert 0 < got < 5
    assert not LIBRARY_LOCK.locked()
    assert not espeak_threads()
    # Already cancelled: nothing at all.
    assert list(engine.synthesize_stream(request, cancel)) == []
    # And the library is fine afterwards.
    assert rms(speak(engine, "Still working.")) > 0.02


def test_sink_can_abort_the_library() -> None:
    lib = get_library()
    calls = []

    def sink(samples: np.ndarray) -> bool:
        calls.append(len(samples))
        return len(calls) < 3

    lib.synthesize(LONG_TEXT, "gmw/en-US", 175, 50, sink)
    assert len(calls) == 3
    assert not LIBRARY_LOCK.locked()


def test_closing_a_stream_early_releases_everything(engine: EspeakEngine) -> None:
    stream = engine.synthesize_stream(engine.validate(SynthesisRequest(text=LONG_TEXT)))
    next(stream)
    stream.close()
    assert not LIBRARY_LOCK.locked()
    assert not espeak_threads()


def run_guarded(fn) -> object:
    """Run fn on a thread; fail (instead of hanging) if it deadlocks."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "espeak call is stuck"
    assert result
    return result[0]


def test_abandoned_stream_does_not_block_the_next_call(engine: EspeakEngine) -> None:
    request = engine.validate(SynthesisRequest(text=LONG_TEXT))
    abandoned = engine.synthesize_stream(request)
    next(abandoned)  # then stop reading, keeping the generator alive
    x = run_guarded(lambda: speak(engine, "Next request."))
    assert rms(x) > 0.02
    # Dropped without close: garbage collection finalises it, also without hanging.
    another = engine.synthesize_stream(request)
    next(another)
    del another, abandoned
    gc.collect()
    x = run_guarded(lambda: speak(engine, "And another."))
    assert rms(x) > 0.02


def test_concurrent_calls_get_their_own_audio(engine: EspeakEngine) -> None:
    requests = [
        SynthesisRequest(text=SENTENCE, voice="en-us"),
        SynthesisRequest(text="Bonjour, comment allez-vous aujourd'hui ?", voice="fr"),
        SynthesisRequest(text="Guten Tag, wie geht es Ihnen heute?", voice="de"),
        SynthesisRequest(text="One two three four five six seven.", voice="en-gb-x-rp"),
    ]
    requests = [engine.validate(r) for r in requests]
    alone = [engine.synthesize(r).samples for r in requests]
    # The references must be told apart, or the check below could not fail.
    for i in range(len(alone)):
        for j in range(i + 1, len(alone)):
            assert similarity(alone[i], alone[j]) < 0.6

    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        try:
            start.wait()
            for k in range(3):
                chunks = [c.samples for c in engine.synthesize_stream(requests[i])]
                results[i, k] = np.concatenate(chunks)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    assert len(results) == 3 * len(requests)
    for (i, _), x in results.items():
        # espeak-ng carries a little pitch-flutter state from one text to the next, so
        # repeated calls differ by a few samples: compare shapes, not bytes.
        assert abs(len(x) - len(alone[i])) < 0.02 * len(alone[i])
        assert similarity(x, alone[i]) > 0.9


# -- bad requests -------------------------------------------------------------------------


def test_unknown_voice_is_rejected(engine: EspeakEngine) -> None:
    with pytest.raises(UnknownVoice):
        engine.validate(SynthesisRequest(text="Hello", voice="no-such-voice"))
    with pytest.raises(UnknownVoice):
        engine.validate(SynthesisRequest(text="Hello", voice="en-us+no-such-variant"))
    with pytest.raises(UnknownVoice):
        engine.synthesize_stream(SynthesisRequest(text="Hello", voice="no-such-voice"))


def test_bad_options_are_rejected(engine: EspeakEngine) -> None:
    for pitch in (-1, 101, "high", True, float("nan")):
        with pytest.raises(InvalidRequest):
            engine.validate(SynthesisRequest(text="Hello", options={"pitch": pitch}))
    with pytest.raises(UnknownLanguage):
        engine.validate(SynthesisRequest(text="Hello", language="xx"))
    with pytest.raises(InvalidRequest):
        engine.validate(SynthesisRequest(text="   "))
