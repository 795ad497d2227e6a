"""The XTTS vocoder: GPT latents -> 24 kHz waveform with a speaker-conditioned HiFi-GAN.

The GPT emits one latent per audio code (`ar_mel_length_compression` = 1024 samples at
22.05 kHz). They are linearly interpolated x4 (to the 256-sample hop) and again by
output_rate / input_rate (so the fixed 256x upsampling lands on 24 kHz), then the HiFi-GAN
generator (transposed-conv upsampling + multi-receptive-field residual blocks) makes audio.
Weight norm is folded into plain weights by the checkpoint loader.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowvox.engines.xtts.config import VOCODER_PRECISIONS
from lowvox.engines.xtts.modules import TypedModuleList
from lowvox.engines.xtts.speaker_encoder import ResNetSpeakerEncoder, SpeakerEncoderConfig
from lowvox.errors import EngineUnavailable, LowvoxError
from lowvox.runtime import kernels
from lowvox.runtime.memory import own_mappings

LRELU_SLOPE = 0.1
# The activation before the output convolution uses leaky_relu's default slope.
FINAL_LRELU_SLOPE = 0.01
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The int8 plan's int8 convolutions: the resblocks of these stages and the upsamplers that
# follow them (every stage of the released vocoder); conv_pre, the first upsampler and
# conv_post stay bf16. On the full-size random vocoder (Zen 4, 180 latents, `vocode`, best
# of 6 in one process; weights with a scale per output and tap): every stage int8 30.9 dB
# SNR against fp32 at 0.107 s per audio second, stages (0, 1, 2) 31.2 dB at 0.112; bf16
# 38.1 dB at 0.169. The last stage's 32-channel convolutions run at ~60% of the kernel's
# 256-channel rate (per output step, quantising its input and rescaling each tap's sums
# weigh more against 32 x 32 products), still faster than oneDNN's bf16.
INT8_STAGES = (0, 1, 2, 3)
# In float32 the fused path gains ~5% in steady state, and much more when the cores are
# contended (fewer parallel regions), but builds its oneDNN kernels per input length: it
# pays from the released size (512 channels) down, not for tiny test models.
FUSE_MIN_CHANNELS = 256
# Frames per piece on the fused path (`FusedStream`), which computes no context twice:
# ~1 s of audio keeps a stage's activations near the caches (the full-size vocoder with
# every convolution in int8, Zen 4: 0.100 s per audio second in pieces of 96 frames, 0.117
# in pieces of 208). Streaming pushes pieces of about this size too (20 tokens: ~87 frames).
FUSED_PIECE_FRAMES = 96
# `_PackedConv`: at most this many copies of a weight packed for other input lengths (one
# per padding oneDNN picks besides the first's: one is typical), and how many lengths it
# counts before forgetting them (whole utterances come at every length).
MAX_EXTRA_PACKINGS = 2
_MAX_TRACKED_LENGTHS = 16
# `FusedStream`'s end of an utterance not yet known (past any real sample position).
_NO_END = 1 << 60


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


def bf16_supported() -> bool:
    """Whether this CPU runs oneDNN's bf16 convolutions natively (AVX512-BF16 or AMX);
    elsewhere oneDNN would emulate them, slower than float32."""
    return torch.backends.mkldnn.is_available() and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )


def amx_supported() -> bool:
    """Whether this CPU has AMX tiles (where oneDNN's bf16 convolutions run on them)."""
    return torch.cpu._is_amx_tile_supported()


def int8_supported() -> bool:
    """Whether this CPU runs the vocoder's int8 convolutions (`kernels.Int8Conv`: AVX-512
    VNNI) with oneDNN for the rest."""
    return torch.backends.mkldnn.is_available() and kernels.int8_conv()


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _padding(conv: nn.Conv1d | nn.ConvTranspose1d) -> int:
    """A layer's padding in samples (every convolution here is built with a number)."""
    assert not isinstance(conv.padding, str), conv.padding
    return conv.padding[0]


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
        padding=(0, _padding(conv)),
        dilation=(1, conv.dilation[0]),
    )


