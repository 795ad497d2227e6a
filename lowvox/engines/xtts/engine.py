"""The `xtts` engine: XttsModel behind lowvox's engine interface.

Voices are the model's studio speakers plus every voice in the voice library (folders of
reference clips, or lone `.wav` files), cloned on first use and cached on disk. For the
CLI, a voice may also be the path of an audio file (`--voice ref.wav`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lowvox.engines.base import (
    AudioChunk,
    Engine,
    EngineCapabilities,
    SynthesisRequest,
    VoiceInfo,
)
from lowvox.errors import EngineUnavailable, InvalidRequest, LowvoxError, UnknownVoice
from lowvox.settings import Settings

log = logging.getLogger(__name__)

# Request options this engine understands, and their types.
OPTIONS: dict[str, tuple[type, ...]] = {
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "repetition_penalty": (int, float),
    "seed": (int,),
    "do_sample": (bool,),
    "max_new_tokens": (int,),
}
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus")
MODEL_FILES = ("config.json", "model.pth", "vocab.json")


def missing_model_files(model_dir: Path) -> list[str]:
    return [name for name in MODEL_FILES if not (model_dir / name).is_file()]


class XttsEngine(Engine):
    """Coqui XTTS v2 (lowvox's own implementation): cloning, 17 languages, streaming."""

    name = "xtts"
    capabilities = EngineCapabilities(
        streaming=True,
        cloning=True,
        speed=True,
        pitch=False,
        temperature=True,
        repetition_penalty=True,
        multivoice=True,
    )

    def __init__(
        self,
        model_dir: str | Path,
        *,
        voices_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        allow_voice_paths: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir)
        # A voice given as an audio file path is for the CLI; a server sets this False (and
        # refuses path-like names itself) so that no client can make it open a file.
        self.allow_voice_paths = allow_voice_paths
        missing = missing_model_files(self.model_dir)
        if missing:
            raise EngineUnavailable(
                f"no XTTS model in {self.model_dir} (missing {', '.join(missing)}); "
                "install one with `lowvox models download xtts-v2 --accept-license`"
            )
        try:
            raw = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
            self._languages = [str(x) for x in raw.get("languages") or []]
            self._sample_rate = int(raw["model_args"]["output_sample_rate"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EngineUnavailable(f"cannot read {self.model_dir / 'config.json'}: {e}") from e
        self.voices_dir = Path(voices_dir) if voices_dir is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = device
        self.precision = precision
        self.threads = threads
        self._model: Any = None
        self._studio: dict[str, Any] | None = None
        self._loading = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> XttsEngine:
        """The model folder is `settings.model_dir`, else `<models>/<model_name>`."""
        model_dir = settings.model_dir or settings.models_path / settings.model_name
        return cls(
            model_dir,
            voices_dir=settings.voices_path,
            cache_dir=settings.cache_path,
            device=settings.device,
            precision=settings.precision,
            threads=settings.threads,
        )

    # -- model ---------------------------------------------------------------------------------

    def load(self) -> None:
        self._get_model()

    def warmup(self) -> None:
        """A few tokens through every stage, so the first real request is not the slow one."""
        if self.default_voice is None:
            return
        request = SynthesisRequest(text="Ready.", options={"max_new_tokens": 8, "seed": 0})
        for _ in self.synthesize_stream(self.validate(request)):
            pass

    def unload(self) -> None:
        with self._loading:
            self._model = None

    def _get_model(self) -> Any:
        with self._loading:
            if self._model is None:
                import torch

                from lowvox.engines.xtts.model import XttsModel
                from lowvox.engines.xtts.voice import VoiceCache

                if self.threads:
                    torch.set_num_threads(self.threads)
                device, precision = _placement(self.device, self.precision)
                cache = self.cache_dir / "xtts" if self.cache_dir is not None else None
                model = XttsModel.load(self.model_dir, device, precision, cache_dir=cache)
                if cache is not None:
                    model.voice_cache = VoiceCache(cache / "voices")
                self._model = model
            return self._model

    @property
    def model(self) -> Any:
        """The loaded XttsModel (loads it on first use)."""
        return self._get_model()

    # -- catalogue -----------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    def languages(self) -> list[str]:
        return list(self._languages)

    def _library(self) -> dict[str, list[Path]]:
        """Voice name -> reference clips, from the voice library folder."""
        if self.voices_dir is None or not self.voices_dir.is_dir():
            return {}
        from lowvox.voices.store import VoiceStore

        return {v.name: list(v.clips) for v in VoiceStore(self.voices_dir).list()}

    def _speakers(self) -> dict[str, Any]:
        """Studio speakers; read from speakers_xtts.pth without loading the whole model."""
        if self._model is not None:
            return self._model.speakers
        if self._studio is None:
            path = self.model_dir / "speakers_xtts.pth"
            if path.is_file():
                from lowvox.engines.xtts.voice import load_studio_speakers

                self._studio = load_studio_speakers(path)
            else:
                self._studio = {}
        return self._studio

    def voices(self) -> list[VoiceInfo]:
        speakers = self._speakers()
        studio = [VoiceInfo(id=name, name=name, kind="studio") for name in speakers]
        cloned = [
            VoiceInfo(id=name, name=name, kind="cloned")
            for name in self._library()
            if name not in speakers
        ]
        return studio + cloned

    def resolve_voice(self, voice: str | None) -> str:
        if (
            self.allow_voice_paths
            and voice is not None
            and voice.strip().lower().endswith(AUDIO_SUFFIXES)
        ):
            path = Path(voice.strip()).expanduser()
            if path.is_file():
                return str(path)
        return super().resolve_voice(voice)

    # -- requests ------------------------------------------------------------------------------

    def validate(self, request: SynthesisRequest, max_chars: int | None = None) -> SynthesisRequest:
        checked = super().validate(request, max_chars)
        options = engine_options(checked.options)
        # Builds (and so validates) the full settings, with config defaults filled in.
        self.model.generation_settings(speed=checked.speed, **options)
        return checked

    def _voice(self, voice_id: str) -> Any:
        model = self.model
        if voice_id in model.speakers:
            return model.speakers[voice_id]
        clips = self._library().get(voice_id)
        if clips is None:
            path = Path(voice_id)
            if not (self.allow_voice_paths and path.is_file()):
                raise UnknownVoice(voice_id)
            clips = [path]
        return model.clone_voice(clips)

    def synthesize_stream(
        self, request: SynthesisRequest, cancel: threading.Event | None = None
    ) -> Iterator[AudioChunk]:
        # Everything that can be wrong is raised here, before the first chunk.
        request = self.validate(request)
        options = engine_options(request.options)
        voice = self._voice(request.voice or "")
        chunks = self.model.synthesize_stream(
            request.text,
            language=request.language,
            voice=voice,
            speed=request.speed,
            cancel=cancel,
            **options,
        )
        return _as_audio_chunks(chunks, self.sample_rate)


def _as_audio_chunks(chunks: Iterator[Any], rate: int) -> Iterator[AudioChunk]:
    for chunk in chunks:
        yield AudioChunk(samples=np.asarray(chunk.wav, dtype=np.float32), sample_rate=rate)


def engine_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The request options XTTS understands, type-checked; unknown names are an error."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in OPTIONS:
            raise InvalidRequest(
                f"unknown option {key!r} for xtts (known: {', '.join(OPTIONS)})", field=key
            )
        if value is None:
            continue
        kinds = OPTIONS[key]
        if (bool not in kinds and isinstance(value, bool)) or not isinstance(value, kinds):
            raise InvalidRequest(f"option {key} has an invalid value {value!r}", field=key)
        out[key] = value
    return out


def _placement(device: str, precision: str) -> tuple[str, str]:
    """Concrete device and precision for XttsModel.load from the `auto`-able settings."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = (precision or "auto").lower()
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    if precision == "int8":
        raise LowvoxError("the xtts engine does not support int8 yet; use fp32, bf16 or fp16")
    return device, precision
