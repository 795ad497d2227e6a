"""The perceiver resampler: a variable number of conditioning frames -> a fixed set of latents.

A learned array of `num_latents` queries attends (cross-attention over the latents themselves
concatenated with the context frames) and passes through a GEGLU feed-forward, `depth` times,
then an RMS norm. XTTS v2 uses its 32 outputs as the voice's GPT conditioning.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Latents `[B, N, D]` attend to `cat(latents, context)`; bias-free projections."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = latents.shape
        context = torch.cat((latents, context), dim=1)  # [B, N + T, D]
        q = self.to_q(latents)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        # [B, L, H * hd] -> [B, H, L, hd]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Splits the last dim in two halves (x, gate) and returns x * gelu(gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    # int(dim * mult * 2 / 3) is the released model's hidden width (e.g. 2730 for 1024 * 4).
    inner = int(dim * mult * 2 / 3)
    return nn.Sequential(nn.Linear(dim, inner * 2), GEGLU(), nn.Linear(inner, dim))


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(dim) * gamma over the last dim."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class PerceiverResampler(nn.Module):
    """`[B, T, dim_context]` -> `[B, num_latents, dim]`."""

    def __init__(
        self,
        dim: int,
        depth: int = 2,
        dim_context: int | None = None,
        num_latents: int = 32,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        dim_context = dim if dim_context is None else dim_context
        self.proj_context = nn.Linear(dim_context, dim) if dim_context != dim else nn.Identity()
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.proj_context(x)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, N, D]
        for layer in self.layers:
            # Each layer is [cross-attention, feed-forward]: the checkpoint's `layers.{i}.0/1`.
            attn, ff = cast(nn.ModuleList, layer)
            latents = attn(latents, context) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