def _conv_transpose(up: nn.ConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
    """Apply a ConvTranspose1d to `[B, C, 1, T]` activations (see `_conv`)."""
    return F.conv_transpose2d(
        x,
        up.weight.unsqueeze(2),
        up.bias,
        stride=(1, up.stride[0]),
        padding=(0, _padding(up)),
        output_padding=(0, up.output_padding[0]),
        dilation=(1, up.dilation[0]),
    )


class ResBlock(nn.Module):
    """Per dilation d: x += conv_k(lrelu(conv_{k,d}(lrelu(x)))) (HiFi-GAN 'type 1' block)."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1: TypedModuleList[nn.Conv1d] = TypedModuleList(
            nn.Conv1d(
                channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d)
            )
            for d in dilations
        )
        self.convs2: TypedModuleList[nn.Conv1d] = TypedModuleList(
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
        self.ups: TypedModuleList[nn.ConvTranspose1d] = TypedModuleList()
        self.resblocks: TypedModuleList[ResBlock] = TypedModuleList()
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
        self.conds: TypedModuleList[nn.Conv1d] | None = (
            TypedModuleList(conds) if cond_in_each_up_layer else None
        )
        self.conv_post = nn.Conv1d(ch_out, 1, 7, padding=3, bias=False)
        self.precision = "fp32"
        # The fused oneDNN path (see `_FusedPlan`): None picks it for bf16 always and for
        # fp32 at FUSE_MIN_CHANNELS and up; True forces it, False forbids it (fp32 only).
        self.fused: bool | None = None
        self._plan: _FusedPlan | None = None
        self._plan_key: tuple = ()

    def set_precision(self, precision: str) -> None:
        """Compute in "fp32" (the default) or "bf16"; weights stay float32 either way.

        bf16 convolutions run on oneDNN (AMX where the CPU has it) from bf16 copies of the
        weights, made once per precision; "fp32" drops them. Idempotent and undoable.
        """
        if precision not in VOCODER_PRECISIONS:
            raise LowvoxError(
                f"unknown vocoder precision {precision!r} "
                f"(choose from {', '.join(VOCODER_PRECISIONS)})"
            )
        if precision == "bf16" and not bf16_supported():
            raise EngineUnavailable("bf16 vocoding needs a CPU with native bf16 and oneDNN")
        if precision == "int8" and not int8_supported():
            raise EngineUnavailable("int8 vocoding needs lowvox's C kernels on AVX-512 VNNI")
        if precision != self.precision:
            self.precision = precision
            self._plan = None

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """`[B, in, F]` frames (any float dtype) + `[B, cond, 1]` -> float32 `[B, 1, F * hop]`."""
        if self._can_fuse(x):
            plan = self._fused_plan()
            g = g.float()
            if len(x) == 1:
                return plan.run(x, g)
            return torch.cat([plan.run(x[b : b + 1], g[b : b + 1]) for b in range(len(x))])
        if self.precision != "fp32":
            raise RuntimeError(f"{self.precision} vocoding needs oneDNN on CPU, in inference")
        return self._reference_forward(x.to(self.conv_pre.weight.dtype), g)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        """The fused oneDNN path serves CPU inference with float32 weights; anything else
        (autograd, other devices, a module cast to half) takes the plain path. Small float32
        generators stay plain: their convolutions are cheap, oneDNN's per-shape set-up is not."""
        w = self.conv_pre.weight
        wanted = self.fused
        if wanted is None:
            wanted = self.precision != "fp32" or w.shape[0] >= FUSE_MIN_CHANNELS
        return (
            wanted
            and x.device.type == "cpu"
            and w.device.type == "cpu"
            and w.dtype == torch.float32
            and not (torch.is_grad_enabled() and w.requires_grad)
            and torch.backends.mkldnn.is_available()
            and all(_phase_taps(up) is not None for up in self.ups)
        )

    def fused_stream(self, g: torch.Tensor) -> FusedStream | None:
        """A `FusedStream` vocoding one utterance for speaker `[1, cond, 1]` in pieces, or
        None where the fused path does not serve this generator (see `_can_fuse`)."""
        if not self._can_fuse(g):
            return None
        return FusedStream(self._fused_plan(), g.float())

    def __getstate__(self) -> dict:
        # The plan's oneDNN tensors cannot be copied or pickled; a copy builds its own.
        state = self.__dict__.copy()
        state["_plan"], state["_plan_key"] = None, ()
        return state

    def _fused_plan(self) -> _FusedPlan:
        # Rebuilt whenever a weight was replaced or modified in place (load_state_dict,
        # .to(), a test's edit): the packed copies must never go stale.
        # (Inference tensors keep no version counter; only replacing them is seen.)
        key = (
            self.precision,
            *((p.data_ptr(), 0 if p.is_inference() else p._version) for p in self.parameters()),
        )
        if self._plan is None or self._plan_key != key:
            self._plan = _FusedPlan(self, self.precision)
            self._plan_key = key
        return self._plan

    def _reference_forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
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
            k, u, p = up.kernel_size[0], up.stride[0], _padding(up)
            # output t is fed by inputs j with j*u - p <= t <= j*u - p + k - 1
            r = math.ceil((r + max(p, k - 1 - p)) / u) + 1
        return r + self.conv_pre.kernel_size[0] // 2


class _PackedConv:
    """One unpadded convolution as a oneDNN 2-D convolution on `[1, C, 1, T]` channels-last
    activations, its weight reordered once into oneDNN's own layout (in `dtype`) instead of
    on every call.

    The fused path never asks oneDNN to pad (`FusedStream` keeps each layer group's
    context instead): with padding, its AMX convolutions copy each input row through a
    kernel unrolled over the whole row, about 1-3 MB of generated code per convolution and
    input length, resident for the life of the process.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        dilation: int,
        length: int,
    ) -> None:
        """`length`: the input samples of a typical call (see below)."""
        w = weight.detach().unsqueeze(2)  # [O, I, 1, k]
        self.reach = dilation * (w.shape[-1] - 1) // 2  # input samples each side of an output
        self.length = length
        # oneDNN packs the weight for the input length it is told, and a call whose length
        # wants another layout reorders the whole weight first, every call: told 4096
        # samples, the released vocoder's conv_pre (14.7 MB in float32) and its 256-channel
        # convolutions, which see ~100 and ~900 per piece, ran at 4-25 GFLOP/s instead of
        # ~72 on an AVX2 EPYC (vocoding 1.5 -> 0.96 s per audio second).
        self.padding = [0, 0]
        self.stride = [1, 1]
        self.dilation = [1, dilation]
        self.weight = self._pack(w.to(dtype).to_mkldnn(), length)
        # Other lengths that recur (a stream's first and last pieces) -> their own packing,
        # or `weight` where that serves them as well (see `_weight_for`).
        self._packed: dict[int, torch.Tensor] = {length: self.weight}
        self._seen: dict[int, int] = {}
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.bias_dtype = dtype

    def _pack(self, weight: torch.Tensor, length: int) -> torch.Tensor:
        """`weight` (a oneDNN tensor, any layout) in the layout oneDNN wants for inputs of
        `length` samples."""
        # torch's stub lacks the op's last argument, the input size to pack the weight for.
        return torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]
            weight,
            self.padding,
            self.stride,
            self.dilation,
            1,
            [1, weight.shape[1], 1, length],
        )

    def _weight_for(self, length: int) -> torch.Tensor:
        """The packed weight for an input of `length` samples.

        A stream's first and last pieces are shorter than the rest, and for some lengths
        oneDNN wants the weight padded differently (e.g. output channels in blocks of 24
        rather than 16), a reorder it does slowly, on every call: on an AVX2 EPYC, 29
        reorders of the 256-channel k=3 weights (~9 ms each) and one of conv_pre (~180 ms)
        per streamed sentence, 0.4 s of its ~2.7. A length seen a second time is packed
        for; the copy is kept only where its size differs from every packing kept (a
        padding change: reorders between equally sized layouts are fast), at most
        `MAX_EXTRA_PACKINGS` of them. The result is the same whichever weight is passed
        (oneDNN computes in the layout it wants, reordering first where it must).
        """
        w = self._packed.get(length)
        if w is not None:
            return w
        if len(self._seen) >= _MAX_TRACKED_LENGTHS:  # one-off lengths (whole utterances)
            self._seen.clear()
        seen = self._seen[length] = self._seen.get(length, 0) + 1
        if (
            seen < 2
            or len(self._packed) >= _MAX_TRACKED_LENGTHS
            or self.extra_packings() >= MAX_EXTRA_PACKINGS
        ):
            return self.weight
        with own_mappings():  # a copy dropped below must not leave the heap fragmented
            w = self._pack(self.weight, length)
        size = torch.ops.mkldnn._nbytes(w)
        # Primary first: an equally sized copy already kept serves as well.
        kept = sorted(self._packed.values(), key=lambda v: v is not self.weight)
        w = next((v for v in kept if torch.ops.mkldnn._nbytes(v) == size), w)
        self._packed[length] = w
        return w

    def extra_packings(self) -> int:
        """How many copies of the weight are kept for other input lengths."""
        return len({id(v) for v in self._packed.values()} - {id(self.weight)})

    def __call__(
        self,
        x: torch.Tensor,
        post: str = "none",
        scalars: Sequence[float] = (),
        bias: torch.Tensor | None = None,
        slope_in: float | None = None,
    ) -> torch.Tensor:
        """conv(x) (`reach` samples shorter at each end), then the element-wise `post`
        ("none", "leaky_relu", "tanh") fused in. (`slope_in`: see `_QConv`; never here.)"""
        assert slope_in is None, "oneDNN convolutions take their input as it is"
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self._weight_for(x.shape[-1]),
            self.bias if bias is None else bias,
            self.padding,
            self.stride,
            self.dilation,
            1,
            post,
            list(scalars),
            None,
        )

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """A new tensor `other + conv(x)`."""
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self._weight_for(x.shape[-1]), self.bias, self.padding, self.stride,
            self.dilation, 1,
            "add", None, None, [], None,
        )  # fmt: skip

    def add_to(self, other: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`other += conv(x)`, accumulated by oneDNN as it writes the result."""
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            other, x, self._weight_for(x.shape[-1]), self.bias, self.padding, self.stride,
            self.dilation, 1,
            "add", None, None, [], None,
        )  # fmt: skip


