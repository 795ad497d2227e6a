"""Laying a job's sentence files out into chapters and a book, with subtitles.

Every spoken sentence is a `Piece`: a mono FLAC file at the job's sample rate. `layout` places
them on one sample-exact timeline (a pause of the configured length between sentences,
paragraphs and chapters, plus any `[pause:x]` the text asked for); `assemble` writes that
timeline as one file of any book format, reading the sentence files one at a time and encoding
as it goes, so a ten-hour book costs no more memory than a sentence.

Loudness follows ITU-R BS.1770-4 (K-weighting, 400 ms blocks every 100 ms, absolute gate at
-70 LUFS, relative gate 10 LU below). Each chapter is measured on its own, in a first pass
over its sentence files, and given the one gain that brings it to the target, held back where
that would lift its sample peak over the limit; a chapter file and the same chapter inside the
book therefore sound the same. Chapter marks (m4b, mp3, opus, flac), tags and the cover are
written by FFmpeg's muxers through PyAV.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import soundfile as sf

from lowvox.audio.encode import output_rate
from lowvox.audio.formats import format_from_path, get_format
from lowvox.audio.loudness import LoudnessMeter, chapter_gain
from lowvox.errors import InvalidRequest, LowvoxError, UnsupportedFormat
from lowvox.files import atomic_path, write_atomic
from lowvox.jobs.model import BookMeta, Pauses

if TYPE_CHECKING:
    from av.container.core import Chapter  # a TypedDict of the stubs only

__all__ = [
    "BOOK_FORMATS",
    "ChapterSpan",
    "Cue",
    "DamagedSentence",
    "Piece",
    "Timeline",
    "assemble",
    "layout",
    "write_srt",
    "write_vtt",
]

logger = logging.getLogger(__name__)

_DEFAULT_PAUSES = Pauses()


# -- the timeline ---------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One spoken sentence: where it sits in the book, its FLAC file (mono, at the job's
    sample rate) and its length in samples. `pause_before`/`pause_after` are extra seconds
    of silence around it, on top of the usual gaps."""

    index: int
    chapter: int
    paragraph: int
    text: str
    path: Path
    samples: int
    pause_before: float = 0.0
    pause_after: float = 0.0


@dataclass(frozen=True)
class Cue:
    """A sentence's place in the output, in seconds: exactly its samples, no silence."""

    index: int  # the piece's index
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class ChapterSpan:
    """A chapter's audio in the output: from its first sentence's first sample to its last
    sentence's last, in samples (`first`, `stop`) and seconds."""

    chapter: int
    first: int
    stop: int
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """Where every sentence and chapter lies in an output file, sample-exact.

    The file starts with its first sentence and ends with its last; silence lies only
    between sentences. `offsets[i]` is piece i's first sample."""

    cues: tuple[Cue, ...]
    chapters: tuple[ChapterSpan, ...]
    offsets: tuple[int, ...]
    samples: int
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate

    @property
    def chapter_starts(self) -> tuple[float, ...]:
        return tuple(c.start for c in self.chapters)


def _gap_seconds(before: Piece, after: Piece, pauses: Pauses) -> float:
    if after.chapter != before.chapter:
        base = pauses.chapter
    elif after.paragraph != before.paragraph:
        base = pauses.paragraph
    else:
        base = pauses.sentence
    return max(0.0, base + before.pause_after + after.pause_before)


def layout(pieces: Sequence[Piece], pauses: Pauses, sample_rate: int) -> Timeline:
    """Place `pieces` (in reading order) on one timeline; no audio is read.

    Between two sentences lies `pauses.sentence`, `pauses.paragraph` when the paragraph
    changes or `pauses.chapter` when the chapter does, plus the first one's `pause_after`
    and the second one's `pause_before`; each gap is rounded to whole samples once, so
    positions are exact. A chapter's pieces must be contiguous."""
    if sample_rate <= 0:
        raise InvalidRequest(f"sample rate must be positive, got {sample_rate}")
    offsets: list[int] = []
    cues: list[Cue] = []
    spans: list[ChapterSpan] = []
    seen: set[int] = set()
    pos = 0
    chapter_first = 0
    for i, piece in enumerate(pieces):
        if piece.samples < 0:
            raise InvalidRequest(f"sentence {piece.index} has a negative length")
        if i > 0:
            prev = pieces[i - 1]
            if piece.chapter != prev.chapter:
                spans.append(_span(prev.chapter, chapter_first, pos, sample_rate))
                chapter_first = -1
            pos += round(_gap_seconds(prev, piece, pauses) * sample_rate)
        if i == 0 or chapter_first < 0:
            if piece.chapter in seen:
                raise InvalidRequest(
                    f"sentence {piece.index}: chapter {piece.chapter} continues after another "
                    "chapter began (pieces must be in reading order)"
                )
            seen.add(piece.chapter)
            chapter_first = pos
        offsets.append(pos)
        cues.append(
            Cue(piece.index, pos / sample_rate, (pos + piece.samples) / sample_rate, piece.text)
        )
        pos += piece.samples
    if pieces:
        spans.append(_span(pieces[-1].chapter, chapter_first, pos, sample_rate))
    return Timeline(tuple(cues), tuple(spans), tuple(offsets), pos, sample_rate)


