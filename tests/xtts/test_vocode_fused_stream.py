"""The fused vocoder path keeps each layer group's context between pieces: every frame is
vocoded about once, in pieces of a few fixed lengths, and the audio is that of the whole
utterance at once (fp32: the same maths in another order), however it is cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowvox.engines.xtts.vocode import (
    FUSED_PIECE_FRAMES,
    RowVocoder,
    stretch_latents,
    vocode_in_windows,
)
from tests.tolerance import FP32_REORDER
from tests.xtts.test_voice_helpers import random_decoder


@pytest.fixture(scope="module")
def decoder():
    decoder = random_decoder(seed=7)
    decoder.waveform_decoder.fused = True  # this small decoder would take the plain path
    return decoder


@pytest.fixture(scope="module")
def speaker() -> torch.Tensor:
    torch.manual_seed(2)
    return F.normalize(torch.randn(1, 24, 1), dim=1)


def whole(decoder, latents, speaker) -> np.ndarray:
    """The plain (unfused) generator on the whole utterance: the reference."""
    gen = decoder.waveform_decoder
    try:
        gen.fused = False
        with torch.inference_mode():
            return decoder(latents, speaker)[0, 0].numpy()
    finally:
        gen.fused = True


def tail_piece(decoder, speaker) -> int:
    vocoder = RowVocoder(decoder, speaker).vocoder
    assert vocoder._fused_stream() is not None
    return vocoder._tail_piece


@pytest.mark.parametrize("n", [1, 9, 40, 97])
@pytest.mark.parametrize("window", [24, 40, 72, 208])  # 208: pieces of FUSED_PIECE_FRAMES
def test_pieces_equal_the_whole_utterance(decoder, speaker, n, window) -> None:
    torch.manual_seed(n)
    latents = torch.randn(1, n, 48)
    expected = whole(decoder, latents, speaker)
    sizes: list[int] = []
    with torch.inference_mode():
        real = decoder.waveform_decoder.fused_stream(speaker)
    assert real is not None
    push = type(real).push

    def spy(stream, x, valid, total=None):
        sizes.append(x.shape[-1])
        return push(stream, x, valid, total)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(type(real), "push", spy)
        audio = vocode_in_windows(decoder, latents, speaker, window=window)
    assert audio.dtype == np.float32 and audio.shape == expected.shape
    FP32_REORDER.check(audio, expected)  # exact but for the order of the sums
    need = decoder.num_frames(n) + real.tail_frames
    piece = min(window, FUSED_PIECE_FRAMES)
    if need <= piece:
        assert sizes == [need]  # one piece, like the whole generator
    else:
        assert set(sizes) <= {piece, tail_piece(decoder, speaker)}
        assert sum(sizes) < need + piece  # each frame about once


@pytest.mark.parametrize(
    ("first", "chunk", "step", "speed"),
    [(12, 20, 1, 1.0), (5, 9, 7, 1.0), (1, 1, 2, 1.0), (12, 20, 3, 1.3)],
)
def test_streamed_pieces_equal_the_whole_utterance(decoder, speaker, first, chunk, step, speed):
    torch.manual_seed(first + chunk)
    latents = torch.randn(1, 83, 48)
    vocoder = RowVocoder(decoder, speaker, speed, first, chunk)
    with torch.inference_mode():
        parts = [vocoder.push(latents[:, i : i + step]) for i in range(0, 83, step)]
        parts.append(vocoder.finish())
    streamed = np.concatenate(parts)
    stretched = stretch_latents(latents, speed)
    expected = whole(decoder, stretched, speaker)
    assert streamed.shape == expected.shape
    FP32_REORDER.check(streamed, expected)
    sizes = vocoder.vocoder.frames_vocoded
    stream = vocoder.vocoder._stream
    assert stream is not None
    # Every frame once: beyond the frames, the padding of a piece or two at the end, and a
    # frame per chunk where chunks differ by one (each is padded to the widest).
    frames = decoder.num_frames(stretched.shape[1])
    assert sum(sizes) <= frames + stream.tail_frames + 2 * max(sizes) + len(sizes)
    # A few fixed lengths: the first piece, the chunks' (the widest so far, which may grow
    # by a frame of interpolation rounding) and the tail piece.
    assert len(set(sizes[1:])) <= 3, sizes


@pytest.mark.parametrize("speed", [1.0, 1.3])
def test_the_end_of_a_sentence_is_vocoded_once_with_the_end_known(decoder, speaker, speed):
    """`finish` vocodes a sentence's last latents with its end: not first a piece of
    mostly padding for the frames they make stable, then the end (on the released vocoder
    that piece cost ~0.2 s a sentence, a tenth of a 40-token one)."""
    from lowvox.engines.xtts import hifigan

    totals: list[int | None] = []
    real = hifigan.FusedStream.push

    def spy(stream, x, valid, total=None):
        totals.append(total)
        return real(stream, x, valid, total)

    torch.manual_seed(4)
    latents = torch.randn(1, 40, 48)
    vocoder = RowVocoder(decoder, speaker, speed, 12, 20)
    with torch.inference_mode(), pytest.MonkeyPatch.context() as m:
        m.setattr(hifigan.FusedStream, "push", spy)
        for i in range(40):
            vocoder.push(latents[:, i : i + 1])
        chunks = len(totals)  # after 12 and 32 latents
        vocoder.finish()
    assert chunks == 2 and all(t is None for t in totals[:chunks])
    assert len(totals) > chunks and all(t is not None for t in totals[chunks:])


@pytest.mark.parametrize("speed", [1.0, 1.3])
def test_held_pushes_make_the_same_audio(decoder, speaker, speed) -> None:
    """Holding a row's vocoding moves no chunk boundary: the audio is the same, exactly."""
    latents = torch.randn(1, 75, 48)
    plain = RowVocoder(decoder, speaker, speed, 12, 20)
    held = RowVocoder(decoder, speaker, speed, 12, 20)
    with torch.inference_mode():
        a = [plain.push(latents[:, i : i + 1]) for i in range(75)] + [plain.finish()]
        hold = [10 <= i < 47 or i >= 60 for i in range(75)]
        b = [held.push(latents[:, i : i + 1], hold=h) for i, h in enumerate(hold)]
        b.append(held.finish())
    assert held.vocoder._stream is not None  # the fused path served
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))


