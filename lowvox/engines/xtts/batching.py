"""`XttsModel`'s batch API: several requests decoded together (see `batch.BatchGenerator`).

`synthesize_batch` makes every sentence of every text one row (long-form work: a long text's
sentences decode together); `stream_batch` streams concurrent requests (the server's
scheduler), sentence k of every request in one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lowvox.engines.xtts.batch import BatchGenerator, BatchRow
from lowvox.engines.xtts.generate import LatentStretcher, stretch_latents
from lowvox.engines.xtts.hifigan import HifiganDecoder
from lowvox.engines.xtts.results import BatchItem, GenerationSettings, StreamChunk, SynthesisResult
from lowvox.engines.xtts.streaming import StreamingVocoder
from lowvox.engines.xtts.voice import Voice
from lowvox.errors import InvalidRequest
from lowvox.runtime.memory import release_heap

# Streaming cadence in audio tokens (~46 ms of audio each). A short first chunk makes the
# first audio come sooner; later chunks are longer because each vocoding also recomputes
# the HiFi-GAN's receptive context on both sides, a cost paid per chunk.
DEFAULT_STREAM_FIRST_TOKENS = 12
DEFAULT_STREAM_CHUNK_TOKENS = 20


def later_chunk_tokens(first_chunk_tokens: int, chunk_tokens: int | None) -> int:
    """The cadence after the first chunk: as asked, else the default (or the first
    chunk's size when that is larger)."""
    return chunk_tokens or max(first_chunk_tokens, DEFAULT_STREAM_CHUNK_TOKENS)


# Rows decoded together by `synthesize_batch` when no size is given: enough to fill the
# matmuls' spare compute during memory-bound decoding without growing the KV caches much.
DEFAULT_MAX_BATCH = 8


class BatchSynthesis:
    """Mixed into `XttsModel`: uses its voices, languages, settings, GPT and vocoder."""

    # Provided by XttsModel.
    gpt: Any
    hifigan_decoder: Any
    sample_rate: int
    _lock: threading.RLock

    @torch.inference_mode()
    def synthesize_batch(
        self,
        texts: Sequence[str],
        language: str | Sequence[str | None] | None = None,
        voice: Voice | str | Sequence[Voice | str | None] | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        do_sample: bool | None = None,
        max_new_tokens: int | None = None,
        speed: float = 1.0,
        split_sentences: bool = True,
        seed: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH,
    ) -> list[SynthesisResult]:
        """`synthesize` for several texts at once: every sentence of every text is a row of
        one batched decode (up to `max_batch_size` rows at a time), so a long text's
        sentences are also decoded together. `language` and `voice` are one for all, or one
        per text. Greedy results equal running each text alone."""
        settings = self.generation_settings(
            temperature, top_k, top_p, repetition_penalty, do_sample, max_new_tokens,
            speed, split_sentences, seed,
        )  # fmt: skip
        if isinstance(texts, str) or not texts:
            raise InvalidRequest("texts must be a non-empty list of strings", field="text")
        if max_batch_size < 1:
            raise InvalidRequest("max_batch_size must be >= 1", field="max_batch_size")
        langs = _per_item(language, len(texts), "language")
        voices = [self.resolve_voice(v) for v in _per_item(voice, len(texts), "voice")]
        rows: list[tuple[int, BatchRow]] = []  # (text index, row), texts' sentences in order
        for i, text in enumerate(texts):
            lang = self.resolve_language(langs[i])
            for ids in self.encode_sentences(text, lang, settings.split_sentences):
                rows.append((i, self._row(ids, voices[i], settings, seed, len(rows))))
        wavs: list[list[np.ndarray]] = [[] for _ in texts]
        codes: list[list[np.ndarray]] = [[] for _ in texts]
        with self._lock:
            for at in range(0, len(rows), max_batch_size):
                part = rows[at : at + max_batch_size]
                gens = BatchGenerator(self.gpt, [row for _, row in part]).run()
                for (i, _), gen in zip(part, gens, strict=True):
                    latents = stretch_latents(gen.latents, settings.speed)
                    wavs[i].append(self._vocode(latents, voices[i]))
                    codes[i].append(gen.codes.cpu().numpy())
            release_heap()
        return [
            SynthesisResult(
                wav=np.concatenate(w).astype(np.float32) if w else np.zeros(0, np.float32),
                sample_rate=self.sample_rate,
                codes=c,
            )
            for w, c in zip(wavs, codes, strict=True)
        ]

    def _row(
        self, ids: torch.Tensor, voice: Voice, settings: GenerationSettings, seed: int | None,
        index: int,
    ) -> BatchRow:  # fmt: skip
        # A seeded batch gives each row its own generator (seed + row), so a row's draws do
        # not depend on which other rows share its batch.
        rng = self._torch_generator(None if seed is None else seed + index)
        return BatchRow(voice.gpt_cond_latent, ids, settings.sampling, settings.max_new_tokens, rng)

    def stream_batch(
        self,
        items: Sequence[BatchItem],
        cancels: Sequence[threading.Event | None] | None = None,
        first_chunk_tokens: int = DEFAULT_STREAM_FIRST_TOKENS,
        chunk_tokens: int | None = None,
    ) -> Iterator[tuple[int, StreamChunk]]:
        """Stream several requests decoded together: yields (item index, chunk), each item's
        chunks in order. Sentence k of every item is decoded in the same batch (a wave);
        an item whose `cancels` event is set leaves the batch before its next token.

        Everything is validated before the first chunk.
        """
        if not items:
            raise InvalidRequest("no requests to synthesize")
        cancels = list(cancels) if cancels is not None else [None] * len(items)
        if len(cancels) != len(items):
            raise ValueError("one cancel event (or None) per item")
        plans = []
        for item in items:
            settings = item.settings or self.generation_settings()
            lang = self.resolve_language(item.language)
            voice = self.resolve_voice(item.voice)
            plans.append((voice, settings, self.encode_sentences(item.text, lang,
                                                                  settings.split_sentences)))  # fmt: skip
        return self._stream_waves(plans, cancels, first_chunk_tokens,
                                  later_chunk_tokens(first_chunk_tokens, chunk_tokens))  # fmt: skip

    def _stream_waves(
        self,
        plans: list[tuple[Voice, GenerationSettings, list[torch.Tensor]]],
        cancels: list[threading.Event | None],
        first_chunk_tokens: int,
        chunk_tokens: int,
    ) -> Iterator[tuple[int, StreamChunk]]:
        with self._lock, torch.inference_mode():
            dec = self.hifigan_decoder
            w = next(dec.parameters())
            waves = max(len(p[2]) for p in plans)
            for sentence in range(waves):
                members = [
                    i for i, p in enumerate(plans)
                    if sentence < len(p[2]) and not _is_set(cancels[i])
                ]  # fmt: skip
                if not members:
                    return
                rows = [
                    self._row(plans[i][2][sentence], plans[i][0], plans[i][1],
                              plans[i][1].seed, sentence)
                    for i in members
                ]  # fmt: skip
                gen = BatchGenerator(self.gpt, rows)
                state = {
                    i: _RowStream(dec, plans[i][0].speaker_embedding.to(w.device, w.dtype),
                                  plans[i][1].speed, first_chunk_tokens)
                    for i in members
                }  # fmt: skip
                for steps in gen.steps():
                    for step in steps:
                        item = members[step.row]
                        if _is_set(cancels[item]):
                            gen.cancel(step.row)
                            continue
                        rs = state[item]
                        rs.pending.append(step.latent)
                        wav = None
                        if step.last:
                            wav = rs.finish(w)
                        elif len(rs.pending) >= rs.due:
                            wav = rs.push(w, chunk_tokens)
                        if wav is not None and wav.size:
                            yield item, StreamChunk(wav, self.sample_rate, sentence)


class _RowStream:
    """Streaming state of one batch row: latents not yet vocoded, the speed stretcher and
    the incremental vocoder (as `XttsModel._stream` keeps for a single request)."""

    def __init__(self, dec: HifiganDecoder, g: torch.Tensor, speed: float, due: int) -> None:
        self.vocoder = StreamingVocoder(dec, g, first_chunk_tokens=1, chunk_tokens=1)
        self.stretcher = LatentStretcher(speed)
        self.pending: list[torch.Tensor] = []
        self.due = due

    def push(self, like: torch.Tensor, next_due: int) -> np.ndarray:
        frames = self.stretcher.push(cat_latents(self.pending, like))
        self.pending, self.due = [], next_due
        return self.vocoder.push(frames) if frames.shape[1] else np.zeros(0, np.float32)

    def finish(self, like: torch.Tensor) -> np.ndarray:
        tails = [self.stretcher.push(cat_latents(self.pending, like))] if self.pending else []
        tails.append(self.stretcher.finish())
        rest = [self.vocoder.push(t) for t in tails if t.shape[1]]
        rest.append(self.vocoder.flush())
        wav = np.concatenate([r for r in rest if r.size] or [np.zeros(0, np.float32)])
        return wav.astype(np.float32)


def _is_set(event: threading.Event | None) -> bool:
    return event is not None and event.is_set()


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    """One value for every item, or a list with one per item."""
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise InvalidRequest(f"{name} has {len(value)} entries for {n} texts", field=name)
        return list(value)
    return [value] * n


def cat_latents(latents: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(latents, dim=1).to(like.device, like.dtype)  # [1, n, D]
