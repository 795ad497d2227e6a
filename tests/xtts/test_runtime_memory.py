"""Long utterances are vocoded in windows (flat memory) with the same audio as in one go."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowvox.engines.xtts.pipeline import vocode
from lowvox.engines.xtts.vocode import DEFAULT_WINDOW_FRAMES


@pytest.mark.slow
def test_long_utterance_vocoded_in_pieces_equals_one_go(golden_model) -> None:
    voice = golden_model.speakers["Alpha Voice"]
    g = torch.Generator().manual_seed(3)
    # About four frames per latent: more than two windows, not a multiple of one.
    n = DEFAULT_WINDOW_FRAMES // 2 + 17
    latents = torch.randn(1, n, golden_model.gpt.dim, generator=g)
    with torch.inference_mode():
        pieces = vocode(golden_model, latents, voice)
        whole = golden_model.hifigan_decoder(latents, voice.speaker_embedding).reshape(-1)
    assert pieces.dtype == np.float32 and pieces.shape == tuple(whole.shape)
    peak = float(whole.abs().max())
    # Windows: another chunking of one operation, yet not FP32_REORDER: this audio peaks near
    # 0.02, where the row's atol (1e-5) would be looser than this bound relative to the peak.
    assert np.abs(pieces - whole.numpy()).max() <= 1e-4 * peak
