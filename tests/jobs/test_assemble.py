"""Assembling sentence files into a book: layout, loudness, formats, tags, subtitles."""

from __future__ import annotations

import io
import math
import re
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from lowvox.audio import loudness as L
from lowvox.audio.formats import format_from_path, get_format
from lowvox.audio.loudness import LoudnessMeter, integrated_loudness
from lowvox.errors import InvalidRequest, LowvoxError, UnsupportedFormat
from lowvox.jobs import assemble as A
from lowvox.jobs.assemble import (
    Piece,
    assemble,
    layout,
    write_srt,
    write_vtt,
)
from lowvox.jobs.model import BookMeta, Pauses

RATE = 24000
PAUSES = Pauses(sentence=0.3, paragraph=0.7, chapter=1.5)
# Loudness of a chapter after normalisation, as the standard's meter reads it.
LU_TOLERANCE = 0.5
# 16-bit output: one quantisation step, plus the input file's own.
PCM_TOLERANCE = 2.0 / 32768


def _speechy(seconds: float, amplitude: float, seed: int) -> np.ndarray:
    """Noise in syllable-like bursts (~5 a second), peaking near `amplitude`."""
    rng = np.random.default_rng(seed)
    n = round(seconds * RATE)
    t = np.arange(n) / RATE
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t + seed), 0, None) ** 2
    # Noise clipped at 3 sigma: a crest factor like speech's, so that bringing a chapter
    # to -18 LUFS is not held back by the peak limit.
    x = np.clip(rng.standard_normal(n), -3, 3) * envelope * amplitude / 3
    return np.clip(x, -1, 1).astype(np.float32)


def _write_piece(folder: Path, index: int, chapter: int, paragraph: int, x: np.ndarray, **kw):
    path = folder / f"{index:05d}.flac"
    sf.write(path, x, RATE, subtype="PCM_16")
    x16, _ = sf.read(path, dtype="float32")  # what the file holds, after 16-bit rounding
    piece = Piece(index, chapter, paragraph, f"Sentence number {index}.", path, len(x), **kw)
    return piece, x16


@pytest.fixture
def book(tmp_path: Path):
    """Three chapters at different levels: (pieces, their audio)."""
    folder = tmp_path / "sentences"
    folder.mkdir()
    plan = [(0, 0, 0.2), (0, 0, 0.2), (0, 1, 0.2), (1, 0, 0.9), (1, 1, 0.9), (2, 0, 0.05)]
    pieces, audio = [], []
    for i, (chapter, paragraph, amp) in enumerate(plan):
        extra = {"pause_after": 0.25} if i == 1 else {}
        piece, x = _write_piece(
            folder, i, chapter, paragraph, _speechy(1.5 + 0.2 * i, amp, i), **extra
        )
        pieces.append(piece)
        audio.append(x)
    return pieces, audio


