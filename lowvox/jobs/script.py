"""The planner: a `Document` to the `Line`s a long-form job speaks, in reading order.

Each paragraph is cut into chunks with `lowvox.text.split_sentences` (whole sentences packed
up to the language's character limit, or `max_chars`), and each chunk is one `Line` that
keeps its chapter and paragraph index. Chapter titles are not spoken here; they travel
in `Document.chapters` for the book's chapter marks.

Inline tags, in any paragraph (see docs/long-form.md, "Inputs and tags"):

- `[voice:Name]text[/voice]`: the text inside is spoken by the voice Name. It may span
  sentences but not paragraphs, and tags do not nest.
- `[pause:1.5]`: that many seconds (more than 0, at most 30) of extra silence at that
  point. It becomes the `pause_after` of the line before it in the chapter, or the
  `pause_before` of the first line when nothing comes before it. Tags that meet at one
  point add up, to at most 30 s too: ten characters of tags cannot ask for hours of
  silence.

Bracketed text that is not shaped like a tag (`[sic]`, `[1]`, `[Note: ...]`, a URL) is
read as it is; a tag that is shaped like one but wrong (`[voise:Bob]`, `[pause:soon]`, a
`[voice:…]` left open) raises `BadDocument` saying where it is.

Narrator mode (`Narrator`) gives `*narration*` and `"speech"` their own voices through
`lowvox.text.segment_narrator`, paragraph by paragraph. Without it, Markdown emphasis
(`*x*`, `**x**`, `_x_`) is unwrapped so that the markers are not read out.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, replace

from lowvox.errors import BadDocument, InvalidRequest, UnknownLanguage, UnknownVoice
from lowvox.jobs.model import Document, Line
from lowvox.text import NARRATOR_MODES, char_limit, resolve_language, segment_narrator
from lowvox.text.split import split_into_sentences

MAX_PAUSE_S = 30.0


@dataclass(frozen=True)
class Narrator:
    """Narrator mode: who speaks `*narration*`, who speaks `"speech"`, and who speaks the
    text inside neither ("character", "narrator" or "silent"). A voice of None is the
    job's voice."""

    narrator_voice: str | None
    character_voice: str | None
    text_not_inside: str = "character"


def plan_lines(
    doc: Document,
    *,
    language: str,
    narrator: Narrator | None = None,
    max_chars: int | None = None,
    known_voices: Collection[str] | None = None,
    titles: bool = True,
) -> list[Line]:
    """The lines to speak for `doc`, in order; with `titles`, each chapter's title first.

    `language` is the job's concrete language code ("en", "zh-cn"); it picks the sentence
    rules and the chunk limit, which `max_chars` overrides. `known_voices`, when given,
    is what a `[voice:Name]` tag may name. Raises `BadDocument` for a malformed tag and
    `UnknownVoice` (saying where) for a tag naming a voice that is not known."""
    if narrator is not None and narrator.text_not_inside not in NARRATOR_MODES:
        raise InvalidRequest(
            f"text_not_inside must be one of {', '.join(NARRATOR_MODES)}, "
            f"not {narrator.text_not_inside!r}",
            field="text_not_inside",
        )
    try:
        lang = resolve_language(language)
    except UnknownLanguage:
        # A language the XTTS text front-end does not know (another engine's): English
        # sentence rules are what `split_sentences` applies to most languages anyway.
        lang = "en"
    limit = char_limit(lang) if max_chars is None else max_chars
    if limit < 1:
        raise InvalidRequest(f"max_chars must be positive, not {limit}", field="max_chars")

    lines: list[Line] = []
    for c, chapter in enumerate(doc.chapters):
        chapter_lines: list[Line] = []
        pause_before = 0.0  # pauses that come before the chapter's first line
        if titles and chapter.title.strip():
            # The title is announced, as a narrator would, as the chapter's first line
            # (paragraph -1: the paragraph pause follows it).
            for chunk in _chunks(strip_emphasis(chapter.title), lang, limit):
                chapter_lines.append(Line(c, -1, chunk))
        for p, paragraph in enumerate(chapter.paragraphs):
            where = _where(c, chapter.title, p)
            for event in _events(paragraph, narrator, known_voices, where):
                if isinstance(event, float):
                    if chapter_lines:
                        last = chapter_lines[-1]
                        total = _added_pause(last.pause_after, event, where)
                        chapter_lines[-1] = replace(last, pause_after=total)
                    else:
                        pause_before = _added_pause(pause_before, event, where)
                    continue
                voice, text = event
                for chunk in _chunks(text, lang, limit):
                    chapter_lines.append(Line(c, p, chunk, voice=voice, pause_before=pause_before))
                    pause_before = 0.0
        lines.extend(chapter_lines)
    return lines


