"""The engine interface: a typed request in, a stream of audio chunks out."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowvox.errors import InvalidRequest, UnknownLanguage, UnknownVoice

MIN_SPEED = 0.25
MAX_SPEED = 4.0


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
    options: Mapping[str, Any] = field(default_factory=dict)


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


class Engine(ABC):
    """A text-to-speech engine. Implementations yield audio as it is produced.

    `synthesize_stream` must be safe to call from any thread; engines that are not
    re-entrant serialise internally.
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
        for _ in self.synthesize_stream(SynthesisRequest(text="Ready.")):
            pass

    def unload(self) -> None:
        """Release what `load` took."""

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
        lowered = {c.lower() for c in candidates}
        for info in self.voices():
            if info.id.lower() in lowered or info.name.lower() in lowered:
                return info.id
        raise UnknownVoice(voice)

    def resolve_language(self, language: str | None, default: str = "en") -> str:
        langs = self.languages()
        lang = (language or default).strip().lower()
        if lang in langs:
            return lang
        # Accept a region-qualified code when only the base language is known.
        base = lang.split("-")[0].split("_")[0]
        if base in langs:
            return base
        raise UnknownLanguage(language or "", langs)

    def validate(self, request: SynthesisRequest, max_chars: int | None = None) -> SynthesisRequest:
        """Check a request completely, before any audio is produced; return it normalised."""
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
            language=self.resolve_language(request.language),
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


def concat_chunks(chunks: Iterator[AudioChunk] | list[AudioChunk], sample_rate: int) -> AudioChunk:
    parts = [c.samples for c in chunks]
    samples = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return AudioChunk(samples=samples, sample_rate=sample_rate)
