"""AllTalk's narrator: `*narration*` in one voice, `"speech"` in another, in order.

The text front-end (`lowvox.text.segment_narrator`) says who speaks each stretch; this
module maps that onto AllTalk's `narrator_enabled` (true | false | silent) and
`text_not_inside` (character | narrator | silent) options and the two voices.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowvox.errors import InvalidRequest
from lowvox.text import segment_narrator

NARRATOR_ENABLED = ("true", "false", "silent")


@dataclass(frozen=True)
class Turn:
    """One piece of text and the voice that says it."""

    text: str
    voice: str | None


def narrator_turns(
    text: str,
    character_voice: str | None,
    narrator_voice: str | None,
    narrator_enabled: str = "false",
    text_not_inside: str = "character",
) -> list[Turn]:
    """Split `text` into voiced turns, in order. With the narrator off, one turn; with it
    `silent`, narration is dropped and only the character speaks."""
    enabled = str(narrator_enabled).strip().lower()
    if enabled not in NARRATOR_ENABLED:
        raise InvalidRequest(
            f"narrator_enabled must be true, false or silent, not {narrator_enabled!r}",
            field="narrator_enabled",
        )
    outside = str(text_not_inside or "character").strip().lower()
    if enabled == "false":
        return [Turn(text=text, voice=character_voice)]
    turns: list[Turn] = []
    for segment in segment_narrator(text, outside):
        if segment.role == "narrator" and enabled == "silent":
            continue
        voice = narrator_voice if segment.role == "narrator" else character_voice
        if turns and turns[-1].voice == voice:  # silent narration may join two speeches
            turns[-1] = Turn(text=f"{turns[-1].text} {segment.text}", voice=voice)
        else:
            turns.append(Turn(text=segment.text, voice=voice))
    return turns
