"""Batched decoding: several texts, voices and lengths in one batch give what each gives
alone (the decode loop; the pipeline's batch is tested in test_pipeline_batch.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowvox.engines.xtts.decode import Decoder, DecodeRow, collect, generate, iter_steps
from lowvox.engines.xtts.loader import load_model
from lowvox.engines.xtts.model import XttsModel
from lowvox.engines.xtts.sampling import SamplingOptions
from tests.tolerance import FP32_OTHER_KERNELS

GREEDY = SamplingOptions(repetition_penalty=5.0, do_sample=False)
TEXTS = [
    "hello there.",
    "a much longer sentence, which goes on for quite a while before it ends.",
    "hi",
    "what is this?",
]


def rows_for(model: XttsModel, limits: list[int], options=GREEDY) -> list[DecodeRow]:
    voices = list(model.speakers.values())
    return [
        DecodeRow(
            voices[i % len(voices)].gpt_cond_latent,
            torch.tensor([model.tokenizer.encode(text, "en")]),
            options,
            limits[i],
        )
        for i, text in enumerate(TEXTS)
    ]


def alone(model: XttsModel, row: DecodeRow):
    return generate(model.gpt, row)


def assert_same_generation(batched, single) -> None:
    assert torch.equal(batched.codes, single.codes)
    assert batched.stopped == single.stopped
    assert batched.latents.shape == single.latents.shape
    # A batch row (its own length, other matmul shapes) against the sequence alone.
    FP32_OTHER_KERNELS.check(batched.latents, single.latents, "latents")
    FP32_OTHER_KERNELS.check(batched.logits, single.logits, "logits")


@pytest.mark.parametrize("bundle", ["golden", "random"])
def test_batch_equals_each_row_alone(bundle, golden_model, random_model) -> None:
    model = golden_model if bundle == "golden" else random_model
    rows = rows_for(model, limits=[24, 40, 13, 31])  # different lengths and limits
    for batched, row in zip(collect(model.gpt, rows), rows, strict=True):
        single = alone(model, row)
        assert len(single.codes) == row.max_new_tokens  # these never stop early
        assert_same_generation(batched, single)


@pytest.mark.slow
def test_rows_stop_on_their_own(golden_dir, tmp_path) -> None:
    """With the stop token made likelier, some rows stop early (at different steps) and
    others run to their limit; each row still equals its lone run."""
    model = load_model(golden_dir, cache_dir=tmp_path)
    stop = model.config.model_args.gpt_stop_audio_token
    base = float(model.gpt.mel_head.bias[stop])
    for boost in (1.0, 2.0, 3.0, 4.0):
        model.gpt.mel_head.bias[stop] = base + boost
        rows = rows_for(model, limits=[40] * len(TEXTS))
        singles = [alone(model, row) for row in rows]
        lengths = {len(s.codes) for s in singles}
        if any(s.stopped for s in singles) and len(lengths) > 1:
            break
    else:
        pytest.skip("no boost gave rows that stop at different steps on this bundle")
    for batched, single in zip(collect(model.gpt, rows), singles, strict=True):
        assert_same_generation(batched, single)


def test_cancelled_row_leaves_the_batch(golden_model) -> None:
    rows = rows_for(golden_model, limits=[20] * len(TEXTS))
    decoder = Decoder(golden_model.gpt, max_rows=4)
    ids = [decoder.add(row) for row in rows]
    seen: dict[int, int] = {}
    for i, steps in enumerate(iter_steps(decoder)):
        for s in steps:
            seen[s.row] = seen.get(s.row, 0) + 1
        if i == 4:
            decoder.cancel(ids[1])
    assert seen[ids[1]] == 5 and all(seen[ids[r]] == 20 for r in (0, 2, 3))


def test_a_row_whose_token_cannot_be_chosen_leaves_alone(golden_model) -> None:
    """Choosing one row's token fails (options no validator lets through: a NaN temperature
    makes `multinomial` raise): that row leaves with the error, the others go on and
    equal their lone runs."""
    rows = rows_for(golden_model, limits=[20] * len(TEXTS))
    broken = SamplingOptions(do_sample=True)
    object.__setattr__(broken, "temperature", float("nan"))
    rows[1] = dataclasses.replace(rows[1], sampling=broken)
    decoder = Decoder(golden_model.gpt, max_rows=4)
    ids = [decoder.add(row) for row in rows]
    steps: dict[int, list] = {i: [] for i in ids}
    for batch in iter_steps(decoder):
        for st in batch:
            steps[st.row].append(st)
    (failed,) = steps[ids[1]]
    assert failed.last and isinstance(failed.error, RuntimeError)
    for r in (0, 2, 3):
        assert all(st.error is None for st in steps[ids[r]])
        codes = torch.stack([st.token for st in steps[ids[r]] if not st.is_stop])
        assert torch.equal(codes, alone(golden_model, rows[r]).codes)
    with pytest.raises(RuntimeError):
        alone(golden_model, rows[1])  # alone, its failure is raised


def test_rows_joining_later_equal_their_lone_runs(golden_model) -> None:
    """Rows added at different steps (each at its own length in the cache), and a row
    added into the place of one that left, each compute what they compute alone."""
    rows = rows_for(golden_model, limits=[18, 30, 9, 14])
    decoder = Decoder(golden_model.gpt, max_rows=3)
    joins = {0: [0, 1], 5: [2], 14: [3]}  # row 3 joins after row 2 (9 tokens) has left
    steps: dict[int, list] = {}
    order: dict[int, int] = {}
    step = 0
    while step <= max(joins) or len(decoder):
        for r in joins.get(step, []):
            order[decoder.add(rows[r])] = r
        for s in decoder.step():
            steps.setdefault(order[s.row], []).append(s)
        step += 1
    for r, row in enumerate(rows):
        single = alone(golden_model, row)
        codes = torch.stack([s.token for s in steps[r] if not s.is_stop])
        assert torch.equal(codes, single.codes)
        latents = torch.cat([s.latent for s in steps[r]], dim=1)
        FP32_OTHER_KERNELS.check(latents, single.latents)


@pytest.mark.slow
def test_int8_batch_gives_the_same_codes(golden_dir, tmp_path) -> None:
    """The CPU default (int8 weights): batching changes the matmuls' shapes, not the codes."""
    model = load_model(golden_dir, precision="int8", cache_dir=tmp_path)
    rows = rows_for(model, limits=[30, 30, 20, 25])
    for batched, row in zip(collect(model.gpt, rows), rows, strict=True):
        single = alone(model, row)
        assert torch.equal(batched.codes, single.codes)
        # int8 weights: no fp32 row applies; this bound is tighter than BF16's, so it stays.
        torch.testing.assert_close(batched.latents, single.latents, atol=1e-2, rtol=1e-2)


def test_cache_rows_and_copies_are_views_of_one_cache() -> None:
    """A batch's cache hands each row out as a view (prefills write into it) and moves a
    row's written positions into the place of one that left."""
    from lowvox.engines.xtts.gpt import KVCache

    cache = KVCache(4, 2, 10, 8)
    cache.k.normal_()
    cache.v.normal_()
    k, v = cache.k.clone(), cache.v.clone()
    row = cache.rows(2, 3)
    row.k.zero_()
    assert torch.equal(cache.k[2], torch.zeros_like(cache.k[2]))  # the view wrote through
    cache.copy_row(3, 1, 6)
    assert torch.equal(cache.k[1, :, :6], k[3, :, :6]) and torch.equal(
        cache.v[1, :, :6], v[3, :, :6]
    )
    assert torch.equal(cache.k[1, :, 6:], k[1, :, 6:])  # positions past the length are left
