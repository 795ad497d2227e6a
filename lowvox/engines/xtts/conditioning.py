"""The conditioning encoder: a log-mel spectrogram of reference speech -> per-frame features.

A 1x1 convolution lifts the 80 mel bands to the model width, then a stack of self-attention
blocks mixes the frames. Two quirks of the released model are kept because the weights depend
on them: the fused qkv projection is laid out head-major (`[head][q|k|v][channel]`), and each
block adds its attention output to the *normalised* input rather than to the input itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _group_count(channels: int) -> int:
    """GroupNorm groups used by the released model: 32, fewer for narrow layers."""
    groups = 8 if channels <= 16 else 16 if channels <= 64 else 32
    while channels % groups:
        groups //= 2
    return groups


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the time axis of `[B, C, T]`, with GroupNorm in front."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_group_count(channels), channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        # GroupNorm in fp32 so half-precision inputs keep their statistics exact.
        x_norm = self.norm(x.float()).to(x.dtype)
        qkv = self.qkv(x_norm)  # [B, 3C, T], channels ordered [head][q|k|v][head_dim]
        qkv = qkv.reshape(b, self.num_heads, 3, c // self.num_heads, t)
        q, k, v = (qkv[:, :, i].transpose(-1, -2) for i in range(3))  # [B, H, T, hd] each
        h = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, hd]
        h = h.transpose(-1, -2).reshape(b, c, t)
        return x_norm + self.proj_out(h)


class ConditioningEncoder(nn.Module):
    """`[B, spec_channels, T]` normalised log-mel -> `[B, embedding_dim, T]` features."""

    def __init__(
        self,
        spec_channels: int,
        embedding_dim: int,
        attn_blocks: int = 6,
        num_attn_heads: int = 4,
    ) -> None:
        super().__init__()
        self.init = nn.Conv1d(spec_channels, embedding_dim, 1)
        self.attn = nn.Sequential(
            *(AttentionBlock(embedding_dim, num_attn_heads) for _ in range(attn_blocks))
        )

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.attn(self.init(mel))
