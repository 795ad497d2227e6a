"""Text filtering before synthesis, AllTalk's `none` | `standard` | `html` modes.

`standard` is AllTalk's standard filter: it keeps what XTTS can read, the letters, marks
and digits of the scripts its 17 languages use (Latin, Cyrillic, Greek, Arabic,
Devanagari, CJK, Hangul, kana), sentence punctuation and quotes, and drops the rest: the
markup chat text is full of (`*actions*`, `~`, `_`, `#`, backticks, `|`, brackets of
every kind), emoji, control characters and other scripts. It collapses repeated `!`, `?`
and `.` and tidies whitespace. Unlike AllTalk it keeps the symbols the front-end speaks
as words (`& @ % + = /`, currency, degree), which AllTalk would drop mid-sentence.
`html` strips tags (and the contents of script/style elements), filters, then
unescapes entities: `&lt;3` is text the author wrote, not markup.
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
    (0x3000, 0x303F),  # CJK symbols: its letters and numbers are 々 〆 〇 (人々, 二〇二四)
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),  # CJK ideographs
    (0xFB50, 0xFDFF), (0xFE70, 0xFEFF),  # Arabic presentation forms
    (0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0xFF66, 0xFF9F),  # full/half width
)  # fmt: skip

# Punctuation and symbols people write in prose and the front-end reads, kept in every
# script. Markup is not among them: * ~ _ ^ ` | \ # and ( ) [ ] { } < > in any width.
_KEPT_SYMBOLS = set(
    "!\"$%&'+,-./:;=?@"
    + "¡¿«»‹›“”„‟‘’‚‛–—―‐‑…·′″°§©®™€£¥¢₹₽₩₺℃№"
    + "、。，．！？：；・ー"  # CJK
    + "،؛؟٪٫٬۔।॥"  # Arabic, Devanagari
)
_REPEATED_MARK = re.compile(r"([!?.])\1+")
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*")
# A tag starts with a letter, "/" + letter, "!" or "?" (as HTML parses it): "1 < 2 and
# 3 > 2" and "<3" are text, not a tag to strip.
_TAG = re.compile(r"<(?:/?[A-Za-z]|[!?])[^<>]*>")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_HIDDEN_OPEN = re.compile(r"<(script|style)\b[^<>]*>", re.IGNORECASE)
_HIDDEN_CLOSE = {name: re.compile(rf"</{name}\s*>", re.IGNORECASE) for name in ("script", "style")}
# Latin ligatures (ﬁ ﬂ ﬀ ﬃ ﬄ ﬅ ﬆ), common in text copied from PDFs and e-books: spelled
# out as their letters, or the filter would drop them from the middle of words.
_LATIN_LIGATURES = re.compile("[\ufb00-\ufb06]")
# Terminal escape sequences (colours, cursor moves: ESC [ 31 m), in text pasted from a
# console or a CLI model's output: dropped whole, or their letters ("31m") would be read.
_TERMINAL_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def _in_scripts(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in _SCRIPT_BLOCKS)


def _keep(ch: str) -> bool:
    if ch in _KEPT_SYMBOLS or ch in " \n":
        return True
    category = unicodedata.category(ch)
    if category[0] in "LMN":
        return _in_scripts(ord(ch)) or ch.isdigit() and ch.isascii()
    return False


def _kept(text: str) -> str:
    text = unicodedata.normalize("NFC", _TERMINAL_ESCAPE.sub("", text))
    text = _LATIN_LIGATURES.sub(lambda m: unicodedata.normalize("NFKC", m.group(0)), text)
    # Tabs and other whitespace become spaces; control and format characters go.
    return "".join(
        " " if (ch.isspace() and ch != "\n") else ch for ch in text if _keep_or_space(ch)
    )


def _standard(text: str) -> str:
    return _tidy(_REPEATED_MARK.sub(r"\1", _kept(text)))


def _html(text: str) -> str:
    """Tags go; entities stand for what the author wrote (`&lt;3`, `&amp;`), so they are
    unescaped after the text around them is filtered, keeping printable ASCII."""
    text = _strip_tags(text)
    out = []
    pos = 0
    for match in _ENTITY.finditer(text):
        out.append(_kept(text[pos : match.start()]))
        out.extend(
            ch
            for ch in html.unescape(match.group(0))
            if _keep_or_space(ch) or (ch.isascii() and ch.isprintable())
        )
        pos = match.end()
    out.append(_kept(text[pos:]))
    return _tidy(_REPEATED_MARK.sub(r"\1", "".join(out)))


def _tidy(text: str) -> str:
    text = _HORIZONTAL_SPACE.sub(" ", text)
    text = _BLANK_LINES.sub("\n", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def _keep_or_space(ch: str) -> bool:
    return ch.isspace() or _keep(ch)


def _strip_tags(text: str) -> str:
    return _TAG.sub(" ", _drop_hidden_elements(text))


def _drop_hidden_elements(text: str) -> str:
    """Drop each <script> and <style> element, contents and all. Each is looked for once:
    an element left open has no closing tag further on either, so no later opening of
    the same name is searched to the end again (that made many open tags quadratic)."""
    out: list[str] = []
    pos = 0
    unclosed: set[str] = set()
    while match := _HIDDEN_OPEN.search(text, pos):
        name = match.group(1).lower()
        close = None if name in unclosed else _HIDDEN_CLOSE[name].search(text, match.end())
        if close is None:
            unclosed.add(name)
            out.append(text[pos : match.end()])
        else:
            out.append(text[pos : match.start()] + " ")
        pos = close.end() if close else match.end()
    out.append(text[pos:])
    return "".join(out)


def filter_text(text: str, mode: str = "standard") -> str:
    """Clean `text` for speech according to `mode` ("none", "standard" or "html")."""
    if not isinstance(mode, str) or mode not in FILTER_MODES:
        raise InvalidRequest(
            f"text filter must be one of {', '.join(FILTER_MODES)}, not {str(mode)[:40]!r}",
            field="text_filtering",
        )
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string", field="text")
    if mode == "none":
        return text
    if mode == "html":
        return _html(text)
    return _standard(text)
