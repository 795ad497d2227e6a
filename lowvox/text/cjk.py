"""Chinese, Japanese and Korean into the Latin letters XTTS reads.

Chinese becomes pinyin with tone numbers (neutral tone 5) via pypinyin; Japanese becomes
Hepburn romaji via cutlet (MeCab with UniDic-lite); Korean syllables are romanised here.
The heavy libraries are imported on first use so that `import lowvox.text` stays fast.
"""

from __future__ import annotations

import itertools
import threading
from functools import lru_cache
from typing import Any

from lowvox.errors import EngineUnavailable


def to_pinyin(text: str) -> str:
    """Pinyin with tone digits, syllables run together: 你好 -> ni3hao3."""
    try:
        import pypinyin
    except ImportError as e:
        raise EngineUnavailable("Chinese text needs pypinyin: pip install pypinyin") from e
    parts = pypinyin.pinyin(
        text, style=pypinyin.Style.TONE3, heteronym=False, neutral_tone_with_five=True
    )
    return "".join(p[0] for p in parts)


_cutlet_lock = threading.Lock()


@lru_cache(maxsize=1)
def _cutlet() -> Any:
    try:
        import cutlet
    except ImportError as e:
        raise EngineUnavailable(
            "Japanese text needs cutlet and unidic-lite: pip install cutlet unidic-lite"
        ) from e
    return cutlet.Cutlet()


def to_romaji(text: str) -> str:
    """Lower-case Hepburn romaji: 私は -> watakushi wa."""
    katsu = _cutlet()
    with _cutlet_lock:  # the MeCab tagger inside is not safe to share across threads
        return katsu.romaji(text).lower()


# Revised Romanisation letters, indexed as Unicode orders the parts of a Hangul syllable.
_INITIALS = (
    "g", "kk", "n", "d", "tt", "l", "m", "b", "pp", "s", "ss", "", "j", "jj", "ch", "k",
    "t", "p", "h",
)  # fmt: skip
_VOWELS = (
    "a", "ae", "ya", "yae", "eo", "e", "yeo", "ye", "o", "wa", "wae", "oe", "yo", "u", "wo",
    "we", "wi", "yu", "eu", "ui", "i",
)  # fmt: skip
_FINALS = (
    "", "g", "kk", "gs", "n", "nj", "nh", "d", "l", "lg", "lm", "lb", "ls", "lt", "lp", "lh",
    "m", "b", "bs", "s", "ss", "ng", "j", "ch", "k", "t", "p", "h",
)  # fmt: skip
_FIRST_SYLLABLE, _LAST_SYLLABLE = 0xAC00, 0xD7A3


def _ambiguous_joins() -> frozenset[str]:
    """Final+initial letter runs that a reader could split back in more than one way."""
    found = set()
    for final, initial in itertools.product(_FINALS, _INITIALS):
        joined = final + initial
        splits = sum(joined[:i] in _FINALS and joined[i:] in _INITIALS for i in range(len(joined)))
        if splits > 1:
            found.add(joined)
    return frozenset(found)


_AMBIGUOUS = _ambiguous_joins()


def romanize_hangul(text: str) -> str:
    """Romanise Hangul syllables letter by letter; a hyphen marks a syllable boundary that
    would otherwise be ambiguous (먹었다 -> meog-eossda). Other characters pass through."""
    out: list[str] = []
    prev_final: str | None = (
        None  # final letters of the previous syllable, None after a non-syllable
    )
    for ch in text:
        code = ord(ch)
        if not _FIRST_SYLLABLE <= code <= _LAST_SYLLABLE:
            out.append(ch)
            prev_final = None
            continue
        index = code - _FIRST_SYLLABLE
        initial, vowel, final = (
            _INITIALS[index // 588],
            _VOWELS[(index // 28) % 21],
            _FINALS[index % 28],
        )
        if prev_final is not None and (initial == "" or prev_final + initial in _AMBIGUOUS):
            out.append("-")
        out.append(initial + vowel + final)
        prev_final = final
    return "".join(out)
