"""Language "auto": guess which XTTS language a text is in, offline.

The writing system settles most languages outright (Hangul is Korean, kana Japanese,
Han without kana Chinese, Devanagari Hindi, Arabic script Arabic, Cyrillic Russian). Latin
text goes to py3langid, a small n-gram classifier whose model ships in its wheel (numpy
arrays, no pickle), restricted to the Latin-script XTTS languages.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from typing import Any

from lowvox.text.languages import resolve_language

logger = logging.getLogger(__name__)

_LATIN_LANGUAGES = ["en", "es", "fr", "de", "it", "pt", "pl", "tr", "nl", "cs", "hu"]
# Below this probability a guess from a few words is noise; the caller's default wins.
_MIN_CONFIDENCE = 0.5

_lock = threading.Lock()
_identifier: Any = None


def _script_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in text:
        if not ch.isalpha() and unicodedata.category(ch) not in ("Mn", "Mc"):
            continue
        code = ord(ch)
        if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
            script = "hangul"
        elif 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9F:
            script = "kana"
        elif 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF:
            script = "han"
        elif 0x0900 <= code <= 0x097F:
            script = "devanagari"
        elif 0x0600 <= code <= 0x06FF or 0x0750 <= code <= 0x077F or 0xFB50 <= code <= 0xFEFF:
            script = "arabic"
        elif 0x0400 <= code <= 0x052F:
            script = "cyrillic"
        elif ch.isascii() or 0x00C0 <= code <= 0x024F or 0x1E00 <= code <= 0x1EFF:
            script = "latin"
        else:
            script = "other"
        counts[script] = counts.get(script, 0) + 1
    return counts


def _latin_identifier() -> Any:
    global _identifier
    with _lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            identifier.set_languages(_LATIN_LANGUAGES)
            _identifier = identifier
        return _identifier


def detect_language(text: str, default: str = "en") -> str:
    """The XTTS language code of `text` (`zh-cn` for Chinese), or `default` when the text
    gives too little to go on (no letters, a script XTTS does not speak, a weak guess)."""
    fallback = resolve_language(default)
    counts = _script_counts(text if isinstance(text, str) else "")
    if not counts:
        return fallback
    if counts.get("hangul"):
        return "ko"
    if counts.get("kana"):
        return "ja"
    script = max(counts, key=lambda s: counts[s])
    by_script = {"han": "zh-cn", "devanagari": "hi", "arabic": "ar", "cyrillic": "ru"}
    if script in by_script:
        return by_script[script]
    if script != "latin":
        return fallback
    try:
        lang, confidence = _latin_identifier().classify(text)
    except ImportError:
        logger.warning("py3langid is not installed; language detection falls back to %s", fallback)
        return fallback
    if confidence < _MIN_CONFIDENCE:
        return fallback
    return str(lang)
