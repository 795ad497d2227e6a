"""The text front-end as the server uses it: AllTalk's filters."""

from __future__ import annotations

from lowvox.text import filter_text as _filter

FILTER_DEFAULT = "standard"


def filter_text(text: str, mode: str | None) -> str:
    """AllTalk's `text_filtering` (none | standard | html); missing means standard."""
    return _filter(text, (mode or FILTER_DEFAULT).strip().lower())
