"""Narrator segmentation, AllTalk-style: *narration* and "speech" get different voices.

Text between asterisks is narration, text in double quotes (straight or curly) is a
character speaking, and everything else follows the `outside` mode: spoken by the
character, by the narrator, or not at all ("silent"). A quote inside narration is the
character speaking (`*She said "hi" and left*` is narrator, character, narrator). A
marker with no partner is dropped and its text read as if it were not there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lowvox.errors import InvalidRequest

Role = Literal["narrator", "character"]
NARRATOR_MODES = ("character", "narrator", "silent")


@dataclass(frozen=True)
class Segment:
    """One stretch of text and who speaks it."""

    text: str
    role: Role


# Only the quote entities: other entities are left for the text filter to unescape once.
_QUOTE_CHARS = {
    "&quot;": '"', "&#34;": '"', "&#x22;": '"', "&ldquo;": "“", "&#8220;": "“",
    "&#x201c;": "“", "&rdquo;": "”", "&#8221;": "”", "&#x201d;": "”",
}  # fmt: skip
_QUOTE_ENTITY = re.compile("|".join(map(re.escape, _QUOTE_CHARS)), re.IGNORECASE)


def _pairs(positions: list[int]) -> list[tuple[int, int]]:
    """First with second, third with fourth, ...; an odd last one has no partner."""
    return list(zip(positions[0::2], positions[1::2], strict=False))


def _quote_spans(text: str) -> list[tuple[int, int]]:
    """Straight quotes pair in order; then each “ outside every span so far pairs with the
    first ” after it, unless that ” lies inside a straight-quoted span. One pass each, so a
    text full of quotes costs no more than any other (it once took seconds)."""
    straight = _pairs([i for i, c in enumerate(text) if c == '"'])
    in_straight = _mark(len(text), straight)
    next_close = [len(text)] * (len(text) + 1)  # the first ” at or after each position
    for i in range(len(text) - 1, -1, -1):
        next_close[i] = i if text[i] == "”" else next_close[i + 1]
    curly: list[tuple[int, int]] = []
    for i, c in enumerate(text):
        # Curly spans come in order, so "inside one" means before the last one's close.
        if c != "“" or in_straight[i] or (curly and i < curly[-1][1]):
            continue
        close = next_close[i + 1]
        if close < len(text) and not in_straight[close]:
            curly.append((i, close))
    return sorted(straight + curly)


def _mark(length: int, spans: list[tuple[int, int]]) -> list[bool]:
    """Per character: is it strictly inside one of the spans?"""
    depth = [0] * (length + 1)
    for a, b in spans:
        depth[a + 1] += 1
        depth[b] -= 1
    out, level = [], 0
    for i in range(length):
        level += depth[i]
        out.append(level > 0)
    return out


def _speakable(text: str) -> bool:
    # Fragments with no letter or digit ("...", "!?", a lone dash) make no speech.
    return any(c.isalnum() for c in text)


def segment_narrator(text: str, mode: str = "character") -> list[Segment]:
    """Split `text` into narrator and character segments, in order.

    `mode` says who speaks text outside both markers: "character", "narrator" or
    "silent" (dropped). Consecutive segments with the same speaker are joined; segments
    with nothing to say (only punctuation or spaces) are dropped. Quotes written as HTML
    entities (`&quot;`: text-generation-webui's AllTalk extension sends its chat HTML)
    are quotes, as AllTalk reads them.
    """
    if mode not in NARRATOR_MODES:
        raise InvalidRequest(
            f"narrator mode must be one of {', '.join(NARRATOR_MODES)}, not {mode!r}",
            field="text_not_inside",
        )
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string", field="text")
    text = _QUOTE_ENTITY.sub(lambda m: _QUOTE_CHARS[m.group(0).lower()], text)
    quotes = _quote_spans(text)
    in_quote = _mark(len(text), quotes)
    stars = _pairs([i for i, c in enumerate(text) if c == "*" and not in_quote[i]])
    in_star = _mark(len(text), stars)
    markers = {i for span in quotes + stars for i in span}
    outside: Role | None = None if mode == "silent" else mode  # type: ignore[assignment]

    # Runs of characters with one speaker, as lists: adding to a string char by char
    # copies it every time.
    pieces: list[tuple[Role | None, list[str]]] = []
    for i, c in enumerate(text):
        role = "character" if in_quote[i] else "narrator" if in_star[i] else outside
        if i in markers or c in '*"“”':  # paired markers delimit; stray ones are dropped
            c = " "
            role = pieces[-1][0] if pieces else role
        if pieces and pieces[-1][0] == role:
            pieces[-1][1].append(c)
        else:
            pieces.append((role, [c]))

    joined: list[tuple[Role, list[str]]] = []
    for role, chars in pieces:
        piece = " ".join("".join(chars).split())
        if role is None or not _speakable(piece):
            continue
        if joined and joined[-1][0] == role:
            joined[-1][1].append(piece)
        else:
            joined.append((role, [piece]))
    segments = [Segment(" ".join(parts), role) for role, parts in joined]
    return segments
