"""Weight-only int8 quantisation of linear layers, by module swap.

Each output channel gets its own scale (symmetric, max-abs / 127). The matmul uses
PyTorch's fused int8-weight kernel with bf16 activations, which reads a quarter of the
bytes fp32 would: decoding one token is bound by how fast weights stream from memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scales [out])."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear holding int8 weights and per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "scales", torch.empty(out_features, dtype=torch.bfloat16, device=device)
        )
        if bias:
            self.register_buffer(
                "bias", torch.empty(out_features, dtype=torch.float32, device=device)
            )
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_per_channel(linear.weight)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device=q.device)
        mod.weight.copy_(q)
        mod.scales.copy_(scales.to(torch.bfloat16))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [N, in]
        try:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        except (RuntimeError, NotImplementedError):
            # Devices without the fused kernel: dequantise on the fly (correct, slower).
            y = F.linear(x2, self.weight.to(torch.bfloat16)) * self.scales
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_linears(module: nn.Module, include: tuple[str, ...] = ("",)) -> int:
    """Swap every nn.Linear whose qualified name starts with one of `include`; returns the count."""
    swapped = 0
    for name, child in list(module.named_modules()):
        for child_name, sub in list(child.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(sub) is nn.Linear and any(full.startswith(p) for p in include):
                setattr(child, child_name, Int8Linear.from_linear(sub))
                swapped += 1
    return swapped
