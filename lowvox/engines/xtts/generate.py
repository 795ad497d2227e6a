"""Autoregressive generation of audio tokens, collecting the vocoder latents on the way.

One prefill of [voice latents | start-text | text | stop-text | start-audio] into a static
KV cache, then one-token decode steps. The state that predicts each token (after `ln_f` and
`final_norm`) is that token's latent, so no second GPT pass is needed. `decode_step` is a
plain function of (token, positions, caches) so it can be compiled or graph-captured alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowvox.engines.xtts.gpt import KVCache, Position, XttsGpt
from lowvox.engines.xtts.sampling import SamplingOptions, process_logits, seen_mask, select_token
from lowvox.errors import InvalidRequest

log = logging.getLogger(__name__)

# The reference fills the prompt's id history with this placeholder; the repetition
# penalty therefore also pushes down audio token 1.
PROMPT_PLACEHOLDER_ID = 1


@dataclass(frozen=True)
class Step:
    """One decoded token: its id, the latent that predicted it [B, 1, D] and raw logits [B, V]."""

    token: torch.Tensor
    latent: torch.Tensor
    logits: torch.Tensor
    is_stop: bool


@dataclass(frozen=True)
class Generation:
    """A finished generation: codes without the stop token [N], latents [1, M, D] (M is N,
    plus one when generation ended on the stop token, as in the reference), raw logits
    [1, M, V] of every step, and whether the stop token was produced."""

    codes: torch.Tensor
    latents: torch.Tensor
    logits: torch.Tensor
    stopped: bool


def decode_step(
    gpt: XttsGpt,
    token: torch.Tensor,
    audio_pos: Position,
    seq_pos: Position,
    caches: list[KVCache],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one audio token [B, 1] at audio position `audio_pos`, sequence position `seq_pos`;
    return its latent [B, 1, D]. With tensor positions every shape is static, so this
    function can be compiled or graph-captured once and replayed for every step."""
    emb = gpt.audio_embeddings(token, audio_pos)
    return gpt.hidden(emb, seq_pos, caches, mask)


class StaticDecoder:
    """The one-token decode step over static buffers (token, positions, a KV cache of
    `max_len`): with tensor positions every shape is fixed and attention covers the whole
    cache under a mask, so the step can be captured once as a CUDA graph and replayed for
    every token of every generation. Uncaptured (CPU) it computes the same, only slower."""

    def __init__(self, gpt: XttsGpt, max_len: int, capture: bool = False) -> None:
        device = gpt.mel_head.weight.device
        self.gpt = gpt
        self.max_len = max_len
        self.caches = gpt.make_caches(max_len)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.audio_pos = torch.zeros((), dtype=torch.long, device=device)
        self.seq_pos = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        if capture:
            self._capture()

    def _run(self) -> torch.Tensor:
        return decode_step(self.gpt, self.token, self.audio_pos, self.seq_pos, self.caches)

    @torch.inference_mode()
    def _capture(self) -> None:
        # Warm up on a side stream (allocator pools, kernel selection), then capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._run()
        self.graph = graph
        for cache in self.caches:  # the warm-up wrote position 0
            cache.k.zero_()
            cache.v.zero_()
        log.info("captured the decode step as a CUDA graph (cache of %d)", self.max_len)

    def step(self, token: torch.Tensor, audio_pos: int, seq_pos: int) -> torch.Tensor:
        """Feed `token` ([1] or [1, 1]) at the given positions; its latent [1, 1, D]."""
        self.token.copy_(token.view(1, 1))
        self.audio_pos.fill_(audio_pos)
        self.seq_pos.fill_(seq_pos)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        assert self.out is not None
        return self.out.clone()  # the next replay overwrites the static output


