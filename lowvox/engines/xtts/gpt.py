"""The XTTS autoregressive model: a GPT-2-style decoder over [voice latents | text | audio codes].

Parameter names follow the released checkpoint (`gpt.*` minus the prefix), including the
GPT-2 "Conv1D" projections whose weights are stored [in, out].

The decoder runs in two shapes only: a prefill of a whole prompt and one-token decode
steps, both writing keys/values into a preallocated `KVCache` by position. Hidden states
go through two LayerNorms (the stack's `ln_f`, then `final_norm`) before `mel_head`; the
normed states are also the "latents" the vocoder consumes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowvox.engines.xtts.conditioning import ConditioningEncoder
from lowvox.engines.xtts.config import XttsArgs
from lowvox.engines.xtts.modules import TypedModuleList
from lowvox.engines.xtts.perceiver import PerceiverResampler
from lowvox.runtime import kernels
from lowvox.runtime.memory import lazy_zeros
from lowvox.runtime.quant import Bf16Linear, Int8Linear, WeightOnlyLinear

LAYER_NORM_EPS = 1e-5  # GPT-2's layer_norm_epsilon and nn.LayerNorm's default

# A sequence position: a Python int (every row's; a prompt, or a one-sequence decode step),
# or an int64 tensor [B] with one position per row, each row a sequence at its own length
# (the batched decode step: rows join and leave a batch at any step).
Position = int | torch.Tensor


class Conv1D(nn.Module):
    """GPT-2's linear layer: y = x @ W + b with W stored [in, out]."""

    weight: nn.Parameter  # [in, out]
    bias: nn.Parameter  # [out]

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.weight.shape[1],)
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.view(shape)


def conv1d_to_linear(module: nn.Module) -> int:
    """Swap every `Conv1D` under `module` for an equivalent `nn.Linear` (weights transposed to
    [out, in]); returns how many. Module-swapping tools (int8 quantisation) expect nn.Linear.
    Do it after loading: the state dict then no longer has the checkpoint's layout."""
    # Hold (parent, name) pairs only, never the Conv1D modules themselves, so each old
    # weight is freed as soon as its layer is swapped (peak: one layer, not a second model).
    targets = [
        (parent, name)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, Conv1D)
    ]
    for parent, name in targets:
        child = getattr(parent, name)
        n_in, n_out = child.weight.shape
        linear = nn.Linear(n_in, n_out, device="meta")
        linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
        linear.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
        setattr(parent, name, linear)
        del child
    swapped = len(targets)
    return swapped