def _jpeg(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as c:
        s = c.add_stream("mjpeg", rate=1)
        s.width, s.height, s.pix_fmt = width, height, "yuvj420p"
        pixels = np.full((height, width, 3), 120, np.uint8)
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuvj420p")
        for p in [*s.encode(frame), *s.encode(None)]:
            c.mux(p)
    return buf.getvalue()


META = BookMeta(
    title="A Test Book",
    author="Ann Author",
    language="en",
    chapter_titles=("Opening", "Middle", "The End"),
)


def _decode(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        rate = stream.codec_context.sample_rate
        resampler = av.AudioResampler(format="flt", layout="mono")
        parts = [
            f.to_ndarray().reshape(-1) for fr in c.decode(stream) for f in resampler.resample(fr)
        ]
    return np.concatenate(parts), rate


def _chapters(path: Path) -> list[tuple[float, str]]:
    with av.open(str(path)) as c:
        return [
            (float(ch["start"] * ch["time_base"]), ch["metadata"]["title"]) for ch in c.chapters()
        ]


# -- layout ----------------------------------------------------------------------------


def _piece(index, chapter, paragraph, samples, **kw):
    return Piece(
        index, chapter, paragraph, f"s{index}", Path(f"/nowhere/{index}.flac"), samples, **kw
    )


def test_layout_gaps_by_sentence_paragraph_and_chapter() -> None:
    pauses = Pauses(sentence=0.25, paragraph=0.5, chapter=2.0)
    pieces = [
        _piece(0, 0, 0, 1000),
        _piece(1, 0, 0, 500),  # same paragraph: 0.25 s
        _piece(2, 0, 1, 700, pause_before=0.1),  # new paragraph: 0.5 + 0.1
        _piece(3, 1, 0, 300, pause_after=0.05),  # new chapter: 2.0
        _piece(4, 1, 0, 100),  # 0.25 + 0.05 (pause_after of the one before)
    ]
    t = layout(pieces, pauses, 1000)
    assert t.offsets == (0, 1250, 2350, 5050, 5650)
    assert t.samples == 5750 and t.duration == 5.75
    assert [(c.start, c.end) for c in t.cues] == [
        (0.0, 1.0),
        (1.25, 1.75),
        (2.35, 3.05),
        (5.05, 5.35),
        (5.65, 5.75),
    ]
    assert [c.index for c in t.cues] == [0, 1, 2, 3, 4]
    assert [(s.chapter, s.first, s.stop) for s in t.chapters] == [(0, 0, 3050), (1, 5050, 5750)]
    assert t.chapter_starts == (0.0, 5.05)


def test_layout_is_sample_exact_at_awkward_rates() -> None:
    # 0.35 s at 22050 Hz is 7717.5 samples: each gap rounds once, cues follow exactly.
    pieces = [_piece(i, 0, 0, 1001 + i) for i in range(50)]
    t = layout(pieces, Pauses(sentence=0.35), 22050)
    gap = round(0.35 * 22050)
    for i in range(1, 50):
        assert t.offsets[i] == t.offsets[i - 1] + pieces[i - 1].samples + gap
        assert t.cues[i].start == t.offsets[i] / 22050
    assert t.samples == t.offsets[-1] + pieces[-1].samples


def test_layout_rejects_interleaved_chapters_and_handles_nothing() -> None:
    with pytest.raises(InvalidRequest, match="reading order"):
        layout([_piece(0, 0, 0, 10), _piece(1, 1, 0, 10), _piece(2, 0, 0, 10)], Pauses(), RATE)
    empty = layout([], Pauses(), RATE)
    assert empty.samples == 0 and empty.cues == () and empty.chapters == ()


# -- loudness --------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [48000, 24000])
def test_full_scale_997hz_sine_reads_minus_3_01_lufs(rate: int) -> None:
    t = np.arange(5 * rate) / rate
    level = integrated_loudness(np.sin(2 * np.pi * 997 * t), rate)
    # The standard's calibration point is at 48 kHz; at 24 kHz the bilinear filter
    # design moves the 997 Hz gain by a few hundredths of a dB.
    assert level == pytest.approx(-3.01, abs=0.01 if rate == 48000 else 0.05)


def test_k_filter_matches_scipy_with_state_carried_across_pieces() -> None:
    signal = pytest.importorskip("scipy.signal")
    b, a = L._k_weighting(RATE)
    x = np.random.default_rng(0).standard_normal(70_000)
    f = L._IirFilter(b, a)
    cuts = [0, 1, 777, 20_000, 20_001, 70_000]  # uneven pieces, one of a single sample
    y = np.concatenate([f(x[i:j]) for i, j in zip(cuts, cuts[1:], strict=False)])
    np.testing.assert_allclose(y, signal.lfilter(b, a, x), atol=1e-9)


def test_meter_streamed_equals_whole_and_gates_silence() -> None:
    x = np.concatenate([_speechy(3.0, 0.3, 1), np.zeros(RATE * 4, np.float32), _speechy(2, 0.3, 2)])
    meter = LoudnessMeter(RATE)
    for i in range(0, len(x), 3333):
        meter.push(x[i : i + 3333])
    assert meter.loudness == pytest.approx(integrated_loudness(x, RATE), abs=1e-9)
    # Digital silence falls under the absolute gate: it does not drag the level down.
    speech_only = np.concatenate([_speechy(3.0, 0.3, 1), _speechy(2, 0.3, 2)])
    assert meter.loudness == pytest.approx(integrated_loudness(speech_only, RATE), abs=0.3)
    assert integrated_loudness(np.zeros(RATE), RATE) == -math.inf
    assert meter.peak == pytest.approx(float(np.abs(x).max()))


def test_meter_agrees_with_pyloudnorm() -> None:
    pyln = pytest.importorskip("pyloudnorm")
    for rate, tolerance in ((48000, 0.1), (24000, 0.15)):
        rng = np.random.default_rng(rate)
        t = np.arange(8 * rate) / rate
        x = rng.standard_normal(len(t)) * 0.1 * (np.sin(2 * np.pi * 1.3 * t) > -0.3)
        ours = integrated_loudness(x, rate)
        theirs = pyln.Meter(rate).integrated_loudness(x)
        # pyloudnorm's filter is an approximation of the standard's (and more so away
        # from 48 kHz); ours follows libebur128's design.
        assert abs(ours - theirs) < tolerance, (rate, ours, theirs)


# -- writing the book ------------------------------------------------------------------


def test_wav_book_places_every_sentence_at_its_cue_at_its_chapter_gain(tmp_path, book) -> None:
    pieces, audio = book
    out = tmp_path / "out" / "book.wav"
    timeline = assemble(pieces, out, "wav", meta=META, pauses=PAUSES, sample_rate=RATE)
    y, rate = sf.read(out, dtype="float32")
    assert rate == RATE and len(y) == timeline.samples
    expected_samples = sum(p.samples for p in pieces) + sum(
        round(A._gap_seconds(a, b, PAUSES) * RATE) for a, b in zip(pieces, pieces[1:], strict=False)
    )
    assert timeline.samples == expected_samples

    silence = np.ones(len(y), bool)
    gains = {}
    for piece, x, offset in zip(pieces, audio, timeline.offsets, strict=True):
        start = round(timeline.cues[pieces.index(piece)].start * RATE)
        assert start == offset
        got = y[offset : offset + piece.samples]
        gain = gains.setdefault(piece.chapter, float(np.dot(got, x) / np.dot(x, x)))
        np.testing.assert_allclose(got, gain * x, atol=PCM_TOLERANCE)
        silence[offset : offset + piece.samples] = False
    assert not y[silence].any()  # the gaps are digital silence

    for span in timeline.chapters:
        level = integrated_loudness(y[span.first : span.stop], RATE)
        assert abs(level - -18.0) < LU_TOLERANCE, (span.chapter, level)
    # The loud chapter was turned down and the quiet one up.
    assert gains[1] < 1.0 < gains[2]


def test_chapter_loudness_by_pyloudnorm(tmp_path, book) -> None:
    pyln = pytest.importorskip("pyloudnorm")
    pieces, _ = book
    out = tmp_path / "book.flac"
    timeline = assemble(pieces, out, meta=META, pauses=PAUSES, sample_rate=RATE, target_lufs=-20)
    y, _ = sf.read(out, dtype="float64")
    for span in timeline.chapters:
        level = pyln.Meter(RATE).integrated_loudness(y[span.first : span.stop])
        assert abs(level - -20.0) < LU_TOLERANCE, (span.chapter, level)


def test_gain_is_held_back_by_the_peak_limit(tmp_path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    x = _speechy(3.0, 0.02, 5)
    x[RATE] = 0.5  # one click: lifting the quiet speech to -16 LUFS would clip it
    piece, _ = _write_piece(folder, 0, 0, 0, x)
    out = tmp_path / "book.wav"
    assemble([piece], out, meta=META, sample_rate=RATE, target_lufs=-16.0, max_peak_dbfs=-1.0)
    y, _ = sf.read(out, dtype="float32")
    assert np.abs(y).max() <= 10 ** (-1 / 20) + PCM_TOLERANCE
    assert np.abs(y).max() > 10 ** (-1 / 20) - 0.01  # the limit, not less
    assert integrated_loudness(y, RATE) < -17.0


def test_no_normalisation_keeps_the_samples(tmp_path, book) -> None:
    pieces, audio = book
    out = tmp_path / "book.flac"
    timeline = assemble(pieces, out, meta=META, pauses=PAUSES, sample_rate=RATE, target_lufs=None)
    y, _ = sf.read(out, dtype="float32")
    for piece, x, offset in zip(pieces, audio, timeline.offsets, strict=True):
        np.testing.assert_allclose(y[offset : offset + piece.samples], x, atol=1e-6)


def test_m4b_has_chapters_tags_and_cover(tmp_path, book) -> None:
    pieces, _ = book
    cover = _jpeg()
    meta = BookMeta(**{**META.__dict__, "cover": cover, "cover_type": "image/jpeg"})
    out = tmp_path / "book.m4b"
    timeline = assemble(pieces, out, "m4b", meta=meta, pauses=PAUSES, sample_rate=RATE)
    assert out.read_bytes()[4:12] == b"ftypM4B "
    with av.open(str(out)) as c:
        assert abs(c.duration / 1e6 - timeline.duration) < 0.05
        assert c.metadata["title"] == "A Test Book"
        assert c.metadata["artist"] == "Ann Author"
        assert c.metadata["album"] == "A Test Book"
        pictures = [s for s in c.streams if s.disposition & av.stream.Disposition.attached_pic]
        assert len(pictures) == 1
        assert bytes(next(c.demux(pictures[0]))) == cover
    marks = _chapters(out)
    assert [title for _, title in marks] == ["Opening", "Middle", "The End"]
    for (start, _), span in zip(marks, timeline.chapters, strict=True):
        assert start == pytest.approx(span.start, abs=0.001)
    y, rate = _decode(out)
    assert rate == RATE and abs(len(y) / rate - timeline.duration) < 0.05


def test_png_cover_and_a_broken_one(tmp_path, book) -> None:
    pieces, _ = book
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 8, 8, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")
        for p in [*s.encode(frame), *s.encode(None)]:
            c.mux(p)
    png = buf.getvalue()
    for cover, pictures in ((png, 1), (b"not an image at all", 0)):
        meta = BookMeta(**{**META.__dict__, "cover": cover, "cover_type": "image/png"})
        out = tmp_path / f"book{pictures}.m4b"
        assemble(pieces[:2], out, meta=meta, pauses=PAUSES, sample_rate=RATE)
        with av.open(str(out)) as c:
            found = [s for s in c.streams if s.disposition & av.stream.Disposition.attached_pic]
            assert len(found) == pictures
            if pictures:
                assert bytes(next(c.demux(found[0]))) == png


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac"])
def test_other_formats_decode_to_the_book_length_with_chapters(tmp_path, book, fmt) -> None:
    pieces, _ = book
    out = tmp_path / f"book.{fmt}"
    timeline = assemble(pieces, out, fmt, meta=META, pauses=PAUSES, sample_rate=RATE)
    y, rate = _decode(out)
    assert abs(len(y) / rate - timeline.duration) < 0.05
    marks = _chapters(out)
    assert [title for _, title in marks] == ["Opening", "Middle", "The End"]
    for (start, _), span in zip(marks, timeline.chapters, strict=True):
        assert start == pytest.approx(span.start, abs=0.001)
    with av.open(str(out)) as c:
        tags = {**c.metadata, **c.streams.audio[0].metadata}
    assert tags["title"] == "A Test Book" and tags["artist"] == "Ann Author"


def test_chapter_file_is_the_chapter_as_in_the_book(tmp_path, book) -> None:
    pieces, _ = book
    whole = assemble(pieces, tmp_path / "book.wav", meta=META, pauses=PAUSES, sample_rate=RATE)
    y, _ = sf.read(tmp_path / "book.wav", dtype="float32")
    middle = [p for p in pieces if p.chapter == 1]
    out = tmp_path / "chapter-002.flac"
    timeline = assemble(middle, out, meta=META, pauses=PAUSES, sample_rate=RATE, chapter_track=True)
    z, _ = sf.read(out, dtype="float32")
    span = whole.chapters[1]
    np.testing.assert_allclose(z, y[span.first : span.stop], atol=PCM_TOLERANCE)
    assert timeline.cues[0].start == 0.0 and len(timeline.cues) == len(middle)
    with av.open(str(out)) as c:
        assert c.metadata["title"] == "Middle"
        assert c.metadata["album"] == "A Test Book"
        assert c.metadata["track"].startswith("2")
    with pytest.raises(InvalidRequest):
        assemble(pieces, tmp_path / "x.flac", meta=META, sample_rate=RATE, chapter_track=True)


def test_a_failure_midway_leaves_no_file_and_keeps_the_old_one(tmp_path, book) -> None:
    pieces, _ = book
    out = tmp_path / "out" / "book.m4b"
    bad = list(pieces)
    bad[4] = Piece(**{**pieces[4].__dict__, "samples": pieces[4].samples + 1})
    with pytest.raises(LowvoxError, match="samples"):
        assemble(bad, out, meta=META, pauses=PAUSES, sample_rate=RATE)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []

    assemble(pieces, out, meta=META, pauses=PAUSES, sample_rate=RATE)
    before = out.read_bytes()
    missing = list(pieces)
    missing[5] = Piece(**{**pieces[5].__dict__, "path": tmp_path / "gone.flac"})
    for target_lufs in (None, -18.0):  # failing in the writing pass and in the measuring one
        with pytest.raises(LowvoxError, match="sentence 5"):
            assemble(
                missing, out, meta=META, pauses=PAUSES, sample_rate=RATE, target_lufs=target_lufs
            )
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["book.m4b"]


def test_memory_stays_flat_for_a_long_book(tmp_path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    x = _speechy(2.0, 0.2, 3)
    sf.write(folder / "one.flac", x, RATE, subtype="PCM_16")
    # 100 sentences, 4 minutes: 23 MB of float32 if it were held at once.
    pieces = [Piece(i, i // 50, i // 5, "s", folder / "one.flac", len(x)) for i in range(100)]
    tracemalloc.start()
    try:
        assemble(pieces, tmp_path / "book.flac", meta=META, sample_rate=RATE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak


def test_formats(tmp_path, book) -> None:
    assert format_from_path("x.m4b") == "m4b"
    assert get_format("M4B").media_type == "audio/mp4" and not get_format("m4b").streamable
    pieces, _ = book
    with pytest.raises(UnsupportedFormat):
        assemble(pieces, tmp_path / "book.aac", meta=META, sample_rate=RATE)
    with pytest.raises(InvalidRequest, match="nothing"):
        assemble([], tmp_path / "book.wav", meta=META, sample_rate=RATE)
    assert not any(tmp_path.glob("book.*"))


# -- subtitles -------------------------------------------------------------------------


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _parse_time(stamp: str) -> int:
    h, m, s, ms = map(int, re.split(r"[:.,]", stamp))
    return ((h * 60 + m) * 60 + s) * 1000 + ms


def test_srt_and_vtt_follow_the_timeline(tmp_path, book) -> None:
    pieces, _ = book
    timeline = layout(pieces, PAUSES, RATE)
    write_srt(timeline.cues, tmp_path / "b.srt")
    write_vtt(timeline.cues, tmp_path / "b.vtt")
    srt = (tmp_path / "b.srt").read_text("utf-8")
    vtt = (tmp_path / "b.vtt").read_text("utf-8")

    blocks = srt.strip().split("\n\n")
    assert len(blocks) == len(timeline.cues)
    for number, (block, cue) in enumerate(zip(blocks, timeline.cues, strict=True), start=1):
        index, timing, text = block.split("\n")
        start, end = timing.split(" --> ")
        assert int(index) == number and text == cue.text
        assert re.fullmatch(r"\d\d:\d\d:\d\d,\d\d\d", start)
        assert (_parse_time(start), _parse_time(end)) == (_ms(cue.start), _ms(cue.end))

    assert vtt.startswith("WEBVTT\n\n")
    blocks = vtt.strip().split("\n\n")[1:]
    assert len(blocks) == len(timeline.cues)
    for block, cue in zip(blocks, timeline.cues, strict=True):
        timing, text = block.split("\n")
        start, end = timing.split(" --> ")
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d", start) and text == cue.text
        assert (_parse_time(start), _parse_time(end)) == (_ms(cue.start), _ms(cue.end))


def test_subtitle_text_is_made_safe(tmp_path) -> None:
    cues = [
        A.Cue(0, 0.0, 1.0, "She wrote: a --> b\n\nthen <i>stopped</i> & left."),
        A.Cue(1, 3723.4567, 3725.0, "Last."),
    ]
    write_srt(cues, tmp_path / "s.srt")
    write_vtt(cues, tmp_path / "s.vtt")
    srt = (tmp_path / "s.srt").read_text("utf-8")
    vtt = (tmp_path / "s.vtt").read_text("utf-8")
    assert "She wrote: a -> b then <i>stopped</i> & left.\n" in srt
    assert "She wrote: a -&gt; b then &lt;i&gt;stopped&lt;/i&gt; &amp; left.\n" in vtt
    assert "01:02:03,457 --> 01:02:05,000" in srt
    assert "01:02:03.457 --> 01:02:05.000" in vtt
    assert len(srt.strip().split("\n\n")) == 2 and len(vtt.strip().split("\n\n")) == 3