def _span(chapter: int, first: int, stop: int, rate: int) -> ChapterSpan:
    return ChapterSpan(chapter, first, stop, first / rate, stop / rate)


# -- reading the sentence files --------------------------------------------------------

_SILENCE_CHUNK_S = 10  # silence is made in pieces of at most this many seconds


class DamagedSentence(LowvoxError):
    """A sentence's file is missing or is not the audio the job recorded."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _read_piece(piece: Piece, sample_rate: int) -> np.ndarray:
    try:
        data, rate = sf.read(piece.path, dtype="float32", always_2d=True)  # [N, C]
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise DamagedSentence(
            piece.index, f"cannot read the audio of sentence {piece.index}: {e}"
        ) from e
    if rate != sample_rate:
        raise DamagedSentence(
            piece.index,
            f"sentence {piece.index} is at {rate} Hz, the job's audio at {sample_rate} Hz",
        )
    if data.shape[0] != piece.samples:
        raise DamagedSentence(
            piece.index,
            f"sentence {piece.index} has {data.shape[0]} samples, the job recorded {piece.samples}",
        )
    return data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)


def _silence(n: int, rate: int) -> Iterator[np.ndarray]:
    chunk = _SILENCE_CHUNK_S * rate
    for start in range(0, n, chunk):
        yield np.zeros(min(chunk, n - start), np.float32)


def _audio(
    pieces: Sequence[Piece], timeline: Timeline, gains: dict[int, float] | None = None
) -> Iterator[np.ndarray]:
    """The timeline's samples in order, one sentence or stretch of silence at a time, each
    sentence scaled by its chapter's gain."""
    rate = timeline.sample_rate
    pos = 0
    for piece, offset in zip(pieces, timeline.offsets, strict=True):
        yield from _silence(offset - pos, rate)
        x = _read_piece(piece, rate)
        gain = 1.0 if gains is None else gains.get(piece.chapter, 1.0)
        yield x if gain == 1.0 else x * np.float32(gain)
        pos = offset + piece.samples


def _measure_gains(
    pieces: Sequence[Piece],
    pauses: Pauses,
    sample_rate: int,
    target_lufs: float,
    max_peak_dbfs: float,
) -> dict[int, float]:
    """Each chapter's gain, from a streamed measurement of that chapter alone."""
    gains: dict[int, float] = {}
    for chapter, group in _chapters(pieces):
        meter = LoudnessMeter(sample_rate)
        for x in _audio(group, layout(group, pauses, sample_rate)):
            meter.push(x)
        gains[chapter] = chapter_gain(meter.loudness, meter.peak, target_lufs, max_peak_dbfs)
        logger.debug(
            "chapter %d: %.2f LUFS, peak %.3f, gain %+.2f dB",
            chapter,
            meter.loudness,
            meter.peak,
            20.0 * math.log10(gains[chapter]),
        )
    return gains


def _chapters(pieces: Sequence[Piece]) -> list[tuple[int, list[Piece]]]:
    groups: list[tuple[int, list[Piece]]] = []
    for piece in pieces:
        if not groups or groups[-1][0] != piece.chapter:
            groups.append((piece.chapter, []))
        groups[-1][1].append(piece)
    return groups


# -- writing the output ----------------------------------------------------------------


@dataclass(frozen=True)
class _BookFormat:
    """How a book format is written with FFmpeg."""

    muxer: str
    codec: str
    sample_format: str
    rate_rule: str  # the lowvox format whose output-rate rule applies
    bit_rate: int | None = None
    options: tuple[tuple[str, str], ...] = ()
    cover: str = "stream"  # "stream": an attached picture; "tag": a Vorbis comment; "none"
    chapters: str = "container"  # "container": the muxer's own; "tag": Vorbis comments; "none"


