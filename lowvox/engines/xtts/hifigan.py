"""The XTTS vocoder: GPT latents -> 24 kHz waveform with a speaker-conditioned HiFi-GAN.

The GPT emits one latent per audio code (`ar_mel_length_compression` = 1024 samples at
22.05 kHz). They are linearly interpolated x4 (to the 256-sample hop) and again by
output_rate / input_rate (so the fixed 256x upsampling lands on 24 kHz), then the HiFi-GAN
generator (transposed-conv upsampling + multi-receptive-field residual blocks) makes audio.
Weight norm is folded into plain weights by the checkpoint loader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowvox.engines.xtts.speaker_encoder import ResNetSpeakerEncoder, SpeakerEncoderConfig

LRELU_SLOPE = 0.1
# The activation before the output convolution uses leaky_relu's default slope.
FINAL_LRELU_SLOPE = 0.01


@dataclass(frozen=True)
class GeneratorConfig:
    """HiFi-GAN generator sizes (the released XTTS v2 values are the defaults)."""

    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Apply a Conv1d to `[B, C, 1, T]` activations as a 2-D convolution.

    With channels-last activations oneDNN convolves in NWC directly instead of reordering
    every input and output to its blocked layout; that is 1.5-4x faster on CPU here. The
    weight is a free `[O, I, 1, k]` view of the Conv1d weight.
    """
    return F.conv2d(
        x,
        conv.weight.unsqueeze(2),
        conv.bias,
        stride=(1, conv.stride[0]),
        padding=(0, conv.padding[0]),
        dilation=(1, conv.dilation[0]),
    )


