"""The data a long-form job is made of, shared by its readers, planner, store and assembler.

A `Document` (what a reader makes of a text, Markdown or EPUB file) is planned into
`Line`s: one sentence each, with its chapter, paragraph, voice and any extra pause. The
store keeps a row per line; the assembler lays their audio out into chapters and a book.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chapter:
    """A chapter's title and its paragraphs, as plain text (inline tags kept)."""

    title: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True)
class Document:
    """What a reader made of an input file: metadata and chapters in reading order."""

    title: str
    chapters: tuple[Chapter, ...]
    author: str | None = None
    language: str | None = None  # as the file declares it (EPUB dc:language), if it does
    cover: bytes | None = None  # image bytes (JPEG or PNG)
    cover_type: str | None = None  # "image/jpeg" | "image/png"


@dataclass(frozen=True)
class Line:
    """One sentence to speak, where it sits in the book, and who speaks it.

    `voice` None means the job's voice. `pause_before`/`pause_after` are extra silences in
    seconds from `[pause:x]` tags, added to the usual gaps around the line."""

    chapter: int  # index into Document.chapters
    paragraph: int  # index of the paragraph within its chapter
    text: str
    voice: str | None = None
    pause_before: float = 0.0
    pause_after: float = 0.0


@dataclass(frozen=True)
class Pauses:
    """Silence between sentences, between paragraphs and between chapters, in seconds."""

    sentence: float = 0.35
    paragraph: float = 0.8
    chapter: float = 2.0


@dataclass(frozen=True)
class BookMeta:
    """What goes into the output file's tags."""

    title: str
    author: str | None = None
    language: str | None = None
    cover: bytes | None = None
    cover_type: str | None = None
    chapter_titles: tuple[str, ...] = field(default_factory=tuple)
