"""Weight-only int8 and bf16 linear layers, by module swap.

int8: each output channel gets its own scale (symmetric, max-abs / 127). Decoding one token
is bound by how fast weights stream from memory, and int8 reads a quarter of fp32's bytes,
bf16 half. On CPU the matmul of a decode step is lowvox's own kernel (`runtime/kernels`:
float32 activations, scale and bias applied in the same pass) and a prompt's is one bf16
matmul, or for int8 on CPUs with AMX the kernel again; elsewhere, or without that kernel,
PyTorch's kernels with bf16 activations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowvox.runtime import kernels
from lowvox.runtime.hugepages import huge_buffer


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


# From this many rows (a prefill, not a decode step or a small batch) a CPU with bf16
# matrix instructions is faster widening the weights to bf16 once and running one matmul.
MATMUL_ROWS = 16


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 bf16: torch's bf16 matmuls run natively instead of emulated."""
    from lowvox.runtime.devices import probe_machine

    return probe_machine(with_gpus=False).cpu_has_bf16


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place modification counter; -1 where it has none (inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return -1


# Whether torch has the fused int8-weight kernel for a device type (learnt on first use).
_FUSED: dict[str, bool] = {}


class WeightOnlyLinear(nn.Module):
    """A drop-in for nn.Linear whose weights are stored in a reduced dtype (`WEIGHT_DTYPE`)
    with a float32 bias, taking and returning float32. On CPU a few rows (decode steps) run
    lowvox's kernel with float32 activations, many rows (a prompt) one bf16 matmul on the
    matrix units; elsewhere `_forward_torch`."""

    WEIGHT_DTYPE: torch.dtype
    weight: torch.Tensor  # [out, in] in WEIGHT_DTYPE
    bias: torch.Tensor | None  # [out] float32

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight",
            torch.empty(out_features, in_features, dtype=self.WEIGHT_DTYPE, device=device),
        )
        if bias:
            self.register_buffer(
                "bias", torch.empty(out_features, dtype=torch.float32, device=device)
            )
        else:
            self.bias = None

    def kernel_scales(self) -> torch.Tensor | None:
        """Per-output-channel float32 scales for lowvox's kernel (None: unscaled weights)."""
        return None

    def kernel_weight(self) -> torch.Tensor:
        """The weights in the form lowvox's kernel takes them (`weight` itself here)."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32:
            rows = x.numel() // self.in_features
            if rows >= MATMUL_ROWS and cpu_has_fast_bf16() and not self._kernel_takes_many_rows():
                return self._forward_bf16_matmul(x)
            if kernels.available():
                x2 = x.reshape(-1, self.in_features).contiguous()  # [N, in]
                y = kernels.linear(x2, self.kernel_weight(), self.kernel_scales(), self.bias)
                return y.view(*x.shape[:-1], self.out_features)
        return self._forward_torch(x)

    def _kernel_takes_many_rows(self) -> bool:
        """Whether lowvox's kernel also beats the bf16 matmul at MATMUL_ROWS rows and more."""
        return False

    def _forward_bf16_matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(WeightOnlyLinear):
    """int8 weights and per-output-channel scales."""

    WEIGHT_DTYPE = torch.int8
    scales: torch.Tensor  # [out] bfloat16

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer(
            "scales", torch.empty(out_features, dtype=torch.bfloat16, device=device)
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_per_channel(linear.weight)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device=q.device)
        mod.weight.copy_(q)
        mod.scales.copy_(scales.to(torch.bfloat16))
        if linear.bias is not None and mod.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod

    _scales_f32: torch.Tensor | None = None
    _scales_key: tuple[int, int] | None = None

    def float_scales(self) -> torch.Tensor:
        """The scales as float32 (exact: they are bf16 values), converted again only when
        the scales are replaced or changed in place (`load_state_dict`)."""
        key = (id(self.scales), _version(self.scales))
        if self._scales_f32 is None or key != self._scales_key or key[1] < 0:
            self._scales_f32 = self.scales.float().contiguous()
            self._scales_key = key
        return self._scales_f32

    kernel_scales = float_scales

    _panels: torch.Tensor | None = None
    _panels_key: tuple[int, int, int] | None = None
    _rows_released = False

    def kernel_weight(self) -> torch.Tensor:
        """Where the kernels pack int8 panels (`kernels.int8_panels`: AVX-512 VNNI without
        AMX), the weights packed (made on first use, again whenever `weight` is replaced or
        changed in place): decode steps and prompts alike multiply panels, which stream
        faster than rows (the full-size GPT's linears: ~15 ms a step against ~20, and a
        batch of 8 rows ~20 ms against ~28, on Zen 4). `weight` stays as it is for
        everything else (state dicts, caches, torch's kernels, other devices); the packed
        copy costs as many bytes again, unless the layer holds only panels (`hold_panels`)."""
        if self._rows_released:
            assert self._panels is not None
            return self._panels  # the one copy of the weights there is
        w = self.weight
        if w.device.type != "cpu" or not kernels.int8_panels():
            return w
        key = self._weight_key()
        if self._panels is None or key != self._panels_key or key[2] < 0:
            self._panels = kernels.pack_int8_panels(w.contiguous())
            self._panels_key = key
        return self._panels

    def _weight_key(self) -> tuple[int, int, int]:
        w = self.weight
        return (id(w), w.data_ptr(), _version(w))

    def adopt_panels(self, panels: torch.Tensor) -> None:
        """Take `panels`, this layer's current weights packed (`kernels.pack_int8_panels`),
        as what `kernel_weight` returns until the weights change (see `pack_panels`)."""
        self.restore_rows()
        self._panels, self._panels_key = panels, self._weight_key()

    def hold_panels(self, panels: torch.Tensor) -> None:
        """Make `panels` (`kernels.pack_int8_panels` of this layer's weights) the layer's
        one copy of its weights: `weight` becomes a stand-in of the same shape and dtype (an
        expanded zero, one byte), and what reads the weights row by row gets them unpacked
        from the panels: state dicts (`rows`), moves and casts, loading a state dict,
        torch's kernels (`restore_rows` first). For the CPU decode alone (see
        `pack_panels`)."""
        self._panels = panels
        self.weight = torch.zeros((), dtype=torch.int8).expand(self.out_features, self.in_features)
        self._rows_released = True

    def rows(self) -> torch.Tensor:
        """The int8 weights [out, in] row by row: `weight`, or unpacked from the panels
        where the rows were released (a new tensor each time)."""
        if self._rows_released:
            assert self._panels is not None
            return kernels.unpack_int8_panels(self._panels, self.out_features, self.in_features)
        return self.weight

    def restore_rows(self) -> None:
        """Make `weight` the row-major weights again where `hold_panels` let it go."""
        if self._rows_released:
            self.weight = self.rows()
            self._rows_released = False
            self._panels_key = self._weight_key()  # the panels still hold these weights

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._rows_released:
            destination[prefix + "weight"] = self.rows()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.restore_rows()  # a weight to load into (or to replace)
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> Int8Linear:
        if self._rows_released and fn(self.weight) is not self.weight:
            self.restore_rows()  # a real move or cast: of the real weights
        return super()._apply(fn, recurse)

    def _kernel_takes_many_rows(self) -> bool:
        # On AMX the kernel multiplies many rows at the cost of few (a 64-token prompt's
        # linears ran ~2.5x faster than widening the weights for the bf16 matmul), with
        # int16 activations where the matmul rounds them to bf16. With AVX-512 VNNI and no
        # AMX, its packed int8 product (int8 activations, as its decode steps take them)
        # ran a 185-token prompt's linears ~2x faster than widening + bf16 matmul (Zen 4).
        return kernels.amx() or kernels.int8_panels()

    def _forward_bf16_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows at once (a prompt's prefill): the weights widened to bf16 (exact, int8
        fits bf16's mantissa) once for all rows, one bf16 matmul on the CPU's matrix units,
        float32 scales and bias after.

        Allocates nothing that outlives the call: the float32 scales are a throwaway copy.
        Caching them here (`float_scales`) would leave a small lasting allocation after each
        layer's multi-MB temporaries on the first prefill, splitting the freed heap so that
        every layer grew it again (~+0.3 GB RSS for the full-size GPT, only given back by
        `release_heap`)."""
        return _bf16_matmul(x, self.rows().to(torch.bfloat16), self.scales.float(), self.bias)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        self.restore_rows()
        return self._forward_fused(x)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's fused int8-weight kernel with bf16 activations (GPUs, and CPUs without
        lowvox's kernel)."""
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


def _bf16_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., in] float32, weight [out, in] bf16 -> float32 (x @ weight.T) * scales + bias,
    as one bf16 matmul (float32 accumulation) on the CPU's matrix units."""
    x2 = x.reshape(-1, weight.shape[1]).to(torch.bfloat16)  # [N, in]
    y = torch.mm(x2, weight.t()).float()
    if scales is not None:
        y *= scales
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Bf16Linear(WeightOnlyLinear):
    """bfloat16 weights: half of fp32's bytes, no scales."""

    WEIGHT_DTYPE = torch.bfloat16

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Bf16Linear:
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        mod.weight = w.to(torch.bfloat16).contiguous()
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def _forward_bf16_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _bf16_matmul(x, self.weight, None, self.bias)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 weights"


