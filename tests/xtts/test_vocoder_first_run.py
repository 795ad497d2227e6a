"""The first vocoding at each new window length runs inside `own_mappings` (oneDNN builds
its kernels then); repeats at a known length run as usual, and the audio is the same."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowvox.engines.xtts import vocode
from tests.tolerance import FP32_REORDER
from tests.xtts.test_voice_helpers import random_decoder


def _decoder():
    return random_decoder(seed=4, dim=16, d_vector=8)


@pytest.fixture
def entered(monkeypatch) -> list[int]:
    """Counts the `own_mappings` blocks that vocoding enters."""
    calls: list[int] = []

    @contextmanager
    def counting():
        calls.append(1)
        yield True

    monkeypatch.setattr(vocode, "own_mappings", counting)
    return calls


def test_first_run_per_length_is_in_own_mappings(entered):
    decoder = _decoder()
    g = F.normalize(torch.randn(1, 8, 1), dim=1)
    radius = decoder.waveform_decoder.receptive_radius()
    window = 2 * radius + 24
    latents = torch.randn(1, 3 * window // 4, 16)  # several windows of one length
    with torch.inference_mode():
        whole = decoder(latents, g)[0, 0].numpy()
        first = vocode.vocode_in_windows(decoder, latents, g, window=window)
        assert len(entered) == 1  # one length: every window after the first is known
        again = vocode.vocode_in_windows(decoder, latents, g, window=window)
        assert len(entered) == 1
        vocode.vocode_in_windows(decoder, latents[:, :5], g, window=window)
        assert len(entered) == 2  # a short utterance is one new, shorter window
    np.testing.assert_array_equal(first, again)  # the same decoder, the same work: exact
    FP32_REORDER.check(first, whole)  # windows: another chunking of one operation


def test_a_new_generator_starts_with_no_known_lengths(entered):
    g = F.normalize(torch.randn(1, 8, 1), dim=1)
    latents = torch.randn(1, 6, 16)
    with torch.inference_mode():
        vocode.vocode_in_windows(_decoder(), latents, g)
        vocode.vocode_in_windows(_decoder(), latents, g)
    assert len(entered) == 2
