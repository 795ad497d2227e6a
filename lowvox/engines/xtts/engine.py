"""The `xtts` engine: XttsModel behind lowvox's engine interface.

Voices are the model's studio speakers plus every voice in the voice library (folders of
reference clips, or lone `.wav` files), cloned on first use and cached on disk. For the
CLI, a voice may also be the path of an audio file (`--voice ref.wav`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowvox.engines.base import (
    AudioChunk,
    Engine,
    EngineCapabilities,
    SynthesisRequest,
    VoiceInfo,
    concat_chunks,
)
from lowvox.errors import EngineUnavailable, InvalidRequest, UnknownVoice
from lowvox.runtime.devices import probe_machine
from lowvox.runtime.planner import Plan, PlanError
from lowvox.runtime.planner import plan as make_plan
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
# Concurrent requests the server's scheduler may hand over as one batch.
MAX_BATCH_SIZE = 8


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
        residency: str = "auto",
        threads: int | None = None,
        keep_alive: float = 0.0,
        plan: Plan | None = None,
        vocoder_precision: str = "auto",
        allow_voice_paths: bool = True,
    ) -> None:
        """`device`, `precision` and `residency` go through the device planner (unless a
        `plan` is given); an impossible choice raises `PlanError`. `threads` sets torch's
        CPU threads at load (None: leave them). `keep_alive` > 0 unloads the model after
        that many idle seconds; the next request loads it again."""
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
        self.plan = (
            plan if plan is not None else make_plan(probe_machine(), device, precision, residency)
        )
        self.device = self.plan.device
        self.precision = self.plan.precision
        self.threads = threads
        self.keep_alive = float(keep_alive)
        if vocoder_precision not in ("auto", "fp32", "bf16"):
            raise PlanError(f"unknown vocoder precision {vocoder_precision!r} (auto, fp32, bf16)")
        if vocoder_precision == "bf16" and self.device != "cpu":
            raise PlanError("vocoder precision bf16 is a CPU feature; on a GPU use fp32 or auto")
        # On a GPU the vocoder runs fp32 (low-VRAM loads on the CPU first: decide here).
        self.vocoder_precision = vocoder_precision if self.device == "cpu" else "fp32"
        self.max_batch_size = MAX_BATCH_SIZE
        self.low_vram = self.plan.residency == "low_vram"
        self.fast_path = False
        self._model: Any = None
        self._residency: Any = None
        self._studio: dict[str, Any] | None = None
        self._loading = threading.RLock()
        self._busy = 0
        self._last_used = time.monotonic()
        self._idle_timer: threading.Timer | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> XttsEngine:
        """The model folder is `settings.model_dir`, else `<models>/<model_name>`."""
        model_dir = settings.model_dir or settings.models_path / settings.model_name
        missing = missing_model_files(model_dir)
        if missing:  # before planning: a missing model is the error that matters
            return cls(model_dir)
        machine = probe_machine()
        plan = make_plan(machine, settings.device, settings.precision, settings.residency)
        log.info("xtts plan: %s", plan.describe())
        if plan.device == "cpu":
            from lowvox.runtime import kernels

            log.info("cpu kernels: %s", kernels.describe())
        return cls(
            model_dir,
            voices_dir=settings.voices_path,
            cache_dir=settings.cache_path,
            plan=plan,
            threads=settings.threads or machine.cpu_count,
            keep_alive=settings.keep_alive,
            vocoder_precision=settings.vocoder_precision,
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
        self.model.warm_up_vocoder()

    def unload(self) -> None:
        """Free the model entirely (RAM and GPU); the next request loads it again."""
        with self._loading:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            if self._model is None:
                return
            if self._residency is not None:
                self._residency.close()
            self._model = self._residency = None
            gc.collect()
            _empty_gpu_cache()
            log.info("xtts model unloaded")

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _get_model(self) -> Any:
        with self._loading:
            if self._model is None:
                self._model = self._load_model()
                if self.keep_alive > 0:
                    self._arm_idle_timer(self.keep_alive)
            self._last_used = time.monotonic()  # validation and voice lookups count as use
            return self._model

    def _load_model(self) -> Any:
        import torch

        from lowvox.engines.xtts.model import XttsModel
        from lowvox.engines.xtts.voice import VoiceCache

        if self.threads:
            torch.set_num_threads(self.threads)
        cache = self.cache_dir / "xtts" if self.cache_dir is not None else None
        # Low-VRAM: the weights load into RAM; the GPU only sees them during requests.
        where = "cpu" if self.low_vram else self.device
        model = XttsModel.load(
            self.model_dir, where, self.precision, cache_dir=cache,
            vocoder_precision=self.vocoder_precision, run_on=self.device,
        )  # fmt: skip
        if cache is not None:
            model.voice_cache = VoiceCache(cache / "voices")
        if self.low_vram:
            self._residency = self._make_residency(model)
        self._apply_fast_path(model)
        log.info(
            "xtts ready: %s on %s%s, %s vocoder (%d CPU threads)",
            self.precision, self.device, " (low-VRAM)" if self.low_vram else "",
            model.hifigan_decoder.precision, torch.get_num_threads(),
        )  # fmt: skip
        return model

    def _make_residency(self, model: Any) -> Any:
        from lowvox.runtime.residency import Residency

        return Residency(model, "cpu", self.device, layers=list(model.gpt.gpt.h))

    @property
    def model(self) -> Any:
        """The loaded XttsModel (loads it on first use)."""
        return self._get_model()

    # -- runtime toggles (AllTalk's "low VRAM" and "DeepSpeed" switches) ----------------------

    def set_low_vram(self, enabled: bool) -> None:
        """Keep the weights in RAM and move them to the GPU per request (or back to the GPU
        for good). Without a GPU there is nothing to move; the setting is remembered."""
        with self._loading:
            enabled = bool(enabled)
            if enabled == self.low_vram:
                return
            if not self.device.startswith("cuda") and self.plan.residency != "low_vram":
                log.info("low-VRAM mode has no effect on the CPU")
                self.low_vram = enabled
                return
            self.low_vram = enabled
            model = self._model
            if model is None:
                return
            if enabled:
                self._apply_fast_path(model)  # the graph cannot follow moving weights
                model.to("cpu")
                _empty_gpu_cache()
                self._residency = self._make_residency(model)
            else:
                if self._residency is not None:
                    self._residency.close()
                self._residency = None
                model.to(self.device)
                self._apply_fast_path(model)
            log.info("xtts low-VRAM mode %s", "on" if enabled else "off")

    def set_fast_path(self, enabled: bool) -> None:
        """AllTalk's "DeepSpeed" switch: on a GPU with the model resident, decode through
        a fixed-shape step captured as a CUDA graph (captured here, not on the first
        request). On the CPU, or in low-VRAM mode (the graph needs the weights to stay
        put), it is remembered but changes nothing."""
        with self._loading:
            self.fast_path = bool(enabled)
            if self._model is not None:
                self._apply_fast_path(self._model)

    def _apply_fast_path(self, model: Any) -> None:
        usable = self.fast_path and self.device.startswith("cuda") and not self.low_vram
        if usable and model.static_decoder is None:
            model.enable_static_decoding()
            log.info("xtts fast path on: CUDA-graph decode step")
        elif not usable:
            if model.static_decoder is not None:
                model.disable_static_decoding()
            if self.fast_path:
                log.info("xtts fast path needs a GPU-resident model; decoding stays eager")

    # -- request bracketing: residency and keep-alive ----------------------------------------

    @contextlib.contextmanager
    def _request(self) -> Iterator[Any]:
        """Around every request: the model loaded, on its compute device while it runs, and
        the idle timer re-armed when it ends."""
        with self._loading:
            model = self._get_model()
            self._busy += 1
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            residency = self._residency
        try:
            with residency.active() if residency is not None else contextlib.nullcontext():
                yield model
        finally:
            with self._loading:
                self._busy -= 1
                self._last_used = time.monotonic()
                if self.keep_alive > 0 and self._busy == 0:
                    self._arm_idle_timer(self.keep_alive)

    def _arm_idle_timer(self, delay: float) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        timer = threading.Timer(delay, self._unload_if_idle)
        timer.daemon = True
        self._idle_timer = timer
        timer.start()

    def _unload_if_idle(self) -> None:
        with self._loading:
            self._idle_timer = None
            if self._busy or self._model is None:
                return  # a running request re-arms the timer when it ends
            idle = time.monotonic() - self._last_used
            if idle < self.keep_alive:
                self._arm_idle_timer(self.keep_alive - idle)
                return
            log.info("xtts idle for %.0f s: unloading", idle)
            self.unload()

    def _streamed(self, make: Any) -> Iterator[Any]:
        """Run the generator `make(model)` returns inside `_request`, lazily."""
        with self._request() as model:
            yield from make(model)

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
        return _as_audio_chunks(self._streamed(lambda _model: chunks), self.sample_rate)

    def synthesize_batch_stream(
        self,
        requests: Sequence[SynthesisRequest],
        cancels: Sequence[threading.Event | None] | None = None,
    ) -> Iterator[tuple[int, AudioChunk]]:
        """Several requests decoded in one batch (the server's scheduler groups concurrent
        requests): yields (index into `requests`, chunk), each request's chunks in order.
        Every request is validated before the first chunk; greedy results equal the same
        requests run alone."""
        from lowvox.engines.xtts.model import BatchItem

        if not requests:
            raise InvalidRequest("no requests to synthesize")
        items = []
        for raw in requests:
            request = self.validate(raw)
            settings = self.model.generation_settings(
                speed=request.speed, **engine_options(request.options)
            )
            voice = self._voice(request.voice or "")
            items.append(BatchItem(request.text, request.language, voice, settings))
        stream = self.model.stream_batch(items, cancels)
        rate = self.sample_rate
        return (
            (i, AudioChunk(np.asarray(c.wav, dtype=np.float32), rate))
            for i, c in self._streamed(lambda _model: stream)
        )

    def synthesize_batch(self, requests: Sequence[SynthesisRequest]) -> list[AudioChunk]:
        """Whole-utterance audio of several requests, decoded together."""
        parts: list[list[AudioChunk]] = [[] for _ in requests]
        for index, chunk in self.synthesize_batch_stream(requests):
            parts[index].append(chunk)
        return [concat_chunks(p, self.sample_rate) for p in parts]


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


def _empty_gpu_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
