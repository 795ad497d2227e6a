"""XTTS configuration, read from a checkpoint's `config.json`.

One frozen dataclass per concern: the architecture (`XttsArgs`, the `model_args` block), the
audio rates, the sampling defaults and the voice-conditioning defaults. Every size comes from
the file; the dataclass defaults are only used for fields an older config.json lacks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lowvox.errors import LowvoxError

# The vocoder's compute precisions (`HifiganGenerator.set_precision`); settings add "auto".
VOCODER_PRECISIONS = ("fp32", "bf16", "int8")


class ConfigError(LowvoxError):
    """config.json is missing, unreadable, or lacks a field the architecture needs."""


@dataclass(frozen=True)
class XttsArgs:
    """Architecture sizes and special token ids (config.json `model_args`)."""

    gpt_layers: int
    gpt_n_model_channels: int
    gpt_n_heads: int
    gpt_number_text_tokens: int
    gpt_start_text_token: int
    gpt_stop_text_token: int
    gpt_num_audio_tokens: int
    gpt_start_audio_token: int
    gpt_stop_audio_token: int
    gpt_max_audio_tokens: int
    gpt_max_text_tokens: int
    gpt_max_prompt_tokens: int = 70
    gpt_code_stride_len: int = 1024
    gpt_use_perceiver_resampler: bool = True
    input_sample_rate: int = 22050
    output_sample_rate: int = 24000
    output_hop_length: int = 256
    decoder_input_dim: int = 1024
    d_vector_dim: int = 512
    cond_d_vector_in_each_upsampling_layer: bool = True
    tokenizer_file: str = ""

    @property
    def max_conditioning_inputs(self) -> int:
        # The reference reserves one conditioning slot in the mel position table.
        return 1

    @property
    def mel_positions(self) -> int:
        """Rows of the learned mel position table: audio tokens + start/stop + conditioning."""
        return self.gpt_max_audio_tokens + 2 + self.max_conditioning_inputs

    @property
    def text_positions(self) -> int:
        """Rows of the learned text position table: text tokens + start/stop."""
        return self.gpt_max_text_tokens + 2

    @property
    def max_generated_tokens(self) -> int:
        """The most audio tokens one generation may produce (the reference's limit)."""
        return self.gpt_max_audio_tokens - self.max_conditioning_inputs - 2


@dataclass(frozen=True)
class AudioConfig:
    """Sample rates: the GPT/conditioning rate and the vocoder's output rate."""

    sample_rate: int = 22050
    output_sample_rate: int = 24000
    dvae_sample_rate: int = 22050


@dataclass(frozen=True)
class SamplingDefaults:
    """Default generation settings (top level of config.json)."""

    temperature: float = 0.75
    top_k: int = 50
    top_p: float = 0.85
    repetition_penalty: float = 10.0
    length_penalty: float = 1.0
    do_sample: bool = True


@dataclass(frozen=True)
class ConditioningDefaults:
    """Default voice-cloning settings (seconds of reference audio used, chunking)."""

    gpt_cond_len: int = 30
    gpt_cond_chunk_len: int = 4
    max_ref_len: int = 30
    sound_norm_refs: bool = False


@dataclass(frozen=True)
class XttsConfig:
    """The whole model configuration."""

    model_args: XttsArgs
    audio: AudioConfig = field(default_factory=AudioConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    conditioning: ConditioningDefaults = field(default_factory=ConditioningDefaults)
    languages: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> XttsConfig:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("model_args"), Mapping):
            raise ConfigError("config has no 'model_args' section")
        languages = raw.get("languages") or ()
        if not isinstance(languages, list | tuple) or not all(
            isinstance(code, str) and code for code in languages
        ):
            raise ConfigError(f"config.languages must be a list of codes, got {languages!r}")
        config = cls(
            model_args=_build(XttsArgs, raw["model_args"], "model_args"),
            audio=_build(AudioConfig, raw.get("audio") or {}, "audio"),
            sampling=_build(SamplingDefaults, raw, "config"),
            conditioning=_build(ConditioningDefaults, raw, "config"),
            languages=tuple(languages),
        )
        config._check_ranges()
        return config

    def _check_ranges(self) -> None:
        """Values of the right type that no model can have: an error naming the field now,
        rather than a division by zero at load or a failure in every request."""
        a = self.model_args
        ints = {f.name: getattr(a, f.name) for f in fields(a) if f.type == "int"}
        # Token ids may be 0 (the released [STOP] text token is); sizes and rates may not.
        ids = {name for name in ints if name.endswith(("_start_text_token", "_stop_text_token",
                                                       "_start_audio_token", "_stop_audio_token"))}  # fmt: skip
        positive = {
            **{f"model_args.{name}": v for name, v in ints.items() if name not in ids},
            **{f"audio.{f.name}": getattr(self.audio, f.name) for f in fields(self.audio)},
            "config.gpt_cond_chunk_len": self.conditioning.gpt_cond_chunk_len,
        }
        for where, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{where} must be positive, got {value}")
        for name in sorted(ids):
            if ints[name] < 0:
                raise ConfigError(f"model_args.{name} must be a token id >= 0, got {ints[name]}")
        for name in ("gpt_start_audio_token", "gpt_stop_audio_token"):
            if ints[name] >= a.gpt_num_audio_tokens:
                raise ConfigError(
                    f"model_args.{name} ({ints[name]}) is not below gpt_num_audio_tokens "
                    f"({a.gpt_num_audio_tokens})"
                )
        if a.gpt_n_model_channels % a.gpt_n_heads:
            raise ConfigError(
                f"model_args.gpt_n_model_channels ({a.gpt_n_model_channels}) does not split "
                f"into gpt_n_heads ({a.gpt_n_heads}) heads"
            )
        # The request-time checks of the sampling values, applied to their defaults.
        from lowvox.engines.xtts.sampling import SamplingOptions
        from lowvox.errors import InvalidRequest

        d = self.sampling
        try:
            SamplingOptions(d.temperature, d.top_k, d.top_p, d.repetition_penalty, d.do_sample)
        except InvalidRequest as e:
            raise ConfigError(f"config.{e.field}: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> XttsConfig:
        path = Path(path)
        try:
            # config.json files written by coqui hold `Infinity`, which json accepts.
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config not found: {path}") from e
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e


def _build(kind: type, raw: Mapping[str, Any], section: str) -> Any:
    """Construct dataclass `kind` from the matching keys of `raw`, checking their types."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section} must be an object, got {raw!r}")
    values: dict[str, Any] = {}
    missing = []
    for f in fields(kind):
        if f.name not in raw or raw[f.name] is None:
            if f.default is f.default_factory:  # both MISSING: a required field
                missing.append(f.name)
            continue
        values[f.name] = _coerce(raw[f.name], f.type, f"{section}.{f.name}")
    if missing:
        raise ConfigError(f"{section} lacks required fields: {', '.join(missing)}")
    return kind(**values)


def _coerce(value: Any, type_name: Any, where: str) -> Any:
    kind = str(type_name)
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "int":
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise TypeError
            return float(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} has an invalid value {value!r} (expected {kind})") from e
    return value