_BOOK_SPECS: dict[str, _BookFormat] = {
    # RF64 past 4 GiB (a day of 24 kHz audio); a plain WAV below.
    "wav": _BookFormat(
        "wav", "pcm_s16le", "s16", "wav", options=(("rf64", "auto"),), cover="none", chapters="none"
    ),
    # Chapters as Vorbis comments (FFmpeg's FLAC muxer writes none of its own).
    "flac": _BookFormat("flac", "flac", "s16", "flac", chapters="tag"),
    # Chapters become ID3v2 CHAP frames, the cover an APIC frame.
    "mp3": _BookFormat("mp3", "libmp3lame", "s16p", "mp3", bit_rate=64_000),
    # Chapters and cover as Vorbis comments (CHAPTERnnn, METADATA_BLOCK_PICTURE), written
    # here: FFmpeg's Ogg muxer rounds chapter times to whole seconds (12.5 s -> 13 s).
    "opus": _BookFormat(
        "ogg", "libopus", "flt", "opus", bit_rate=48_000, cover="tag", chapters="tag"
    ),
    # AAC in MP4 with the audiobook brand; the index goes up front for players that
    # stream; chapters are written both as a QuickTime chapter track and as Nero 'chpl'.
    "m4b": _BookFormat(
        "mp4",
        "aac",
        "fltp",
        "m4a",
        bit_rate=64_000,
        options=(("brand", "M4B "), ("movflags", "+faststart")),
    ),
    "m4a": _BookFormat(
        "mp4",
        "aac",
        "fltp",
        "m4a",
        bit_rate=64_000,
        options=(("brand", "M4A "), ("movflags", "+faststart")),
    ),
}


# The formats a book or chapter file can be written in.
BOOK_FORMATS: tuple[str, ...] = tuple(_BOOK_SPECS)


def _book_format(fmt: str) -> _BookFormat:
    spec = _BOOK_SPECS.get(get_format(fmt).name)
    if spec is None:
        raise UnsupportedFormat(fmt, list(BOOK_FORMATS))
    return spec


@dataclass(frozen=True)
class _Cover:
    data: bytes
    codec: str  # "mjpeg" | "png"
    mime: str
    width: int
    height: int


def _probe_cover(data: bytes | None) -> _Cover | None:
    """The cover's codec and size, from FFmpeg's own probe; None (with a warning) for
    anything that is not a JPEG or PNG image: a bad cover should not cost the book."""
    if not data:
        return None
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            codec, width, height = stream.codec_context.name, stream.width, stream.height
    except (av.FFmpegError, IndexError, ValueError) as e:
        logger.warning("the cover is not a readable image (%s); writing the book without it", e)
        return None
    mime = {"mjpeg": "image/jpeg", "png": "image/png"}.get(codec)
    if mime is None:
        logger.warning("the cover is %s, not JPEG or PNG; writing the book without it", codec)
        return None
    return _Cover(data, codec, mime, width, height)


def _flac_picture(cover: _Cover) -> str:
    """A FLAC PICTURE block, base64: how Ogg files carry a cover (METADATA_BLOCK_PICTURE)."""
    mime = cover.mime.encode()
    block = (
        struct.pack(">II", 3, len(mime))  # 3: front cover
        + mime
        + struct.pack(">IIIIII", 0, cover.width, cover.height, 24, 0, len(cover.data))
        + cover.data
    )
    return base64.b64encode(block).decode("ascii")


@dataclass(frozen=True)
class _Tags:
    """What one output file says about itself."""

    metadata: dict[str, str]
    chapter_titles: tuple[str, ...]  # one per span of the timeline
    cover: bytes | None


def _book_tags(meta: BookMeta, timeline: Timeline) -> _Tags:
    metadata = {"title": meta.title, "album": meta.title, "genre": "Audiobook"}
    if meta.author:
        metadata.update(artist=meta.author, album_artist=meta.author)
    if meta.language:
        metadata["language"] = meta.language
    titles = tuple(_chapter_title(meta, span.chapter) for span in timeline.chapters)
    return _Tags(metadata, titles, meta.cover)


def _chapter_title(meta: BookMeta, chapter: int) -> str:
    if 0 <= chapter < len(meta.chapter_titles) and meta.chapter_titles[chapter].strip():
        return meta.chapter_titles[chapter].strip()
    return f"Chapter {chapter + 1}"


