"""Shape and structural properties of the voice-side modules, on small random models whose
sizes differ from the golden bundle (so nothing here depends on one checkpoint)."""

from __future__ import annotations

import pytest
import torch

from lowvox.engines.xtts.conditioning import ConditioningEncoder
from lowvox.engines.xtts.hifigan import GeneratorConfig, HifiganDecoder
from lowvox.engines.xtts.perceiver import PerceiverResampler
from lowvox.engines.xtts.speaker_encoder import ResNetSpeakerEncoder, SpeakerEncoderConfig
from tests.tolerance import FP32_REORDER
from tests.xtts.test_voice_helpers import random_decoder


@torch.inference_mode()
def test_conditioning_encoder_is_time_equivariant() -> None:
    # Self-attention without positions: permuting frames permutes the output the same way.
    torch.manual_seed(0)
    enc = ConditioningEncoder(80, 64, attn_blocks=3, num_attn_heads=4).eval()
    mel = torch.randn(2, 80, 37)
    out = enc(mel)
    assert out.shape == (2, 64, 37)
    perm = torch.randperm(37)
    FP32_REORDER.check(enc(mel[:, :, perm]), out[:, :, perm])  # the same sums, reordered


@torch.inference_mode()
def test_conditioning_heads_are_independent_slices_of_qkv() -> None:
    # Head-major qkv layout: zeroing the qkv rows of head 0 must leave the other heads' part
    # of the attention output unchanged (checked before proj_out via an identity projection).
    torch.manual_seed(1)
    enc = ConditioningEncoder(16, 32, attn_blocks=1, num_attn_heads=4).eval()
    block = enc.attn[0]
    with torch.no_grad():
        block.proj_out.weight.copy_(torch.eye(32).unsqueeze(-1))
        block.proj_out.bias.zero_()
    mel = torch.randn(1, 16, 9)
    before = enc(mel)
    with torch.no_grad():
        block.qkv.weight[: 3 * 8].zero_()  # rows of head 0: [q|k|v] x 8 channels
        block.qkv.bias[: 3 * 8].zero_()
    after = enc(mel)
    torch.testing.assert_close(after[:, 8:], before[:, 8:])
    assert not torch.allclose(after[:, :8], before[:, :8])


@torch.inference_mode()
def test_perceiver_shape_and_context_order_invariance() -> None:
    torch.manual_seed(2)
    p = PerceiverResampler(
        48, depth=2, dim_context=40, num_latents=6, dim_head=8, heads=3, ff_mult=2
    )
    with torch.no_grad():
        p.latents.normal_()
    x = torch.randn(3, 21, 40)
    out = p(x)
    assert out.shape == (3, 6, 48)
    # Cross-attention pools over context frames: their order cannot matter.
    FP32_REORDER.check(p(x[:, torch.randperm(21)]), out)
    # RMS norm output: each latent has norm sqrt(dim) * |gamma| = sqrt(48).
    torch.testing.assert_close(out.norm(dim=-1), torch.full((3, 6), 48**0.5), rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_speaker_encoder_embeds_unit_vectors_and_ignores_gain() -> None:
    torch.manual_seed(3)
    cfg = SpeakerEncoderConfig(layers=(1, 1, 1), num_filters=(8, 16, 32), num_mels=40, proj_dim=20)
    enc = ResNetSpeakerEncoder(cfg).eval()
    audio = torch.randn(2, 16000) * 0.1
    emb = enc.embed(audio)
    assert emb.shape == (2, 20)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    # log-mel + per-band instance norm removes the overall level (up to the log's epsilon).
    torch.testing.assert_close(enc.embed(audio * 0.5), emb, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(enc.embed(torch.randn(2, 16000) * 0.1), emb, atol=1e-3)


def test_speaker_encoder_front_end_buffers_are_checkpoint_keys() -> None:
    keys = set(ResNetSpeakerEncoder().state_dict())
    assert {
        "torch_spec.0.filter",
        "torch_spec.1.spectrogram.window",
        "torch_spec.1.mel_scale.fb",
    } <= keys


def test_decoder_rejects_inconsistent_sizes() -> None:
    with pytest.raises(ValueError):
        HifiganDecoder(22050, 24000, 128, 1024, 32, 16, True, generator=GeneratorConfig())
    with pytest.raises(ValueError):
        HifiganDecoder(
            22050, 24000, 256, 1024, 32, 16, True, speaker_encoder=SpeakerEncoderConfig()
        )


@pytest.mark.parametrize("n", [1, 7, 30])
@torch.inference_mode()
def test_decoder_output_length_and_range(n: int) -> None:
    dec = random_decoder()
    lat = torch.randn(1, n, 48)
    wav = dec(lat, torch.randn(1, 24, 1))
    assert wav.shape == (1, 1, dec.num_frames(n) * dec.hop_length)
    # x4 then x24000/22050 frames, as the reference's two interpolations size them.
    assert dec.num_frames(n) == int(int(n * 4) * 24000 / 22050)
    assert float(wav.abs().max()) <= 1.0


@pytest.mark.parametrize("make", [random_decoder, lambda: random_decoder(seed=3, dim=16)])
@torch.inference_mode()
def test_receptive_radius_bounds_the_measured_reach(make) -> None:
    """Perturbing input frame p may change output only within R frames of p, and R is tight
    (the measured reach is at least R - 3)."""
    dec = make()
    gen = dec.waveform_decoder
    radius = gen.receptive_radius()
    hop = dec.hop_length
    torch.manual_seed(4)
    frames, p = 4 * radius + 10, 2 * radius + 5
    z = torch.randn(1, gen.conv_pre.in_channels, frames)
    g = torch.randn(1, gen.cond_layer.in_channels, 1)
    base = gen(z, g)[0, 0]
    z2 = z.clone()
    z2[:, :, p] += 5.0
    diff = (gen(z2, g)[0, 0] - base).abs()
    changed = torch.nonzero(diff > 0).flatten()
    assert changed.numel() > 0
    first, last = int(changed.min()) // hop, int(changed.max()) // hop
    assert p - radius <= first and last <= p + radius
    assert max(p - first, last - p) >= radius - 3
