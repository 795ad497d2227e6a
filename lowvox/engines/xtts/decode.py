"""The one decode loop: audio tokens for any number of sentences, which join and leave it
at step boundaries (continuous batching, as Orca and vLLM schedule), one sentence being
the batch of one.

A row is one sentence: voice latents, text ids, its own sampling options, generator, token
limit and (for teacher forcing) codes. `Decoder.add` prefills its prompt
[voice latents | start-text | text | stop-text | start-audio] into a free row of the batch's
KV cache; every `Decoder.step` then chooses one token for every row (each with its own
options), lets the finished rows go and feeds the others' tokens through the GPT in one
batched call. Rows are sequences of their own lengths: each writes and attends its own
positions (XTTS's positions are learned embeddings added to the inputs, so nothing
positional happens inside attention), hence a row computes what it would alone.

The state that predicts each token (after `ln_f` and `final_norm`) is that token's latent,
so no second GPT pass is needed for the vocoder. On a GPU with graphs on, the step is
captured once per batch bucket (1, 2, 4, ... rows) over static buffers and replayed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch

from lowvox.engines.xtts.gpt import KVCache, XttsGpt
from lowvox.engines.xtts.sampling import SamplingOptions, process_logits, seen_mask, select_token

log = logging.getLogger(__name__)

# The reference fills the prompt's id history with this placeholder; the repetition
# penalty therefore also pushes down audio token 1.
PROMPT_PLACEHOLDER_ID = 1
# Batch sizes a graph-captured step is recorded for; a batch runs in the smallest that fits.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32)
# The voice latents at the head of every prompt: the perceiver's outputs (fixed by XTTS v2).
VOICE_LATENTS = 32
# Voices whose prompt prefix (keys/values of their latents: ~4 MB each in a bf16 cache of
# the full-size GPT) a GPT keeps for its decoders (`VoicePrefixes`).
VOICE_PREFIXES = 8


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, H, n, hd]


class VoicePrefixes:
    """Voices' prompt prefixes: the keys/values of their 32 latents, the head of every
    prompt, kept for one GPT and shared by all its decoders (the server's batch, each
    `stream`, `generate`) under a lock, the `limit` most recently used.

    XTTS adds no position to the voice latents and attention is causal, so their keys and
    values depend on nothing but the latents and the GPT's weights: a prefix is found by
    the latents' values and by `weights_stamp` (which tensors, changed in place or not),
    so that a GPT whose weights moved or changed computes them again."""

    def __init__(self, limit: int = VOICE_PREFIXES) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._kept: list[tuple[torch.Tensor, tuple, KV]] = []  # oldest first

    def __len__(self) -> int:
        return len(self._kept)

    def find(self, cond_latent: torch.Tensor, stamp: tuple) -> KV | None:
        """The kept keys/values of these latents under these weights, or None."""
        latent = cond_latent.detach().cpu()
        with self._lock:
            for i, (kept, at, kv) in enumerate(self._kept):
                if at == stamp and kept.dtype == latent.dtype and torch.equal(kept, latent):
                    self._kept.append(self._kept.pop(i))  # most recent last
                    return kv
        return None

    def keep(self, cond_latent: torch.Tensor, stamp: tuple, kv: KV) -> None:
        """Keep `kv` (not to be written to again) for these latents; those kept under other
        weights can no longer be found, and go."""
        latent = cond_latent.detach().cpu().clone()
        with self._lock:
            self._kept = [e for e in self._kept if e[1] == stamp]
            self._kept.append((latent, stamp, kv))
            del self._kept[: -self.limit]


_VOICE_PREFIXES: weakref.WeakKeyDictionary[XttsGpt, VoicePrefixes] = weakref.WeakKeyDictionary()
_VOICE_PREFIXES_LOCK = threading.Lock()


def voice_prefixes(gpt: XttsGpt) -> VoicePrefixes:
    """The voice prefixes kept for `gpt` (made on first use; they go with it)."""
    with _VOICE_PREFIXES_LOCK:
        kept = _VOICE_PREFIXES.get(gpt)
        if kept is None:
            kept = _VOICE_PREFIXES[gpt] = VoicePrefixes()
        return kept


def weights_stamp(module: torch.nn.Module) -> tuple:
    """Which weights `module` computes with: each tensor's memory and, where torch counts
    them (not for inference tensors), its in-place changes."""
    stamp: list[int] = []  # ~1 ms for the full-size GPT's 482 tensors
    for m in module.modules():
        for t in itertools.chain(m._parameters.values(), m._buffers.values()):
            if t is not None:
                stamp += (t.data_ptr(), 0 if t.is_inference() else t._version)
    return tuple(stamp)


@dataclass(frozen=True)
class DecodeRow:
    """One sentence to decode: voice latents [1, 32, D], text ids [1, T] (without the
    start/stop text tokens), how tokens are chosen, at most `max_new_tokens` of them, an
    optional generator (seeded sampling) and optional `forced` codes [N] to feed instead of
    choosing (teacher forcing through the very steps generation runs; logits still come)."""

    cond_latent: torch.Tensor
    text_ids: torch.Tensor
    sampling: SamplingOptions
    max_new_tokens: int
    generator: torch.Generator | None = None
    forced: torch.Tensor | None = None


@dataclass(frozen=True)
class RowStep:
    """One token of one row: its id (0-dim), the latent that predicted it [1, 1, D], the raw
    logits [1, V]; `last` when the row is finished (stop token or token limit). `error`:
    choosing this row's token failed; the row has left (`last`), its token means nothing,
    and the other rows went on."""

    row: int
    token: torch.Tensor
    latent: torch.Tensor
    logits: torch.Tensor
    is_stop: bool
    last: bool
    error: Exception | None = None


@dataclass(frozen=True)
class Generation:
    """A finished row: codes without the stop token [N], latents [1, M, D] (M is N, plus one
    when generation ended on the stop token, as in the reference), raw logits [1, M, V] of
    every step, and whether the stop token was produced."""

    codes: torch.Tensor
    latents: torch.Tensor
    logits: torch.Tensor
    stopped: bool


@dataclass(eq=False)
class _Active:
    """A row in the batch; its cache row is its index in `Decoder._rows`."""

    id: int
    row: DecodeRow
    limit: int
    length: int  # positions written to its cache row
    tokens: int  # audio tokens chosen so far
    seen: torch.Tensor  # [1, V] ids the repetition penalty pushes down
    latent: torch.Tensor  # [1, 1, D]: predicts its next token
    token: torch.Tensor | None = None  # [1]: chosen this step, fed in by `_advance`
    cancelled: bool = False


class Decoder:
    """The batch of rows being decoded: add rows at any time, `step()` them together."""

    def __init__(self, gpt: XttsGpt, max_rows: int = 8, graphs: bool = False) -> None:
        """`max_rows`: rows decoded at once (the KV cache holds that many). `graphs`: on a
        CUDA device, replay the step as a CUDA graph per batch bucket."""
        if max_rows < 1:
            raise ValueError("a decoder needs room for at least one row")
        args = gpt.args
        self.gpt = gpt
        self.max_rows = max_rows
        self.device = gpt.mel_head.weight.device
        # The longest row: voice latents, wrapped text, the start token and every new token.
        self.max_len = VOICE_LATENTS + args.text_positions + 1 + args.max_generated_tokens
        self.graphs = graphs
        self._rows: list[_Active] = []
        self._next_id = 0
        self._caches: list[KVCache] | None = None
        self._capacity = (0, 0)  # (rows, positions) the caches hold
        # The caches' rows first..stop-1, one set of views per (first, stop): the same
        # objects step after step, so that the fused CPU kernels are looked up once each.
        self._views: dict[tuple[int, int], list[KVCache]] = {}
        self._graphs: dict[int, _GraphStep] = {}
        # Voices' prompt prefixes, shared with every decoder of this GPT (`_voice_prefix`).
        self._prefixes = voice_prefixes(gpt)

    # -- rows ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def free(self) -> int:
        return self.max_rows - len(self._rows)

    def positions(self, text_tokens: int, max_new_tokens: int) -> int:
        """Cache positions a row can take: its prompt (voice latents, wrapped text), the
        start token and every new token."""
        limit = min(max_new_tokens, self.gpt.args.max_generated_tokens)
        return VOICE_LATENTS + text_tokens + 2 + 1 + limit

    def _limit(self, row: DecodeRow) -> int:
        limit = min(row.max_new_tokens, self.gpt.args.max_generated_tokens)
        return min(limit, row.forced.numel()) if row.forced is not None else limit

    @torch.inference_mode()
    def add(self, row: DecodeRow) -> int:
        """Prefill `row`'s prompt into a free cache row; it takes part from the next step.
        Returns its id (`RowStep.row`)."""
        if not self.free:
            raise RuntimeError(f"the batch is full ({self.max_rows} rows)")
        if row.text_ids.dim() != 2 or row.text_ids.shape[0] != 1:
            raise ValueError(f"text_ids must be [1, T], got {tuple(row.text_ids.shape)}")
        if row.text_ids.shape[1] + 2 > self.gpt.args.text_positions or self._limit(row) < 1:
            raise ValueError(
                f"a row of {row.text_ids.shape[1]} text ids and {self._limit(row)} new tokens "
                f"does not fit the model's position tables"
            )
        need = row.cond_latent.shape[1] + row.text_ids.shape[1] + 3 + self._limit(row)
        gpt, args = self.gpt, self.gpt.args
        slot = len(self._rows)
        caches = self._ensure(slot + 1, need)
        prompt = gpt.prompt_embeddings(
            row.cond_latent.to(self.device), row.text_ids.to(self.device)
        )  # [1, P, D]
        start = torch.full((1, 1), args.gpt_start_audio_token, dtype=torch.long, device=self.device)
        emb = torch.cat([prompt, gpt.audio_embeddings(start, 0)], dim=1)  # [1, P + 1, D]
        # Only the last position's state is needed; the rest only fills the cache row.
        own = [c.rows(slot, slot + 1) for c in caches]
        voice = self._voice_prefix(row.cond_latent, emb, own)  # the voice latents' positions
        latent = gpt.final_norm(gpt.gpt(emb[:, voice:], voice, own)[:, -1:])  # [1, 1, D]
        history = torch.tensor(
            [[PROMPT_PLACEHOLDER_ID, args.gpt_start_audio_token]], device=self.device
        )
        active = _Active(
            id=self._next_id,
            row=row,
            limit=self._limit(row),
            length=emb.shape[1],
            tokens=0,
            seen=seen_mask(history, args.gpt_num_audio_tokens),
            latent=latent,
        )
        self._next_id += 1
        self._rows.append(active)
        return active.id

    def _voice_prefix(
        self, cond_latent: torch.Tensor, emb: torch.Tensor, own: list[KVCache]
    ) -> int:
        """Fill the voice latents' positions of a row's cache (`own`), the first 32 of the
        prompt `emb`: from a previous prompt of the same voice, by any decoder of this GPT,
        when its keys/values are kept (`VoicePrefixes`), else by running them (and keeping
        them). The positions count.

        A voice's keys/values are computed once (~17% of a 150-token prompt, ~0.5 s on 2
        AVX2 cores). Where the prompt runs through lowvox's CPU kernels every token is
        computed on its own, so the cache is bit for bit what the whole prompt gives;
        elsewhere (torch's attention, a GPU) the same within reordering."""
        n = cond_latent.shape[1]
        stamp = (str(self.device), self.gpt.cache_dtype, weights_stamp(self.gpt.gpt))
        kept = self._prefixes.find(cond_latent, stamp)
        if kept is None:
            self.gpt.gpt(emb[:, :n], 0, own)
            kept = [(c.k[:, :, :n].clone(), c.v[:, :, :n].clone()) for c in own]
            self._prefixes.keep(cond_latent, stamp, kept)
        else:
            for c, (k, v) in zip(own, kept, strict=True):
                c.k[:, :, :n] = k
                c.v[:, :, :n] = v
        return n

    def cancel(self, row: int) -> None:
        """Let row `row` go at the next step, without choosing another token for it."""
        for active in self._rows:
            if active.id == row:
                active.cancelled = True

    # -- the step ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, only: Collection[int] | None = None) -> list[RowStep]:
        """Choose the next token of every row (in the order they joined); rows that end here
        leave, the others advance one position together. `only`: just these rows (ids)
        step (every row when none of them is here, or under CUDA graphs); the others
        wait, as they are, for a later step (a step of one row reads the
        weights as one of eight does, but computes an eighth: what a listener waiting
        for its first audio needs while the others' audio waits anyway). Each row's tokens
        are the same whichever steps it waits out. A row whose token cannot be chosen (its
        sampling failed) leaves with a step carrying the `error`; the others go on."""
        self._drop([a for a in self._rows if a.cancelled])
        if not self._rows:
            return []
        args = self.gpt.args
        chosen = self._rows
        if only is not None and not self.graphs:
            chosen = [a for a in self._rows if a.id in only] or self._rows
        latents = torch.cat([a.latent for a in chosen])  # [n, 1, D]
        logits = self.gpt.logits(latents)[:, -1].float()  # [n, V]
        steps: list[RowStep] = []
        done: list[_Active] = []
        for k, a in enumerate(chosen):
            row_logits = logits[k : k + 1]
            try:
                token = self._choose(a, row_logits)  # [1]
            except Exception as e:  # noqa: BLE001 -- this row's own failure: it alone leaves
                log.warning("decode row %d failed choosing its token: %s", a.id, e)
                stop = torch.tensor(args.gpt_stop_audio_token, device=self.device)
                steps.append(RowStep(a.id, stop, a.latent, row_logits, False, True, error=e))
                done.append(a)
                continue
            is_stop = int(token) == args.gpt_stop_audio_token
            a.tokens += 1
            last = is_stop or a.tokens == a.limit
            steps.append(RowStep(a.id, token[0], a.latent, row_logits, is_stop, last))
            if last:
                done.append(a)
            else:
                a.seen[0, token] = True
                a.token = token
        self._drop(done)
        stepped = {id(a) for a in chosen}
        slots = [k for k, a in enumerate(self._rows) if id(a) in stepped]
        # Cache rows are contiguous runs of the batch's: one GPT call per run of them.
        while slots:
            end = next(
                (i for i in range(1, len(slots)) if slots[i] != slots[i - 1] + 1), len(slots)
            )
            self._advance(slots[0], slots[end - 1] + 1)
            slots = slots[end:]
        return steps

    def _choose(self, a: _Active, logits: torch.Tensor) -> torch.Tensor:
        """Row `a`'s next token [1] from its raw logits [1, V] (or its forced code)."""
        if a.row.forced is not None:
            return a.row.forced.reshape(-1)[a.tokens : a.tokens + 1].to(self.device)
        scores = process_logits(logits, a.seen, a.row.sampling)
        return select_token(scores, a.row.sampling.do_sample, a.row.generator)

    def _advance(self, first: int, stop: int) -> None:
        """Feed the chosen tokens of rows first..stop-1 through the GPT in one call."""
        rows = self._rows[first:stop]
        n = len(rows)
        tokens = torch.cat([a.token.view(1, 1) for a in rows if a.token is not None])
        assert tokens.shape == (n, 1)
        audio_pos = torch.tensor([a.tokens for a in rows], device=self.device)
        seq_pos = torch.tensor([a.length for a in rows], device=self.device)
        assert self._caches is not None
        if self.graphs:
            assert first == 0 and stop == len(self._rows)
            latents = self._graph(n).run(tokens, audio_pos, seq_pos)
        else:
            caches = self._views.get((first, stop))
            if caches is None:
                caches = self._views[first, stop] = [c.rows(first, stop) for c in self._caches]
            latents = self.gpt.decode(tokens, audio_pos, seq_pos, caches)  # [n, 1, D]
        for k, a in enumerate(rows):
            a.latent = latents[k : k + 1]
            a.length += 1
            a.token = None

    def _drop(self, leaving: list[_Active]) -> None:
        """Remove rows; the last rows move into the freed cache rows (rows stay 0..n-1)."""
        for a in leaving:
            k = self._rows.index(a)
            last = len(self._rows) - 1
            if k != last:
                moved = self._rows[last]
                assert self._caches is not None
                for cache in self._caches:
                    cache.copy_row(last, k, moved.length)
                self._rows[k] = moved
            self._rows.pop()

    # -- memory --------------------------------------------------------------------------

    def _ensure(self, rows: int, positions: int) -> list[KVCache]:
        """Caches that hold `rows` rows of `positions`. On a CPU they are made once at full
        size (pages cost memory only where written); elsewhere they grow as needed."""
        have_rows, have_len = self._capacity
        if self._caches is not None and rows <= have_rows and positions <= have_len:
            return self._caches
        if self.device.type == "cpu" or self.graphs:
            want = (self.max_rows, self.max_len)
        else:
            want = (max(rows, min(2 * have_rows, self.max_rows)), max(positions, have_len))
        # On a CPU the caches are lazy however many rows: pages cost memory where written.
        caches = self.gpt.make_caches(want[1], batch=want[0], lazy=self.device.type == "cpu")
        if self._caches is not None:
            for old, new in zip(self._caches, caches, strict=True):
                for k, a in enumerate(self._rows):
                    new.k[k, :, : a.length] = old.k[k, :, : a.length]
                    new.v[k, :, : a.length] = old.v[k, :, : a.length]
        self._caches, self._capacity = caches, want
        self._graphs.clear()  # captured over the old buffers
        self._views.clear()
        return caches

    def _graph(self, rows: int) -> _GraphStep:
        bucket = next(b for b in GRAPH_BUCKETS if b >= rows) if rows <= GRAPH_BUCKETS[-1] else rows
        bucket = min(bucket, self.max_rows)
        graph = self._graphs.get(bucket)
        if graph is None:
            assert self._caches is not None
            graph = _GraphStep(self.gpt, [c.rows(0, bucket) for c in self._caches], bucket)
            self._graphs[bucket] = graph
        return graph


class _GraphStep:
    """The batched decode step over static buffers for `bucket` rows, captured as a CUDA
    graph and replayed; fewer rows run padded (the extra rows write only to cache rows no
    live row uses, at position 0, and their outputs are dropped)."""

    def __init__(self, gpt: XttsGpt, caches: list[KVCache], bucket: int) -> None:
        device = gpt.mel_head.weight.device
        self.gpt, self.caches, self.bucket = gpt, caches, bucket
        self.tokens = torch.zeros(bucket, 1, dtype=torch.long, device=device)
        self.audio_pos = torch.zeros(bucket, dtype=torch.long, device=device)
        self.seq_pos = torch.zeros(bucket, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        if device.type == "cuda":
            self._capture()

    def _run(self) -> torch.Tensor:
        return self.gpt.decode(self.tokens, self.audio_pos, self.seq_pos, self.caches, static=True)

    def _capture(self) -> None:
        # Warm up on a side stream (allocator pools, kernel selection), then capture. The
        # warm-up writes position 0 of every row: rows that are live were prefilled
        # there, so the steps below rewrite only what the next real step writes anyway.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            saved = [(c.k[:, :, 0].clone(), c.v[:, :, 0].clone()) for c in self.caches]
            for _ in range(2):
                self._run()
            for c, (k, v) in zip(self.caches, saved, strict=True):
                c.k[:, :, 0], c.v[:, :, 0] = k, v
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._run()
        self.graph = graph
        log.info("captured the decode step for %d rows as a CUDA graph", self.bucket)

    def run(
        self, tokens: torch.Tensor, audio_pos: torch.Tensor, seq_pos: torch.Tensor
    ) -> torch.Tensor:
        n = tokens.shape[0]
        self.tokens[:n] = tokens
        self.audio_pos[:n] = audio_pos
        self.seq_pos[:n] = seq_pos
        # Padding rows: position 0 of cache rows past the live ones.
        self.tokens[n:] = 0
        self.audio_pos[n:] = 0
        self.seq_pos[n:] = 0
        if self.graph is None:
            return self._run()[:n]
        self.graph.replay()
        assert self.out is not None
        return self.out[:n].clone()  # the next replay overwrites the static output


def generate(gpt: XttsGpt, row: DecodeRow, graphs: bool = False) -> Generation:
    """Decode one row to its end (the batch of one)."""
    return collect(gpt, [row], graphs=graphs)[0]


def collect(gpt: XttsGpt, rows: list[DecodeRow], graphs: bool = False) -> list[Generation]:
    """Decode `rows` together to their ends; their generations in the same order."""
    decoder = Decoder(gpt, max_rows=max(1, len(rows)), graphs=graphs)
    ids = [decoder.add(row) for row in rows]
    parts: dict[int, list[RowStep]] = {i: [] for i in ids}
    for steps in iter_steps(decoder):
        for s in steps:
            parts[s.row].append(s)
    return [_generation(parts[i], gpt) for i in ids]


def iter_steps(decoder: Decoder) -> Iterator[list[RowStep]]:
    """`decoder.step()` until every row has finished."""
    while len(decoder):
        yield decoder.step()


def _generation(steps: list[RowStep], gpt: XttsGpt) -> Generation:
    failed = next((s.error for s in steps if s.error is not None), None)
    if failed is not None:
        raise failed
    device = gpt.mel_head.weight.device
    codes = [s.token.view(1) for s in steps if not s.is_stop]
    return Generation(
        codes=torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long, device=device),
        latents=torch.cat([s.latent for s in steps], dim=1),
        logits=torch.stack([s.logits for s in steps], dim=1),
        stopped=bool(steps) and steps[-1].is_stop,
    )
