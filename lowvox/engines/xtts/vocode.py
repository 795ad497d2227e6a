"""From GPT latents to audio: speed, streaming vocoding with flat per-chunk cost, and the
per-row streams of the decode loop (whole-file audio is the collected stream).

The reference re-vocodes the whole prefix for every chunk and cross-fades, which costs
O(T^2) over an utterance. Here each chunk vocodes only the frames it emits plus a fixed
margin of context on both sides. HiFi-GAN is a stack of finite convolutions, so an output
frame depends on at most R interpolated frames on each side (R = the generator's receptive
radius); with R frames of context the chunk's audio equals the whole-utterance audio.

Frames are addressed in whole-utterance coordinates: the two linear interpolations that
turn latents into vocoder frames are evaluated at global frame indices (exactly as
F.interpolate does for the whole sequence), and a frame is treated as known only once every
latent it reads has arrived, so nothing emitted ever changes when more latents come in.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from lowvox.engines.xtts.hifigan import (
    FUSED_PIECE_FRAMES,
    FusedStream,
    HifiganDecoder,
    HifiganGenerator,
)
from lowvox.runtime.memory import own_mappings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Streaming cadence in audio tokens (~46 ms of audio each). A short first chunk makes the
# first audio come sooner; later chunks are longer because each vocoding also recomputes
# the HiFi-GAN's receptive context on both sides, a cost paid per chunk.
DEFAULT_FIRST_CHUNK_TOKENS = 12
DEFAULT_CHUNK_TOKENS = 20
# `vocode_in_windows`: frames per HiFi-GAN call (about 2.2 s of audio, ~175 new frames each).
DEFAULT_WINDOW_FRAMES = 208
# ... and at most `FUSED_PIECE_FRAMES` per piece on the fused path (see there).


# Per generator: the (precision, input length) pairs it has already run at on the CPU.
_RUN_AT: weakref.WeakKeyDictionary[HifiganGenerator, set[tuple]] = weakref.WeakKeyDictionary()


def run_generator(decoder: HifiganDecoder, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`decoder.waveform_decoder(z, g)` for frames `z` `[1, D, F]`: the first run at a new
    length F (where oneDNN builds its kernels for it, ~80 of them) inside `own_mappings`, so
    that what oneDNN keeps does not fragment the heap under the window's activations."""
    gen = decoder.waveform_decoder
    if z.device.type != "cpu":
        return gen(z, g)
    return _first_at_length(gen, ("whole", z.shape[-1]), lambda: gen(z, g))


def _first_at_length(gen: HifiganGenerator, shape: tuple, run: Callable[[], T]) -> T:
    """`run()`, inside `own_mappings` the first time `gen` runs at this input shape."""
    key = (gen.precision, *shape)
    done = _RUN_AT.setdefault(gen, set())
    if key in done:
        return run()
    with own_mappings():
        out = run()
    done.add(key)
    return out