class Generator:
    """Generates audio tokens for one sentence; iterate `steps()` or call `run()`."""

    def __init__(
        self,
        gpt: XttsGpt,
        cond_latent: torch.Tensor,
        text_ids: torch.Tensor,
        options: SamplingOptions,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
        static: StaticDecoder | None = None,
        forced: torch.Tensor | None = None,
    ) -> None:
        """`static`: decode through this fixed-shape (possibly graph-captured) step when
        the generation fits its cache; otherwise the ordinary eager step is used.
        `forced` [N]: feed these codes instead of choosing (teacher forcing through the
        very decode steps generation runs); the logits are still computed and returned."""
        args = gpt.args
        if text_ids.dim() != 2 or text_ids.shape[0] != 1:
            raise ValueError(f"text_ids must be [1, T], got {tuple(text_ids.shape)}")
        if text_ids.shape[1] >= args.gpt_max_text_tokens:
            raise InvalidRequest(
                f"a sentence is {text_ids.shape[1]} tokens long, over the model's limit of "
                f"{args.gpt_max_text_tokens - 1}; split the text into shorter sentences",
                field="text",
            )
        if max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be >= 1", field="max_new_tokens")
        self.gpt = gpt
        self.options = options
        self.max_new_tokens = min(max_new_tokens, args.max_generated_tokens)
        self.generator = generator
        self.cond_latent = cond_latent
        self.text_ids = text_ids
        self.static = static
        self.forced = forced
        if forced is not None:
            self.max_new_tokens = min(self.max_new_tokens, forced.numel())

    @torch.inference_mode()
    def steps(self) -> Iterator[Step]:
        gpt, args, opts = self.gpt, self.gpt.args, self.options
        device = gpt.mel_head.weight.device
        prompt = gpt.prompt_embeddings(
            self.cond_latent.to(device), self.text_ids.to(device)
        )  # [1, P, D]
        p = prompt.shape[1]
        static = self.static
        if static is not None and static.max_len < p + 1 + self.max_new_tokens:
            static = None
        # The static decoder's caches are reused: positions past the current one are
        # masked, so what an earlier generation left there is never seen.
        caches = (
            static.caches if static is not None else gpt.make_caches(p + 1 + self.max_new_tokens)
        )
        start = torch.full((1, 1), args.gpt_start_audio_token, dtype=torch.long, device=device)
        emb = torch.cat([prompt, gpt.audio_embeddings(start, 0)], dim=1)
        # Only the last position's state is needed; the rest only fills the cache.
        latent = gpt.final_norm(gpt.gpt(emb, 0, caches)[:, -1:])  # [1, 1, D]

        history = torch.full((1, p + 1), PROMPT_PLACEHOLDER_ID, dtype=torch.long, device=device)
        history[0, -1] = args.gpt_start_audio_token
        seen = seen_mask(history, args.gpt_num_audio_tokens)
        for i in range(self.max_new_tokens):
            logits = gpt.logits(latent)[:, -1].float()  # [1, V]
            scores = process_logits(logits, seen, opts)
            if self.forced is None:
                token = select_token(scores, opts.do_sample, self.generator)  # [1]
            else:
                token = self.forced.reshape(-1)[i : i + 1].to(device)
            is_stop = int(token) == args.gpt_stop_audio_token
            yield Step(token=token, latent=latent, logits=logits, is_stop=is_stop)
            if is_stop or i + 1 == self.max_new_tokens:
                return
            seen[0, token] = True
            if static is not None:
                latent = static.step(token, i + 1, p + 1 + i)
            else:
                latent = decode_step(gpt, token.view(1, 1), i + 1, p + 1 + i, caches)

    def run(self) -> Generation:
        tokens, latents, logits = [], [], []
        stopped = False
        for step in self.steps():
            latents.append(step.latent)
            logits.append(step.logits)
            if step.is_stop:
                stopped = True
            else:
                tokens.append(step.token)
        device = self.gpt.mel_head.weight.device
        codes = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long, device=device)
        return Generation(
            codes=codes,
            latents=torch.cat(latents, dim=1),
            logits=torch.stack(logits, dim=1),
            stopped=stopped,
        )


def stretch_latents(latents: torch.Tensor, speed: float) -> torch.Tensor:
    """Change speaking rate by linearly resampling latents [B, T, D] by 1/speed in time."""
    if speed == 1.0:
        return latents
    scale = 1.0 / max(speed, 0.05)
    stretched = F.interpolate(latents.transpose(1, 2), scale_factor=scale, mode="linear")
    return stretched.transpose(1, 2)


class LatentStretcher:
    """`stretch_latents` done incrementally: push latents as they arrive, get back the output
    frames that are already final; `finish()` returns the rest. The concatenation equals
    `stretch_latents(all_latents, speed)` (linear interpolation, half-pixel centres)."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.scale = 1.0 / max(speed, 0.05)
        # Same single-precision source step as torch's linear interpolation kernel.
        self._step = torch.tensor(1.0 / self.scale, dtype=torch.float32)
        self._frames: torch.Tensor | None = None  # [1, n, D], every frame received so far
        self._emitted = 0

    @property
    def received(self) -> int:
        return 0 if self._frames is None else self._frames.shape[1]

    def _emit(self, upto: int, final: bool) -> torch.Tensor | None:
        if self._frames is None:
            return None
        n = self.received
        j = torch.arange(self._emitted, upto, dtype=torch.float32)
        src = (self._step * (j + 0.5) - 0.5).clamp(min=0.0)
        i0 = src.long()
        i1 = torch.where(i0 < n - 1, i0 + 1, i0)
        if not final:
            keep = int((i0 + 1 < n).sum())  # i0 + 1 < n holds for a prefix of j
            src, i0, i1 = src[:keep], i0[:keep], i1[:keep]
        frames = self._frames
        w1 = (src - i0.float()).to(frames.device, frames.dtype)[None, :, None]
        i0, i1 = i0.to(frames.device), i1.to(frames.device)
        out = frames[:, i0] * (1 - w1) + frames[:, i1] * w1
        self._emitted += out.shape[1]
        return out

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, n, D] new latents -> [1, m, D] output frames that no later input can change."""
        if self.speed == 1.0:
            return latents
        self._frames = latents if self._frames is None else torch.cat([self._frames, latents], 1)
        out = self._emit(int(self.received * self.scale), final=False)
        return out if out is not None else latents[:, :0]

    def finish(self) -> torch.Tensor:
        """The remaining output frames (empty when speed is 1)."""
        if self._frames is None:
            return torch.zeros(1, 0, 0)
        out = self._emit(int(self.received * self.scale), final=True)
        assert out is not None
        return out
