"""Streaming vocoding on a random decoder: equals whole-utterance decoding, emits the first
chunk on time, and vocodes a bounded number of frames per chunk however long the utterance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowvox.engines.xtts.vocode import RowVocoder, StreamingVocoder, interpolate_frames
from tests.tolerance import MIN_STREAM_SNR_DB, snr_db
from tests.xtts.test_voice_helpers import random_decoder


def stream(vocoder: RowVocoder, latents: torch.Tensor, step: int) -> list[np.ndarray]:
    parts = [vocoder.push(latents[:, i : i + step]) for i in range(0, latents.shape[1], step)]
    parts.append(vocoder.finish())
    return parts


@pytest.fixture(scope="module")
def decoder():
    return random_decoder(seed=21)


@pytest.fixture(scope="module")
def speaker() -> torch.Tensor:
    torch.manual_seed(8)
    return F.normalize(torch.randn(1, 24, 1), dim=1)


@pytest.mark.parametrize(
    ("n", "step", "first", "chunk"),
    [
        (57, 1, 20, 20),
        (57, 4, 20, 20),
        (120, 7, 5, 9),
        (30, 30, 20, 20),
        (3, 1, 20, 20),
        (64, 2, 1, 1),
    ],
)
def test_streamed_equals_whole_utterance(decoder, speaker, n, step, first, chunk) -> None:
    torch.manual_seed(n + step)
    latents = torch.randn(1, n, 48)
    with torch.inference_mode():
        whole = decoder(latents, speaker)[0, 0].numpy()
    vocoder = RowVocoder(decoder, speaker, 1.0, first, chunk)
    streamed = np.concatenate(stream(vocoder, latents, step))
    assert streamed.dtype == np.float32
    assert streamed.shape == whole.shape
    assert snr_db(whole, streamed) >= MIN_STREAM_SNR_DB
    # No seam: the worst single-sample error is tiny next to the signal's level (a bound on
    # the cross-fades at chunk joins, beside the SNR; no elementwise row describes them).
    assert np.abs(streamed - whole).max() <= 1e-3 * np.abs(whole).max()


def test_first_chunk_after_configured_tokens(decoder, speaker) -> None:
    latents = torch.randn(1, 60, 48)
    # The default cadence (what every stream uses): the first chunk after 12 tokens.
    default = RowVocoder(decoder, speaker)
    sizes = [default.push(latents[:, i : i + 1]).size for i in range(12)]
    assert all(s == 0 for s in sizes[:-1]) and sizes[-1] > 0
    for first in (20, 8):
        vocoder = RowVocoder(decoder, speaker, 1.0, first)
        sizes = [vocoder.push(latents[:, i : i + 1]).size for i in range(first)]
        assert all(s == 0 for s in sizes[:-1])
        assert sizes[-1] > 0  # emitted as soon as the first_chunk_tokens-th latent arrives


def test_per_chunk_cost_is_flat(decoder, speaker) -> None:
    """Frames run through HiFi-GAN per chunk do not grow with the utterance length."""
    radius = decoder.waveform_decoder.receptive_radius()
    worst = {}
    for n in (60, 240, 480):
        vocoder = RowVocoder(decoder, speaker, chunk_tokens=10)
        stream(vocoder, torch.randn(1, n, 48), step=1)
        first, *rest = vocoder.vocoder.frames_vocoded
        assert len(rest) >= n // 10 - 3
        assert first <= decoder.num_frames(12) + 2 * radius  # the first chunk: 12 latents
        worst[n] = max(rest)
    # Later chunks: 10 latents (~44 frames) plus context on both sides (+ rounding slack).
    bound = decoder.num_frames(10) + 2 + 2 * radius
    assert all(w <= bound for w in worst.values()), (worst, bound)
    assert worst[480] == worst[60]


def test_push_validation(decoder, speaker) -> None:
    vocoder = StreamingVocoder(decoder, speaker)
    with pytest.raises(ValueError):
        vocoder.push(torch.randn(5, 48))
    assert vocoder.push(torch.randn(1, 0, 48)).size == 0
    assert vocoder.flush().size == 0  # nothing pushed, nothing to say
    with pytest.raises(RuntimeError):
        vocoder.push(torch.randn(1, 1, 48))
    with pytest.raises(ValueError):
        RowVocoder(decoder, speaker, 1.0, 0)


@pytest.mark.parametrize("scale", [4.0, 24000 / 22050, 1.5])
def test_window_interpolation_matches_f_interpolate(scale: float) -> None:
    x = torch.randn(1, 5, 41)
    full = F.interpolate(x, scale_factor=scale, mode="linear")
    n_out = full.shape[-1]
    torch.testing.assert_close(interpolate_frames(x, 0, 0, n_out, scale, 41), full)
    # A window, computed from a slice of the input, equals the same window of the whole.
    lo, hi = int(15 * scale), int(25 * scale)  # reads input frames ~14..26
    part = interpolate_frames(x[:, :, 10:30], 10, lo, hi, scale, 41)
    torch.testing.assert_close(part, full[:, :, lo:hi])


@pytest.mark.parametrize("speed", [1.0, 1.3])
def test_held_pushes_make_the_same_audio_as_unheld_ones(decoder, speaker, speed) -> None:
    """A batch may hold a bulk row's vocoding (a listener waits elsewhere): the chunks end
    at the same latents whenever they are vocoded, so the audio is exactly the same."""
    latents = torch.randn(1, 75, 48)
    plain = RowVocoder(decoder, speaker, speed, 12, 20)
    held = RowVocoder(decoder, speaker, speed, 12, 20)
    with torch.inference_mode():
        a = [plain.push(latents[:, i : i + 1]) for i in range(75)] + [plain.finish()]
        hold = [10 <= i < 47 or i >= 60 for i in range(75)]  # past several chunk ends
        b = [held.push(latents[:, i : i + 1], hold=h) for i, h in enumerate(hold)]
        b.append(held.finish())
    assert sum(x.size for x in b[10:47]) == 0  # nothing while held...
    assert b[47].size > a[47].size  # ...then the backlog at once
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