class _Writer:
    """Float mono samples in, one file of a book format out: resampler, encoder, muxer."""

    def __init__(
        self, path: Path, spec: _BookFormat, sample_rate: int, tags: _Tags, timeline: Timeline
    ) -> None:
        self._rate = sample_rate
        self._out_rate = output_rate(spec.rate_rule, sample_rate)
        self._time_base = Fraction(1, sample_rate)
        self._pts = 0
        cover = _probe_cover(tags.cover) if spec.cover != "none" else None
        self._container = av.open(str(path), "w", format=spec.muxer, options=dict(spec.options))
        try:
            self._container.metadata.update(tags.metadata)
            if cover is not None and spec.cover == "tag":
                self._container.metadata["METADATA_BLOCK_PICTURE"] = _flac_picture(cover)
            stream = self._container.add_stream(spec.codec, rate=self._out_rate, layout="mono")
            assert isinstance(stream, av.AudioStream)
            self._stream = stream
            self._stream.codec_context.format = spec.sample_format
            if spec.bit_rate is not None:
                self._stream.codec_context.bit_rate = spec.bit_rate
            self._cover_stream = None
            if cover is not None and spec.cover == "stream":
                self._cover_stream = self._container.add_mux_stream(
                    cover.codec, width=cover.width, height=cover.height
                )
                self._cover_stream.disposition = av.stream.Disposition.attached_pic
            marks = _chapter_marks(timeline, tags.chapter_titles)
            if spec.chapters == "container":
                self._container.set_chapters(marks)
            elif spec.chapters == "tag":
                self._container.metadata.update(_chapter_comments(marks))
            self._resampler = av.AudioResampler(
                format=spec.sample_format, layout="mono", rate=self._out_rate
            )
            self._container.start_encoding()
            if self._cover_stream is not None and cover is not None:
                packet = av.Packet(cover.data)
                packet.stream = self._cover_stream
                packet.pts = packet.dts = 0
                packet.time_base = Fraction(1, 90_000)
                self._container.mux(packet)
        except BaseException:
            self._container.close()
            raise

    def write(self, x: np.ndarray) -> None:
        if not len(x):
            return
        x = np.clip(x, -1.0, 1.0).astype(np.float32, copy=False)
        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self._rate
        frame.time_base = self._time_base
        frame.pts = self._pts
        self._pts += len(x)
        self._encode(self._resampler.resample(frame))

    def close(self) -> None:
        try:
            self._encode(self._resampler.resample(None))
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()

    def abort(self) -> None:
        # The file is thrown away: an error while closing it changes nothing.
        with contextlib.suppress(av.FFmpegError, OSError):
            self._container.close()

    def _encode(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)


def _chapter_marks(timeline: Timeline, titles: tuple[str, ...]) -> list[Chapter]:
    """Chapter marks that tile the file: each starts at its chapter's first sample (the
    first at 0) and ends where the next one starts."""
    spans = timeline.chapters
    marks: list[Chapter] = []
    for i, (span, title) in enumerate(zip(spans, titles, strict=True)):
        start = 0 if i == 0 else span.first
        end = spans[i + 1].first if i + 1 < len(spans) else timeline.samples
        marks.append(
            {
                "id": i + 1,
                "start": start,
                "end": max(end, start),
                "time_base": Fraction(1, timeline.sample_rate),
                "metadata": {"title": title},
            }
        )
    return marks


def _chapter_comments(marks: list[Chapter]) -> dict[str, str]:
    """Chapter marks as Vorbis comments (Xiph's chapter extension): CHAPTERnnn holds the
    start (HH:MM:SS.mmm), CHAPTERnnnNAME the title."""
    comments = {}
    for number, mark in enumerate(marks, start=1):
        start = float(mark["start"] * (mark["time_base"] or 1))
        comments[f"CHAPTER{number:03d}"] = _timestamp(start, ".")
        comments[f"CHAPTER{number:03d}NAME"] = mark["metadata"]["title"]
    return comments


