"""Text to audio: text -> sentences -> decode rows -> audio chunks, for many utterances at once.

An `Utterance` is a request made ready: its sentences as text ids, its voice, its resolved
`XttsOptions`. A `Batch` speaks any number of them together on the thread that owns the
model: each utterance holds one row of the decode loop at a time (its current sentence),
its next sentence joins when that one ends, and every utterance gets its own audio as its
latents arrive (`RowVocoder`), so a short request is done as soon as its own audio is.
Utterances join and leave at step boundaries; at most `prefills_per_step` prompts are
prefilled per step, so rows already speaking are never stalled for long. A failure of one
utterance (its voice, its vocoding) ends that utterance only.

`stream` and `synthesize` are the batch of one: whole-file audio is the collected stream.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from lowvox.engines.xtts.decode import Decoder, DecodeRow, RowStep
from lowvox.engines.xtts.model import XttsModel
from lowvox.engines.xtts.options import XttsOptions
from lowvox.engines.xtts.results import StreamChunk, SynthesisResult
from lowvox.engines.xtts.vocode import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_FIRST_CHUNK_TOKENS,
    RowVocoder,
    vocode_in_windows,
)
from lowvox.engines.xtts.voices import Voice, check_voice
from lowvox.errors import Cancelled, InvalidRequest, LowvoxError, UnknownVoice
from lowvox.runtime.memory import release_heap
from lowvox.text.tokenizer import XttsTokenizer

log = logging.getLogger(__name__)

# How many new utterances decode towards their first audio at once before the next one's
# prefill waits (see `Batch.step`), and while any waits for its first audio, every other
# row's vocoding waits ("first audio first"). benchmarks/serve_latency.py, 2-core AMD EPYC,
# full-size int8, 8 streamed requests 0.7 s apart, TTFA p95 / alone (alone 0.6 s): rows
# with 2 s of audio in hand held, three at once 3.75x; every row held, three at once
# 2.35x, two 2.28x, one 2.09x; a row held at most until it is 0, 1 or 2 s short of what
# its listener has played, one at once, 5.3x, 4.8x, 5.0x: in that overload (eight
# streams need ~2.5x what two cores give) a listener mid-stream pauses instead.
FIRST_AUDIO_AT_ONCE = 1
# Chunks vocoded in one step for rows whose listeners already hear them (their first
# chunks and sentence ends aside), most urgent first: after rows were held for a new
# listener, their backlog is spread over the next steps rather than making one step of
# ~0.15 s per chunk (seconds) that a request arriving then would wait behind.
CHUNKS_PER_STEP = 2
# Bulk work (a long-form job's prefills, decode steps and vocoding) waits while a listener
# mid-stream has less than this much sent audio not yet played (seconds): the worst step
# with bulk work in it (a prefill, a 16-row decode step and a bulk chunk) takes ~0.5 s on a
# 2-core CPU, and a listener decoded alone gains audio ~2.5x faster than it plays.
LISTENER_SLACK_S = 1.5


def encode_text(
    tokenizer: XttsTokenizer, text: str, language: str, split: bool, max_text_tokens: int
) -> tuple[torch.Tensor, ...]:
    """The text ids [1, T] of every sentence generated on its own (the reference splits,
    lowercases and strips them), each checked against the model's text limit."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("text is empty", field="text")
    from lowvox.text.split import fit_pieces, split_sentences

    def too_long(piece: str) -> bool:
        return len(tokenizer.encode(piece, language)) >= max_text_tokens

    pieces = split_sentences(text, language, tokenizer.char_limit(language)) if split else [text]
    encoded = []
    for piece in (p.strip().lower() for p in pieces):
        if not piece:
            continue
        parts = [(piece, tokenizer.encode(piece, language))]
        if split and len(parts[0][1]) >= max_text_tokens:
            # Within the character limit but past the token limit (spelled-out numbers):
            # cut again at word boundaries rather than refuse the whole text.
            parts = [(p, tokenizer.encode(p, language)) for p in fit_pieces(piece, too_long)]
        for part, ids in parts:
            if len(ids) >= max_text_tokens:
                hint = "" if split else " (turn sentence splitting on)"
                raise InvalidRequest(
                    f"a sentence is {len(ids)} tokens long, over the model's limit of "
                    f"{max_text_tokens - 1}{hint}: {part[:60]!r}...",
                    field="text",
                )
            encoded.append(torch.tensor([ids], dtype=torch.long))
    if not encoded:
        raise InvalidRequest("nothing to say after cleaning the text", field="text")
    return tuple(encoded)