# What a transformer projection is: the checkpoint's `Conv1D`; after `conv1d_to_linear`, an
# `nn.Linear`; after a weight-only swap (`runtime.quant`), an `Int8Linear` or `Bf16Linear`.
Projection = Conv1D | nn.Linear | WeightOnlyLinear


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that normalises in float32 whatever the input's dtype (its parameters
    stay float32) and returns `output_dtype` (default: the input's). In half precision the
    blocks' norms hand half-precision inputs to the linears while the residual stream stays
    float32 (see `cast_gpt`)."""

    output_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.output_dtype is None:
            # The common case (fp32 and int8 models): plain LayerNorm, no extra calls in
            # a decode step that runs 61 of them per token.
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)
        return y.to(self.output_dtype or x.dtype)


def cast_gpt(gpt: XttsGpt, dtype: torch.dtype) -> XttsGpt:
    """Half precision for the decoder: the transformer's linear weights in `dtype` (95% of
    the GPT's bytes), and the blocks' norms emitting `dtype` for them. Embeddings, every
    LayerNorm's statistics, the residual stream, the latents, `mel_head` and the voice
    modules stay float32: they cost little, and rounding `mel_head`'s weights alone moved
    greedy choices where two tokens were close."""
    linears = [m for m in gpt.gpt.h.modules() if isinstance(m, Conv1D | nn.Linear)]
    for module in linears:
        for key, t in list(module.named_parameters(recurse=False)):
            setattr(module, key, nn.Parameter(t.detach().to(dtype), requires_grad=False))
    for block in gpt.gpt.h:
        block.ln_1.output_dtype = dtype
        block.ln_2.output_dtype = dtype
    return gpt


class KVCache:
    """Keys and values of one layer, [rows, heads, max_len, head_dim], written by position.

    A row is one sequence; rows of a batch may each be at their own length (see
    `Attention.forward`). On CPU a cache of several rows takes memory only where written
    (`lazy_zeros`): most of a batch's cache is never reached by short rows or early stops.
    """

    k: torch.Tensor
    v: torch.Tensor

    def __init__(
        self,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        lazy: bool | None = None,
    ) -> None:
        shape = (batch, heads, max_len, head_dim)
        # By default a single sequence's cache comes from the heap: its first touches would
        # cost page faults, and the heap often has the memory already (freed prompt
        # activations). A cache sized for the longest possible row (the decode loop's) is
        # lazy whatever its rows: most of it is never written.
        lazy = batch > 1 if lazy is None else lazy
        self.k = _zeros(shape, dtype, device, lazy)
        self.v = _zeros(shape, dtype, device, lazy)

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache over existing tensors (views of a larger cache, e.g. one row of it)."""
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own (views: writes land here)."""
        return KVCache.of(self.k[start:stop], self.v[start:stop])

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row `src`'s first `length` positions into row `dst` (compacting a batch)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def update(
        self, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H, T, hd] at positions start..start+T; return the filled prefix."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def update_rows(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token per row, k/v [B, H, 1, hd], row b at positions[b] ([B] int64; no
        shape depends on the values, so this can be graph-captured); the whole cache."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, positions] = k[:, :, 0]
        self.v[rows, :, positions] = v[:, :, 0]
        return self.k, self.v


def _zeros(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None, lazy: bool
) -> torch.Tensor:
    """Zeros for a cache; `lazy`: on CPU, memory only for the positions written."""
    if lazy and (device is None or torch.device(device).type == "cpu"):
        return lazy_zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def _use_cpu_kernel(cache_keys: torch.Tensor) -> bool:
    return (
        cache_keys.device.type == "cpu"
        and cache_keys.dtype in kernels.CACHE_KINDS
        and kernels.available()
    )


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.c_attn: Projection = Conv1D(dim, 3 * dim)
        self.c_proj: Projection = Conv1D(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        start: Position,
        cache: KVCache | None,
        static: bool = False,
    ) -> torch.Tensor:
        """x [B, T, D] at sequence positions start.. (an int: every row's), or one token
        per row (T = 1) at positions start[b] (an int64 tensor [B]: each row at its own
        length, as in continuous batching). `static`: attend over the whole cache under a
        mask, so that no shape depends on a position (graph capture)."""
        b, t, d = x.shape
        qkv = self.c_attn(x)
        if (
            b == 1
            and t > 1
            and cache is not None
            and not static
            and isinstance(start, int)
            and qkv.dtype == torch.float32
            and cache.k.is_contiguous()
            and _use_cpu_kernel(cache.k)
        ):
            # A prompt on a CPU: lowvox's kernel writes its keys/values into the cache and
            # attends token by token as decode steps do (no float copy of the cache).
            y = kernels.attend_prompt(qkv.view(t, 3 * d), cache.k, cache.v, start)
            return self.c_proj(y.view(1, t, d))
        q, k, v = qkv.split(d, dim=2)
        # [B, T, D] -> [B, H, T, hd]
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
        if isinstance(start, torch.Tensor):
            if cache is None or t != 1 or start.shape != (b,):
                raise ValueError("per-row positions need a cache, one token and one per row")
            keys, values = cache.update_rows(start, k, v)
            length = keys.shape[2] if static else int(start.max()) + 1
            seen = torch.arange(length, device=x.device)[None, :] <= start[:, None]  # [B, L]
            y = F.scaled_dot_product_attention(
                q,
                keys[:, :, :length].to(q.dtype),
                values[:, :, :length].to(q.dtype),
                attn_mask=seen[:, None, None],
            )
            return self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        if t == 1 and b == 1 and cache is not None and _use_cpu_kernel(cache.k):
            # A CPU decode step: lowvox's kernel writes this token's key/value into the
            # cache and attends over it in place. [1, H, 1, hd] -> [H, hd] are free views.
            y = kernels.attend_one(
                q.reshape(self.heads, -1), k.reshape(self.heads, -1), v.reshape(self.heads, -1),
                cache.k, cache.v, start,
            )  # fmt: skip
            return self.c_proj(y.view(1, 1, d))
        if cache is not None:
            # What later steps will read: a bfloat16 cache's rounded keys and values.
            k, v = (y.to(q.dtype) for y in cache.update(start, k, v))
        elif start != 0:
            raise ValueError("attention without a cache must start at position 0")
        if t == 1:
            # One new token sees every cached position: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # A block after a prefix: row i sees keys 0..start+i.
            rows = torch.arange(start, start + t, device=x.device)[:, None]
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= rows
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, d)  # [B, T, D]
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.c_fc: Projection = Conv1D(dim, hidden)
        self.c_proj: Projection = Conv1D(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation.
        h = self.c_fc(x)
        if (
            h.device.type == "cpu"
            and h.dtype == torch.float32
            and h.is_contiguous()
            and not torch.is_grad_enabled()
            and kernels.vector_gelu()
        ):
            # The fused decode blocks' GELU, in place (torch's tanh is the slow part of its own).
            return self.c_proj(kernels.gelu_tanh_(h))
        return self.c_proj(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, heads)
        self.ln_2 = LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(dim, 4 * dim)
        self._fused: tuple[tuple[int, ...], kernels.FusedBlock] | None = None
        # The cache tensor the fused decoder was last looked up for, and the answer (None:
        # the module path). Weights are checked once per generation (per cache), not at
        # each of its hundreds of steps, where checking cost ~1 ms per token for 30 blocks:
        # weights changed in place during a generation are seen from the next one.
        self._checked: tuple[weakref.ref[torch.Tensor], kernels.FusedBlock | None] | None = None

    def forward(
        self,
        x: torch.Tensor,
        start: Position,
        cache: KVCache | None,
        static: bool = False,
    ) -> torch.Tensor:
        """See `Attention.forward`. One-token steps on a CPU go through the fused C block."""
        if cache is not None and x.shape[1] == 1 and not static:
            fused = self.fused_for(x, cache)
            if fused is not None:
                return fused(x, cache.k, cache.v, start)
        x = x + self.attn(self.ln_1(x), start, cache, static)
        return x + self.mlp(self.ln_2(x))

    def fused_for(self, x: torch.Tensor, cache: KVCache) -> kernels.FusedBlock | None:
        """The fused decoder for one-token steps of `x`'s kind into `cache`, or None (the
        module path), looked up once per cache."""
        # A batch hands its rows over as views of one cache: the tensor they view is the
        # generation's, whichever rows a step has.
        anchor = cache.k if cache.k._base is None else cache.k._base
        checked = self._checked
        if checked is not None and checked[0]() is anchor:
            return checked[1]
        fused = self._fused_decoder(x, cache)
        self._checked = (weakref.ref(anchor), fused)
        return fused

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Block:
        # Moved or cast: the fused decoder must not keep the old tensors alive.
        self._fused = self._checked = None
        return super()._apply(fn, recurse)

    def _fused_decoder(self, x: torch.Tensor, cache: KVCache) -> kernels.FusedBlock | None:
        """The whole block as one C call, for CPU decode steps of int8, CPU bf16 and fp32
        models (where the per-op overhead of ~15 small torch calls per block costs as much
        as attention, and the gaps between them stall the weight stream)."""
        linears = (self.attn.c_attn, self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj)
        kinds = {type(m) for m in linears}
        if (
            x.dtype != torch.float32
            or not _use_cpu_kernel(cache.k)
            or len(kinds) != 1
            or not kinds <= {Int8Linear, Bf16Linear, Conv1D}
            or any(m.bias is None or m.weight.device.type != "cpu" for m in linears)
            or (Conv1D in kinds and any(m.weight.dtype != torch.float32 for m in linears))
            or self.ln_1.output_dtype is not None
            or self.ln_1.eps != self.ln_2.eps
        ):
            return None
        parts = [
            (
                m.kernel_weight() if isinstance(m, WeightOnlyLinear) else m.weight,
                m.kernel_scales() if isinstance(m, WeightOnlyLinear) else None,
                m.bias,
            )
            for m in linears
            if m.bias is not None  # all of them (checked above)
        ]
        norms = (self.ln_1.weight, self.ln_1.bias, self.ln_2.weight, self.ln_2.bias)
        # Rebuilt when any tensor is replaced (a load, a move, new scales).
        tensors = (*norms, *(t for part in parts for t in part if t is not None))
        key = tuple(t.data_ptr() for t in tensors)
        if self._fused is None or self._fused[0] != key:
            fused = kernels.FusedBlock(norms[:2], norms[2:], self.ln_1.eps, parts, self.attn.heads)
            self._fused = (key, fused)
        return self._fused[1]


class Transformer(nn.Module):
    """The GPT-2 stack without token or position embeddings (XTTS supplies its own)."""

    def __init__(self, layers: int, dim: int, heads: int) -> None:
        super().__init__()
        self.h: TypedModuleList[Block] = TypedModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = LayerNorm(dim, eps=LAYER_NORM_EPS)
        self._stack: kernels.FusedStack | None = None

    def forward(
        self,
        x: torch.Tensor,
        start: Position = 0,
        caches: list[KVCache] | None = None,
        static: bool = False,
    ) -> torch.Tensor:
        """x [B, T, D] at positions `start` (see `Attention.forward`) -> [B, T, D]."""
        if x.shape[1] == 1 and caches is not None and not static:
            stack = self._fused_stack(x, caches)
            if stack is not None:
                x = stack(x, [c.k for c in caches], [c.v for c in caches], start)
                return self.ln_f(x)
        for i, block in enumerate(self.h):
            x = block(x, start, caches[i] if caches is not None else None, static)
        return self.ln_f(x)

    def _fused_stack(self, x: torch.Tensor, caches: list[KVCache]) -> kernels.FusedStack | None:
        """Every block's fused decoder as one C call (a decode step's 30 blocks without
        Python between them), or None when any block takes the module path."""
        if len(caches) != len(self.h):
            return None
        found = [block.fused_for(x, cache) for block, cache in zip(self.h, caches, strict=True)]
        fused = [f for f in found if f is not None]
        if len(fused) != len(found) or len({(f.kind, f.dim, f.heads) for f in fused}) != 1:
            return None
        stack = self._stack
        if (
            stack is None
            or len(stack.blocks) != len(fused)
            or any(a is not b for a, b in zip(stack.blocks, fused, strict=True))
        ):
            self._stack = kernels.FusedStack(fused)
        return self._stack

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> Transformer:
        self._stack = None  # moved or cast: let go of the old tensors
        return super()._apply(fn, recurse)


class PositionEmbedding(nn.Module):
    """Learned absolute positions; `forward(start, length)` -> [1, length, D]."""

    def __init__(self, positions: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(positions, dim)

    def forward(self, start: Position, length: int) -> torch.Tensor:
        """Positions start..start+length-1 -> [1, length, D]; per-row positions (an int64
        tensor [B], one token each) -> [B, 1, D]."""
        if isinstance(start, torch.Tensor):
            if length != 1:
                raise ValueError("per-row positions embed one token per row")
            return self.emb(start).unsqueeze(1)
        if start + length > self.emb.num_embeddings:
            raise ValueError(
                f"position {start + length - 1} is past the table of {self.emb.num_embeddings}"
            )
        return self.emb.weight[start : start + length].unsqueeze(0)


class XttsGpt(nn.Module):
    """Text/voice-conditioned audio-token decoder (`gpt.*` in the checkpoint).

    `conditioning_encoder` and `conditioning_perceiver` turn a reference mel into the 32
    voice latents; they are built by the caller (the voice modules) and may be absent when
    only decoding is needed.
    """

    def __init__(
        self,
        args: XttsArgs,
        conditioning_encoder: ConditioningEncoder | None = None,
        conditioning_perceiver: PerceiverResampler | None = None,
    ) -> None:
        super().__init__()
        self.args = args
        dim = args.gpt_n_model_channels
        self.conditioning_encoder = conditioning_encoder
        self.conditioning_perceiver = conditioning_perceiver
        self.text_embedding = nn.Embedding(args.gpt_number_text_tokens, dim)
        self.mel_embedding = nn.Embedding(args.gpt_num_audio_tokens, dim)
        self.gpt = Transformer(args.gpt_layers, dim, args.gpt_n_heads)
        self.mel_pos_embedding = PositionEmbedding(args.mel_positions, dim)
        self.text_pos_embedding = PositionEmbedding(args.text_positions, dim)
        self.final_norm = LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mel_head = nn.Linear(dim, args.gpt_num_audio_tokens)

    @property
    def dim(self) -> int:
        return self.args.gpt_n_model_channels

    @property
    def heads(self) -> int:
        return self.args.gpt_n_heads

    def make_caches(
        self,
        max_len: int,
        batch: int = 1,
        device: torch.device | str | None = None,
        lazy: bool | None = None,
    ) -> list[KVCache]:
        """One preallocated cache per layer, in `cache_dtype` (`lazy`: see `KVCache`)."""
        w = self.mel_head.weight
        dtype, hd = self.cache_dtype, self.dim // self.heads
        return [
            KVCache(batch, self.heads, max_len, hd, dtype, device or w.device, lazy)
            for _ in self.gpt.h
        ]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the blocks' linear inputs (attention keys/values included)."""
        first = self.gpt.h[0].ln_1.output_dtype if len(self.gpt.h) else None
        return first or self.text_embedding.weight.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype attention keys and values are kept in: the compute dtype, except on a
        CPU with weight-only (int8, bf16) blocks, where bfloat16 halves what every decode
        step reads from the cache (one row at 300 positions: 74 MB of float32 keys and
        values against 384 MB of int8 weights; a batch reads each row's)."""
        compute = self.compute_dtype
        blocks = list(self.gpt.h)
        if (
            compute == torch.float32
            and self.mel_head.weight.device.type == "cpu"
            and blocks
            and isinstance(blocks[0].attn.c_attn, WeightOnlyLinear)
        ):
            return torch.bfloat16
        return compute

    def text_embeddings(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] text ids (already wrapped in start/stop) -> [B, T, D] with positions."""
        return self.text_embedding(text_ids) + self.text_pos_embedding(0, text_ids.shape[1])

    def audio_embeddings(self, codes: torch.Tensor, start: Position) -> torch.Tensor:
        """[B, T] audio ids at audio positions start.. -> [B, T, D]."""
        return self.mel_embedding(codes) + self.mel_pos_embedding(start, codes.shape[1])

    def wrap_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T + 2]: start and stop text tokens around the text."""
        a = self.args
        b = text_ids.shape[0]
        start = text_ids.new_full((b, 1), a.gpt_start_text_token)
        stop = text_ids.new_full((b, 1), a.gpt_stop_text_token)
        return torch.cat([start, text_ids, stop], dim=1)

    def prompt_embeddings(self, cond_latent: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Voice latents [B, 32, D] and text ids [B, T] -> prompt [B, 32 + T + 2, D]."""
        text = self.text_embeddings(self.wrap_text(text_ids))
        return torch.cat([cond_latent.to(text.dtype), text], dim=1)

    def hidden(
        self,
        emb: torch.Tensor,
        start: Position = 0,
        caches: list[KVCache] | None = None,
        static: bool = False,
    ) -> torch.Tensor:
        """Embeddings [B, T, D] at sequence positions `start` -> normed latents [B, T, D]."""
        return self.final_norm(self.gpt(emb, start, caches, static))

    def decode(
        self,
        tokens: torch.Tensor,
        audio_pos: torch.Tensor,
        seq_pos: torch.Tensor,
        caches: list[KVCache],
        static: bool = False,
    ) -> torch.Tensor:
        """One decode step of B rows, each at its own length: audio token [B, 1] at audio
        position audio_pos[b] and sequence position seq_pos[b] (int64 [B]) -> its latent
        [B, 1, D]. `static`: no shape depends on a position (graph capture)."""
        emb = self.audio_embeddings(tokens, audio_pos)
        return self.hidden(emb, seq_pos, caches, static)

    def logits(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, num_audio_tokens]."""
        return self.mel_head(latents)

    def teacher_forced_latents(
        self, cond_latent: torch.Tensor, text_ids: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor:
        """Latents of known codes in one pass: [B, N] codes -> [B, N, D].

        Latent i is the state at the input that predicts code i (the start token for i=0,
        code i-1 after), exactly what decoding those codes step by step produces.
        """
        a = self.args
        start = codes.new_full((codes.shape[0], 1), a.gpt_start_audio_token)
        audio_in = torch.cat([start, codes[:, :-1]], dim=1)
        prompt = self.prompt_embeddings(cond_latent, text_ids)
        emb = torch.cat([prompt, self.audio_embeddings(audio_in, 0)], dim=1)
        return self.hidden(emb)[:, prompt.shape[1] :]
