"""Speaking from the tests in one line: `say(model, text, voice=..., seed=1)` through the
pipeline's public API (`prepare`, then `synthesize` or `stream`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lowvox.engines.xtts.options import XttsOptions
from lowvox.engines.xtts.pipeline import prepare, stream, synthesize
from lowvox.engines.xtts.results import StreamChunk, SynthesisResult


def say(
    model, text: str, language: str | None = None, voice: Any = None, **options
) -> SynthesisResult:
    return synthesize(model, prepare(model, text, language, voice, XttsOptions(**options)))


def say_stream(
    model,
    text: str,
    language: str | None = None,
    voice: Any = None,
    first_chunk_tokens: int = 12,
    chunk_tokens: int | None = None,
    **options,
) -> Iterator[StreamChunk]:
    utt = prepare(
        model, text, language, voice, XttsOptions(**options), first_chunk_tokens, chunk_tokens
    )
    return stream(model, utt)
