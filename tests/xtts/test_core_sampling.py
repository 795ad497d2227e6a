"""Logits processing: parity with the reference's processors, and each step alone."""

from __future__ import annotations

import math

import pytest
import torch

from lowvox.engines.xtts.sampling import (
    SamplingOptions,
    process_logits,
    repetition_penalty,
    seen_mask,
    select_token,
    temperature,
    top_k,
    top_p,
)
from lowvox.errors import InvalidRequest


@pytest.mark.parametrize("case", range(4))
def test_processors_match_reference(golden_ref, golden_cases, case: int) -> None:
    params = golden_cases["processor_params"][case]
    ids, raw = golden_ref["proc.input_ids"], golden_ref["proc.raw"]
    expected = golden_ref[f"proc{case}.scores"]
    out = process_logits(raw.clone(), seen_mask(ids, raw.shape[1]), SamplingOptions(**params))
    kept = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(out), kept)  # the same tokens filtered out
    # Elementwise ops on the reference's own inputs, no sums: tighter than FP32_PIPELINE.
    torch.testing.assert_close(out[kept], expected[kept], rtol=1e-6, atol=1e-6)
    assert (out[~kept] == -math.inf).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    scores = torch.tensor([[2.0, -2.0, 3.0, 4.0]])
    seen = seen_mask(torch.tensor([[0, 1, 1]]), 4)
    out = repetition_penalty(scores, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 3.0, 4.0]]


def test_ids_beyond_the_vocabulary_are_ignored() -> None:
    assert seen_mask(torch.tensor([[1, 9]]), 4).tolist() == [[False, True, False, False]]


def test_top_k_keeps_ties_and_top_p_keeps_the_best_token() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(top_k(scores, 2)).tolist() == [[False, True, True, False, False]]
    assert torch.equal(top_k(scores, 0), scores)
    assert torch.equal(top_k(scores, 99), scores)
    # One dominant token: even a tiny top_p keeps exactly it.
    peaked = torch.tensor([[0.0, 10.0, 0.0]])
    assert torch.isfinite(top_p(peaked, 0.01)).tolist() == [[False, True, False]]
    # Probabilities 0.5/0.3/0.2: top_p 0.7 keeps the two best (0.2 <= 0.3 is dropped).
    probs = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(top_p(probs, 0.7)).tolist() == [[True, True, False]]
    assert torch.equal(top_p(probs, 1.0), probs)


def test_temperature_scales() -> None:
    scores = torch.tensor([[1.0, -2.0]])
    assert temperature(scores, 0.5).tolist() == [[2.0, -4.0]]


def test_greedy_ignores_warpers() -> None:
    scores = torch.tensor([[1.0, 5.0, 4.0]])
    options = SamplingOptions(temperature=0.1, top_k=1, top_p=0.1, do_sample=False)
    out = process_logits(scores, seen_mask(torch.tensor([[0]]), 3), options)
    assert torch.equal(out, scores)
    assert select_token(out, do_sample=False).tolist() == [1]


def test_sampling_is_seedable() -> None:
    scores = torch.randn(1, 50)
    draw = [
        [int(select_token(scores, True, g)) for _ in range(20)]
        for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))
    ]
    assert draw[0] == draw[1]
    assert len(set(draw[0])) > 1


def test_sampling_never_picks_a_filtered_token() -> None:
    scores = top_k(torch.randn(1, 100), 3)
    g = torch.Generator().manual_seed(0)
    picks = {int(select_token(scores, True, g)) for _ in range(200)}
    assert picks <= set(torch.isfinite(scores)[0].nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1e-40},  # scores / 1e-40 overflow float32
        {"repetition_penalty": 1e-300},  # a seen positive score / 1e-300 overflows
        {"repetition_penalty": 1e300, "temperature": 1e300},  # -inf, then -inf / inf
    ],
)
def test_extreme_but_valid_options_still_choose_a_token(options: dict) -> None:
    """Values the options accept (positive, finite) must not turn the scores into NaN:
    that made `multinomial` raise, failing the request (and, before rows failed alone,
    every request of its batch). A temperature near 0 samples the best token."""
    scores = torch.tensor([[-3.0, 2.0, -1.0, 5.0, 4.0], [-3.0, -2.0, -1.0, -5.0, -4.0]])
    seen = seen_mask(torch.tensor([[1, 4], [1, 4]]), 5)
    sampling = SamplingOptions(do_sample=True, top_k=3, top_p=0.9, **options)
    out = process_logits(scores, seen, sampling)
    assert not torch.isnan(out).any()
    picks = select_token(out, True, torch.Generator().manual_seed(0))
    assert picks.shape == (2,)
    if options.get("temperature") == 1e-40:
        best = process_logits(scores, seen, SamplingOptions(do_sample=False, **options))
        assert picks.tolist() == best.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 0.0},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": float("inf")},
    ],
)
def test_invalid_options_are_rejected(bad: dict) -> None:
    with pytest.raises(InvalidRequest):
        SamplingOptions(**bad)