def pack_panels(module: nn.Module, release_rows: bool = True) -> int:
    """Pack the weights of every CPU `Int8Linear` under `module` as the kernels' int8 panels
    (where they take them, `kernels.int8_panels`), all in one buffer of huge pages, and hand
    each layer its part; returns the bytes packed (0 where nothing was). `release_rows`:
    the layers then let their row-major weights go (`Int8Linear.hold_panels`): the
    panels are the one copy (the full-size GPT: 0.39 GB less). Layers that hold only
    panels already (read so from the cache, `qcache.read_quantized(panels=True)`) keep them.

    A decode step streams every panel once. Packed one layer at a time (`kernel_weight`),
    each in memory of its own, they sit in 4 KB pages: the full-size GPT's int8 panels
    streamed at 24.3 GB/s in 4 KB pages against 28.5 in 2 MB ones on 2 cores (18.9
    against 23.2 on one; Zen 4, `kernels.linear` over 90 4096 x 1024 layers, one process).
    """
    layers = [
        m
        for m in module.modules()
        if isinstance(m, Int8Linear) and m.weight.device.type == "cpu" and not m._rows_released
    ]
    if not layers or not kernels.int8_panels():
        return 0
    shapes = [kernels.panel_shape(m.out_features, m.in_features) for m in layers]
    # Every part is a whole number of 64-byte rows, so each starts 64-byte aligned.
    buf = huge_buffer(sum(n * k for n, k in shapes))
    at = 0
    for m, (n, k) in zip(layers, shapes, strict=True):
        part = buf[at : at + n * k].view(n, k)
        packed = kernels.pack_int8_panels(m.weight.contiguous(), out=part)
        if release_rows:
            m.hold_panels(packed)
        else:
            m.adopt_panels(packed)
        at += n * k
    return at


