"""`XttsModel`: the assembled XTTS v2 modules (voice conditioning, GPT, HiFi-GAN).

    model = XttsModel.load("models/xtts-v2")  # loader.load_model
    voice = model.clone_voice(["ref.wav"])
    wav = model.synthesize("Hello there.", language="en", voice=voice, seed=1).wav
    for chunk in model.synthesize_stream("Hello there.", language="en", voice=voice): ...

The model does no I/O and holds no locks: `loader.py` builds it on the meta device and
assigns the checkpoint's weights, and only the thread that owns it touches it afterwards
(ARCHITECTURE.md). Speaking is `pipeline.py`'s (text -> sentences -> decode rows -> audio
chunks): `synthesize` and `synthesize_stream` are the documented one-call API over its
`prepare`, `synthesize` and `stream`.

A model loaded from an int8 or (CPU) bf16 cache leaves out the modules that only cloning a
voice from reference audio needs (`CLONING_MODULES`): `cloning_source` then says where the
loader reads them from on the first clone (`loader.ensure_cloning_modules`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lowvox.engines.xtts.conditioning import ConditioningEncoder
from lowvox.engines.xtts.config import ConfigError, XttsConfig
from lowvox.engines.xtts.gpt import XttsGpt
from lowvox.engines.xtts.hifigan import HifiganDecoder
from lowvox.engines.xtts.perceiver import PerceiverResampler
from lowvox.engines.xtts.voices import Voice, VoiceCache
from lowvox.engines.xtts.voices import clone_voice as clone_from_references
from lowvox.text.tokenizer import XttsTokenizer

if TYPE_CHECKING:
    import threading

    from lowvox.engines.xtts.loader import CloningSource
    from lowvox.engines.xtts.results import StreamChunk, SynthesisResult

# Fixed by the XTTS v2 architecture itself, not by config.json: 80 mel bands into the
# conditioning encoder, and the perceiver's shape (32 latents, 8 heads of 64, depth 2, x4 MLP).
COND_MEL_CHANNELS = 80
PERCEIVER = {"depth": 2, "num_latents": 32, "dim_head": 64, "heads": 8, "ff_mult": 4}
# The modules used only to clone a voice from reference audio; speaking never runs them.
CLONING_MODULES = (
    "gpt.conditioning_encoder",
    "gpt.conditioning_perceiver",
    "hifigan_decoder.speaker_encoder",
)


class XttsModel(nn.Module):
    """XTTS v2: voice conditioning, the autoregressive GPT, and the HiFi-GAN decoder, plus
    what speaking needs beside the weights (tokenizer, studio speakers), set by the loader."""

    mel_stats: torch.Tensor  # [80] per-band divisor of the conditioning log-mel

    def __init__(self, config: XttsConfig) -> None:
        super().__init__()
        a = config.model_args
        if not a.gpt_use_perceiver_resampler:
            raise ConfigError("XTTS v1 checkpoints (no perceiver resampler) are not supported")
        self.config = config
        self.gpt = XttsGpt(
            a,
            conditioning_encoder=_conditioning_encoder(config),
            conditioning_perceiver=_conditioning_perceiver(config),
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
        self.tokenizer: XttsTokenizer | None = None
        self.speakers: dict[str, Voice] = {}
        self.voice_cache: VoiceCache | None = None
        self.model_dir: Path | None = None
        self.precision = "fp32"
        # Set while `CLONING_MODULES` are left out: where the loader reads them from.
        self.cloning_source: CloningSource | None = None
        # Where `.to()` last put the weights: low-VRAM residency points them at GPU copies
        # only during a request, so the device of a weight is not where they live.
        self._weights_device: torch.device | None = None

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cache_dir: str | os.PathLike[str] | None = None,
        vocoder_precision: str = "auto",
    ) -> XttsModel:
        """A model folder loaded by `loader.load_model` (see there for the arguments)."""
        # Imported here: the loader builds this class.
        from lowvox.engines.xtts.loader import load_model

        return load_model(model_dir, device, precision, cache_dir, vocoder_precision)

    # ------------------------------------------------------------------------------------
    # The cloning modules, which a model loaded from a cache gets on first use

    def new_cloning_modules(self) -> dict[str, nn.Module]:
        """`CLONING_MODULES` built as `__init__` builds them (on the default device, e.g.
        under `torch.device("meta")`), by name."""
        return {
            "gpt.conditioning_encoder": _conditioning_encoder(self.config),
            "gpt.conditioning_perceiver": _conditioning_perceiver(self.config),
            "hifigan_decoder.speaker_encoder": self.hifigan_decoder.new_speaker_encoder(),
        }

    def leave_out_cloning_modules(self, source: CloningSource) -> None:
        """Take `CLONING_MODULES` out of the module tree (so that `.to()`, `state_dict()` and
        residency see only what speaking uses); `source` says where they are to be read."""
        for name in CLONING_MODULES:
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child, None)
        self.cloning_source = source

    def put_cloning_modules(self, modules: Mapping[str, nn.Module]) -> None:
        """Put `CLONING_MODULES` (by name, from `new_cloning_modules`, with their weights)
        back in the module tree."""
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child, module)
        # Last: whoever sees None finds every module in place.
        self.cloning_source = None

    @property
    def weights_device(self) -> torch.device:
        """Where the weights live (where `.to()` last put them), which during a low-VRAM
        request is not `device`, where they compute."""
        return self._weights_device or self.device

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> XttsModel:
        # Every `.to()`, `.cpu()`, `.cuda()` ends here: remember where the weights went.
        super()._apply(fn, recurse)
        self._weights_device = self.device
        return self

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
        paths: Sequence[str | os.PathLike[str] | np.ndarray],
        gpt_cond_len: int | None = None,
        gpt_cond_chunk_len: int | None = None,
        max_ref_length: int | None = None,
        sound_norm_refs: bool | None = None,
    ) -> Voice:
        """Voice latents from one or more reference recordings (paths or arrays), with the
        config's conditioning defaults and the model's voice cache (`voices.clone_voice`)."""
        c = self.config.conditioning
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

    # ------------------------------------------------------------------------------------
    # Speaking: the batch of one, through `pipeline.py`

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
        """Speak `text` (`voice`: a `Voice`, a studio speaker's name, or None for the first
        one); unset options come from config.json. `.wav` is float32 at `.sample_rate`,
        `.codes` one array per sentence."""
        from lowvox.engines.xtts import pipeline
        from lowvox.engines.xtts.options import XttsOptions

        options = XttsOptions(
            temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, do_sample=do_sample,
            max_new_tokens=max_new_tokens, speed=speed, split_sentences=split_sentences,
            seed=seed,
        )  # fmt: skip
        return pipeline.synthesize(self, pipeline.prepare(self, text, language, voice, options))

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
        first_chunk_tokens: int | None = None,
        chunk_tokens: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Generator[StreamChunk, None, None]:
        """`synthesize`, yielding chunks (`.wav`) as they are made: the first after
        `first_chunk_tokens` tokens, then every `chunk_tokens` (unset: the pipeline's
        cadence). Everything is checked before this returns; `cancel` stops between steps."""
        from lowvox.engines.xtts import pipeline
        from lowvox.engines.xtts.options import XttsOptions
        from lowvox.engines.xtts.vocode import DEFAULT_FIRST_CHUNK_TOKENS

        options = XttsOptions(
            temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, do_sample=do_sample,
            max_new_tokens=max_new_tokens, speed=speed, split_sentences=split_sentences,
            seed=seed,
        )  # fmt: skip
        first = DEFAULT_FIRST_CHUNK_TOKENS if first_chunk_tokens is None else first_chunk_tokens
        utt = pipeline.prepare(self, text, language, voice, options, first, chunk_tokens)
        return pipeline.stream(self, utt, cancel)


def _conditioning_encoder(config: XttsConfig) -> ConditioningEncoder:
    a = config.model_args
    return ConditioningEncoder(
        COND_MEL_CHANNELS, a.gpt_n_model_channels, num_attn_heads=a.gpt_n_heads
    )


def _conditioning_perceiver(config: XttsConfig) -> PerceiverResampler:
    dim = config.model_args.gpt_n_model_channels
    return PerceiverResampler(dim, dim_context=dim, **PERCEIVER)


__all__ = ["CLONING_MODULES", "COND_MEL_CHANNELS", "XttsModel"]
