"""Voices: the library on disk (`store`) and how a requested name is matched."""

from __future__ import annotations

import unicodedata


def fold_name(name: str) -> str:
    """A voice name as looked up when no voice has it exactly: any letter case, and one
    Unicode form (NFC), so "Zoë" typed on one system finds "Zoë" stored by another, which
    may spell the ë as e plus a combining diaeresis (NFD, as macOS names files)."""
    return unicodedata.normalize("NFC", name).casefold()
