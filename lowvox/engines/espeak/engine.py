"""The built-in espeak-ng engine: every espeak voice, speed and pitch, streamed as produced."""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np

from lowvox.engines.base import (
    MAX_SPEED,
    AudioChunk,
    Engine,
    EngineCapabilities,
    OptionValue,
    SynthesisRequest,
    VoiceInfo,
)
from lowvox.engines.espeak.binding import (
    RATE_MINIMUM,
    RATE_NORMAL,
    EspeakLibrary,
    get_library,
)
from lowvox.errors import InvalidRequest, UnknownVoice

logger = logging.getLogger(__name__)

DEFAULT_VOICE = "en-us"
DEFAULT_PITCH = 50
# espeak-ng clamps below 80 wpm itself; above 450 it speeds up with libsonic.
RATE_MAXIMUM = round(RATE_NORMAL * MAX_SPEED)

# A chunk gathers what the worker has produced since the last one, up to this much audio.
MAX_CHUNK_SECONDS = 1.0
# How long closing a stream waits for its worker to notice and stop (normally ~1 ms).
_STOP_TIMEOUT_S = 5.0
# How often a waiting stream looks at its cancel event.
_POLL_S = 0.05

_worker_state = threading.local()  # .is_worker is True on synthesis threads


def speed_to_rate(speed: float) -> int:
    """Words per minute for a speed factor (1.0 = espeak's 175 wpm), within espeak's range."""
    return int(min(max(round(RATE_NORMAL * speed), RATE_MINIMUM), RATE_MAXIMUM))


def pitch_option(options: Mapping[str, OptionValue]) -> int:
    """The "pitch" option (0-100, espeak's scale; 50 is the voice's normal pitch)."""
    value = options.get("pitch", DEFAULT_PITCH)
    if value is None:
        return DEFAULT_PITCH
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"pitch must be a number from 0 to 100, got {value!r}", field="pitch")
    if not 0 <= value <= 100:
        raise InvalidRequest(f"pitch {value:g} is out of range (0-100)", field="pitch")
    return round(value)


@dataclass(frozen=True)
class _Voice:
    info: VoiceInfo
    identifier: str  # what espeak_SetVoiceByName takes, e.g. "gmw/en-US"
    languages: tuple[tuple[int, str], ...]  # (priority, lower-case code)


class EspeakEngine(Engine):
    """Speaks with espeak-ng, embedded through ctypes; needs no model and no system package.

    Voice ids are espeak's own voice names ("en-us", "fr", "de", "en-gb-x-rp"), optionally
    followed by a variant as on espeak's command line ("en-us+f3").
    """

    name = "espeak"
    capabilities = EngineCapabilities(
        streaming=True, cloning=False, speed=True, pitch=True, multivoice=True
    )

    def __init__(self) -> None:
        self._lib: EspeakLibrary | None = None
        self._voices: dict[str, _Voice] = {}
        self._variants: dict[str, str] = {}  # lower-case name -> file name ("alex" -> "Alex")
        self._loaded = threading.Lock()

    # -- set-up and catalogue ---------------------------------------------------------------

    def load(self) -> None:
        self._library()

    def _library(self) -> EspeakLibrary:
        with self._loaded:
            if self._lib is None:
                lib = get_library()
                self._voices = _catalogue(lib)
                self._variants = {
                    v.identifier.rsplit("/", 1)[-1].lower(): v.identifier.rsplit("/", 1)[-1]
                    for v in lib.list_variants()
                }
                self._lib = lib
                logger.info(
                    "espeak-ng %s: %d voices, %d variants",
                    lib.version,
                    len(self._voices),
                    len(self._variants),
                )
            return self._lib

    @property
    def sample_rate(self) -> int:
        return self._library().sample_rate

    def voices(self) -> list[VoiceInfo]:
        self._library()
        return [v.info for v in self._voices.values()]

    def languages(self) -> list[str]:
        self._library()
        return sorted({code for v in self._voices.values() for _, code in v.languages})

    def variants(self) -> list[str]:
        """Variant names that can follow a voice id after '+' ("f3", "klatt", ...)."""
        self._library()
        return sorted(self._variants)

    @property
    def default_voice(self) -> str | None:
        self._library()
        if DEFAULT_VOICE in self._voices:
            return DEFAULT_VOICE
        for voice_id, voice in self._voices.items():
            if voice.info.language and voice.info.language.startswith("en"):
                return voice_id
        return next(iter(self._voices), None)

    def voice_for_language(self, language: str) -> str:
        """The voice that speaks `language` best: the default voice if it can, else the
        voice listing it with espeak's highest priority."""
        self._library()
        code = language.lower()
        default = self.default_voice
        if default is not None and any(c == code for _, c in self._voices[default].languages):
            return default
        best = min(
            (
                (priority, order, voice_id)
                for order, (voice_id, voice) in enumerate(self._voices.items())
                for priority, c in voice.languages
                if c == code
            ),
            default=None,
        )
        if best is None:
            raise InvalidRequest(f"no espeak voice speaks {language!r}", field="language")
        return best[2]

    # -- requests ------------------------------------------------------------------------------

    def resolve_voice(self, voice: str | None) -> str:
        if voice is None or "+" not in voice:
            return super().resolve_voice(voice)
        base, _, variant = voice.strip().partition("+")
        base_id = super().resolve_voice(base)
        self._library()
        if variant.strip().lower() not in self._variants:
            raise UnknownVoice(voice)
        return f"{base_id}+{variant.strip().lower()}"

    def validate(self, request: SynthesisRequest, max_chars: int | None = None) -> SynthesisRequest:
        """As `Engine.validate`, and: without a voice, the language picks one; without a
        language, the voice's own is reported."""
        checked = super().validate(request, max_chars)
        pitch_option(checked.options)
        voice, language = checked.voice, checked.language
        assert voice is not None and language is not None  # resolved by Engine.validate
        voice_given = bool(request.voice and request.voice.strip())
        if voice_given:
            if not (request.language and request.language.strip()):
                base = voice.split("+", 1)[0]
                language = self._voices[base].info.language or language
            return replace(checked, language=language)
        return replace(checked, voice=self.voice_for_language(language))

    def synthesize_stream(
        self, request: SynthesisRequest, cancel: threading.Event | None = None
    ) -> Iterator[AudioChunk]:
        # Everything that can be wrong with the request is raised here, before the
        # caller starts iterating; the generator only runs the synthesis.
        lib = self._library()
        voice_id = self.resolve_voice(request.voice)
        base, _, variant = voice_id.partition("+")
        target = self._voices[base].identifier
        if variant:
            target += "+" + self._variants[variant]
        rate = speed_to_rate(request.speed)
        pitch = pitch_option(request.options)
        return _stream(lib, request.text, target, rate, pitch, cancel)


