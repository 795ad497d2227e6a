"""`XttsOptions`: how XTTS speaks a request, one typed object from the API edge to the sampler.

Every API and the CLI build one (`from_mapping` turns a request's loose option names into
it, refusing unknown names and wrong types); `resolved(config)` fills what was left unset
from the checkpoint's config.json and checks every range, once, before the request is
queued. Nothing downstream checks again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from lowvox.engines.base import MAX_SPEED, MIN_SPEED, OptionValue
from lowvox.engines.xtts.config import XttsConfig
from lowvox.engines.xtts.sampling import SamplingOptions
from lowvox.errors import InvalidRequest

# torch.Generator.manual_seed takes 64 bits; seeds are kept to the signed range so that
# every client (JSON numbers, SQLite, C longs) can hold them.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class XttsOptions:
    """Sampling, length, speed, splitting and seed. None: the checkpoint's default."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    max_new_tokens: int | None = None
    speed: float = 1.0
    split_sentences: bool = True
    seed: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, options: Mapping[str, OptionValue], speed: float = 1.0) -> XttsOptions:
        """From a request's option names; unknown names and mistyped values are errors,
        None means unset."""
        known = cls.names()
        values: dict[str, Any] = {"speed": speed}  # each value's type is checked below
        for key, value in options.items():
            if key not in known:
                raise InvalidRequest(
                    f"unknown option {key!r} for xtts (known: {', '.join(known)})", field=key
                )
            if value is not None:
                values[key] = value
        for key, value in values.items():
            kinds = _TYPES[key]
            if (bool not in kinds and isinstance(value, bool)) or not isinstance(value, kinds):
                raise InvalidRequest(f"option {key} has an invalid value {value!r}", field=key)
        return cls(**values)

    def resolved(self, config: XttsConfig) -> XttsOptions:
        """Every unset option from `config`, every value range-checked."""
        d = config.sampling
        limit = config.model_args.max_generated_tokens
        out = replace(
            self,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_k=d.top_k if self.top_k is None else self.top_k,
            top_p=d.top_p if self.top_p is None else self.top_p,
            repetition_penalty=(
                d.repetition_penalty if self.repetition_penalty is None else self.repetition_penalty
            ),
            do_sample=d.do_sample if self.do_sample is None else bool(self.do_sample),
            max_new_tokens=limit if self.max_new_tokens is None else self.max_new_tokens,
        )
        out.sampling  # noqa: B018 -- SamplingOptions checks the sampling values
        n = out.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
            raise InvalidRequest(
                f"max_new_tokens must be in 1..{limit}, got {n!r}", "max_new_tokens"
            )
        speed = out.speed
        if not (isinstance(speed, int | float) and math.isfinite(speed)):
            raise InvalidRequest(f"speed must be a number, got {speed!r}", field="speed")
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise InvalidRequest(
                f"speed {speed:g} is out of range ({MIN_SPEED:g}-{MAX_SPEED:g})", field="speed"
            )
        seed = out.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
        ):
            raise InvalidRequest(f"seed must be an integer in 0..2**63-1, got {seed!r}", "seed")
        return replace(out, speed=float(speed), split_sentences=bool(out.split_sentences))

    @property
    def sampling(self) -> SamplingOptions:
        """The token-choice part (of resolved options)."""
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if t is None or k is None or p is None or r is None:
            raise ValueError("sampling options of unresolved XttsOptions")
        return SamplingOptions(
            temperature=t, top_k=k, top_p=p, repetition_penalty=r, do_sample=bool(self.do_sample)
        )


_TYPES: dict[str, tuple[type, ...]] = {
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "repetition_penalty": (int, float),
    "do_sample": (bool,),
    "max_new_tokens": (int,),
    "speed": (int, float),
    "split_sentences": (bool,),
    "seed": (int,),
}
