"""The `xtts` engine: the XTTS v2 model behind lowvox's engine interface.

Voices are the model's studio speakers plus every voice in the voice library (folders of
reference clips, or lone `.wav` files), cloned on first use and cached on disk. For the
CLI, a voice may also be the path of an audio file (`--voice ref.wav`).

Threads: `validate` needs only config.json, vocab.json and the voice names, so it runs
anywhere (the server runs it before queueing). Everything that touches the model (loading,
cloning, speaking, unloading, the runtime switches) runs on the thread that owns the
engine: the server's scheduler worker, or the caller's thread for the CLI.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lowvox.engines.base import (
    AudioChunk,
    BatchEvent,
    Engine,
    EngineBatch,
    EngineCapabilities,
    SynthesisRequest,
    VoiceInfo,
)
from lowvox.engines.xtts.config import VOCODER_PRECISIONS, ConfigError, XttsConfig
from lowvox.engines.xtts.options import XttsOptions
from lowvox.errors import EngineUnavailable, LowvoxError, UnknownVoice
from lowvox.runtime.devices import probe_machine
from lowvox.runtime.planner import Plan, PlanError
from lowvox.runtime.planner import plan as make_plan
from lowvox.settings import Settings
from lowvox.text.tokenizer import XttsTokenizer

if TYPE_CHECKING:
    import torch

    from lowvox.engines.xtts.model import XttsModel
    from lowvox.engines.xtts.pipeline import Batch, Utterance
    from lowvox.engines.xtts.voices import Voice
    from lowvox.runtime.residency import Residency

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus")
MODEL_FILES = ("config.json", "model.pth", "vocab.json")
# Requests decoded together by default (the scheduler's batch): the server's default.
MAX_BATCH_SIZE: int = Settings.model_fields["max_batch_size"].default
# The KV-cache budget, unless set: this share of the memory free when the model loads.
KV_SHARE_OF_FREE_MEMORY = 0.5


def missing_model_files(model_dir: Path) -> list[str]:
    return [name for name in MODEL_FILES if not (model_dir / name).is_file()]


@dataclass(frozen=True)
class XttsRequest(SynthesisRequest):
    """A request `XttsEngine.validate` has checked: its options resolved and its text split
    into sentences and tokenised. Speaking it checks nothing again."""

    settings: XttsOptions = XttsOptions()
    pieces: tuple[torch.Tensor, ...] = ()


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
        sentence_splitting=True,
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
        plan: Plan | None = None,
        vocoder_precision: str = "auto",
        allow_voice_paths: bool = True,
        max_batch_size: int = MAX_BATCH_SIZE,
        kv_cache_mb: int | None = None,
    ) -> None:
        """`device`, `precision` and `residency` go through the device planner (unless a
        `plan` is given); an impossible choice raises `PlanError`. `threads` sets torch's
        CPU threads at load (None: leave them). `max_batch_size`: requests decoded together;
        `kv_cache_mb`: the KV-cache memory they may reserve (None: half the memory free at
        load)."""
        self.model_dir = Path(model_dir)
        # A voice given as an audio file path is for the CLI's `say`; engines made from the
        # settings for the server and jobs leave it off (`create_engine`), and the server
        # also refuses path-like names itself, so that no client can make it open a file.
        self.allow_voice_paths = allow_voice_paths
        missing = missing_model_files(self.model_dir)
        if missing:
            raise EngineUnavailable(
                f"no XTTS model in {self.model_dir} (missing {', '.join(missing)}); "
                "install one with `lowvox models download xtts-v2 --accept-license`"
            )
        try:
            self.config = XttsConfig.from_file(self.model_dir / "config.json")
            self.tokenizer = XttsTokenizer.from_file(self.model_dir / "vocab.json")
        except (ConfigError, LowvoxError, OSError, ValueError) as e:
            raise EngineUnavailable(f"cannot read the model in {self.model_dir}: {e}") from e
        self.voices_dir = Path(voices_dir) if voices_dir is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.plan = (
            plan if plan is not None else make_plan(probe_machine(), device, precision, residency)
        )
        self.device = self.plan.device
        self.precision = self.plan.precision
        self.threads = threads
        if vocoder_precision not in ("auto", *VOCODER_PRECISIONS):
            raise PlanError(
                f"unknown vocoder precision {vocoder_precision!r} "
                f"(auto, {', '.join(VOCODER_PRECISIONS)})"
            )
        if vocoder_precision in ("bf16", "int8") and self.device != "cpu":
            raise PlanError(
                f"vocoder precision {vocoder_precision} is a CPU feature; on a GPU use fp32 or auto"
            )
        # On a GPU the vocoder runs fp32 (low-VRAM loads on the CPU first: decide here).
        self.vocoder_precision = vocoder_precision if self.device == "cpu" else "fp32"
        if max_batch_size < 1:
            raise PlanError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.kv_cache_mb = kv_cache_mb
        self._low_vram = self.plan.residency == "low_vram"
        self._fast_path = False
        self._model: XttsModel | None = None
        self._residency: Residency | None = None
        # Requests (a batch with rows, a stream) inside `_on_device` now: while any is,
        # the weights may not move (their KV caches and residency are tied to them).
        self._in_use = 0
        self._studio: dict[str, Voice] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, allow_voice_paths: bool = False) -> XttsEngine:
        """The model folder is `settings.model_dir`, else `<models>/<model_name>`. Voices
        given as audio file paths are refused unless `allow_voice_paths` (the CLI's)."""
        model_dir = settings.model_dir or settings.models_path / settings.model_name
        missing = missing_model_files(model_dir)
        if missing:  # before planning: a missing model is the error that matters
            return cls(model_dir, allow_voice_paths=allow_voice_paths)
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
            vocoder_precision=settings.vocoder_precision,
            allow_voice_paths=allow_voice_paths,
            max_batch_size=settings.max_batch_size,
            kv_cache_mb=settings.kv_cache_mb,
        )

    # -- the model (on the owning thread) ------------------------------------------------------

    def load(self) -> None:
        self.model  # noqa: B018 -- loads it

    def warmup(self) -> None:
        """A few tokens through every stage, so the first real request is not the slow one."""
        if self.default_voice is None:
            return
        from lowvox.engines.xtts.pipeline import warm_up

        request = self.validate(
            SynthesisRequest(text="Ready.", options={"max_new_tokens": 8, "seed": 0})
        )
        for _ in self.synthesize_stream(request):
            pass
        warm_up(self.model)

    def unload(self) -> None:
        """Free the model entirely (RAM and GPU); the next request loads it again."""
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

    @property
    def model(self) -> XttsModel:
        """The loaded XttsModel (loaded here on first use: call on the owning thread)."""
        if self._model is None:
            self._model = self._load_model()
        return self._model

    def _load_model(self) -> XttsModel:
        import torch

        from lowvox.engines.xtts.loader import load_model
        from lowvox.engines.xtts.voices import VoiceCache

        if self.threads:
            torch.set_num_threads(self.threads)
        cache = self.cache_dir / "xtts" if self.cache_dir is not None else None
        # Low-VRAM: the weights load into RAM; the GPU only sees them during requests.
        where = "cpu" if self._low_vram else self.device
        model = load_model(
            self.model_dir, where, self.precision, cache_dir=cache,
            vocoder_precision=self.vocoder_precision, run_on=self.device,
        )  # fmt: skip
        if cache is not None:
            model.voice_cache = VoiceCache(cache / "voices")
        if self._low_vram:
            self._residency = self._make_residency(model)
        log.info(
            "xtts ready: %s on %s%s, %s vocoder (%d CPU threads)",
            self.precision, self.device, " (low-VRAM)" if self._low_vram else "",
            model.hifigan_decoder.precision, torch.get_num_threads(),
        )  # fmt: skip
        return model

    def _make_residency(self, model: XttsModel) -> Residency:
        from lowvox.runtime.residency import Residency

        return Residency(model, "cpu", self.device, layers=list(model.gpt.gpt.h))

    def kv_positions(self, model: XttsModel) -> int:
        """KV-cache positions all requests of a batch may reserve together."""
        args = model.config.model_args
        itemsize = model.gpt.cache_dtype.itemsize  # keys and values are kept in it
        per_position = 2 * args.gpt_layers * args.gpt_n_model_channels * itemsize
        if self.kv_cache_mb is not None:
            budget = self.kv_cache_mb * 2**20
        else:
            budget = int(KV_SHARE_OF_FREE_MEMORY * _free_memory(model.device))
        return max(1, budget // per_position)

    # -- runtime switches (AllTalk's "low VRAM" and "DeepSpeed") --------------------------------

    @property
    def low_vram(self) -> bool:
        return self._low_vram

    @property
    def fast_path(self) -> bool:
        return self._fast_path

    def set_low_vram(self, enabled: bool) -> None:
        """Keep the weights in RAM and move them to the GPU per request (or back to the GPU
        for good). Without a GPU there is nothing to move; the setting is remembered."""
        enabled = bool(enabled)
        if enabled == self._low_vram:
            return
        model = self._model
        moves = self.device.startswith("cuda") or self.plan.residency == "low_vram"
        if moves and model is not None and self._in_use:
            # Mid-request the weights cannot move: turning it on would leave the batch's
            # KV cache on the GPU with the weights in RAM, turning it off would let the
            # running requests' residency put the weights back in RAM as they end.
            raise LowVramBusy()
        self._low_vram = enabled
        if not moves:
            log.info("low-VRAM mode has no effect on the CPU")
            return
        if model is None:
            return
        if enabled:
            model.to("cpu")
            _empty_gpu_cache()
            self._residency = self._make_residency(model)
        else:
            if self._residency is not None:
                self._residency.close()
            self._residency = None
            model.to(self.device)
        log.info("xtts low-VRAM mode %s", "on" if enabled else "off")

    def set_fast_path(self, enabled: bool) -> None:
        """AllTalk's "DeepSpeed" switch: on a GPU with the model resident, batches replay
        their decode step as CUDA graphs. On the CPU, or in low-VRAM mode (a graph needs the
        weights to stay put), it is remembered but changes nothing."""
        self._fast_path = bool(enabled)

    @property
    def graphs(self) -> bool:
        """Whether decode steps are replayed as CUDA graphs (see `set_fast_path`)."""
        return self._fast_path and self.device.startswith("cuda") and not self._low_vram

    # -- catalogue ------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.config.model_args.output_sample_rate

    def languages(self) -> list[str]:
        return list(self.config.languages)

    def _library(self) -> dict[str, list[Path]]:
        """Voice name -> reference clips, from the voice library folder."""
        if self.voices_dir is None or not self.voices_dir.is_dir():
            return {}
        from lowvox.voices.store import VoiceStore

        return {v.name: list(v.clips) for v in VoiceStore(self.voices_dir).list()}

    def _speakers(self) -> dict[str, Voice]:
        """Studio speakers; read from speakers_xtts.pth without loading the whole model."""
        if self._model is not None:
            return self._model.speakers
        if self._studio is None:
            path = self.model_dir / "speakers_xtts.pth"
            if path.is_file():
                from lowvox.engines.xtts.voices import load_studio_speakers

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

    def prepare_voice(self, name: str, clips: Sequence[Path]) -> None:
        """Clone a library voice once: its latents are cached, later requests skip cloning."""
        self.model.clone_voice(list(clips))

    # -- requests -------------------------------------------------------------------------------

    def validate(self, request: SynthesisRequest, max_chars: int | None = None) -> XttsRequest:
        if isinstance(request, XttsRequest):
            return request
        from lowvox.engines.xtts.pipeline import encode_text

        checked = super().validate(request, max_chars)
        settings = XttsOptions.from_mapping(checked.options, checked.speed).resolved(self.config)
        pieces = encode_text(
            self.tokenizer,
            checked.text,
            checked.language or "en",
            settings.split_sentences,
            self.config.model_args.gpt_max_text_tokens,
        )
        return XttsRequest(
            text=checked.text,
            voice=checked.voice,
            language=checked.language,
            speed=checked.speed,
            options=checked.options,
            settings=settings,
            pieces=pieces,
        )

    def _voice(self, voice_id: str) -> Voice:
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

    def utterance(self, request: SynthesisRequest) -> Utterance:
        """A request made ready to speak (its voice cloned or looked up): owning thread."""
        from lowvox.engines.xtts.pipeline import Utterance

        checked = self.validate(request)
        return Utterance(checked.pieces, self._voice(checked.voice or ""), checked.settings)

    def open_batch(self) -> EngineBatch:
        return XttsBatch(self)

    def synthesize_stream(
        self, request: SynthesisRequest, cancel: threading.Event | None = None
    ) -> Iterator[AudioChunk]:
        """One request alone (the CLI's path): validated and made ready here, before the
        first chunk, so every error comes before any audio."""
        from lowvox.engines.xtts.pipeline import stream

        utt = self.utterance(request)
        rate = self.sample_rate

        def chunks() -> Iterator[AudioChunk]:
            with self._on_device():
                for chunk in stream(self.model, utt, cancel):
                    if chunk.wav.size:
                        yield AudioChunk(np.asarray(chunk.wav, dtype=np.float32), rate)

        return chunks()

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """The weights on their compute device while requests run (low-VRAM residency)."""
        residency = self._residency
        self._in_use += 1
        try:
            with residency.active() if residency is not None else contextlib.nullcontext():
                yield
        finally:
            self._in_use -= 1


class LowVramBusy(EngineUnavailable):
    """The low-VRAM switch came while requests run on the weights it would move: a 503
    with a Retry-After of a few seconds: asked again once they are done, it applies."""

    retry_after = 5

    def __init__(self) -> None:
        super().__init__(
            "low-VRAM mode cannot change while requests are running; retry when they are done"
        )


class XttsBatch(EngineBatch):
    """The scheduler's batch for XTTS: a `pipeline.Batch` of the engine's model (made anew
    when the model was reloaded), with the weights on their compute device while it holds
    requests."""

    def __init__(self, engine: XttsEngine) -> None:
        self.engine = engine
        self._batch: Batch | None = None
        self._ids: dict[int, int] = {}  # pipeline utterance id -> request id
        self._next_id = 0
        self._device: contextlib.ExitStack | None = None

    @property
    def capacity(self) -> int:
        return self.engine.max_batch_size

    def __len__(self) -> int:
        return len(self._ids)

    def _pipeline(self) -> Batch:
        from lowvox.engines.xtts.pipeline import Batch

        model = self.engine.model
        batch = self._batch
        # Made anew, once empty, for a reloaded model and after the fast-path or low-VRAM
        # switch (CUDA graphs on or off: a graph must never replay over weights that move).
        stale = batch is not None and (
            batch.model is not model or batch.decoder.graphs != self.engine.graphs
        )
        if batch is None or (stale and not len(batch)):
            batch = Batch(
                model,
                max_rows=self.engine.max_batch_size,
                graphs=self.engine.graphs,
                kv_positions=self.engine.kv_positions(model),
            )
            self._batch = batch
        return batch

    def fits(self, request: SynthesisRequest) -> bool:
        if len(self) >= self.capacity:
            return False
        if not len(self) or not isinstance(request, XttsRequest) or self._batch is None:
            return True
        return self._batch.fits(request.pieces, request.settings)

    def add(self, request: SynthesisRequest, cancel: threading.Event, bulk: bool = False) -> int:
        batch = self._pipeline()
        if self._device is None:
            self._device = contextlib.ExitStack()
            self._device.enter_context(self.engine._on_device())
        try:
            utt = self.engine.utterance(request)
            uid = batch.add(utt, cancel, bulk=bulk)
        except BaseException:
            self._release_device()
            raise
        rid, self._next_id = self._next_id, self._next_id + 1
        self._ids[uid] = rid
        return rid

    def step(self) -> list[BatchEvent]:
        batch = self._batch
        if batch is None or not self._ids:
            return []
        rate = self.engine.sample_rate
        out = []
        try:
            events = batch.step()
        except Exception as e:  # the shared step itself failed: every request in it did
            log.exception("xtts batch step failed")
            error = e if isinstance(e, LowvoxError) else LowvoxError("synthesis failed")
            out = [BatchEvent(rid, error=error) for rid in self._ids.values()]
            self._ids.clear()
            self._batch = None
            self._release_device()
            return out
        for event in events:
            rid = self._ids[event.utterance]
            if event.chunk is not None:
                if event.chunk.wav.size:
                    wav = np.asarray(event.chunk.wav, dtype=np.float32)
                    out.append(BatchEvent(rid, chunk=AudioChunk(wav, rate)))
            else:
                out.append(BatchEvent(rid, done=event.done, error=event.error))
                del self._ids[event.utterance]
        if not self._ids:
            self._release_device()
        return out

    def _release_device(self) -> None:
        if self._device is not None and not self._ids:
            self._device.close()
            self._device = None


def _free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device` (RAM available to this process on a CPU)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def _empty_gpu_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
