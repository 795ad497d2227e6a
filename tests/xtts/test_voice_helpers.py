"""Builders shared by the voice tests (this module holds no tests itself).

`golden_voice_model` builds the golden model from its config and weights (loaded strictly);
`random_voice_model` makes a small random model whose sizes and seed differ from the golden
bundle, so properties are checked on more than one model. (`snr_db` lives in
`tests.tolerance`, with the bounds it is held to.)
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from lowvox.engines.xtts.conditioning import ConditioningEncoder
from lowvox.engines.xtts.hifigan import GeneratorConfig, HifiganDecoder
from lowvox.engines.xtts.perceiver import PerceiverResampler
from lowvox.engines.xtts.speaker_encoder import SpeakerEncoderConfig


def golden_voice_model(golden_dir: Path):
    """The golden model, built from its config and weights with every key checked; the
    voice tests use its conditioning encoder, perceiver, HiFi-GAN decoder and mel_stats."""
    from lowvox.engines.xtts.checkpoint import read_state_dict
    from lowvox.engines.xtts.config import XttsConfig
    from lowvox.engines.xtts.loader import from_state_dict

    config = XttsConfig.from_file(golden_dir / "config.json")
    model = from_state_dict(config, read_state_dict(golden_dir / "model.pth"))
    model.fingerprint = "golden"
    return model


def random_decoder(
    seed: int = 11, dim: int = 48, d_vector: int = 24, channels: int = 32
) -> HifiganDecoder:
    """A small random HiFi-GAN with a different layout from the released one (`channels`
    in its first stage, halved at each of the three after)."""
    torch.manual_seed(seed)
    decoder = HifiganDecoder(
        input_sample_rate=22050,
        output_sample_rate=24000,
        output_hop_length=64,
        ar_mel_length_compression=256,
        decoder_input_dim=dim,
        d_vector_dim=d_vector,
        cond_d_vector_in_each_upsampling_layer=True,
        generator=GeneratorConfig(
            upsample_rates=(4, 4, 4),
            upsample_kernel_sizes=(8, 8, 8),
            upsample_initial_channel=channels,
            resblock_kernel_sizes=(3, 5),
            resblock_dilation_sizes=((1, 3), (1, 2)),
        ),
        speaker_encoder=SpeakerEncoderConfig(
            layers=(1, 2), num_filters=(8, 16), num_mels=32, proj_dim=d_vector, attention_dim=16
        ),
    )
    # Default init gives near-silent output; larger weights make seams and errors visible.
    with torch.no_grad():
        for name, p in decoder.waveform_decoder.named_parameters():
            if name.endswith("weight"):
                p.mul_(2.0)
    return decoder.eval()


def random_voice_model(seed: int = 5, dim: int = 96, heads: int = 3) -> SimpleNamespace:
    torch.manual_seed(seed)
    encoder = ConditioningEncoder(80, dim, attn_blocks=2, num_attn_heads=heads)
    perceiver = PerceiverResampler(
        dim, depth=1, dim_context=dim, num_latents=8, dim_head=16, heads=2, ff_mult=2
    )
    with torch.no_grad():
        perceiver.latents.normal_()
    decoder = random_decoder(seed + 1, dim=dim)
    return SimpleNamespace(
        config=SimpleNamespace(audio=SimpleNamespace(sample_rate=22050)),
        gpt=SimpleNamespace(
            conditioning_encoder=encoder.eval(), conditioning_perceiver=perceiver.eval()
        ),
        hifigan_decoder=decoder,
        mel_stats=torch.rand(80) + 0.5,
        fingerprint=f"random-{seed}",
    )
