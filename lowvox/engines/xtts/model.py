"""`XttsModel`: the assembled XTTS v2 model and its public API.

    model = XttsModel.load("models/xtts-v2")
    voice = model.clone_voice(["ref.wav"])
    result = model.synthesize("Hello there.", language="en", voice=voice)
    for chunk in model.synthesize_stream("Hello there.", language="en", voice=voice): ...

`load` reads config.json, builds the modules on the meta device and assigns the checkpoint's
weights (through the safetensors cache, see `checkpoint.load_weights`). Generation defaults
come from the model's config.json.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowvox.engines.xtts.checkpoint import (
    CheckpointError,
    check_keys,
    default_cache_path,
    load_weights,
)
from lowvox.engines.xtts.conditioning import ConditioningEncoder
from lowvox.engines.xtts.config import ConfigError, XttsConfig
from lowvox.engines.xtts.generate import Generator, LatentStretcher, stretch_latents
from lowvox.engines.xtts.gpt import XttsGpt
from lowvox.engines.xtts.hifigan import HifiganDecoder
from lowvox.engines.xtts.perceiver import PerceiverResampler
from lowvox.engines.xtts.sampling import SamplingOptions
from lowvox.engines.xtts.streaming import StreamingVocoder
from lowvox.engines.xtts.voice import Voice, VoiceCache, load_studio_speakers
from lowvox.engines.xtts.voice import clone_voice as clone_from_references
from lowvox.errors import InvalidRequest, LowvoxError, UnknownLanguage, UnknownVoice
from lowvox.text.tokenizer import XttsTokenizer

log = logging.getLogger(__name__)

# Fixed by the XTTS v2 architecture itself, not by config.json: 80 mel bands into the
# conditioning encoder, and the perceiver's shape (32 latents, 8 heads of 64, depth 2, x4 MLP).
COND_MEL_CHANNELS = 80
PERCEIVER = {"depth": 2, "num_latents": 32, "dim_head": 64, "heads": 8, "ff_mult": 4}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_STREAM_FIRST_TOKENS = 20


@dataclass(frozen=True)
class SynthesisResult:
    """Whole-utterance audio: float32 samples at `sample_rate`, and the audio codes of each
    sentence (without the stop token)."""

    wav: np.ndarray
    sample_rate: int
    codes: list[np.ndarray]


@dataclass(frozen=True)
class StreamChunk:
    """A piece of audio from `synthesize_stream`; `sentence` is the index it belongs to."""

    wav: np.ndarray
    sample_rate: int
    sentence: int


@dataclass(frozen=True)
class GenerationSettings:
    """Everything `synthesize` needs besides text and voice, with config defaults filled in."""

    sampling: SamplingOptions
    max_new_tokens: int
    speed: float
    split_sentences: bool
    seed: int | None


class XttsModel(nn.Module):
    """XTTS v2: voice conditioning, the autoregressive GPT, and the HiFi-GAN decoder."""

    def __init__(self, config: XttsConfig) -> None:
        super().__init__()
        a = config.model_args
        if not a.gpt_use_perceiver_resampler:
            raise ConfigError("XTTS v1 checkpoints (no perceiver resampler) are not supported")
        dim = a.gpt_n_model_channels
        self.config = config
        self.gpt = XttsGpt(
            a,
            conditioning_encoder=ConditioningEncoder(
                COND_MEL_CHANNELS, dim, num_attn_heads=a.gpt_n_heads
            ),
            conditioning_perceiver=PerceiverResampler(dim, dim_context=dim, **PERCEIVER),
        )
        self.hifigan_decoder = HifiganDecoder(
            input_sample_rate=a.input_sample_rate,
            output_sample_rate=a.output_sample_rate,
            output_hop_length=a.output_hop_length,
            ar_mel_length_compression=a.gpt_code_stride_len,
            decoder_input_dim=a.decoder_input_dim,
            d_vector_dim=a.d_vector_dim,
            cond_d_vector_in_each_upsampling_layer=a.cond_d_vector_in_each_upsampling_layer,
        )
        self.register_buffer("mel_stats", torch.ones(COND_MEL_CHANNELS))
        self.fingerprint = ""
        self.tokenizer: Any = None
        self.speakers: dict[str, Voice] = {}
        self.voice_cache: VoiceCache | None = None
        self.model_dir: Path | None = None
        self._lock = threading.RLock()  # one generation at a time; re-entrant for callbacks

    # ------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> XttsModel:
        """Load a model folder (config.json, model.pth, vocab.json, optional speakers_xtts.pth).

        `precision` ("fp32", "fp16", "bf16") applies to the GPT; the conditioning modules and
        the vocoder stay in float32. Converted weights are cached as safetensors in
        `cache_dir` (or beside model.pth when that folder is writable).
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise LowvoxError(f"model folder not found: {model_dir}")
        if precision not in PRECISIONS:
            raise LowvoxError(
                f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})"
            )
        # Cheap checks first, so a broken folder fails before the weights are converted.
        checkpoint = model_dir / "model.pth"
        config_path = model_dir / "config.json"
        config = XttsConfig.from_file(config_path) if config_path.is_file() else None
        vocab_path = _vocab_path(model_dir, config)
        tokenizer = XttsTokenizer.from_file(vocab_path)

        cache_path = default_cache_path(checkpoint, Path(cache_dir) if cache_dir else None)
        weights = load_weights(checkpoint, cache_path)
        if config is None:
            if weights.config is None:
                raise ConfigError(f"{model_dir} has no config.json and model.pth holds no config")
            config = XttsConfig.from_dict(weights.config)
        config = replace(config, model_args=_text_tokens_from_vocab(config.model_args, vocab_path))

        model = cls.from_state_dict(config, weights.state_dict, source=str(checkpoint))
        model.fingerprint = weights.fingerprint
        model.model_dir = model_dir
        model.to(device)
        if precision != "fp32":
            model.gpt.to(PRECISIONS[precision])
            # The voice modules run once per voice, in float32.
            model.gpt.conditioning_encoder.float()
            model.gpt.conditioning_perceiver.float()

        model.tokenizer = tokenizer
        speakers_file = model_dir / "speakers_xtts.pth"
        if speakers_file.is_file():
            model.speakers = load_studio_speakers(speakers_file)
        log.info(
            "loaded XTTS from %s (%d layers, dim %d, %d studio speakers)",
            model_dir,
            config.model_args.gpt_layers,
            config.model_args.gpt_n_model_channels,
            len(model.speakers),
        )
        return model

    @classmethod
    def from_state_dict(
        cls, config: XttsConfig, state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
    ) -> XttsModel:
        """Build on the meta device and assign mapped weights; every key must match."""
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        check_keys(expected, state_dict, source)
        model.load_state_dict(state_dict, strict=True, assign=True)
        if not any(t.is_meta for t in state_dict.values()):  # meta in, meta out: layout checks
            tensors = [*model.named_parameters(), *model.named_buffers()]
            left = [n for n, t in tensors if t.is_meta]
            if left:
                raise CheckpointError(f"{source} left tensors uninitialised: {_names(left)}")
        return model.requires_grad_(False).eval()

    # ------------------------------------------------------------------------------------
    # Voices

    @property
    def sample_rate(self) -> int:
        return self.config.model_args.output_sample_rate

    @property
    def device(self) -> torch.device:
        return self.gpt.mel_head.weight.device

    def clone_voice(
        self,
        paths: Any,
        gpt_cond_len: int | None = None,
        gpt_cond_chunk_len: int | None = None,
        max_ref_length: int | None = None,
        sound_norm_refs: bool | None = None,
    ) -> Voice:
        """Voice latents from one or more reference recordings (paths or arrays)."""
        c = self.config.conditioning
        with self._lock:
            return clone_from_references(
                self,
                paths,
                gpt_cond_len=c.gpt_cond_len if gpt_cond_len is None else gpt_cond_len,
                gpt_cond_chunk_len=(
                    c.gpt_cond_chunk_len if gpt_cond_chunk_len is None else gpt_cond_chunk_len
                ),
                max_ref_length=c.max_ref_len if max_ref_length is None else max_ref_length,
                sound_norm_refs=c.sound_norm_refs if sound_norm_refs is None else sound_norm_refs,
                cache=self.voice_cache,
            )

    def resolve_voice(self, voice: Voice | str | None) -> Voice:
        if voice is None:
            if not self.speakers:
                raise InvalidRequest("no voice given and the model has no studio speakers")
            return next(iter(self.speakers.values()))
        if isinstance(voice, str):
            if voice in self.speakers:
                return self.speakers[voice]
            raise UnknownVoice(voice)
        return voice

    def resolve_language(self, language: str | None) -> str:
        langs = self.config.languages
        lang = (language or "en").strip().lower()
        if lang in langs:
            return lang
        base = lang.split("-")[0].split("_")[0]
        if base in langs:
            return base
        raise UnknownLanguage(language or "", list(langs))

    # ------------------------------------------------------------------------------------
    # Synthesis

    def generation_settings(
        self,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        do_sample: bool | None = None,
        max_new_tokens: int | None = None,
        speed: float = 1.0,
        split_sentences: bool = True,
        seed: int | None = None,
    ) -> GenerationSettings:
        """Fill unset options from config.json and validate them all."""
        d = self.config.sampling
        sampling = SamplingOptions(
            temperature=d.temperature if temperature is None else temperature,
            top_k=d.top_k if top_k is None else top_k,
            top_p=d.top_p if top_p is None else top_p,
            repetition_penalty=d.repetition_penalty
            if repetition_penalty is None
            else repetition_penalty,
            do_sample=d.do_sample if do_sample is None else bool(do_sample),
        )
        limit = self.config.model_args.max_generated_tokens
        if max_new_tokens is None:
            max_new_tokens = limit
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise InvalidRequest("max_new_tokens must be an integer", field="max_new_tokens")
        if not 1 <= max_new_tokens <= limit:
            raise InvalidRequest(
                f"max_new_tokens must be in 1..{limit}, got {max_new_tokens}",
                field="max_new_tokens",
            )
        if not (isinstance(speed, int | float) and 0.05 <= speed <= 20):
            raise InvalidRequest(f"speed {speed!r} is out of range", field="speed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequest("seed must be an integer", field="seed")
        return GenerationSettings(sampling, max_new_tokens, float(speed), split_sentences, seed)

    def sentences(self, text: str, language: str, split: bool) -> list[str]:
        """The pieces generated one at a time (the reference lowercases and strips them)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("text is empty", field="text")
        if split:
            from lowvox.text import split_sentences

            pieces = split_sentences(text, language, self.tokenizer.char_limit(language))
        else:
            pieces = [text]
        pieces = [p.strip().lower() for p in pieces]
        return [p for p in pieces if p]

    def encode_sentences(self, text: str, language: str, split: bool) -> list[torch.Tensor]:
        """Text ids [1, T] of every piece, checked against the model's text limit up front
        (so a stream fails before its first chunk, not halfway)."""
        limit = self.config.model_args.gpt_max_text_tokens
        encoded = []
        for piece in self.sentences(text, language, split):
            ids = self.tokenizer.encode(piece, language)
            if len(ids) >= limit:
                hint = "" if split else " (turn sentence splitting on)"
                raise InvalidRequest(
                    f"a sentence is {len(ids)} tokens long, over the model's limit of "
                    f"{limit - 1}{hint}: {piece[:60]!r}...",
                    field="text",
                )
            encoded.append(torch.tensor([ids], dtype=torch.long, device=self.device))
        return encoded

    def _torch_generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def _vocode(self, latents: torch.Tensor, voice: Voice) -> np.ndarray:
        dec = self.hifigan_decoder
        w = next(dec.parameters())
        g = voice.speaker_embedding.to(w.device, w.dtype)
        wav = dec(latents.to(w.device, w.dtype), g)  # [1, 1, N]
        return wav.reshape(-1).float().cpu().numpy()

    @torch.inference_mode()
    def synthesize(
        self,
        text: str,
        language: str | None = None,
        voice: Voice | str | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        do_sample: bool | None = None,
        max_new_tokens: int | None = None,
        speed: float = 1.0,
        split_sentences: bool = True,
        seed: int | None = None,
    ) -> SynthesisResult:
        """Speak `text` with `voice`; unset generation options come from config.json."""
        settings = self.generation_settings(
            temperature, top_k, top_p, repetition_penalty, do_sample, max_new_tokens,
            speed, split_sentences, seed,
        )  # fmt: skip
        lang = self.resolve_language(language)
        v = self.resolve_voice(voice)
        pieces = self.encode_sentences(text, lang, settings.split_sentences)
        wavs, codes = [], []
        with self._lock:
            rng = self._torch_generator(settings.seed)
            for text_ids in pieces:
                gen = Generator(
                    self.gpt,
                    v.gpt_cond_latent,
                    text_ids,
                    settings.sampling,
                    settings.max_new_tokens,
                    rng,
                ).run()
                latents = stretch_latents(gen.latents, settings.speed)
                wavs.append(self._vocode(latents, v))
                codes.append(gen.codes.cpu().numpy())
        wav = np.concatenate(wavs).astype(np.float32) if wavs else np.zeros(0, np.float32)
        return SynthesisResult(wav=wav, sample_rate=self.sample_rate, codes=codes)

    def synthesize_stream(
        self,
        text: str,
        language: str | None = None,
        voice: Voice | str | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        do_sample: bool | None = None,
        max_new_tokens: int | None = None,
        speed: float = 1.0,
        split_sentences: bool = True,
        seed: int | None = None,
        first_chunk_tokens: int = DEFAULT_STREAM_FIRST_TOKENS,
        chunk_tokens: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[StreamChunk]:
        """Yield audio as it is generated: the first chunk after `first_chunk_tokens` tokens,
        then every `chunk_tokens` (default: the same) tokens. Only new latents are vocoded
        (with a little context), so each chunk costs the same however long the text is.

        Everything is validated before the first chunk; setting `cancel` stops generation
        between tokens.
        """
        settings = self.generation_settings(
            temperature, top_k, top_p, repetition_penalty, do_sample, max_new_tokens,
            speed, split_sentences, seed,
        )  # fmt: skip
        for name, value in (
            ("first_chunk_tokens", first_chunk_tokens),
            ("chunk_tokens", chunk_tokens),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise InvalidRequest(f"{name} must be an integer >= 1", field=name)
        lang = self.resolve_language(language)
        v = self.resolve_voice(voice)
        pieces = self.encode_sentences(text, lang, settings.split_sentences)
        return self._stream(pieces, v, settings, first_chunk_tokens,
                            chunk_tokens or first_chunk_tokens, cancel)  # fmt: skip

    def _stream(
        self,
        pieces: Sequence[torch.Tensor],
        voice: Voice,
        settings: GenerationSettings,
        first_chunk_tokens: int,
        chunk_tokens: int,
        cancel: threading.Event | None,
    ) -> Iterator[StreamChunk]:
        with self._lock, torch.inference_mode():
            rng = self._torch_generator(settings.seed)
            dec = self.hifigan_decoder
            w = next(dec.parameters())
            g = voice.speaker_embedding.to(w.device, w.dtype)
            for index, text_ids in enumerate(pieces):
                # The vocoder emits whenever we push; the cadence is decided here.
                vocoder = StreamingVocoder(dec, g, first_chunk_tokens=1, chunk_tokens=1)
                stretcher = LatentStretcher(settings.speed)
                gen = Generator(
                    self.gpt,
                    voice.gpt_cond_latent,
                    text_ids,
                    settings.sampling,
                    settings.max_new_tokens,
                    rng,
                )
                pending: list[torch.Tensor] = []
                due = first_chunk_tokens
                for step in gen.steps():
                    if cancel is not None and cancel.is_set():
                        return
                    pending.append(step.latent)
                    if len(pending) >= due:
                        frames = stretcher.push(_cat(pending, w))
                        pending, due = [], chunk_tokens
                        wav = vocoder.push(frames) if frames.shape[1] else np.zeros(0, np.float32)
                        if wav.size:
                            yield StreamChunk(wav.astype(np.float32), self.sample_rate, index)
                tails = [stretcher.push(_cat(pending, w))] if pending else []
                tails.append(stretcher.finish())
                rest = [vocoder.push(t) for t in tails if t.shape[1]]
                rest.append(vocoder.flush())
                wav = np.concatenate([r for r in rest if r.size] or [np.zeros(0, np.float32)])
                if wav.size:
                    yield StreamChunk(wav.astype(np.float32), self.sample_rate, index)


def _names(keys: list[str], limit: int = 40) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _cat(latents: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(latents, dim=1).to(like.device, like.dtype)  # [1, n, D]


def _vocab_path(model_dir: Path, config: XttsConfig | None) -> Path:
    path = model_dir / "vocab.json"
    if path.is_file():
        return path
    named = config.model_args.tokenizer_file if config is not None else ""
    if named and (model_dir / named).is_file():
        return model_dir / named
    raise LowvoxError(f"{model_dir} has no vocab.json")


def _text_tokens_from_vocab(args: Any, vocab_path: Path) -> Any:
    """The reference takes the text vocabulary size and [START]/[STOP] ids from the
    tokenizer file rather than config.json; do the same, noting any disagreement."""
    try:
        raw = json.loads(vocab_path.read_text(encoding="utf-8"))
        ids = dict(raw["model"]["vocab"])
        ids.update({t["content"]: t["id"] for t in raw.get("added_tokens", [])})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LowvoxError(f"cannot read {vocab_path}: {e}") from e
    found = {
        "gpt_number_text_tokens": max(ids.values()) + 1,
        "gpt_start_text_token": ids.get("[START]", args.gpt_start_text_token),
        "gpt_stop_text_token": ids.get("[STOP]", args.gpt_stop_text_token),
    }
    changed = {k: v for k, v in found.items() if getattr(args, k) != v}
    if changed:
        log.warning("config.json text token settings differ from %s; using %s", vocab_path, changed)
        return replace(args, **changed)
    return args


__all__ = [
    "GenerationSettings",
    "StreamChunk",
    "SynthesisResult",
    "XttsModel",
]
