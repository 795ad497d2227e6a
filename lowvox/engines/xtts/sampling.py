"""Logits processing and token selection, with the reference's semantics and order.

The reference (Hugging Face `generate`) applies, in order: repetition penalty over every id
seen so far (prompt placeholders included), then, only when sampling, temperature, top-k and
top-p. Each step is a small pure function over `scores [B, V]`, testable alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowvox.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingOptions:
    """How the next audio token is chosen. Neutral values switch a step off."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1.0: no nucleus filtering
    repetition_penalty: float = 1.0  # 1.0: no penalty
    do_sample: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and self.temperature > 0):
            raise InvalidRequest(
                f"temperature must be > 0, got {self.temperature!r}", field="temperature"
            )
        if not math.isfinite(self.temperature):
            raise InvalidRequest("temperature must be finite", field="temperature")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(
                f"top_k must be an integer >= 0, got {self.top_k!r}", field="top_k"
            )
        if not (isinstance(self.top_p, int | float) and 0.0 <= self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in [0, 1], got {self.top_p!r}", field="top_p")
        if not (
            isinstance(self.repetition_penalty, int | float)
            and math.isfinite(self.repetition_penalty)
            and self.repetition_penalty > 0
        ):
            raise InvalidRequest(
                f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
                field="repetition_penalty",
            )


def seen_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, L] ids -> [B, V] bool, True where an id occurred. Ids >= V (cannot be generated)
    are ignored, as the reference does."""
    mask = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, ids.clamp(max=vocab), True)
    return mask[:, :vocab]


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Push down every seen token: negative scores are multiplied, positive ones divided.
    A penalty far from 1 cannot overflow a score to infinity: it stops at the largest
    finite value (so that the steps after it, and softmax, never meet inf - inf)."""
    if penalty == 1.0:
        return scores
    big = torch.finfo(scores.dtype).max
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty).clamp(-big, big)
    return torch.where(seen, penalised, scores)


def temperature(scores: torch.Tensor, value: float) -> torch.Tensor:
    """Scores divided by the temperature. Where that overflows (a temperature near 0) they
    are measured from the best score first, which softmax, top-k and top-p do not see but
    which cannot overflow upwards: the best token keeps 0, the others fall to -inf, and
    sampling becomes the greedy choice it tends to, not NaN."""
    if value == 1.0:
        return scores
    out = scores / value
    # Chosen per row on the device: testing for inf on the host would make every decode
    # step wait for the GPU here.
    shifted = (scores - scores.amax(dim=-1, keepdim=True)) / value
    return torch.where(torch.isinf(out).any(dim=-1, keepdim=True), shifted, out)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k best scores (ties with the k-th kept too); the rest become -inf."""
    if k <= 0:
        return scores
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is <= 1 - p,
    always keeping the most likely one."""
    if p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def process_logits(
    scores: torch.Tensor, seen: torch.Tensor, options: SamplingOptions
) -> torch.Tensor:
    """Raw next-token logits [B, V] -> the scores tokens are chosen from."""
    scores = repetition_penalty(scores, seen, options.repetition_penalty)
    if options.do_sample:
        scores = temperature(scores, options.temperature)
        scores = top_k(scores, options.top_k)
        scores = top_p(scores, options.top_p)
    return scores


def select_token(
    scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, V] processed scores -> [B] token ids (multinomial draw, or argmax)."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
