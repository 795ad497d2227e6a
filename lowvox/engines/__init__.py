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


def _espeak(settings: Settings, voice_files: bool) -> Engine:
    from lowvox.engines.espeak import EspeakEngine

    return EspeakEngine()


def _xtts(settings: Settings, voice_files: bool) -> Engine:
    from lowvox.engines.xtts.engine import XttsEngine

    return XttsEngine.from_settings(settings, allow_voice_paths=voice_files)


# Factories import lazily so that the espeak voice never pays for torch.
_FACTORIES: dict[str, Callable[[Settings, bool], Engine]] = {"espeak": _espeak, "xtts": _xtts}
ENGINE_NAMES = tuple(_FACTORIES)


def create_engine(name: str, settings: Settings, *, voice_files: bool = False) -> Engine:
    """The engine `name`, configured from `settings`. Its voices are the ones it has and
    the library's; with `voice_files` (`lowvox say --voice ref.wav`, the user's own
    command) a voice may also be an audio file's path. The server and jobs never ask for
    that: no client or document can make an engine open a file."""
    try:
        factory = _FACTORIES[name.lower()]
    except KeyError:
        raise UnknownEngine(name, list(ENGINE_NAMES)) from None
    return factory(settings, voice_files)
