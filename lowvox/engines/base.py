"""The engine interface: a typed request in, a stream of audio chunks out.

An engine validates a request once (`validate`, before it is queued) and speaks validated
requests through an `EngineBatch` that the engine's scheduler drives on the one thread
that owns the engine: requests join and leave the batch at step boundaries. Engines that
decode several requests together (XTTS) supply their own batch; the default one speaks a
request at a time through `synthesize_stream`.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowvox.errors import Cancelled, InvalidRequest, LowvoxError, UnknownVoice
from lowvox.text.languages import pick_language
from lowvox.voices import fold_name

log = logging.getLogger(__name__)

MIN_SPEED = 0.25
MAX_SPEED = 4.0

# An engine option's value as requests carry it (a JSON scalar; None: unset). Each engine
# checks the names and types of its own options (`Engine.validate`).
OptionValue = str | int | float | bool | None


def check_voice_name(voice: object) -> str | None:
    """A voice as a client or a document names it: stripped, or None for the default.
    Clients name voices; they never point at files. Anything path-like is refused so
    that no engine ever opens a file a client chose."""
    if voice is None:
        return None
    if not isinstance(voice, str):
        raise InvalidRequest("voice must be a string", field="voice")
    name = voice.strip()
    if not name:
        return None
    if "/" in name or "\\" in name or name.startswith(".") or "\x00" in name or len(name) > 200:
        raise InvalidRequest(
            f"invalid voice name: {voice[:80]!r} (a voice name, not a path)", field="voice"
        )
    return name


@dataclass(frozen=True)
class AudioChunk:
    """A piece of mono audio: float32 samples in [-1, 1] at `sample_rate`."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class SynthesisRequest:
    """What to say and how. `options` holds engine-specific knobs (temperature, pitch, ...)."""

    text: str
    voice: str | None = None
    language: str | None = None
    speed: float = 1.0
    options: Mapping[str, OptionValue] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchEvent:
    """What one step of an `EngineBatch` did for one request: a chunk of its audio, its
    end, or its failure (which ends that request only)."""

    request: int
    chunk: AudioChunk | None = None
    done: bool = False
    error: LowvoxError | None = None


class EngineBatch(ABC):
    """Requests being spoken together, driven by `step()` on the engine's owning thread."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Requests it can hold at once."""

    @abstractmethod
    def __len__(self) -> int: ...

    def fits(self, request: SynthesisRequest) -> bool:
        """Whether `request` can join now."""
        return len(self) < self.capacity

    @abstractmethod
    def add(self, request: SynthesisRequest, cancel: threading.Event, bulk: bool = False) -> int:
        """Take a validated request (it joins at a coming step); its id in `BatchEvent`s.
        `bulk`: nobody listens to it live (a long-form job's sentence), so the batch may
        put its work after that of interactive requests. Raises `LowvoxError` when this
        request cannot be spoken (its own failure)."""

    @abstractmethod
    def step(self) -> list[BatchEvent]:
        """Advance every request a little; what happened to each."""