def test_first_audio_comes_as_soon_as_before(decoder, speaker) -> None:
    """The fused path emits the first chunk at the same latent as the windowed one."""
    latents = torch.randn(1, 30, 48)
    vocoder = RowVocoder(decoder, speaker)
    sizes = [vocoder.push(latents[:, i : i + 1]).size for i in range(12)]
    assert all(s == 0 for s in sizes[:-1]) and sizes[-1] > 0


def test_each_convolution_is_packed_for_the_length_it_runs_at(decoder, speaker) -> None:
    """oneDNN packs a weight for the input length it is told; a call of a length that
    wants another layout reorders the whole weight on every call (conv_pre of the released
    vocoder, packed for 4096 samples and called with ~100, ran ~20x slower). Each packed
    convolution is told about what a piece of `FUSED_PIECE_FRAMES` gives it."""
    from lowvox.engines.xtts import hifigan

    seen: dict[int, list[int]] = {}
    packed: dict[int, hifigan._PackedConv] = {}
    cls = hifigan._PackedConv
    call, plus, add_to = cls.__call__, cls.plus, cls.add_to

    def note(conv, x) -> None:
        packed[id(conv)] = conv
        seen.setdefault(id(conv), []).append(x.shape[-1])

    def spy_call(conv, x, *args, **kwargs):
        note(conv, x)
        return call(conv, x, *args, **kwargs)

    def spy_plus(conv, x, other):
        note(conv, x)
        return plus(conv, x, other)

    def spy_add_to(conv, other, x):
        note(conv, x)
        return add_to(conv, other, x)

    torch.manual_seed(5)
    latents = torch.randn(1, 120, 48)  # several whole pieces
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cls, "__call__", spy_call)
        m.setattr(cls, "plus", spy_plus)
        m.setattr(cls, "add_to", spy_add_to)
        vocode_in_windows(decoder, latents, speaker, window=208)
    assert len(packed) >= 2 + 2 * len(decoder.waveform_decoder.resblocks)
    for key, lengths in seen.items():
        common = max(set(lengths), key=lengths.count)  # a whole piece's
        told = packed[key].length
        assert abs(told - common) <= 0.25 * common, (told, sorted(set(lengths)))


def test_a_recurring_input_length_gets_its_own_packing_where_oneDNN_pads_differently() -> None:
    """A stream's first and last pieces are shorter than the length a convolution is
    packed for; where oneDNN wants the weight padded differently for them it would reorder
    it on every call (slowly). A length seen twice is packed for, kept only if sized
    differently from every packing kept, at most `MAX_EXTRA_PACKINGS` copies; one-off
    lengths keep nothing. Whichever weight serves a call, the result is the same."""
    from lowvox.engines.xtts.hifigan import _MAX_TRACKED_LENGTHS, MAX_EXTRA_PACKINGS, _PackedConv

    torch.manual_seed(3)
    weight, bias = torch.randn(256, 256, 3) / 28, torch.randn(256)
    conv = _PackedConv(weight, bias, torch.float32, 1, 770)
    lengths = [30, 176, 424, 720, 1500, 3000]
    xs = {
        n: torch.randn(1, 256, 1, n).contiguous(memory_format=torch.channels_last) for n in lengths
    }
    with torch.inference_mode():
        first = {n: conv(xs[n]) for n in lengths}  # each seen once: the primary packing
        assert conv.extra_packings() == 0 and set(conv._packed) == {770}
        for n in lengths:
            ref = F.conv1d(xs[n][:, :, 0], weight, bias)
            FP32_REORDER.check(first[n][:, :, 0], ref)
            for _ in range(2):
                assert torch.equal(conv(xs[n]), first[n])
        assert set(lengths) <= set(conv._packed)
        kept = {id(w): w for w in conv._packed.values()}.values()
        sizes = [torch.ops.mkldnn._nbytes(w) for w in kept]
        assert len(sizes) == len(set(sizes))  # copies only where the padding differs
        assert conv.extra_packings() <= MAX_EXTRA_PACKINGS

        one_off = _PackedConv(weight, bias, torch.float32, 1, 770)
        for n in range(100, 140):  # whole utterances: every length new
            one_off(torch.randn(1, 256, 1, n).contiguous(memory_format=torch.channels_last))
        assert one_off.extra_packings() == 0 and set(one_off._packed) == {770}
        assert len(one_off._seen) <= _MAX_TRACKED_LENGTHS
