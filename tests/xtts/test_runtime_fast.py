"""The fixed-shape decode step (what a CUDA graph captures) decodes exactly as the eager one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowvox.engines.xtts.generate import Generator, StaticDecoder
from lowvox.engines.xtts.model import XttsModel
from lowvox.engines.xtts.sampling import SamplingOptions
from tests.tolerance import FP32_OTHER_KERNELS

GREEDY = SamplingOptions(repetition_penalty=5.0, do_sample=False)


def run(model: XttsModel, text: str, static: StaticDecoder | None, tokens: int = 30):
    voice = next(iter(model.speakers.values()))
    ids = torch.tensor([model.tokenizer.encode(text, "en")], device=model.device)
    return Generator(model.gpt, voice.gpt_cond_latent, ids, GREEDY, tokens, None, static).run()


def test_static_step_decodes_like_the_eager_one(golden_model) -> None:
    static = StaticDecoder(golden_model.gpt, max_len=200)
    # Two generations through the same static cache: the second must not see the first.
    for text in ("a first sentence that is rather long, to fill the cache.", "short one."):
        eager = run(golden_model, text, None)
        fixed = run(golden_model, text, static)
        assert torch.equal(eager.codes, fixed.codes)
        FP32_OTHER_KERNELS.check(fixed.latents, eager.latents)  # static vs growing KV cache


def test_generation_too_long_for_the_static_cache_falls_back(golden_model) -> None:
    static = StaticDecoder(golden_model.gpt, max_len=40)  # shorter than any prompt + tokens
    eager = run(golden_model, "hello.", None, tokens=10)
    assert torch.equal(run(golden_model, "hello.", static, tokens=10).codes, eager.codes)


@pytest.mark.slow
def test_model_level_static_decoding(golden_dir, tmp_path) -> None:
    model = XttsModel.load(golden_dir, cache_dir=tmp_path)
    kwargs = dict(voice="Alpha Voice", do_sample=False, max_new_tokens=15)
    eager = model.synthesize("Static shapes.", **kwargs)
    model.enable_static_decoding(capture=False)
    assert model.static_decoder is not None
    fixed = model.synthesize("Static shapes.", **kwargs)
    assert np.array_equal(eager.codes[0], fixed.codes[0])
    streamed = np.concatenate([c.wav for c in model.synthesize_stream("Static shapes.", **kwargs)])
    assert streamed.shape == eager.wav.shape
    model.disable_static_decoding()
    assert model.static_decoder is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager(golden_dir, tmp_path) -> None:
    model = XttsModel.load(golden_dir, device="cuda", cache_dir=tmp_path)
    eager = run(model, "a sentence for the graph.", None)
    static = StaticDecoder(model.gpt, max_len=300, capture=True)
    assert static.graph is not None
    for _ in range(2):  # replayed across generations
        graphed = run(model, "a sentence for the graph.", static)
        assert torch.equal(graphed.codes, eager.codes)