class StreamBatch(EngineBatch):
    """The default batch: up to `capacity` requests through `Engine.synthesize_stream`, each
    advanced by one chunk per step in turn (1: one request at a time, for engines whose
    streams cannot interleave)."""

    def __init__(self, engine: Engine, capacity: int = 1) -> None:
        self.engine = engine
        self._capacity = capacity
        self._streams: dict[int, tuple[threading.Event, Iterator[AudioChunk]]] = {}
        self._next_id = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, request: SynthesisRequest, cancel: threading.Event, bulk: bool = False) -> int:
        if len(self._streams) >= self._capacity:
            raise RuntimeError(f"the batch is full ({self._capacity} requests)")
        stream = self.engine.synthesize_stream(request, cancel)
        rid, self._next_id = self._next_id, self._next_id + 1
        self._streams[rid] = (cancel, stream)
        return rid

    def step(self) -> list[BatchEvent]:
        return [self._advance(rid) for rid in list(self._streams)]

    def _advance(self, rid: int) -> BatchEvent:
        cancel, stream = self._streams[rid]
        try:
            if cancel.is_set():
                raise Cancelled("generation cancelled")
            chunk = next(stream, None)
        except LowvoxError as e:
            self._close(rid)
            return BatchEvent(rid, error=e)
        except Exception:  # noqa: BLE001 -- one request's failure is its own
            log.exception("%s: a request failed", self.engine.name)
            self._close(rid)
            return BatchEvent(rid, error=LowvoxError("synthesis failed"))
        if chunk is None:
            self._close(rid)
            return BatchEvent(rid, done=True)
        return BatchEvent(rid, chunk=chunk)

    def _close(self, rid: int) -> None:
        _, stream = self._streams.pop(rid)
        close = getattr(stream, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    name: str
    language: str | None = None
    kind: str = "builtin"  # builtin | cloned | studio


@dataclass(frozen=True)
class EngineCapabilities:
    streaming: bool = True
    cloning: bool = False
    speed: bool = True
    pitch: bool = False
    temperature: bool = False
    repetition_penalty: bool = False
    multivoice: bool = True
    # Takes `split_sentences` (False: the whole text in one generation, as XTTS's
    # `enable_text_splitting=False` does).
    sentence_splitting: bool = False


class Engine(ABC):
    """A text-to-speech engine. Implementations yield audio as it is produced.

    One thread owns an engine (the server's scheduler worker, or the CLI's thread): it
    alone calls `load`, `warmup`, `synthesize_stream`, `open_batch` and the batch's steps,
    the voice hooks, the runtime switches and `unload`, so engines need no locks.
    `validate`, `voices`, `languages` and `sample_rate` touch no model and may run anywhere.
    """

    name: str = ""
    capabilities: EngineCapabilities = EngineCapabilities()

    @property
    @abstractmethod
    def sample_rate(self) -> int: ...

    @abstractmethod
    def voices(self) -> list[VoiceInfo]: ...

    @abstractmethod
    def languages(self) -> list[str]: ...

    @property
    def default_voice(self) -> str | None:
        voices = self.voices()
        return voices[0].id if voices else None

    def load(self) -> None:
        """Prepare the engine (load weights, open libraries). Called once at start-up."""

    def warmup(self) -> None:
        """Run a tiny synthesis so that the first real request is fast."""
        for _ in self.synthesize_stream(self.validate(SynthesisRequest(text="Ready."))):
            pass

    def unload(self) -> None:
        """Release what `load` took."""

    # -- optional abilities: every engine has them, most as no-ops -------------------------

    def open_batch(self) -> EngineBatch:
        """A batch for the scheduler to drive (the default speaks one request at a time)."""
        return StreamBatch(self)

    def prepare_voice(self, name: str, clips: Sequence[Path]) -> None:
        """A library voice was added or changed: prepare what speaking with it needs (XTTS
        clones it once and caches the latents). Runs on the engine's owning thread."""

    def forget_voice(self, name: str) -> None:
        """A library voice was renamed or deleted."""

    def set_low_vram(self, enabled: bool) -> None:
        """AllTalk's "low VRAM" switch: weights in RAM, on the GPU only per request."""

    def set_fast_path(self, enabled: bool) -> None:
        """AllTalk's "DeepSpeed" switch: the fastest decoding the device allows."""

    @property
    def low_vram(self) -> bool:
        return False

    @property
    def fast_path(self) -> bool:
        return False

    def resolve_voice(self, voice: str | None) -> str:
        """Map a requested voice (id or name, `.wav` suffix tolerated) to a voice id."""
        if voice is None or not voice.strip():
            default = self.default_voice
            if default is None:
                raise InvalidRequest(f"engine {self.name!r} has no voices", field="voice")
            return default
        wanted = voice.strip()
        candidates = {wanted, wanted.removesuffix(".wav")}
        for info in self.voices():
            if info.id in candidates or info.name in candidates:
                return info.id
        folded = {fold_name(c) for c in candidates}
        for info in self.voices():
            if fold_name(info.id) in folded or fold_name(info.name) in folded:
                return info.id
        raise UnknownVoice(voice)

    def resolve_language(self, language: str | None, text: str = "", default: str = "en") -> str:
        """The engine's code for `language` ("auto": detected from `text`)."""
        return pick_language(language, self.languages(), text, default)

    def validate(self, request: SynthesisRequest, max_chars: int | None = None) -> SynthesisRequest:
        """Check a request completely, once, before it is queued and before any audio is
        produced; return it normalised (voice id, language code). Nothing after this checks
        the request again."""
        text = request.text if isinstance(request.text, str) else ""
        if not text.strip():
            raise InvalidRequest("text is empty", field="text")
        if max_chars is not None and len(text) > max_chars:
            raise InvalidRequest(
                f"text is {len(text)} characters, over the limit of {max_chars}", field="text"
            )
        speed = float(request.speed)
        if not (MIN_SPEED <= speed <= MAX_SPEED):
            raise InvalidRequest(
                f"speed {speed:g} is out of range ({MIN_SPEED:g}-{MAX_SPEED:g})", field="speed"
            )
        return SynthesisRequest(
            text=text,
            voice=self.resolve_voice(request.voice),
            language=self.resolve_language(request.language, text),
            speed=speed,
            options=dict(request.options),
        )

    @abstractmethod
    def synthesize_stream(
        self, request: SynthesisRequest, cancel: threading.Event | None = None
    ) -> Iterator[AudioChunk]:
        """Yield audio chunks for a validated request, stopping early when `cancel` is set."""

    def synthesize(
        self, request: SynthesisRequest, cancel: threading.Event | None = None
    ) -> AudioChunk:
        """Whole-utterance audio: the stream, concatenated."""
        return concat_chunks(self.synthesize_stream(request, cancel), self.sample_rate)

    def synthesize_batch(self, requests: Sequence[SynthesisRequest]) -> list[AudioChunk]:
        """Whole-utterance audio of several requests spoken through one `open_batch()` (as
        the server's scheduler drives it), in request order. One failure fails the call."""
        validated = [self.validate(r) for r in requests]
        batch = self.open_batch()
        parts: list[list[np.ndarray]] = [[] for _ in validated]
        index: dict[int, int] = {}
        waiting = list(enumerate(validated))
        while waiting or len(batch):
            while waiting and batch.fits(waiting[0][1]):
                i, request = waiting.pop(0)
                index[batch.add(request, threading.Event())] = i
            for event in batch.step():
                if event.error is not None:
                    raise event.error
                if event.chunk is not None:
                    parts[index[event.request]].append(event.chunk.samples)
        return [
            concat_chunks([AudioChunk(s, self.sample_rate) for s in p], self.sample_rate)
            for p in parts
        ]


def concat_chunks(chunks: Iterator[AudioChunk] | list[AudioChunk], sample_rate: int) -> AudioChunk:
    parts = [c.samples for c in chunks]
    samples = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return AudioChunk(samples=samples, sample_rate=sample_rate)
