"""Batched decoding: several texts, voices and lengths in one batch give what each gives alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lowvox.engines.xtts.batch import BatchGenerator, BatchRow
from lowvox.engines.xtts.generate import Generator
from lowvox.engines.xtts.model import BatchItem, XttsModel
from lowvox.engines.xtts.sampling import SamplingOptions
from lowvox.errors import InvalidRequest
from tests.tolerance import FP32_OTHER_KERNELS, FP32_PIPELINE, MIN_STREAM_SNR_DB, snr_db

GREEDY = SamplingOptions(repetition_penalty=5.0, do_sample=False)
# Over the 250-character limit for English, so it is split into two sentences.
LONG = "First request, two sentences. " + "Then a second one, made long on purpose, " * 6 + "end."
TEXTS = [
    "hello there.",
    "a much longer sentence, which goes on for quite a while before it ends.",
    "hi",
    "what is this?",
]


def rows_for(model: XttsModel, limits: list[int], options=GREEDY) -> list[BatchRow]:
    voices = list(model.speakers.values())
    return [
        BatchRow(
            voices[i % len(voices)].gpt_cond_latent,
            torch.tensor([model.tokenizer.encode(text, "en")]),
            options,
            limits[i],
        )
        for i, text in enumerate(TEXTS)
    ]


def alone(model: XttsModel, row: BatchRow):
    return Generator(
        model.gpt, row.cond_latent, row.text_ids, row.options, row.max_new_tokens
    ).run()


def assert_same_generation(batched, single) -> None:
    assert torch.equal(batched.codes, single.codes)
    assert batched.stopped == single.stopped
    assert batched.latents.shape == single.latents.shape
    # A padded batch row against the sequence alone.
    FP32_OTHER_KERNELS.check(batched.latents, single.latents, "latents")
    FP32_OTHER_KERNELS.check(batched.logits, single.logits, "logits")


@pytest.mark.parametrize("bundle", ["golden", "random"])
def test_batch_equals_each_row_alone(bundle, golden_model, random_model) -> None:
    model = golden_model if bundle == "golden" else random_model
    rows = rows_for(model, limits=[24, 40, 13, 31])  # different lengths and limits
    for batched, row in zip(BatchGenerator(model.gpt, rows).run(), rows, strict=True):
        single = alone(model, row)
        assert len(single.codes) == row.max_new_tokens  # these never stop early
        assert_same_generation(batched, single)


@pytest.mark.slow
def test_rows_stop_on_their_own(golden_dir, tmp_path) -> None:
    """With the stop token made likelier, some rows stop early (at different steps) and
    others run to their limit; each row still equals its lone run."""
    model = XttsModel.load(golden_dir, cache_dir=tmp_path)
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
    for batched, single in zip(BatchGenerator(model.gpt, rows).run(), singles, strict=True):
        assert_same_generation(batched, single)


def test_cancelled_row_leaves_the_batch(golden_model) -> None:
    rows = rows_for(golden_model, limits=[20] * len(TEXTS))
    gen = BatchGenerator(golden_model.gpt, rows)
    seen: dict[int, int] = {}
    for i, steps in enumerate(gen.steps()):
        for s in steps:
            seen[s.row] = seen.get(s.row, 0) + 1
        if i == 4:
            gen.cancel(1)
    assert seen[1] == 5 and all(seen[r] == 20 for r in (0, 2, 3))


@pytest.mark.slow
def test_synthesize_batch_equals_synthesize(golden_model) -> None:
    voices = list(golden_model.speakers)
    texts = [LONG, "Short.", "This one is a little longer."]
    kwargs = dict(do_sample=False, repetition_penalty=5.0, max_new_tokens=20)
    results = golden_model.synthesize_batch(
        texts, language="en", voice=[voices[0], voices[1], voices[0]], **kwargs
    )
    assert len(results) == len(texts)
    for text, voice, res in zip(texts, [voices[0], voices[1], voices[0]], results, strict=True):
        single = golden_model.synthesize(text, language="en", voice=voice, **kwargs)
        assert len(res.codes) == len(single.codes) == (2 if text == LONG else 1)
        for a, b in zip(res.codes, single.codes, strict=True):
            assert np.array_equal(a, b)
        assert res.wav.shape == single.wav.shape
        FP32_PIPELINE.check(res.wav, single.wav)  # whole-pipeline audio through a batch


@pytest.mark.slow
def test_synthesize_batch_small_batches_give_the_same(golden_model) -> None:
    kwargs = dict(do_sample=False, max_new_tokens=12, voice="Alpha Voice")
    texts = ["One.", "Two words.", "Three words here."]
    full = golden_model.synthesize_batch(texts, **kwargs)
    pairs = golden_model.synthesize_batch(texts, max_batch_size=2, **kwargs)
    for a, b in zip(full, pairs, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a.codes, b.codes, strict=True))


@pytest.mark.slow
def test_stream_batch_matches_whole_utterances(golden_model) -> None:
    settings = golden_model.generation_settings(do_sample=False, max_new_tokens=30)
    items = [
        BatchItem(LONG, "en", "Alpha Voice", settings),
        BatchItem("Second request.", "en", "Beta Voice", settings),
    ]
    chunks: dict[int, list[np.ndarray]] = {0: [], 1: []}
    order: dict[int, list[int]] = {0: [], 1: []}
    for index, chunk in golden_model.stream_batch(items, first_chunk_tokens=8):
        chunks[index].append(chunk.wav)
        order[index].append(chunk.sentence)
    assert order[0] == sorted(order[0]) and set(order[0]) == {0, 1}
    assert len(chunks[1]) > 1  # streamed in pieces, not in one go
    for index, item in enumerate(items):
        whole = golden_model.synthesize(
            item.text, language="en", voice=item.voice, do_sample=False, max_new_tokens=30
        )
        streamed = np.concatenate(chunks[index])
        assert streamed.shape == whole.wav.shape
        # The streaming vocoder matches the whole-utterance one closely (not bit-exactly).
        assert snr_db(whole.wav, streamed) >= MIN_STREAM_SNR_DB


@pytest.mark.slow
def test_stream_batch_cancel_stops_one_request(golden_model) -> None:
    settings = golden_model.generation_settings(do_sample=False, max_new_tokens=40)
    items = [BatchItem("One request.", voice="Alpha Voice", settings=settings)] * 2
    cancels = [threading.Event(), threading.Event()]
    counts = [0, 0]
    for index, _chunk in golden_model.stream_batch(items, cancels, first_chunk_tokens=5):
        counts[index] += 1
        if index == 0 and counts[0] == 1:
            cancels[0].set()
    assert counts[0] == 1 and counts[1] > 2


def test_batch_bad_input_is_a_clear_error(golden_model) -> None:
    with pytest.raises(InvalidRequest):
        golden_model.synthesize_batch([])
    with pytest.raises(InvalidRequest, match="voice"):
        golden_model.synthesize_batch(["a", "b"], voice=["Alpha Voice"])
    with pytest.raises(InvalidRequest):
        golden_model.synthesize_batch(["a", " "], voice="Alpha Voice")
    with pytest.raises(InvalidRequest):
        golden_model.stream_batch([])


@pytest.mark.slow
def test_int8_batch_gives_the_same_codes(golden_dir, tmp_path) -> None:
    """The CPU default (int8 weights): batching changes the matmuls' shapes, not the codes."""
    model = XttsModel.load(golden_dir, precision="int8", cache_dir=tmp_path)
    rows = rows_for(model, limits=[30, 30, 20, 25])
    for batched, row in zip(BatchGenerator(model.gpt, rows).run(), rows, strict=True):
        single = alone(model, row)
        assert torch.equal(batched.codes, single.codes)
        # int8 weights: no fp32 row applies; this bound is tighter than BF16's, so it stays.
        torch.testing.assert_close(batched.latents, single.latents, atol=1e-2, rtol=1e-2)


def test_cache_keep_rows_keeps_what_was_written() -> None:
    """Compaction when rows finish: the kept rows' written positions, in the new order; the
    rest of the fresh cache is zero (never read before it is written)."""
    from lowvox.engines.xtts.gpt import KVCache

    cache = KVCache(4, 2, 10, 8)
    cache.k.normal_()
    cache.v.normal_()
    k, v = cache.k.clone(), cache.v.clone()
    index = torch.tensor([3, 1])
    cache.keep_rows(index, 6)
    assert cache.k.shape == cache.v.shape == (2, 2, 10, 8)
    assert torch.equal(cache.k[:, :, :6], k[index, :, :6])
    assert torch.equal(cache.v[:, :, :6], v[index, :, :6])
    assert not cache.k[:, :, 6:].any() and not cache.v[:, :, 6:].any()
    assert cache.k.is_contiguous() and cache.v.is_contiguous()
