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
    scales = _bf16_ceil(w.abs().amax(dim=1).clamp(min=1e-12) / 127.0)
    # The kernel applies bf16 scales: quantise against exactly those (rounded up, so no
    # weight needs clipping), or every output channel would carry a gain error of up to
    # 0.4% on top of the rounding noise.
    q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
    return q, scales


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 values >= x (positive x), as float32."""
    down = x.to(torch.bfloat16).float()
    up = torch.nextafter(down.to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16))
    return torch.where(down >= x, down, up.float())


# Whether torch has the fused int8-weight kernel for a device type (learnt on first use).
_FUSED: dict[str, bool] = {}


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
        if self.weight.data_ptr() % 64:
            # The fused kernel's vector loads need 64-byte alignment (a weight assigned from
            # a memory-mapped file may lack it, and the kernel would crash): copy once.
            self.weight = self.weight.clone()
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [N, in]
        y = None
        if _FUSED.get(x2.device.type, True):
            try:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
            except (RuntimeError, NotImplementedError):
                # Remembered per device type, so that no later call (e.g. one being captured
                # as a CUDA graph) tries and fails again.
                _FUSED[x2.device.type] = False
        if y is None:
            # Devices without the fused kernel: dequantise on the fly (correct, slower).
            y = F.linear(x2, self.weight.to(torch.bfloat16)) * self.scales
        if self.bias is not None and x.dtype == self.bias.dtype:
            y = torch.add(self.bias, y)  # bf16 + fp32 promotes: cast and bias in one op
        else:
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


# Recorded in the metadata of saved int8 weights; a loader refuses any other mode.
INT8_MODE = "int8-weight-only/per-output-channel/symmetric/bf16-exact-scales"


def _swap_linears(module: nn.Module, include: tuple[str, ...], make) -> int:
    # (parent, name) pairs only: holding the old layers would keep every float weight alive
    # until the end, and quantising a model would briefly need it twice.
    targets = [
        (child, child_name)
        for name, child in module.named_modules()
        for child_name, sub in child.named_children()
        if type(sub) is nn.Linear
        and any(f"{name}.{child_name}".lstrip(".").startswith(p) for p in include)
    ]
    for parent, child_name in targets:
        setattr(parent, child_name, make(getattr(parent, child_name)))
    return len(targets)


def quantize_linears(module: nn.Module, include: tuple[str, ...] = ("",)) -> int:
    """Swap every nn.Linear whose qualified name starts with one of `include`; returns the count.
    Each float weight is released as soon as its layer is swapped."""
    return _swap_linears(module, include, Int8Linear.from_linear)


def int8_skeleton(module: nn.Module, include: tuple[str, ...] = ("",)) -> int:
    """Like `quantize_linears`, but the new layers are empty (meta device): for a model built
    on the meta device that then takes saved int8 weights with `load_state_dict(assign=True)`,
    so the float weights never exist."""
    return _swap_linears(
        module,
        include,
        lambda lin: Int8Linear(
            lin.in_features, lin.out_features, lin.bias is not None, device="meta"
        ),
    )
