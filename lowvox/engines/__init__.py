"""Engine registry: engines are created by name from the settings."""

from __future__ import annotations

from collections.abc import Callable

from lowvox.engines.base import (
    AudioChunk,
    Engine,
    EngineCapabilities,
    SynthesisRequest,
    VoiceInfo,
    concat_chunks,
)
from lowvox.errors import UnknownEngine
from lowvox.settings import Settings

__all__ = [
    "AudioChunk",
    "Engine",
    "EngineCapabilities",
    "SynthesisRequest",
    "VoiceInfo",
    "concat_chunks",
    "ENGINE_NAMES",
    "create_engine",
]


def _espeak(settings: Settings) -> Engine:
    from lowvox.engines.espeak import EspeakEngine

    return EspeakEngine()


def _xtts(settings: Settings) -> Engine:
    from lowvox.engines.xtts.engine import XttsEngine

    return XttsEngine.from_settings(settings)


# Factories import lazily so that the espeak voice never pays for torch.
_FACTORIES: dict[str, Callable[[Settings], Engine]] = {"espeak": _espeak, "xtts": _xtts}
ENGINE_NAMES = tuple(_FACTORIES)


def create_engine(name: str, settings: Settings) -> Engine:
    try:
        factory = _FACTORIES[name.lower()]
    except KeyError:
        raise UnknownEngine(name, list(ENGINE_NAMES)) from None
    return factory(settings)
