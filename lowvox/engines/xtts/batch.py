"""Several sequences decoded together: different voices, texts, lengths and options.

Prompts are left-padded to a common length so that every row's next token is written at the
same cache column; an explicit attention mask keeps each row away from its padding. XTTS's
positions are learned embeddings added to the inputs (nothing positional happens inside the
attention), so padding shifts no row's positions: each row computes what it would alone.
A row stops on its own (stop token or its token limit) and leaves the batch; the caches are
compacted so finished rows cost nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lowvox.engines.xtts.generate import PROMPT_PLACEHOLDER_ID, Generation, decode_step
from lowvox.engines.xtts.gpt import XttsGpt
from lowvox.engines.xtts.sampling import SamplingOptions, process_logits, seen_mask, select_token
from lowvox.errors import InvalidRequest


@dataclass(frozen=True)
class BatchRow:
    """One sequence of a batch: voice latents [1, 32, D], text ids [1, T] and its options."""

    cond_latent: torch.Tensor
    text_ids: torch.Tensor
    options: SamplingOptions
    max_new_tokens: int
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class RowStep:
    """One token of one row: id (0-dim), the latent that predicted it [1, 1, D], raw logits
    [1, V]; `last` when the row is finished (stop token or token limit)."""

    row: int
    token: torch.Tensor
    latent: torch.Tensor
    logits: torch.Tensor
    is_stop: bool
    last: bool


class BatchGenerator:
    """Generates audio tokens for several sentences at once; iterate `steps()` or `run()`."""

    def __init__(self, gpt: XttsGpt, rows: Sequence[BatchRow]) -> None:
        if not rows:
            raise ValueError("a batch needs at least one row")
        args = gpt.args
        for row in rows:
            if row.text_ids.dim() != 2 or row.text_ids.shape[0] != 1:
                raise ValueError(f"text_ids must be [1, T], got {tuple(row.text_ids.shape)}")
            if row.text_ids.shape[1] >= args.gpt_max_text_tokens:
                raise InvalidRequest(
                    f"a sentence is {row.text_ids.shape[1]} tokens long, over the model's "
                    f"limit of {args.gpt_max_text_tokens - 1}",
                    field="text",
                )
            if row.max_new_tokens < 1:
                raise InvalidRequest("max_new_tokens must be >= 1", field="max_new_tokens")
        self.gpt = gpt
        self.rows = list(rows)
        self.limits = [min(r.max_new_tokens, args.max_generated_tokens) for r in rows]
        self._cancelled: set[int] = set()

    def cancel(self, row: int) -> None:
        """Retire `row` before its next token (its client went away)."""
        self._cancelled.add(row)

    @torch.inference_mode()
    def steps(self) -> Iterator[list[RowStep]]:
        """Per decoding step, the step of every row still running (in row order)."""
        gpt, args = self.gpt, self.gpt.args
        device = gpt.mel_head.weight.device
        start_tok = torch.full((1, 1), args.gpt_start_audio_token, dtype=torch.long, device=device)
        start_emb = gpt.audio_embeddings(start_tok, 0)  # [1, 1, D]
        prompts = [
            torch.cat(
                [gpt.prompt_embeddings(r.cond_latent.to(device), r.text_ids.to(device)), start_emb],
                dim=1,
            )
            for r in self.rows
        ]  # each [1, P_i + 1, D]
        b, width = len(prompts), max(p.shape[1] for p in prompts)
        emb = start_emb.new_zeros(b, width, start_emb.shape[-1])  # [B, L, D], left-padded
        offsets = []
        for i, p in enumerate(prompts):
            offsets.append(width - p.shape[1])
            emb[i, offsets[i] :] = p[0]
        total = width + max(self.limits)
        columns = torch.arange(total, device=device)
        # valid[b, j]: column j holds row b's own input (not padding). [B, total]
        valid = columns[None, :] >= torch.tensor(offsets, device=device)[:, None]
        # Prefill: causal within a row's own columns; padding rows see only themselves, so
        # their (unused) states stay finite and never poison the cache with NaNs.
        q = columns[:width, None]
        causal = (columns[None, :width] <= q) & valid[:, None, :width]  # [B, L, L]
        mask = (causal | (columns[None, :width] == q)).unsqueeze(1)  # [B, 1, L, L]
        caches = gpt.make_caches(total, batch=b)
        latent = gpt.final_norm(gpt.gpt(emb, 0, caches, mask)[:, -1:])  # [B, 1, D]

        history = torch.full((1, 2), PROMPT_PLACEHOLDER_ID, dtype=torch.long, device=device)
        history[0, -1] = args.gpt_start_audio_token
        seen = seen_mask(history, args.gpt_num_audio_tokens).expand(b, -1).clone()  # [B, V]
        active = list(range(b))  # batch position -> row index
        for i in range(max(self.limits)):
            logits = gpt.logits(latent)[:, -1].float()  # [n, V]
            steps, tokens, keep = [], [], []
            for k, row in enumerate(active):
                opts = self.rows[row].options
                scores = process_logits(logits[k : k + 1], seen[k : k + 1], opts)
                token = select_token(scores, opts.do_sample, self.rows[row].generator)  # [1]
                is_stop = int(token) == args.gpt_stop_audio_token
                last = is_stop or i + 1 == self.limits[row]
                steps.append(
                    RowStep(row, token[0], latent[k : k + 1], logits[k : k + 1], is_stop, last)
                )
                if not last:
                    keep.append(k)
                    tokens.append(token)
            yield steps
            chosen = dict(zip(keep, tokens, strict=True))
            keep = [k for k in keep if active[k] not in self._cancelled]
            if not keep:
                return
            tokens = [chosen[k] for k in keep]
            if len(keep) < len(active):
                # Finished rows leave: later steps only compute the rows still running.
                index = torch.tensor(keep, device=device)
                for cache in caches:
                    cache.keep_rows(index, width + i)  # positions written so far
                valid, seen = valid[index], seen[index]
                active = [active[k] for k in keep]
            for k in range(len(active)):
                seen[k, tokens[k]] = True
            token_in = torch.stack(tokens).view(-1, 1)  # [n, 1]
            step_mask = valid[:, None, None, : width + i + 1]  # [n, 1, 1, L + i + 1]
            latent = decode_step(gpt, token_in, i + 1, width + i, caches, step_mask)

    def run(self) -> list[Generation]:
        """Every row's finished generation, in row order (as `Generator.run` gives one)."""
        tokens: list[list[torch.Tensor]] = [[] for _ in self.rows]
        latents: list[list[torch.Tensor]] = [[] for _ in self.rows]
        logits: list[list[torch.Tensor]] = [[] for _ in self.rows]
        stopped = [False] * len(self.rows)
        for steps in self.steps():
            for s in steps:
                latents[s.row].append(s.latent)
                logits[s.row].append(s.logits)
                if s.is_stop:
                    stopped[s.row] = True
                else:
                    tokens[s.row].append(s.token.view(1))
        device = self.gpt.mel_head.weight.device
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return [
            Generation(
                codes=torch.cat(tokens[r]) if tokens[r] else empty,
                latents=torch.cat(latents[r], dim=1),
                logits=torch.stack(logits[r], dim=1),
                stopped=stopped[r],
            )
            for r in range(len(self.rows))
        ]