@dataclass(frozen=True)
class Utterance:
    """What a `Batch` speaks: sentences as text ids [1, T], a voice, resolved options, and
    the streaming cadence in tokens."""

    pieces: tuple[torch.Tensor, ...]
    voice: Voice
    options: XttsOptions
    first_chunk_tokens: int = DEFAULT_FIRST_CHUNK_TOKENS
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS


def prepare(
    model: XttsModel,
    text: str,
    language: str | None = None,
    voice: Voice | str | None = None,
    options: XttsOptions | None = None,
    first_chunk_tokens: int = DEFAULT_FIRST_CHUNK_TOKENS,
    chunk_tokens: int | None = None,
) -> Utterance:
    """An utterance for `model` from Python: `language` as `pick_language` reads it (None:
    "en"), `voice` a `Voice` or a studio speaker's name (None: the first), `options` unset
    values from config.json. Every check the engine makes, raised here. Streaming cadence:
    the first chunk after `first_chunk_tokens`, then every `chunk_tokens` (unset: 20, or the
    first chunk's size when that is larger: fewer input lengths for the vocoder to build).

        utt = prepare(model, "Hello there.", "en", "Ana Florence", XttsOptions(seed=1))
        audio = synthesize(model, utt).wav
    """
    from lowvox.text.languages import pick_language

    if model.tokenizer is None:
        raise LowvoxError("the model was loaded without its tokenizer")
    sizes = {"first_chunk_tokens": first_chunk_tokens, "chunk_tokens": chunk_tokens}
    for name, n in sizes.items():
        # Checked here, not by the vocoder, which would fail on 2.5 mid-stream.
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidRequest(f"{name} must be a whole number of tokens >= 1, got {n!r}", name)
    if chunk_tokens is None:
        chunk_tokens = max(first_chunk_tokens, DEFAULT_CHUNK_TOKENS)
    opts = (options or XttsOptions()).resolved(model.config)
    lang = pick_language(language, model.config.languages, text)
    if voice is None or isinstance(voice, str):
        if not model.speakers:
            raise InvalidRequest("no voice given and the model has no studio speakers")
        name = voice if voice is not None else next(iter(model.speakers))
        if name not in model.speakers:
            raise UnknownVoice(name)
        voice = model.speakers[name]
    elif not isinstance(voice, Voice):
        raise InvalidRequest(
            f"voice must be a Voice or a studio speaker's name, not {type(voice).__name__}",
            field="voice",
        )
    # Again at its first sentence (`Batch`), for utterances that were not prepared here.
    check_voice(voice, model.gpt.dim, model.config.model_args.d_vector_dim)
    limit = model.config.model_args.gpt_max_text_tokens
    pieces = encode_text(model.tokenizer, text, lang, opts.split_sentences, limit)
    return Utterance(pieces, voice, opts, first_chunk_tokens, chunk_tokens)


@dataclass(frozen=True)
class BatchEvent:
    """What one step did for one utterance: a chunk of its audio, its end, or its failure."""

    utterance: int
    chunk: StreamChunk | None = None
    done: bool = False
    error: LowvoxError | None = None


@dataclass(eq=False)
class _Speaking:
    id: int
    utt: Utterance
    cancel: threading.Event | None
    generator: torch.Generator | None
    positions: int  # KV positions its longest sentence can take
    sentence: int = 0
    bulk: bool = False  # nobody listens live: its prefills and vocoding wait for others'
    row: int | None = None  # its decode row; None before its sentence's prefill and after
    # its decode ends; the sentence's vocoder from the prefill until its audio is all out
    vocoder: RowVocoder | None = None
    codes: list[torch.Tensor] = field(default_factory=list)
    first_audio_at: float | None = None  # when its first audio went out (Batch's clock)
    audio_s: float = 0.0  # seconds of audio it has sent

    @property
    def unvocoded(self) -> bool:
        """Its sentence is decoded but audio was held back: vocoded over coming steps."""
        return self.row is None and self.vocoder is not None

    def slack(self, now: float) -> float:
        """Seconds of sent audio its listener has not yet played (0 before any audio)."""
        if self.first_audio_at is None:
            return 0.0
        return self.first_audio_at + self.audio_s - now