class _QConv:
    """One unpadded convolution with int8 weights (`kernels.Int8Conv`) on `[1, C, 1, T]`
    channels-last float32 or bf16 activations: `_PackedConv`'s calls, in the int8 plan.
    Every one of them reads a leaky ReLU's output (its 8-bit codes' zero point is set for
    that, `kernels.LRELU_ZERO`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int = 1) -> None:
        self.conv = kernels.Int8Conv(weight.detach(), dilation)
        self.reach = self.conv.span // 2
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.bias_dtype = torch.float32

    @staticmethod
    def _rows(x: torch.Tensor) -> torch.Tensor:
        """`[1, C, 1, T]` channels-last -> its memory as `[T, C]` (a view)."""
        return x.permute(0, 2, 3, 1).view(x.shape[3], x.shape[1])

    def _run(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        res: torch.Tensor | None = None,
        slope: float | None = None,
        out: torch.Tensor | None = None,
        slope_in: float | None = None,
    ) -> torch.Tensor:
        y = self.conv(
            self._rows(x),
            bias,
            None if res is None else self._rows(res),
            slope,
            None if out is None else self._rows(out),
            slope_in,
            kernels.LRELU_ZERO,
        )
        return y.view(1, 1, y.shape[0], y.shape[1]).permute(0, 3, 1, 2)

    def __call__(
        self,
        x: torch.Tensor,
        post: str = "none",
        scalars: Sequence[float] = (),
        bias: torch.Tensor | None = None,
        slope_in: float | None = None,
    ) -> torch.Tensor:
        """conv(x) (`reach` samples shorter at each end), then "none" or "leaky_relu";
        with `slope_in`, conv(leaky_relu(x, slope_in)), the ReLU applied as x is read."""
        if post not in ("none", "leaky_relu"):
            raise ValueError(f"no {post!r} after an int8 convolution")
        slope = scalars[0] if post == "leaky_relu" else None
        return self._run(x, self.bias if bias is None else bias, slope=slope, slope_in=slope_in)

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """A new tensor `other + conv(x)`."""
        return self._run(x, self.bias, res=other)

    def add_to(self, other: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`other += conv(x)`."""
        self._run(x, self.bias, res=other, out=other)
        return other