def _added_pause(pause: float, more: float, where: str) -> float:
    """`pause` with `more` seconds added; BadDocument when the pauses that meet at one
    point come to more than `MAX_PAUSE_S`, as one tag may not either."""
    total = pause + more
    if total > MAX_PAUSE_S:
        raise BadDocument(
            f"the [pause:…] tags in {where} add up to {total:g} s at one point; "
            f"pauses that meet may come to at most {MAX_PAUSE_S:g} seconds"
        )
    return total


def _chunks(text: str, lang: str, limit: int) -> list[str]:
    """The sentences of `text`, each a line of its own (a row, a take, a subtitle cue);
    one longer than `limit` is wrapped at word boundaries."""
    return split_into_sentences(text, lang, limit)


def count_words(doc: Document) -> int:
    """Words to be read (tags left out), for the job limits."""
    return sum(len(_without_tags(p).split()) for ch in doc.chapters for p in ch.paragraphs)


def count_chars(doc: Document) -> int:
    """Characters to be read (tags left out, runs of whitespace as one), for job limits."""
    return sum(
        len(" ".join(_without_tags(p).split())) for ch in doc.chapters for p in ch.paragraphs
    )


def _where(chapter: int, title: str, paragraph: int) -> str:
    named = f' "{title}"' if title else ""
    return f"chapter {chapter + 1}{named}, paragraph {paragraph + 1}"


# ---------------------------------------------------------------------------------------
# Tags

# `[name:value]` or `[/name]`. Only `voice` and `pause` are tags in any shape; other names
# are tags (and errors) only as `[lowercase:value]` with no space after the colon, so
# that bracketed prose such as "[sic]", "[Note: see above]" or a URL is read as written.
# A value holds no `[`: each match attempt stops at the next bracket, so a paragraph of
# unclosed `[a:[a:…` is scanned once, not once per bracket (quadratic: 120 kB took 60 s).
_TAG = re.compile(r"\[(/?)([A-Za-z]+)(?::([^\[\]\n]*))?\]")
_SECONDS = re.compile(r"\d+(?:\.\d+)?|\.\d+")
_TAG_NAMES = ("voice", "pause")
_HELP = "tags are [voice:Name]…[/voice] and [pause:seconds]"


def _is_tag(m: re.Match[str]) -> bool:
    closing, name, value = m.groups()
    if name.lower() in _TAG_NAMES:
        return True
    # `[lowercase:value]`, as a mistyped tag looks; not "[Note:x]", "[see: x]", "[http://x]".
    return (
        not closing
        and name.islower()
        and bool(value)
        and not value[0].isspace()
        and not value.startswith("//")
    )


def _without_tags(text: str) -> str:
    return _TAG.sub(lambda m: " " if _is_tag(m) else m.group(0), text)


@dataclass
class _Span:
    """Text spoken by the voice a `[voice:…]` tag names (pause placeholders inside)."""

    voice: str
    text: str = ""


# A tag's place in the text is held by a placeholder, \ue000<index>\ue001, that survives
# the narrator split: private-use characters that no reader leaves in a paragraph. The
# digits make it "speakable", so segment_narrator keeps the segment it stands in.
_MARK = re.compile("\ue000(\\d+)\ue001")
_PRIVATE = str.maketrans("", "", "\ue000\ue001")
_OPENERS = re.compile('["“*]')  # where a quote or narration may open


def _mark(i: int) -> str:
    return f"\ue000{i}\ue001"


def _parse(
    text: str, known_voices: Collection[str] | None, where: str, positions: bool
) -> tuple[str, list[float | _Span | None]]:
    """The paragraph with each tag replaced by a placeholder, and what each one stands
    for: a pause in seconds, a `_Span`, or None (a position only). Marks are numbered in
    reading order. With `positions`, a position mark follows each quote and asterisk
    outside voice tags: in narrator mode "silent" the text outside both is dropped with
    its tags, and the next mark that survives tells where the lost ones stood."""
    marks: list[float | _Span | None] = []
    outer: list[str] = []
    span: _Span | None = None
    inner: list[str] = []
    pos = 0

    def position(m: re.Match[str]) -> str:
        marks.append(None)
        return m.group(0) + _mark(len(marks) - 1)

    def add(piece: str) -> None:
        if span is not None:
            inner.append(piece)
        else:
            outer.append(_OPENERS.sub(position, piece) if positions else piece)

    for m in _TAG.finditer(text):
        if not _is_tag(m):
            continue
        closing, name, value = m.groups()
        name = name.lower()
        tag = m.group(0)
        add(text[pos : m.start()])
        pos = m.end()
        if name not in _TAG_NAMES:
            raise BadDocument(f"unknown tag {tag} in {where} ({_HELP})")
        if name == "pause":
            seconds = value.strip() if value is not None else ""
            if closing or not _SECONDS.fullmatch(seconds):
                raise BadDocument(
                    f"bad tag {tag} in {where}: write [pause:seconds], as in [pause:1.5]"
                )
            pause = float(seconds)
            if not 0 < pause <= MAX_PAUSE_S:
                raise BadDocument(
                    f"bad tag {tag} in {where}: a pause is more than 0 and at most "
                    f"{MAX_PAUSE_S:g} seconds"
                )
            marks.append(pause)
            (inner if span is not None else outer).append(_mark(len(marks) - 1))
        elif closing:
            if value is not None:
                raise BadDocument(f"bad tag {tag} in {where}: the closing tag is [/voice]")
            if span is None:
                raise BadDocument(f"{tag} in {where} closes no [voice:…] tag")
            span.text = "".join(inner)
            span, inner = None, []
        else:
            voice = (value or "").strip()
            if not voice:
                raise BadDocument(f"bad tag {tag} in {where}: write [voice:Name]")
            if span is not None:
                raise BadDocument(
                    f"{tag} in {where} is inside [voice:{span.voice}]; voice tags do not "
                    "nest (close the first with [/voice])"
                )
            if known_voices is not None and voice not in known_voices:
                raise UnknownVoice(voice, where=f"in a [voice:…] tag, {where}")
            span = _Span(voice)
            marks.append(span)
            outer.append(_mark(len(marks) - 1))
    if span is not None:
        raise BadDocument(
            f"[voice:{span.voice}] in {where} is not closed; close it with [/voice] "
            "in the same paragraph"
        )
    add(text[pos:])
    return "".join(outer), marks