# Recorded in the metadata of saved weights; a loader refuses any other mode.
INT8_MODE = "int8-weight-only/per-output-channel/symmetric/bf16-exact-scales"
BF16_MODE = "bf16-weight-only/float32-bias"


def _swap_linears(
    module: nn.Module, include: tuple[str, ...], make: Callable[[nn.Linear], nn.Module]
) -> int:
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


def bf16_linears(module: nn.Module, include: tuple[str, ...] = ("",)) -> int:
    """Swap every nn.Linear whose qualified name starts with one of `include` for a
    `Bf16Linear`; returns the count. Each float weight is released as soon as its layer is
    swapped."""
    return _swap_linears(module, include, Bf16Linear.from_linear)


def int8_skeleton(module: nn.Module, include: tuple[str, ...] = ("",)) -> int:
    """Like `quantize_linears`, but the new layers are empty (meta device): for a model built
    on the meta device that then takes saved int8 weights with `load_state_dict(assign=True)`,
    so the float weights never exist."""
    return _swap_linears(module, include, functools.partial(_empty, Int8Linear))


def bf16_skeleton(module: nn.Module, include: tuple[str, ...] = ("",)) -> int:
    """`int8_skeleton` for saved bf16 weights (`Bf16Linear`)."""
    return _swap_linears(module, include, functools.partial(_empty, Bf16Linear))


def _empty(cls: type[WeightOnlyLinear], lin: nn.Linear) -> nn.Module:
    return cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