def _conv_transpose(up: nn.ConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
    """Apply a ConvTranspose1d to `[B, C, 1, T]` activations (see `_conv`)."""
    return F.conv_transpose2d(
        x,
        up.weight.unsqueeze(2),
        up.bias,
        stride=(1, up.stride[0]),
        padding=(0, up.padding[0]),
        output_padding=(0, up.output_padding[0]),
        dilation=(1, up.dilation[0]),
    )


class ResBlock(nn.Module):
    """Per dilation d: x += conv_k(lrelu(conv_{k,d}(lrelu(x)))) (HiFi-GAN 'type 1' block)."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(
                channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d)
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size))
            for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, 1, T]` -> `[B, C, 1, T]` (the generator's 2-D activation layout).

        In-place ops only touch tensors created here (conv outputs); `x` itself, which the
        sibling blocks also read, is never modified. This is inference-only code.
        """
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            xt = _conv(c1, F.leaky_relu(x, LRELU_SLOPE))
            xt = _conv(c2, F.leaky_relu(xt, LRELU_SLOPE, inplace=True))
            x = xt.add_(x)
        return x

    def radius(self) -> int:
        """Samples of context each side that one output sample depends on."""
        return sum(
            c.dilation[0] * (c.kernel_size[0] - 1) // 2 for c in [*self.convs1, *self.convs2]
        )


class HifiganGenerator(nn.Module):
    """`[B, in_channels, F]` frames + `[B, cond_channels, 1]` speaker -> `[B, 1, F * hop]`."""

    def __init__(
        self,
        in_channels: int,
        cond_channels: int,
        config: GeneratorConfig,
        cond_in_each_up_layer: bool = True,
    ) -> None:
        super().__init__()
        self.num_kernels = len(config.resblock_kernel_sizes)
        ch = config.upsample_initial_channel
        self.conv_pre = nn.Conv1d(in_channels, ch, 7, padding=3)
        self.cond_layer = nn.Conv1d(cond_channels, ch, 1)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        conds = []
        for i, (u, k) in enumerate(
            zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True)
        ):
            ch_in, ch_out = ch // 2**i, ch // 2 ** (i + 1)
            # padding (k - u) / 2 makes each layer output exactly u samples per input frame
            self.ups.append(nn.ConvTranspose1d(ch_in, ch_out, k, u, padding=(k - u) // 2))
            for ks, ds in zip(
                config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True
            ):
                self.resblocks.append(ResBlock(ch_out, ks, ds))
            conds.append(nn.Conv1d(cond_channels, ch_out, 1))
        self.conds = nn.ModuleList(conds) if cond_in_each_up_layer else None
        self.conv_post = nn.Conv1d(ch_out, 1, 7, padding=3, bias=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # Activations are [B, C, 1, T] in channels-last memory (see `_conv`); the speaker
        # terms are [B, C, 1, 1] and broadcast over time. Every in-place op below acts on a
        # fresh conv output owned by this function.
        x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        g = g.unsqueeze(2)  # [B, cond, 1, 1]
        o = _conv(self.conv_pre, x).add_(_conv(self.cond_layer, g))
        for i, up in enumerate(self.ups):
            o = _conv_transpose(up, F.leaky_relu(o, LRELU_SLOPE, inplace=True))
            if self.conds is not None:
                o.add_(_conv(self.conds[i], g))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            z = blocks[0](o)
            for block in blocks[1:]:
                z.add_(block(o))
            o = z.div_(self.num_kernels)
        o = _conv(self.conv_post, F.leaky_relu(o, FINAL_LRELU_SLOPE, inplace=True))
        return torch.tanh_(o).squeeze(2)  # [B, 1, N]

    def receptive_radius(self) -> int:
        """A bound R (in input frames) such that output frame i depends only on inputs i-R..i+R.

        Walks from the output back to the input, widening the radius (in samples at each
        rate) by every convolution's reach; transposed convolutions divide it by their stride.
        """
        r = self.conv_post.kernel_size[0] // 2
        for i in reversed(range(len(self.ups))):
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            r += max(b.radius() for b in blocks)
            up = self.ups[i]
            k, u, p = up.kernel_size[0], up.stride[0], up.padding[0]
            # output t is fed by inputs j with j*u - p <= t <= j*u - p + k - 1
            r = math.ceil((r + max(p, k - 1 - p)) / u) + 1
        return r + self.conv_pre.kernel_size[0] // 2


class HifiganDecoder(nn.Module):
    """GPT latents `[B, T, D]` + speaker embedding `[B, d_vector_dim, 1]` -> `[B, 1, N]` audio."""

    def __init__(
        self,
        input_sample_rate: int,
        output_sample_rate: int,
        output_hop_length: int,
        ar_mel_length_compression: int,
        decoder_input_dim: int,
        d_vector_dim: int,
        cond_d_vector_in_each_upsampling_layer: bool,
        generator: GeneratorConfig | None = None,
        speaker_encoder: SpeakerEncoderConfig | None = None,
    ) -> None:
        super().__init__()
        generator = generator or GeneratorConfig()
        if generator.hop_length != output_hop_length:
            raise ValueError(
                f"generator upsamples by {generator.hop_length}, config says {output_hop_length}"
            )
        self.input_sample_rate = input_sample_rate
        self.output_sample_rate = output_sample_rate
        self.output_hop_length = output_hop_length
        self.ar_mel_length_compression = ar_mel_length_compression
        self.waveform_decoder = HifiganGenerator(
            decoder_input_dim, d_vector_dim, generator, cond_d_vector_in_each_upsampling_layer
        )
        # The speaker encoder's output is the generator's conditioning vector.
        speaker_encoder = speaker_encoder or SpeakerEncoderConfig(proj_dim=d_vector_dim)
        if speaker_encoder.proj_dim != d_vector_dim:
            raise ValueError(
                f"speaker encoder makes {speaker_encoder.proj_dim}-d embeddings, "
                f"the generator expects {d_vector_dim}"
            )
        self.speaker_encoder = ResNetSpeakerEncoder(speaker_encoder)

    @property
    def hop_length(self) -> int:
        """Output samples per interpolated frame."""
        return self.output_hop_length

    @property
    def frame_scales(self) -> tuple[float, ...]:
        """The two linear-interpolation factors applied to the latents, in order."""
        scales = [self.ar_mel_length_compression / self.output_hop_length]
        if self.output_sample_rate != self.input_sample_rate:
            scales.append(self.output_sample_rate / self.input_sample_rate)
        return tuple(scales)

    def num_frames(self, num_latents: int) -> int:
        """Interpolated frames for `num_latents` latents (as F.interpolate sizes them)."""
        n = num_latents
        for s in self.frame_scales:
            n = math.floor(n * s)
        return n

    def upsample_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` -> `[B, D, F]` frames at the vocoder's hop."""
        z = latents.transpose(1, 2)
        for s in self.frame_scales:
            z = F.interpolate(z, scale_factor=s, mode="linear")
        return z

    def forward(self, latents: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.waveform_decoder(self.upsample_latents(latents), g)