# ---------------------------------------------------------------------------------------
# Voices

_STARS = re.compile(r"(\*{1,3})(?=[^\s*])(.+?)(?<=[^\s*])\1")
_UNDERSCORES = re.compile(r"(?<![\w\\])(_{1,3})(?=[^\s_])(.+?)(?<=[^\s_])\1(?!\w)")


def strip_emphasis(text: str) -> str:
    """`*x*`, `**x**`, `***x***`, `_x_`, `__x__` unwrapped to `x`; a lone `*` and the
    underscores and apostrophes inside words are left alone."""
    for _ in range(3):  # `**bold *and* italic**` takes two passes
        unwrapped = _UNDERSCORES.sub(r"\2", _STARS.sub(r"\2", text))
        if unwrapped == text:
            break
        text = unwrapped
    return text


def _speakable(text: str) -> bool:
    return any(c.isalnum() for c in text)


def _events(
    paragraph: str,
    narrator: Narrator | None,
    known_voices: Collection[str] | None,
    where: str,
) -> list[tuple[str | None, str] | float]:
    """A paragraph as what happens in order: (voice, text) to speak, and float pauses.
    Adjacent text for the same voice is joined; a pause or a change of voice cuts it."""
    text = paragraph.translate(_PRIVATE)
    outer, marks = _parse(text, known_voices, where, positions=narrator is not None)
    segments: list[tuple[str | None, str]]
    if narrator is None:
        segments = [(None, strip_emphasis(outer))]
    else:
        voices = {"narrator": narrator.narrator_voice, "character": narrator.character_voice}
        segments = [
            (voices[s.role], s.text) for s in segment_narrator(outer, narrator.text_not_inside)
        ]

    inner = {int(i) for m in marks if isinstance(m, _Span) for i in _MARK.findall(m.text)}
    met: set[int] = set()
    swept = 0  # every mark below this one is met, or inside a voice tag
    # (voice, pieces of its text) to speak, and pauses. The pieces are joined once at the
    # end, and each mark is looked at once by the sweep: a paragraph of quotes (a mark
    # each in narrator mode) took time quadratic in its length (40 kB: 20 s).
    out: list[tuple[str | None, list[str]] | float] = []

    def say(voice: str | None, text: str) -> None:
        last = out[-1] if out else None
        if isinstance(last, tuple) and last[0] == voice:
            last[1].append(text)
        elif text:
            out.append((voice, [text]))

    def meet(i: int) -> None:
        # Marks before this one that were not met went with silent text: they stood here.
        nonlocal swept
        todo = range(swept, i + 1) if i >= swept else (i,) if i >= 0 else ()
        swept = max(swept, i + 1)
        for j in todo:
            if j in met or (j in inner and j != i):
                continue
            met.add(j)
            mark = marks[j]
            if isinstance(mark, float):
                out.append(mark)
            elif isinstance(mark, _Span):
                walk(strip_emphasis(mark.text), mark.voice)

    def walk(text: str, voice: str | None) -> None:
        pos = 0
        for m in _MARK.finditer(text):
            say(voice, text[pos : m.start()])
            pos = m.end()
            meet(int(m.group(1)))
        say(voice, text[pos:])

    for voice, text in segments:
        walk(f" {text} ", voice)  # segments come stripped: keep words apart
    meet(len(marks) - 1)
    events: list[tuple[str | None, str] | float] = []
    for e in out:
        if isinstance(e, float):
            events.append(e)
        elif _speakable(said := "".join(e[1])):
            events.append((e[0], " ".join(said.split())))
    return events
