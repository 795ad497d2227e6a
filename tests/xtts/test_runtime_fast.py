"""The fixed-shape decode step (what a CUDA graph captures, per batch bucket) decodes
exactly as the eager one, padded buckets and rows joining included."""

from __future__ import annotations

import pytest
import torch

from lowvox.engines.xtts.decode import Decoder, DecodeRow, collect
from lowvox.engines.xtts.loader import load_model
from lowvox.engines.xtts.model import XttsModel
from lowvox.engines.xtts.sampling import SamplingOptions
from tests.tolerance import FP32_OTHER_KERNELS

GREEDY = SamplingOptions(repetition_penalty=5.0, do_sample=False)
TEXTS = ("a first sentence that is rather long, to fill the cache.", "short one.", "and a third.")


def rows(model: XttsModel, tokens: int = 30) -> list[DecodeRow]:
    voice = next(iter(model.speakers.values()))
    return [
        DecodeRow(
            voice.gpt_cond_latent,
            torch.tensor([model.tokenizer.encode(text, "en")], device=model.device),
            GREEDY,
            tokens,
        )
        for text in TEXTS
    ]


def test_static_steps_decode_like_the_eager_ones(golden_model) -> None:
    # Three rows run in the bucket of four: one padding row rides along.
    eager = collect(golden_model.gpt, rows(golden_model))
    fixed = collect(golden_model.gpt, rows(golden_model), graphs=True)
    for e, f in zip(eager, fixed, strict=True):
        assert torch.equal(e.codes, f.codes)
        FP32_OTHER_KERNELS.check(f.latents, e.latents)


def test_static_steps_keep_rows_apart_as_they_join_and_leave(golden_model) -> None:
    decoder = Decoder(golden_model.gpt, max_rows=4, graphs=True)
    first, second, third = rows(golden_model, tokens=12)
    ids = {decoder.add(first): 0}
    codes: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step in range(40):
        if step == 3:
            ids[decoder.add(second)] = 1  # bucket 1 -> 2
        if step == 14:
            ids[decoder.add(third)] = 2  # after the first has left
        for s in decoder.step():
            if not s.is_stop:
                codes[ids[s.row]].append(int(s.token))
        if step > 14 and not len(decoder):
            break
    eager = collect(golden_model.gpt, rows(golden_model, tokens=12))
    for i, e in enumerate(eager):
        assert codes[i] == e.codes.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager(golden_dir, tmp_path) -> None:
    model = load_model(golden_dir, device="cuda", cache_dir=tmp_path)
    eager = collect(model.gpt, rows(model))
    decoder = Decoder(model.gpt, max_rows=4, graphs=True)
    for _ in range(2):  # replayed across generations
        ids = {decoder.add(row): i for i, row in enumerate(rows(model))}
        codes: dict[int, list[int]] = {i: [] for i in range(len(TEXTS))}
        while len(decoder):
            for s in decoder.step():
                if not s.is_stop:
                    codes[ids[s.row]].append(int(s.token))
        assert decoder._graphs  # captured
        for i, e in enumerate(eager):
            assert codes[i] == e.codes.tolist()