def _phase_taps(up: nn.ConvTranspose1d) -> dict[tuple[int, int], int] | None:
    """For a stride-u ConvTranspose1d: (phase r, input offset d) -> kernel index, or None
    where the layer has no symmetric polyphase form (see `_polyphase`)."""
    c_in, c_out, k = up.weight.shape
    u, p = up.stride[0], _padding(up)
    if up.dilation[0] != 1 or up.groups != 1 or k % u or k - 2 * p + up.output_padding[0] != u:
        return None
    taps = {}
    for r in range(u):
        c, s = divmod(r + p, u)
        for j in range(k // u):
            taps[(r, c - j)] = s + j * u
    lo, hi = min(d for _, d in taps), max(d for _, d in taps)
    return taps if lo == -hi else None


def _polyphase(up: nn.ConvTranspose1d) -> tuple[torch.Tensor, int]:
    """A stride-u ConvTranspose1d as a plain convolution making u x out channels.

    Output sample m*u + r only reads taps kk = (r + p) % u + j*u of input m + (r + p) // u - j,
    so phase r is a small ordinary convolution; stacked phase-major, `[1, u*out, 1, T]`
    channels-last memory is exactly `[1, out, 1, T*u]` channels-last (a free view). Returns
    (`[u*out, in, K]` weight, its reach K // 2); the layer must have `_phase_taps`.
    """
    taps = _phase_taps(up)
    assert taps is not None
    w = up.weight.detach()  # [in, out, k]
    c_in, c_out, _ = w.shape
    u = up.stride[0]
    hi = max(d for _, d in taps)
    out = w.new_zeros(u, c_out, c_in, 2 * hi + 1)  # zero where a phase skips an offset
    for (r, d), kk in taps.items():
        out[r, :, :, d + hi] = w[:, :, kk].T
    return out.reshape(u * c_out, c_in, 2 * hi + 1), hi


_Conv = _PackedConv | _QConv


class _FusedPlan:
    """The generator rewritten for CPU inference: fewer passes over memory, same function.

    - every convolution's weight is prepacked (`_PackedConv`), the upsamplers as polyphase
      convolutions; the int8 plan quantises those of `INT8_STAGES` for lowvox's kernel
      instead (`_QConv`, where the shape fits), the rest in bf16 (fp32 on CPUs without
      native bf16), on activations of that dtype; its int8 stages' first convolutions apply
      their input's leaky ReLU as they read it (`folds`);
    - the leaky ReLU after a resblock's first convolution and the residual add after its
      second run inside the convolution (oneDNN post-ops); the block input's leaky ReLU is
      computed once per stage for all sibling blocks;
    - the speaker terms (constant over time) are folded into the conv_pre and upsampler
      biases; the average over sibling blocks is folded into the next layer's weight
      (leaky ReLU is positively homogeneous: lrelu(z / n) = lrelu(z) / n);
    - conv_post runs in float32 with tanh fused, whatever the compute dtype.
    It runs through `FusedStream`s, which vocode an utterance in pieces, each frame once.
    Weights are copies: the plan belongs to one set of weight values (see `_fused_plan`).
    """

    def __init__(self, gen: HifiganGenerator, precision: str) -> None:
        if precision == "int8":
            dtype = torch.bfloat16 if bf16_supported() else torch.float32
        else:
            dtype = _DTYPES[precision]
        self.dtype = dtype
        self.gen = gen
        n = gen.num_kernels

        # Input samples per frame: rates[i] for upsampler i (conv_pre's: 1), rates[i + 1] for
        # stage i's resblocks, rates[-1] for conv_post.
        rates = [1, *itertools.accumulate((up.stride[0] for up in gen.ups), operator.mul)]

        def length(w: torch.Tensor, rate: int, dil: int) -> int:
            """The input samples a piece gives a convolution of weight `w`."""
            return FUSED_PIECE_FRAMES * rate + dil * (w.shape[-1] - 1)

        def conv(
            w: torch.Tensor, b: torch.Tensor | None, rate: int, dil: int = 1, q: bool = False
        ) -> _Conv:
            if q and precision == "int8" and kernels.Int8Conv.fits(w):
                return _QConv(w, b, dil)
            return _PackedConv(w, b, dtype, dil, length(w, rate, dil))

        def of(c: nn.Conv1d, rate: int, q: bool = False) -> _Conv:
            return conv(c.weight, c.bias, rate, c.dilation[0], q)

        self.pre = of(gen.conv_pre, 1)
        self.ups: list[_Conv] = []
        for i, up in enumerate(gen.ups):
            w, _ = _polyphase(up)
            self.ups.append(
                conv(w * (1.0 / n if i else 1.0), None, rates[i], q=i - 1 in INT8_STAGES)
            )
        self.blocks = [
            [
                [
                    (of(c1, rates[i + 1], i in INT8_STAGES), of(c2, rates[i + 1], i in INT8_STAGES))
                    for c1, c2 in zip(b.convs1, b.convs2, strict=True)
                ]
                for b in gen.resblocks[i * n : (i + 1) * n]
            ]
            for i in range(len(gen.ups))
        ]
        post, dil = gen.conv_post, gen.conv_post.dilation[0]
        self.post = _PackedConv(
            post.weight * (1.0 / n),
            post.bias,
            torch.float32,
            dil,
            length(post.weight, rates[-1], dil),
        )
        # Per stage: whether its resblocks' first convolutions apply their input's leaky
        # ReLU as they read it (all of them int8).
        self.folds = [
            all(isinstance(c1, _QConv) for b in stage for c1, _ in b) for stage in self.blocks
        ]

    def bias(
        self,
        conv: nn.Conv1d | nn.ConvTranspose1d,
        cond: nn.Conv1d | None,
        g: torch.Tensor,
        packed: _Conv,
    ) -> torch.Tensor:
        """conv's bias plus the speaker term `cond(g)`: `[C]` in the dtype its `packed`
        form adds it in."""
        assert conv.bias is not None  # conv_pre and the upsamplers are built with one
        b = conv.bias.detach().float()
        if cond is not None:
            b = b + F.conv1d(g, cond.weight, cond.bias).reshape(-1)
        return b.to(packed.bias_dtype)

    def run(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """`[1, in, F]` frames + float32 `[1, cond, 1]` speaker -> float32 `[1, 1, F * hop]`:
        the whole utterance as one final piece."""
        stream = FusedStream(self, g)
        frames = x.shape[-1]
        x = F.pad(x, (0, stream.tail_frames))
        return stream.push(x, x.shape[-1], total=frames).reshape(1, 1, -1)


def _mask(y: torch.Tensor, start: int, lo: int, hi: int) -> torch.Tensor:
    """Zero the samples of `y` `[1, C, 1, T]` (at positions `start..start+T-1`) outside
    `[lo, hi)`: a layer's output past either end of the utterance, so that the next layer
    reads zeros there, as its zero padding would give it."""
    n = y.shape[-1]
    a, b = min(max(lo - start, 0), n), max(min(hi - start, n), 0)
    if a:
        y[..., :a] = 0
    if b < n:
        y[..., b:] = 0
    return y


class _Tail:
    """The last input samples one layer group still needs (`2 * reach` of them: each output
    reads `reach` samples either side), and the position of the first."""

    def __init__(self, channels: int, reach: int, start: int, dtype: torch.dtype) -> None:
        self.reach = reach
        # Before the utterance everything is zero (what zero padding reads).
        self.kept = torch.zeros(1, channels, 1, 2 * reach, dtype=dtype).contiguous(
            memory_format=torch.channels_last
        )
        self.pos = start - 2 * reach

    def extend(self, x: torch.Tensor, valid: int) -> tuple[torch.Tensor, int]:
        """The kept samples followed by `x` `[1, C, 1, L]`, of which the first `valid` are
        real (the rest pad a piece to its fixed length), and the position of the first.
        Keeps the last `2 * reach` real samples for the next piece."""
        start = self.pos
        x = torch.cat([self.kept, x], dim=3).contiguous(memory_format=torch.channels_last)
        self.kept = x[..., valid : valid + 2 * self.reach].clone()
        self.pos += valid
        return x, start


class FusedStream:
    """One utterance vocoded piece by piece through a `_FusedPlan`, each frame once.

    Every layer group (conv_pre, each upsampler, each stage's resblocks, conv_post) keeps
    the end of its input that its next outputs still read (`_Tail`), and runs its
    convolutions unpadded on that plus the new samples. The utterance sits on a line of
    zeros: before it, each group's kept samples start as zeros; each layer's output is
    zeroed outside the utterance (`_mask`), so the next layer reads what its zero padding
    would. Hence the audio is that of the whole utterance at once, whatever the pieces.

    A piece has a fixed length (oneDNN builds kernels per input length), of which the
    first `valid` frames are real and the rest are padding; audio comes out
    `delay` samples behind the frames pushed. The end of the utterance is a final piece
    whose frames past the last are zero (`total`): then every layer's samples past the
    true end are zeroed, exactly what zero padding at the end gives.
    """

    def __init__(self, plan: _FusedPlan, g: torch.Tensor) -> None:
        gen, dt = plan.gen, plan.dtype
        self.plan = plan
        self.pre_bias = plan.bias(gen.conv_pre, gen.cond_layer, g, plan.pre)
        self.up_bias = []
        for i, up in enumerate(gen.ups):
            cond = gen.conds[i] if gen.conds is not None else None
            self.up_bias.append(plan.bias(up, cond, g, plan.ups[i]).repeat(up.stride[0]))
        self.radii = [[sum(c1.reach + c2.reach for c1, c2 in b) for b in s] for s in plan.blocks]
        # Positions: group g's input starts at -lag (everything before is zero); its
        # outputs start `reach` later, in the output's samples.
        lag = 0
        self.pre_tail = _Tail(gen.conv_pre.in_channels, plan.pre.reach, 0, dt)
        lag = plan.pre.reach
        self.up_tails, self.stage_tails = [], []
        for i, up in enumerate(gen.ups):
            reach = plan.ups[i].reach
            self.up_tails.append(_Tail(up.in_channels, reach, -lag, dt))
            lag = (lag + reach) * up.stride[0]
            self.stage_tails.append(_Tail(up.out_channels, max(self.radii[i]), -lag, dt))
            lag += max(self.radii[i])
        self.post_tail = _Tail(gen.conv_post.in_channels, plan.post.reach, -lag, torch.float32)
        self.delay = lag + plan.post.reach  # audio samples behind the frames pushed
        self.hop = math.prod(up.stride[0] for up in gen.ups)
        self.tail_frames = -(-self.delay // self.hop)  # zero frames that flush the end
        self.frames_in = 0  # frames pushed (real ones)
        self.emitted = 0  # audio samples returned

    @torch.inference_mode()
    def push(self, x: torch.Tensor, valid: int, total: int | None = None) -> torch.Tensor:
        """Frames `[1, in, L]` (the first `valid` real) -> the float32 audio `[N]` now final.

        `total`: the utterance's length in frames, once known; its frames past `total` in
        `x` must be zero, and count as valid.
        """
        plan = self.plan
        if total is not None:
            assert not x[..., max(0, total - self.frames_in) :].any(), "frames past the end"
            valid = x.shape[-1]
        end = _NO_END if total is None else total

        def limit(rate: int) -> int:
            return end * rate

        x = x.to(plan.dtype).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        v = valid
        xs, p = self.pre_tail.extend(x, v)
        pos = p + plan.pre.reach
        o = _mask(plan.pre(xs, bias=self.pre_bias), pos, 0, limit(1))
        rate = 1
        for i, blocks in enumerate(plan.blocks):
            xs, p = self.up_tails[i].extend(F.leaky_relu(o, LRELU_SLOPE, inplace=True), v)
            y = plan.ups[i](xs, bias=self.up_bias[i])  # [1, u * C', 1, L], phase-major
            u = self.plan.gen.ups[i].stride[0]
            c = y.shape[1] // u
            # channels-last [L, u, C'] memory is [L * u, C']: a view, no copy
            y = y.permute(0, 2, 3, 1).reshape(1, 1, -1, c).permute(0, 3, 1, 2)
            rate, v = rate * u, v * u
            y = _mask(y, (p + plan.ups[i].reach) * u, 0, limit(rate))
            xs, p = self.stage_tails[i].extend(y, v)
            o = self._stage(blocks, self.radii[i], xs, p, limit(rate), plan.folds[i])
        o = F.leaky_relu(o, FINAL_LRELU_SLOPE, inplace=True).float()
        xs, p = self.post_tail.extend(o, v)
        audio = plan.post(xs, "tanh")[0, 0, 0]  # [L * hop] at positions pos..
        pos = p + plan.post.reach
        stop = min(pos + v, limit(self.hop))
        out = audio[max(self.emitted - pos, 0) : max(stop - pos, 0)]
        self.emitted = max(self.emitted, stop)
        self.frames_in += valid if total is None else min(valid, total - self.frames_in)
        return out

    @staticmethod
    def _stage(
        blocks: list[list[tuple[_Conv, _Conv]]],
        radii: list[int],
        xs: torch.Tensor,
        start: int,
        hi: int,
        fold: bool,
    ) -> torch.Tensor:
        """The sum (not yet the mean) of the sibling resblocks' outputs for input `xs`
        `[1, C, 1, 2R + L]` (R: the widest block's radius) at positions `start..`: `[1, C, 1, L]`.

        Each block reads the middle of `xs` it needs; each convolution's input and each
        residual are trimmed to the range its outputs cover."""
        reach = max(radii)
        n = xs.shape[-1] - 2 * reach
        # The first input of every block: its leaky ReLU, or (fold) xs itself, the first
        # convolutions applying the leaky ReLU as they read it.
        slope_in = LRELU_SLOPE if fold else None
        a = xs if fold else F.leaky_relu(xs, LRELU_SLOPE)
        z = None
        for pairs, radius in zip(blocks, radii, strict=True):
            s = reach - radius
            xa, x, pos = a[..., s : s + n + 2 * radius], xs[..., s : s + n + 2 * radius], start + s
            for j, (c1, c2) in enumerate(pairs):
                t = _mask(
                    c1(xa, "leaky_relu", [LRELU_SLOPE], slope_in=slope_in), pos + c1.reach, 0, hi
                )
                trim = c1.reach + c2.reach
                pos += trim
                res = x[..., trim : x.shape[-1] - trim]
                # x starts as xs, which the sibling blocks also read: never written into.
                x = _mask(c2.plus(t, res) if j == 0 else c2.add_to(res, t), pos, 0, hi)
                if j + 1 < len(pairs):
                    xa = x if fold else F.leaky_relu(x, LRELU_SLOPE)
            z = x if z is None else z.add_(x)
        assert z is not None  # every stage has blocks
        return z


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
        self.speaker_encoder_config = speaker_encoder
        # Used only to clone voices: a model loaded from a cache may set it to None and
        # load it later (see `loader.ensure_cloning_modules`).
        self.speaker_encoder: ResNetSpeakerEncoder | None = self.new_speaker_encoder()

    def new_speaker_encoder(self) -> ResNetSpeakerEncoder:
        """A freshly initialised speaker encoder of this decoder's layout."""
        return ResNetSpeakerEncoder(self.speaker_encoder_config)

    @property
    def precision(self) -> str:
        """The generator's compute precision ("fp32" or "bf16")."""
        return self.waveform_decoder.precision

    def set_precision(self, precision: str) -> None:
        """Vocode in "fp32" or "bf16" (see `HifiganGenerator.set_precision`). The speaker
        encoder is untouched (float32); inputs and outputs stay float32 either way."""
        self.waveform_decoder.set_precision(precision)

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