def _write(
    pieces: Sequence[Piece],
    out_path: str | os.PathLike[str],
    fmt: str | None,
    tags_for: Callable[[Timeline], _Tags] | None,
    *,
    meta: BookMeta,
    pauses: Pauses,
    sample_rate: int,
    target_lufs: float | None,
    max_peak_dbfs: float,
) -> Timeline:
    out = Path(out_path)
    spec = _book_format(fmt or format_from_path(out))
    if not pieces:
        raise InvalidRequest("there is nothing to assemble: no spoken sentences")
    timeline = layout(pieces, pauses, sample_rate)
    gains = None
    if target_lufs is not None:
        gains = _measure_gains(pieces, pauses, sample_rate, target_lufs, max_peak_dbfs)
    tags = tags_for(timeline) if tags_for is not None else _book_tags(meta, timeline)
    # Written under a temporary name: a failure at any point leaves no file (and any
    # earlier version of it untouched).
    with atomic_path(out) as tmp:
        try:
            writer = _Writer(tmp, spec, sample_rate, tags, timeline)
            try:
                for x in _audio(pieces, timeline, gains):
                    writer.write(x)
            except BaseException:
                writer.abort()
                raise
            writer.close()
        except (av.FFmpegError, OSError, ValueError) as e:
            raise LowvoxError(f"cannot write {out.name}: {e}") from e
    logger.info("wrote %s: %d sentences, %.1f s", out, len(pieces), timeline.duration)
    return timeline


def assemble(
    pieces: Sequence[Piece],
    out_path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    meta: BookMeta,
    pauses: Pauses = _DEFAULT_PAUSES,
    sample_rate: int,
    target_lufs: float | None = -18.0,
    max_peak_dbfs: float = -1.0,
    chapter_track: bool = False,
) -> Timeline:
    """Write `pieces` (in reading order) as one file: the book, or any run of chapters.

    `fmt` is one of `BOOK_FORMATS` (default: from the file name). With `target_lufs`, each
    chapter is brought to that integrated loudness, its sample peak kept under
    `max_peak_dbfs`; None leaves the levels as they are. Tags come from `meta`, chapter
    marks from its `chapter_titles` ("Chapter n" where one is missing). With
    `chapter_track`, `pieces` are one chapter, written as a track of the book: its title
    is the chapter's, the album the book's, the track number the chapter's; its audio is
    the chapter exactly as it sounds inside the book (same gain). The file appears only
    once it is complete. Returns the file's timeline (for subtitles)."""
    tags_for: Callable[[Timeline], _Tags] | None = None
    if chapter_track:
        chapters = {p.chapter for p in pieces}
        if len(chapters) > 1:
            raise InvalidRequest(f"a chapter track got sentences of {len(chapters)} chapters")

        def track_tags(timeline: Timeline) -> _Tags:
            book = _book_tags(meta, timeline)
            (chapter,) = chapters
            title = _chapter_title(meta, chapter)
            metadata = dict(book.metadata, title=title, track=str(chapter + 1))
            if meta.chapter_titles:
                metadata["track"] = f"{chapter + 1}/{len(meta.chapter_titles)}"
            return _Tags(metadata, (title,), meta.cover)

        tags_for = track_tags
    return _write(
        pieces,
        out_path,
        fmt,
        tags_for,
        meta=meta,
        pauses=pauses,
        sample_rate=sample_rate,
        target_lufs=target_lufs,
        max_peak_dbfs=max_peak_dbfs,
    )


# -- subtitles -------------------------------------------------------------------------


def _cue_text(text: str, *, vtt: bool) -> str:
    """One line of cue text: no blank line (it would end the cue) and no `-->` (it would
    read as a timing line)."""
    text = " ".join(text.split())
    while "-->" in text:
        text = text.replace("-->", "->")
    if vtt:  # WebVTT cue text is markup: & and < start entities and tags
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


def _timestamp(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def srt_text(cues: Sequence[Cue]) -> str:
    blocks = []
    for number, cue in enumerate(cues, start=1):
        timing = f"{_timestamp(cue.start, ',')} --> {_timestamp(cue.end, ',')}"
        blocks.append(f"{number}\n{timing}\n{_cue_text(cue.text, vtt=False)}\n")
    return "\n".join(blocks)


def vtt_text(cues: Sequence[Cue]) -> str:
    blocks = ["WEBVTT\n"]
    for cue in cues:
        timing = f"{_timestamp(cue.start, '.')} --> {_timestamp(cue.end, '.')}"
        blocks.append(f"{timing}\n{_cue_text(cue.text, vtt=True)}\n")
    return "\n".join(blocks)


def write_srt(cues: Sequence[Cue], path: str | os.PathLike[str]) -> None:
    """SubRip subtitles, one numbered cue per sentence (`HH:MM:SS,mmm`), UTF-8."""
    write_atomic(path, srt_text(cues).encode("utf-8"))


def write_vtt(cues: Sequence[Cue], path: str | os.PathLike[str]) -> None:
    """WebVTT subtitles, one cue per sentence (`HH:MM:SS.mmm`), UTF-8."""
    write_atomic(path, vtt_text(cues).encode("utf-8"))
