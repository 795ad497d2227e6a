"""Text filtering before synthesis, AllTalk's `none` | `standard` | `html` modes.

`standard` keeps what XTTS can read: letters, marks and digits of the scripts its 17
languages use (Latin, Cyrillic, Greek, Arabic, Devanagari, CJK, Hangul, kana) plus
ordinary punctuation and symbols; it drops emoji, control characters and other scripts,
collapses repeated `!`, `?` and `.`, and tidies whitespace. `html` first strips tags
(and the contents of script/style elements) and unescapes entities, then does the same.
"""

from __future__ import annotations

import html
import re
import unicodedata

from lowvox.errors import InvalidRequest

FILTER_MODES = ("none", "standard", "html")

# Blocks whose letters, marks and digits are kept.
_SCRIPT_BLOCKS = (
    (0x0041, 0x024F),  # Latin, Latin-1, Latin Extended-A/B
    (0x0250, 0x02FF),  # IPA, spacing modifier letters
    (0x0300, 0x036F),  # combining diacritics
    (0x0370, 0x03FF),  # Greek
    (0x0400, 0x052F),  # Cyrillic
    (0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF),  # Arabic
    (0x0900, 0x097F), (0xA8E0, 0xA8FF),  # Devanagari
    (0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF),  # Hangul
    (0x1E00, 0x1FFF),  # Latin Extended Additional, Greek Extended
    (0x3040, 0x30FF), (0x31F0, 0x31FF),  # kana
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),  # CJK ideographs
    (0xFB50, 0xFDFF), (0xFE70, 0xFEFF),  # Arabic presentation forms
    (0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0xFF66, 0xFF9F),  # full/half width
)  # fmt: skip

# Punctuation and symbols people write in prose, kept in every script.
_KEPT_SYMBOLS = set(
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "¡¿«»‹›“”„‟‘’‚‛–—―‐‑…·•′″°§¶©®™€£¥¢₹₽₩₺℃№"
    "、。，．！？：；「」『』（）【】《》〈〉〔〕～・ー"
    "،؛؟٪٫٬۔।॥"
)
_REPEATED_MARK = re.compile(r"([!?.])\1+")
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*")
_TAG = re.compile(r"<[^<>]*>")
_HIDDEN_ELEMENT = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)


def _in_scripts(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in _SCRIPT_BLOCKS)


def _keep(ch: str) -> bool:
    if ch in _KEPT_SYMBOLS or ch in " \n":
        return True
    category = unicodedata.category(ch)
    if category[0] in "LMN":
        return _in_scripts(ord(ch)) or ch.isdigit() and ch.isascii()
    return False


def _standard(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    # Tabs and other whitespace become spaces; control and format characters go.
    text = "".join(
        " " if (ch.isspace() and ch != "\n") else ch for ch in text if _keep_or_space(ch)
    )
    text = _REPEATED_MARK.sub(r"\1", text)
    text = _HORIZONTAL_SPACE.sub(" ", text)
    text = _BLANK_LINES.sub("\n", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def _keep_or_space(ch: str) -> bool:
    return ch.isspace() or _keep(ch)


def _strip_html(text: str) -> str:
    text = _HIDDEN_ELEMENT.sub(" ", text)
    text = _TAG.sub(" ", text)
    return html.unescape(text)


def filter_text(text: str, mode: str = "standard") -> str:
    """Clean `text` for speech according to `mode` ("none", "standard" or "html")."""
    if mode not in FILTER_MODES:
        raise InvalidRequest(
            f"text filter must be one of {', '.join(FILTER_MODES)}, not {mode!r}",
            field="text_filtering",
        )
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string", field="text")
    if mode == "none":
        return text
    if mode == "html":
        text = _strip_html(text)
    return _standard(text)