def _source_positions(
    out_idx: torch.Tensor, scale_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left source index and weight of the right neighbour for linear interpolation by
    `scale_factor` (align_corners=False), in float32 as PyTorch's CPU kernel computes them."""
    inv = torch.tensor(1.0 / scale_factor, dtype=torch.float32)
    src = (inv * (out_idx.to(torch.float32) + 0.5) - 0.5).clamp(min=0.0)
    idx0 = src.to(torch.int64)
    return idx0, (src - idx0).clamp(0.0, 1.0)


def interpolate_frames(
    x: torch.Tensor, offset: int, start: int, stop: int, scale_factor: float, in_len: int
) -> torch.Tensor:
    """Frames `start..stop-1` of `F.interpolate(full, scale_factor, mode="linear")`.

    `x` `[B, C, L]` holds input frames `offset..offset+L-1` of the full sequence, whose length
    is `in_len` (it decides the clamp at the end); it must cover every frame read.
    """
    idx0, w1 = _source_positions(torch.arange(start, stop), scale_factor)
    idx1 = torch.where(idx0 < in_len - 1, idx0 + 1, idx0)
    a = x.index_select(2, idx0 - offset)
    b = x.index_select(2, idx1 - offset)
    w1 = w1.to(x.dtype)
    return a * (1.0 - w1) + b * w1


def _index0(i: int, scale_factor: float) -> int:
    return int(_source_positions(torch.tensor([i]), scale_factor)[0][0])


def _stable_count(n_in: int, scale_factor: float) -> int:
    """How many leading output frames read only inputs `0..n_in-1` with a real right
    neighbour, i.e. will not change when more input frames arrive."""
    lo, hi = 0, math.floor(n_in * scale_factor)  # invariant: frames < lo are stable
    while lo < hi:  # the left index is monotone in the output index: binary search
        mid = (lo + hi) // 2
        if _index0(mid, scale_factor) <= n_in - 2:
            lo = mid + 1
        else:
            hi = mid
    return lo


class StreamingVocoder:
    """Turns GPT latents pushed in pieces into final audio, vocoding each frame range once.

    `push` adds latents and vocodes the audio that is now final (possibly empty: its caller,
    `RowVocoder`, decides the cadence); `flush` returns the rest. Concatenated, the pieces
    equal `decoder(all_latents, speaker_embedding)` up to float rounding.

    `context` is the number of interpolated frames of context on each side of a chunk;
    the default is the decoder's receptive radius (exact). Smaller trades accuracy at the
    seams for latency.
    """

    def __init__(
        self,
        decoder: HifiganDecoder,
        speaker_embedding: torch.Tensor,
        *,
        context: int | None = None,
    ) -> None:
        self.decoder = decoder
        param = next(decoder.waveform_decoder.parameters())
        self._device, self._dtype = param.device, param.dtype
        self.g = speaker_embedding.detach().reshape(1, -1, 1).to(self._device, self._dtype)
        radius = decoder.waveform_decoder.receptive_radius()
        self.context = radius if context is None else int(context)
        self.hop = decoder.hop_length
        self.scales = decoder.frame_scales
        self._buf: torch.Tensor | None = None  # [1, capacity, D], grown by doubling
        self._n = 0  # latents received
        self._emitted = 0  # frames whose audio has been returned
        self._finished = False
        self.frames_vocoded: list[int] = []  # frames run through HiFi-GAN, per vocoding
        self._widest = 0  # the widest window or piece after the first (see `_widen`)
        # The fused path's per-layer state (`HifiganGenerator.fused_stream`), made at the
        # first vocoding; where that path does not serve, windows with context instead.
        self._stream: FusedStream | None = None
        self._stream_checked = False
        self._pushed = 0  # frames pushed into `_stream`

    @property
    def num_latents(self) -> int:
        return self._n

    def _append(self, latents: torch.Tensor) -> None:
        n = latents.shape[1]
        if self._buf is None:
            cap = max(64, n)
            self._buf = latents.new_empty(
                1, cap, latents.shape[2], device=self._device, dtype=self._dtype
            )
        elif self._n + n > self._buf.shape[1]:
            cap = max(2 * self._buf.shape[1], self._n + n)
            grown = self._buf.new_empty(1, cap, self._buf.shape[2])
            grown[:, : self._n] = self._buf[:, : self._n]
            self._buf = grown
        self._buf[:, self._n : self._n + n] = latents
        self._n += n

    def push(self, latents: torch.Tensor) -> np.ndarray:
        """Add `[1, n, D]` latents; return the float32 audio that became final (maybe empty)."""
        if self._finished:
            raise RuntimeError("push after flush")
        _check_latents(latents)
        if latents.shape[1] == 0:
            return np.zeros(0, np.float32)
        self._append(latents.detach())
        return self._vocode(final=False)

    def flush(self, last: torch.Tensor | None = None) -> np.ndarray:
        """Vocode everything not yet returned (the end of the utterance), with its `last`
        latents `[1, n, D]` if given: vocoded with the end, not as a piece of their own
        (a `push` of them would vocode a main-size piece mostly of padding first)."""
        if last is not None and last.shape[1]:
            if self._finished:
                raise RuntimeError("push after flush")
            _check_latents(last)
            self._append(last.detach())
        if self._finished:
            return np.zeros(0, np.float32)
        self._finished = True
        if self._n == 0:
            return np.zeros(0, np.float32)
        return self._vocode(final=True)

    @torch.inference_mode()
    def _fused_stream(self) -> FusedStream | None:
        if not self._stream_checked:
            self._stream = self.decoder.waveform_decoder.fused_stream(self.g)
            self._stream_checked = True
        return self._stream

    @property
    def _tail_piece(self) -> int:
        """The length of the pieces that end an utterance: the frames that flush the fused
        path's delay, plus the last frames, which become known only at the end."""
        assert self._stream is not None
        return self._stream.tail_frames + math.ceil(math.prod(self.scales))

    def _vocode_fused(self, final: bool) -> np.ndarray:
        """Push the frames now known through `_stream`, in pieces of a few fixed lengths:
        while streaming, the widest piece after the first (as `_widen`); at the end, such
        pieces and one short `_tail_piece`, or just one piece if it is the first."""
        assert self._stream is not None
        if not final:
            n = self._stable_frames() - self._pushed
            if n <= 0:
                return np.zeros(0, np.float32)
            size = n
            if self.frames_vocoded:
                size = self._widest = max(n, self._widest)
            return self._push_pieces([size], None)
        total = self._lengths()[-1]
        need = total - self._pushed + self._stream.tail_frames
        if not self.frames_vocoded:
            return self._push_pieces([need], total)
        main = self._widest or self.frames_vocoded[0]
        return self._push_pieces(_piece_sizes(need, main, self._tail_piece), total)

    def _push_pieces(self, sizes: list[int], total: int | None) -> np.ndarray:
        """Push the next frames in pieces of `sizes`, zero-padded past the frames known
        (the stable ones, or all `total` at the end); the audio that came out."""
        stream, buf = self._stream, self._buf
        assert stream is not None and buf is not None
        known = self._stable_frames() if total is None else total
        gen = self.decoder.waveform_decoder
        out = []
        for size in sizes:
            real = max(0, min(size, known - self._pushed))
            x = buf.new_zeros(1, buf.shape[2], size)  # [1, D, size]
            if real:
                x[..., :real] = self._frames(self._pushed, self._pushed + real)
            push = functools.partial(stream.push, x, real, total)
            out.append(_first_at_length(gen, ("piece", size), push))
            self._pushed += real
            self.frames_vocoded.append(size)
        return torch.cat(out).float().cpu().numpy()

    def _lengths(self) -> list[int]:
        """Sequence length after each interpolation stage, for the latents received so far."""
        lengths = [self._n]
        for s in self.scales:
            lengths.append(math.floor(lengths[-1] * s))
        return lengths

    def _stable_frames(self) -> int:
        """Frames (after all interpolation stages) that no future latent can change."""
        n = self._n
        for s in self.scales:
            n = _stable_count(n, s)
        return n

    def _frames(self, start: int, stop: int) -> torch.Tensor:
        """Vocoder input frames `start..stop-1` of the current sequence: `[1, D, stop-start]`."""
        lengths = self._lengths()
        # Walk back through the stages to find which input frames are read.
        spans = [(start, stop)]
        for s, in_len in zip(reversed(self.scales), reversed(lengths[:-1]), strict=True):
            lo, hi = spans[-1]
            first = _index0(lo, s)
            last = min(_index0(hi - 1, s) + 1, in_len - 1)
            spans.append((first, last + 1))
        spans.reverse()  # spans[k]: frame range needed after k stages
        lo, hi = spans[0]
        assert self._buf is not None
        x = self._buf[:, lo:hi].transpose(1, 2)  # [1, D, hi - lo]
        for k, s in enumerate(self.scales):
            nxt_lo, nxt_hi = spans[k + 1]
            x = interpolate_frames(x, spans[k][0], nxt_lo, nxt_hi, s, lengths[k])
        return x

    def _widen(self, w0: int, w1: int, available: int, final: bool) -> tuple[int, int]:
        """Grow a later chunk's window `[w0, w1)` to the widest later window so far (or, for
        a last window right after the first, to the first one's width), into known frames:
        leftwards first, over audio already emitted, then rightwards.

        Extra context never changes the emitted audio, and it keeps the set of input lengths
        small (the last chunk of an utterance gets the middle chunks' length): oneDNN builds
        its convolution kernels per input shape, about 80 of them per new length, costing
        as much as vocoding seconds of audio in bf16.
        """
        if not self.frames_vocoded:  # the first window: nothing to match yet
            return w0, w1
        target = self._widest or (self.frames_vocoded[0] if final else 0)
        if w1 - w0 < target:
            w0 = max(0, w1 - target)
            w1 = min(available, w0 + target)
        self._widest = max(self._widest, w1 - w0)
        return w0, w1

    @torch.inference_mode()
    def _vocode(self, final: bool) -> np.ndarray:
        if self._fused_stream() is not None:
            return self._vocode_fused(final)
        if final:
            available = self._lengths()[-1]
            end = available
        else:
            available = self._stable_frames()
            end = available - self.context  # keep `context` known frames to the right
        if end <= self._emitted:
            return np.zeros(0, np.float32)
        w0 = max(0, self._emitted - self.context)
        w1 = min(available, end + self.context)
        w0, w1 = self._widen(w0, w1, available, final)
        z = self._frames(w0, w1)
        audio = run_generator(self.decoder, z, self.g)[0, 0]  # [(w1 - w0) * hop]
        out = audio[(self._emitted - w0) * self.hop : (end - w0) * self.hop]
        self.frames_vocoded.append(w1 - w0)
        self._emitted = end
        return out.float().cpu().numpy()


@torch.inference_mode()
def vocode_in_windows(
    decoder: HifiganDecoder,
    latents: torch.Tensor,
    speaker_embedding: torch.Tensor,
    window: int = DEFAULT_WINDOW_FRAMES,
) -> np.ndarray:
    """Whole-utterance audio for `[1, T, D]` latents, vocoded `window` frames at a time.

    Equals `decoder(latents, speaker_embedding)` up to float rounding, with the activations
    of one window instead of the whole utterance. Every call has exactly `window` frames
    (the last window is aligned to the end, overlapping its neighbour more), unless the
    utterance is shorter: oneDNN builds convolution kernels per input length, so a fixed
    length is built once per process instead of once per utterance. The fused path (no
    context, see `FusedStream`) takes pieces of at most `FUSED_PIECE_FRAMES`.
    """
    v = StreamingVocoder(decoder, speaker_embedding)
    _check_latents(latents)
    if window <= 2 * v.context:
        raise ValueError(f"window must exceed twice the context ({2 * v.context} frames)")
    if latents.shape[1] == 0:
        return np.zeros(0, np.float32)
    v._append(latents.detach())
    total = v._lengths()[-1]
    stream = v._fused_stream()
    if stream is not None:  # the fused path: each frame once, in pieces of `piece` frames
        need = total + stream.tail_frames
        v._finished = True
        piece = min(window, FUSED_PIECE_FRAMES)
        sizes = [need] if need <= piece else _piece_sizes(need, piece, v._tail_piece)
        return v._push_pieces(sizes, total)
    parts = []
    emitted = 0
    while emitted < total:
        w0 = max(0, emitted - v.context)
        w1 = min(total, w0 + window)
        w0 = max(0, w1 - window)
        end = total if w1 == total else w1 - v.context
        z = v._frames(w0, w1)
        audio = run_generator(decoder, z, v.g)[0, 0]  # [(w1 - w0) * hop]
        parts.append(audio[(emitted - w0) * v.hop : (end - w0) * v.hop].float().cpu().numpy())
        v.frames_vocoded.append(w1 - w0)
        emitted = end
    return np.concatenate(parts)


def _check_latents(latents: torch.Tensor) -> None:
    if latents.dim() != 3 or latents.shape[0] != 1:
        raise ValueError(f"expected latents [1, n, D], got {tuple(latents.shape)}")


def _piece_sizes(need: int, main: int, tail: int) -> list[int]:
    """Pieces of `main` frames, and one of `tail` to finish, that cover `need` frames."""
    sizes = []
    while need > 0:
        size = tail if need <= tail else main
        sizes.append(size)
        need -= size
    return sizes


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
        # [1, m, D]: the frames received from `_first` on, those later outputs still read
        # (earlier ones are dropped: a push costs the same however long the sentence).
        self._frames: torch.Tensor | None = None
        self._first = 0
        self._received = 0
        self._emitted = 0

    @property
    def received(self) -> int:
        return self._received

    @property
    def held(self) -> int:
        """Frames kept for the outputs still to come."""
        return 0 if self._frames is None else self._frames.shape[1]

    def _source(self, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source position and its left frame's index for output frames `j`."""
        src = (self._step * (j.to(torch.float32) + 0.5) - 0.5).clamp(min=0.0)
        return src, src.long()

    def _emit(self, upto: int, final: bool) -> torch.Tensor | None:
        if self._frames is None:
            return None
        n = self.received
        src, i0 = self._source(torch.arange(self._emitted, upto))
        i1 = torch.where(i0 < n - 1, i0 + 1, i0)
        if not final:
            keep = int((i0 + 1 < n).sum())  # i0 + 1 < n holds for a prefix of j
            src, i0, i1 = src[:keep], i0[:keep], i1[:keep]
        frames = self._frames
        w1 = (src - i0.float()).to(frames.device, frames.dtype)[None, :, None]
        i0, i1 = (i0 - self._first).to(frames.device), (i1 - self._first).to(frames.device)
        out = frames[:, i0] * (1 - w1) + frames[:, i1] * w1
        self._emitted += out.shape[1]
        # The next output reads from its left frame on (left frames only grow with j).
        _, after = self._source(torch.tensor([self._emitted]))
        drop = min(int(after[0]), n - 1) - self._first
        if drop > 0:
            self._frames, self._first = frames[:, drop:], self._first + drop
        return out

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, n, D] new latents -> [1, m, D] output frames that no later input can change."""
        if self.speed == 1.0:
            return latents
        self._frames = latents if self._frames is None else torch.cat([self._frames, latents], 1)
        self._received += latents.shape[1]
        out = self._emit(int(self.received * self.scale), final=False)
        return out if out is not None else latents[:, :0]

    def finish(self) -> torch.Tensor:
        """The remaining output frames (empty when speed is 1)."""
        if self._frames is None:
            return torch.zeros(1, 0, 0)
        out = self._emit(int(self.received * self.scale), final=True)
        assert out is not None
        return out


class RowVocoder:
    """One sentence's audio as its latents arrive from the decode loop: speed-stretched,
    vocoded after `first_chunk_tokens` latents, then every `chunk_tokens`, and the rest at
    `finish`. The chunks of a sentence, joined, are its whole-utterance audio."""

    def __init__(
        self,
        decoder: HifiganDecoder,
        speaker_embedding: torch.Tensor,
        speed: float = 1.0,
        first_chunk_tokens: int = DEFAULT_FIRST_CHUNK_TOKENS,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        if first_chunk_tokens < 1 or chunk_tokens < 1:
            raise ValueError("first_chunk_tokens and chunk_tokens must be at least 1")
        w = next(decoder.parameters())
        self._like = w
        self.vocoder = StreamingVocoder(decoder, speaker_embedding.to(w.device, w.dtype))
        self.stretcher = LatentStretcher(speed)
        self.chunk_tokens = chunk_tokens
        self._due = first_chunk_tokens
        self._pending: list[torch.Tensor] = []
        self._count = 0  # latents pending

    def push(self, latents: torch.Tensor, hold: bool = False) -> np.ndarray:
        """Add latents [1, n, D] (a step's one, usually); the audio of the next chunk if
        it became due (else empty; one chunk a push, so a held backlog is caught up over
        several). `hold`: keep them for later even if audio is due (the batch has more
        urgent vocoding). Chunks always end at the same latents (after
        `first_chunk_tokens`, then every `chunk_tokens`), held or not, so the audio is the
        same however the pushes were held."""
        self._pending.append(latents)
        self._count += latents.shape[1]
        return np.zeros(0, np.float32) if hold else self._drain(limit=1)

    def _drain(self, limit: int | None = None) -> np.ndarray:
        """Vocode the chunks whose latents are all here (at most `limit`: a backlog held
        back is caught up a chunk a push)."""
        out = [np.zeros(0, np.float32)]
        while self._count >= self._due and (limit is None or len(out) <= limit):
            chunk = self._take(self._due)
            self._due = self.chunk_tokens
            out.append(self._vocode(self.stretcher.push(chunk)))
        return np.concatenate(out)

    def drain_one(self) -> np.ndarray:
        """The next chunk if its latents are all here (else empty): a held backlog."""
        return self._drain(limit=1)

    def due_with(self, pushed: int) -> bool:
        """Whether a chunk's latents are all here once `pushed` more come (the push that
        brings them vocodes it, unless held)."""
        return self._count + pushed >= self._due

    def finish(self) -> np.ndarray:
        """The rest of the sentence's audio."""
        out = [self._drain()]  # chunks that were held back
        tails = [self.stretcher.push(self._take(self._count))] if self._pending else []
        tails.append(self.stretcher.finish())
        tails = [t for t in tails if t.shape[1]]  # `_take` put them on the vocoder's device
        last = torch.cat(tails, dim=1) if tails else None
        out.append(self.vocoder.flush(last).astype(np.float32))
        return np.concatenate([r for r in out if r.size] or [np.zeros(0, np.float32)])

    def _take(self, n: int) -> torch.Tensor:
        """The first `n` pending latents [1, n, D]; the rest stay pending."""
        latents = torch.cat(self._pending, dim=1)
        self._pending = [latents[:, n:]] if latents.shape[1] > n else []
        self._count -= min(n, latents.shape[1])
        return latents[:, :n].to(self._like.device, self._like.dtype)

    def _vocode(self, frames: torch.Tensor) -> np.ndarray:
        if not frames.shape[1]:
            return np.zeros(0, np.float32)
        return self.vocoder.push(frames).astype(np.float32)