class Batch:
    """Utterances spoken together (continuous batching); drive it with `step()`."""

    def __init__(
        self,
        model: XttsModel,
        max_rows: int,
        graphs: bool = False,
        prefills_per_step: int = 1,
        kv_positions: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`kv_positions`: the KV-cache positions all utterances together may reserve (None:
        no bound beyond `max_rows`). `clock`: seconds, for how much audio each listener
        has in hand."""
        self._clock = clock
        self.model = model
        self.decoder = Decoder(model.gpt, max_rows=max_rows, graphs=graphs)
        self.prefills_per_step = max(1, prefills_per_step)
        self.kv_positions = kv_positions
        self._speaking: list[_Speaking] = []
        self._by_row: dict[int, _Speaking] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._speaking)

    @property
    def max_rows(self) -> int:
        return self.decoder.max_rows

    def positions(self, pieces: tuple[torch.Tensor, ...], options: XttsOptions) -> int:
        """KV positions an utterance reserves: those of its longest sentence."""
        limit = options.max_new_tokens or 1
        return max(self.decoder.positions(ids.shape[1], limit) for ids in pieces)

    def fits(self, pieces: tuple[torch.Tensor, ...], options: XttsOptions) -> bool:
        """Whether an utterance of these sentences can join now (a free row, and room in
        the KV budget; an empty batch takes any utterance)."""
        if len(self._speaking) >= self.max_rows:
            return False
        if self.kv_positions is None or not self._speaking:
            return True
        used = sum(s.positions for s in self._speaking)
        return used + self.positions(pieces, options) <= self.kv_positions

    def add(self, utt: Utterance, cancel: threading.Event | None = None, bulk: bool = False) -> int:
        """Queue `utt`; its first sentence is prefilled at a coming step. Its id. A `bulk`
        utterance (a long-form job's sentence: nobody is waiting for its first audio) is
        prefilled after interactive ones, and while an interactive utterance waits for its
        first audio its vocoding is put off (its latents are kept and vocoded later)."""
        if len(self._speaking) >= self.max_rows:
            raise RuntimeError(f"the batch is full ({self.max_rows} utterances)")
        seed = utt.options.seed
        device = self.decoder.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        s = _Speaking(
            self._next_id,
            utt,
            cancel,
            generator,
            self.positions(utt.pieces, utt.options),
            bulk=bulk,
        )
        self._next_id += 1
        self._speaking.append(s)
        return s.id

    def step(self) -> list[BatchEvent]:
        """Prefill waiting sentences (a few), choose every row's next token, vocode what is
        due; the events of every utterance that produced audio, ended or failed."""
        events: list[BatchEvent] = []
        for s in [s for s in self._speaking if s.cancel is not None and s.cancel.is_set()]:
            self._end(s, events, Cancelled("generation cancelled"))
        # Interactive sentences first, and of those the ones that continue an utterance:
        # their listeners are mid-stream.
        waiting = sorted(
            (s for s in self._speaking if s.vocoder is None),
            key=lambda s: (s.bulk, not s.sentence),
        )
        # A new utterance's prefill (a long prompt's takes as long as ~20 decode steps)
        # waits while FIRST_AUDIO_AT_ONCE already decoding wait for their first audio, so
        # that arrivals closer together than a prefill do not each push every earlier
        # newcomer's first audio back by a prefill. Sentences that continue an utterance go on.
        pending = sum(
            1
            for s in self._speaking
            if s.row is not None and not s.bulk and s.first_audio_at is None
        )
        if pending >= FIRST_AUDIO_AT_ONCE:
            waiting = [s for s in waiting if s.sentence and not s.bulk]
        short = self._listener_short()
        if short:
            waiting = [s for s in waiting if not s.bulk]
        starting = waiting[: self.prefills_per_step]
        for s in starting:
            try:
                self._start_sentence(s)
            except LowvoxError as e:
                self._end(s, events, e)
            except Exception:  # noqa: BLE001 -- one utterance's failure is its own
                log.exception("utterance %d failed to start", s.id)
                self._end(s, events, LowvoxError("synthesis failed"))
        # While a listener waits for its first audio only its row decodes: everyone else's
        # audio waits for its first chunk anyway (below), and a step of one row takes half
        # the time of one of eight. While a listener is short of audio in hand, only
        # listeners' rows decode (none, if their sentences are all decoded): bulk rows wait.
        firsts = {
            s.row
            for s in self._speaking
            if s.row is not None and not s.bulk and s.first_audio_at is None
        }
        only: set[int] | None = None  # every row
        if firsts:
            only = firsts
        elif short:
            only = {s.row for s in self._speaking if s.row is not None and not s.bulk}
        with torch.inference_mode():
            steps = [] if only is not None and not only else self.decoder.step(only)
        # A row whose token could not be chosen has left the decoder: its utterance ends.
        for failed in [f for f in steps if f.error is not None]:
            s = self._by_row.pop(failed.row)
            s.row = None
            self._end(s, events, LowvoxError("synthesis failed: no audio token could be chosen"))
        steps = [f for f in steps if f.error is None]
        # Vocoding is most of a step's time: who vocodes now. While a listener waits for
        # an utterance's first audio, no one else (first audio first); otherwise rows whose
        # listeners already hear them share CHUNKS_PER_STEP chunks, those with the least
        # audio in hand first (earliest deadline), and bulk rows (nobody listens live) one
        # chunk a step when no listener's is due, so that a backlog is caught up without a
        # burst that would starve a stream. A new listener's chunks are never put off.
        # Held latents are vocoded later into the same chunks: the audio is the same, only
        # its timing moves.
        now = self._clock()
        first_wait = any(not s.bulk and s.first_audio_at is None for s in self._speaking)
        stepped = {self._by_row[st.row]: st for st in steps if st.row in self._by_row}
        due: list[tuple[float, _Speaking]] = []
        for s in self._speaking:
            st = stepped.get(s)
            if s.vocoder is None or (st is None and not s.unvocoded):
                continue
            if not s.bulk and s.first_audio_at is None:
                continue  # a new listener: never put off
            if st is None or st.last or s.vocoder.due_with(st.latent.shape[1]):
                due.append((math.inf if s.bulk else s.slack(now), s))
        due.sort(key=lambda d: d[0])
        listened = [s for _, s in due if not s.bulk]
        # A step that prefilled a bulk sentence vocodes no bulk chunk: each takes ~0.2 s
        # on a 2-core CPU, and a request arriving meanwhile waits for the whole step.
        bulk_prefilled = any(s.bulk for s in starting)
        bulk = [s for _, s in due if s.bulk and not bulk_prefilled and not short]
        free = (
            set()
            if first_wait
            else set(listened[:CHUNKS_PER_STEP]) | set(bulk[: 1 if not listened else 0])
        )
        for s in list(self._speaking):
            st = stepped.get(s)
            if st is None and not (s.unvocoded and s in free):
                continue
            try:
                new_listener = not s.bulk and s.first_audio_at is None
                self._vocode(s, st, events, hold=not new_listener and s not in free)
            except LowvoxError as e:
                self._end(s, events, e)
            except Exception:  # noqa: BLE001 -- its own failure, details in the log
                log.exception("utterance %d failed while vocoding", s.id)
                self._end(s, events, LowvoxError("synthesis failed"))
        if not self._speaking:
            release_heap()  # the vocoder's freed activations go back to the system
        return events

    def _listener_short(self) -> bool:
        """Whether a listener who already hears its utterance has less than
        `LISTENER_SLACK_S` of sent audio left to play (bulk work waits meanwhile)."""
        now = self._clock()
        return any(
            not s.bulk and s.first_audio_at is not None and s.slack(now) < LISTENER_SLACK_S
            for s in self._speaking
        )

    # -- one utterance -------------------------------------------------------------------

    def _start_sentence(self, s: _Speaking) -> None:
        utt, dec = s.utt, self.model.hifigan_decoder
        if not s.sentence:  # the voice is the whole utterance's
            args = self.model.config.model_args
            check_voice(utt.voice, self.model.gpt.dim, args.d_vector_dim)
        row = DecodeRow(
            utt.voice.gpt_cond_latent,
            utt.pieces[s.sentence],
            utt.options.sampling,
            utt.options.max_new_tokens or 1,
            s.generator,
        )
        s.vocoder = RowVocoder(
            dec, utt.voice.speaker_embedding, utt.options.speed,
            utt.first_chunk_tokens, utt.chunk_tokens,
        )  # fmt: skip
        with torch.inference_mode():
            s.row = self.decoder.add(row)
        self._by_row[s.row] = s

    def _vocode(
        self, s: _Speaking, st: RowStep | None, events: list[BatchEvent], hold: bool
    ) -> None:
        """A row's step (`st`), or a step of a decoded sentence's held-back audio (None):
        keep its token, vocode the next chunk if due (unless held), and once the sentence
        is decoded and no more than its last piece is left, finish it."""
        assert s.vocoder is not None
        wav = np.zeros(0, np.float32)
        with torch.inference_mode():
            if st is not None:
                wav = s.vocoder.push(st.latent, hold=hold)
                if not st.is_stop:
                    s.codes.append(st.token.view(1))
                if st.last:
                    del self._by_row[st.row]
                    s.row = None  # decoded: from now on `unvocoded`
            elif not hold:
                wav = s.vocoder.drain_one()
            if s.row is None and not hold and not s.vocoder.due_with(0):
                tail = s.vocoder.finish()
                wav = np.concatenate([wav, tail]) if wav.size else tail
                self._sentence_done(s, wav, events)
                return
        if wav.size:
            self._sent(s, wav)
            events.append(BatchEvent(s.id, StreamChunk(wav, self.model.sample_rate, s.sentence)))

    def _sent(self, s: _Speaking, wav: np.ndarray) -> None:
        if wav.size:
            s.first_audio_at = self._clock() if s.first_audio_at is None else s.first_audio_at
            s.audio_s += wav.size / self.model.sample_rate

    def _sentence_done(self, s: _Speaking, wav: np.ndarray, events: list[BatchEvent]) -> None:
        """The sentence's last audio (with its codes) goes out; the next sentence waits for
        its prefill, or the utterance is done."""
        self._sent(s, wav)
        codes = torch.cat(s.codes).cpu().numpy() if s.codes else np.zeros(0, np.int64)
        rate = self.model.sample_rate
        events.append(BatchEvent(s.id, StreamChunk(wav, rate, s.sentence, codes)))
        s.vocoder, s.codes = None, []
        s.sentence += 1
        if s.sentence == len(s.utt.pieces):
            self._speaking.remove(s)
            events.append(BatchEvent(s.id, done=True))

    def _end(self, s: _Speaking, events: list[BatchEvent], error: LowvoxError) -> None:
        if s.row is not None:
            self.decoder.cancel(s.row)
            self._by_row.pop(s.row, None)
        if s in self._speaking:
            self._speaking.remove(s)
        events.append(BatchEvent(s.id, error=error))


def stream(
    model: XttsModel, utt: Utterance, cancel: threading.Event | None = None
) -> Generator[StreamChunk, None, None]:
    """Speak one utterance, yielding its audio as it is made (the batch of one); `close()`
    it to stop early."""
    batch = Batch(model, max_rows=1)
    batch.add(utt, cancel)
    while len(batch):
        for event in batch.step():
            if event.error is not None:
                if isinstance(event.error, Cancelled):
                    return
                raise event.error
            if event.chunk is not None and (event.chunk.wav.size or event.chunk.codes is not None):
                yield event.chunk


def synthesize(model: XttsModel, utt: Utterance) -> SynthesisResult:
    """Whole-utterance audio and every sentence's codes: the collected stream."""
    wavs: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    for chunk in stream(model, utt):
        wavs.append(chunk.wav)
        if chunk.codes is not None:
            codes.append(chunk.codes)
    wav = np.concatenate(wavs).astype(np.float32) if wavs else np.zeros(0, np.float32)
    return SynthesisResult(wav=wav, sample_rate=model.sample_rate, codes=codes)


def vocode(model: XttsModel, latents: torch.Tensor, voice: Voice) -> np.ndarray:
    """The audio of GPT latents [1, T, D] already at hand, in fixed-size windows (memory
    stays flat however long they are; one input length for oneDNN to build)."""
    dec = model.hifigan_decoder
    w = next(dec.parameters())
    g = voice.speaker_embedding.to(w.device, w.dtype)
    return vocode_in_windows(dec, latents.to(w.device, w.dtype), g)


def warm_up(model: XttsModel, tokens: int = 60) -> None:
    """Vocode silence once at the streaming cadence, so that oneDNN builds its kernels for
    those input lengths (about 1 s in bf16) at start-up rather than in the first request."""
    zeros = torch.zeros(1, 1, model.gpt.dim, device=model.device)
    speaker = torch.zeros(1, model.config.model_args.d_vector_dim, 1, device=model.device)
    with torch.inference_mode():
        vocoder = RowVocoder(model.hifigan_decoder, speaker)
        for _ in range(tokens):
            vocoder.push(zeros)
        vocoder.finish()
    release_heap()