def _catalogue(lib: EspeakLibrary) -> dict[str, _Voice]:
    """Voices by id: the voice file's name, lower-cased ("gmw/en-US" -> "en-us")."""
    voices = lib.list_voices()
    short = [v.identifier.rsplit("/", 1)[-1].lower() for v in voices]
    catalogue: dict[str, _Voice] = {}
    for voice, key in zip(voices, short, strict=True):
        # Two files of one name in different folders would clash; keep the full path then.
        voice_id = key if short.count(key) == 1 else voice.identifier.lower()
        languages = tuple((p, code.lower()) for p, code in voice.languages)
        catalogue[voice_id] = _Voice(
            info=VoiceInfo(
                id=voice_id,
                name=voice.name or voice_id,
                language=languages[0][1] if languages else None,
            ),
            identifier=voice.identifier,
            languages=languages,
        )
    return catalogue


class _Done:
    """Queue marker: the worker has finished (with `error` if it failed)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def _stream(
    lib: EspeakLibrary,
    text: str,
    voice: str,
    rate: int,
    pitch: int,
    cancel: threading.Event | None,
) -> Iterator[AudioChunk]:
    """Run one synthesis on a worker thread and yield its audio while it runs.

    espeak_Synth only returns when the whole text is spoken, calling back with each block
    on the way, so a worker thread makes the call and queues the blocks for this
    generator. The queue is unbounded on purpose: a consumer that stops reading without
    closing the generator must not leave the worker blocked while it holds the library
    lock (espeak-ng runs ~1000x real time, so a whole text is queued within a second or so).
    """
    if cancel is not None and cancel.is_set():
        return
    stop = threading.Event()
    blocks: queue.SimpleQueue[np.ndarray | _Done] = queue.SimpleQueue()

    def sink(samples: np.ndarray) -> bool:
        if stop.is_set() or (cancel is not None and cancel.is_set()):
            return False
        blocks.put(samples)
        return True

    def work() -> None:
        _worker_state.is_worker = True
        try:
            lib.synthesize(text, voice, rate, pitch, sink)
        except BaseException as e:  # noqa: BLE001 - re-raised by the generator
            blocks.put(_Done(e))
        else:
            blocks.put(_Done())

    worker = threading.Thread(target=work, name="espeak-synth", daemon=True)
    worker.start()
    max_samples = int(MAX_CHUNK_SECONDS * lib.sample_rate)
    done: _Done | None = None
    try:
        while done is None:
            try:
                item = blocks.get(timeout=_POLL_S)
            except queue.Empty:
                if cancel is not None and cancel.is_set():
                    return
                continue
            if cancel is not None and cancel.is_set():
                return
            if isinstance(item, _Done):
                done = item
                break
            parts, count = [item], len(item)
            # Take whatever else is already waiting, so a slow consumer gets fewer,
            # larger chunks instead of falling further behind.
            while count < max_samples:
                try:
                    more = blocks.get_nowait()
                except queue.Empty:
                    break
                if isinstance(more, _Done):
                    done = more
                    break
                parts.append(more)
                count += len(more)
            yield AudioChunk(samples=np.concatenate(parts), sample_rate=lib.sample_rate)
        if done.error is not None:
            raise done.error
    finally:
        stop.set()
        # The worker sees `stop` at its next block and returns, releasing the lock. Never
        # wait from a synthesis thread (a generator can be finalised by garbage collection
        # anywhere), which could wait on a lock that thread itself holds.
        if (
            not getattr(_worker_state, "is_worker", False)
            and worker is not threading.current_thread()
        ):
            worker.join(_STOP_TIMEOUT_S)
            if worker.is_alive():
                logger.warning("espeak synthesis did not stop within %.0f s", _STOP_TIMEOUT_S)
