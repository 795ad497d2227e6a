"""Where spaCy's tokenizer would cut text, as far as sentence boundaries depend on it.

The reference splits sentences with spaCy's sentencizer, which looks at tokens: a
sentence ends after a token that is exactly "." / "!" / "?" (or another sentence mark).
So what matters is when a full stop becomes a token of its own: after a lower-case letter
or digit but not after a lone capital (`Plan B.`), never inside a known abbreviation
(`Mr.`, `e.g.`, also when glued to the next word as in `Dr.Smith`), inside a word only as
`lower.Upper`, and never inside something that looks like a web address. This module
restates those rules (tables in `split_rules.py`) for the spaCy languages the reference
uses: English rules for most XTTS languages, and Spanish, Arabic, Hindi, Chinese
(character by character) and Japanese (punctuation marks apart) for their own.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from lowvox.text.split_rules import (
    CURRENCY_AFTER_NUMBER,
    ICON_RANGES,
    PREFIX_CHARS,
    PUNCT_CHARS,
    QUOTES,
    SPECIAL_CASES,
    UNCASED_RANGES,
    UNITS_AFTER_NUMBER,
)


@dataclass(frozen=True)
class Token:
    text: str
    space: str  # the whitespace that follows the token in the text ("" or " ")

    @property
    def is_punct(self) -> bool:
        return all(unicodedata.category(c).startswith("P") for c in self.text)


# ----------------------------------------------------------------------------------------
# Character classes (built once, on first use)


def _ranges(chars: list[str]) -> str:
    """A regex character-class body for a sorted list of characters."""
    out: list[str] = []
    start: str | None = None
    prev: str | None = None
    for c in chars:
        if prev is not None and ord(c) == ord(prev) + 1:
            prev = c
            continue
        if start is not None and prev is not None:
            out.append(
                re.escape(start) if start == prev else f"{re.escape(start)}-{re.escape(prev)}"
            )
        start = prev = c
    if start is not None and prev is not None:
        out.append(re.escape(start) if start == prev else f"{re.escape(start)}-{re.escape(prev)}")
    return "".join(out)


# Cased alphabets whose letters count as upper/lower case for the tokenizer rules: Latin,
# IPA, Greek, Cyrillic and their extensions, and full-width Latin.
_CASED_BLOCKS = (
    (0x41, 0x24F), (0x250, 0x2AF), (0x370, 0x3FF), (0x400, 0x52F), (0x1D00, 0x1DBF),
    (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xAB30, 0xAB6F), (0xFF21, 0xFF5A),
)  # fmt: skip


@lru_cache(maxsize=1)
def _classes() -> dict[str, str]:
    lower: list[str] = []
    upper: list[str] = []
    for lo, hi in _CASED_BLOCKS:
        for code in range(lo, hi + 1):
            cat = unicodedata.category(chr(code))
            if cat == "Ll":
                lower.append(chr(code))
            elif cat == "Lu":
                upper.append(chr(code))
    return {
        "alpha": _ranges(sorted(lower + upper)) + UNCASED_RANGES,
        "lower": _ranges(lower) + UNCASED_RANGES,
        "upper": _ranges(upper) + UNCASED_RANGES,
    }


@dataclass(frozen=True)
class _Rules:
    """The tokenizer rules of one spaCy language class, as far as sentences depend on them."""

    specials: frozenset[str]
    suffix: re.Pattern[str]
    infix: re.Pattern[str]
    url: re.Pattern[str]


@lru_cache(maxsize=8)
def _rules(family: str) -> _Rules:
    cls = _classes()
    lower, upper = cls["lower"], cls["upper"]
    quotes = re.escape(QUOTES)
    punct = re.escape(PUNCT_CHARS)
    # A suffix is the longest tail that one of these matches in full.
    tails = [
        f"[{punct}]",
        "……",
        r"\.\.+",
        f"[{quotes}]",
        r"(?<=[0-9])\+",
        r"(?<=[0-9])(?:" + "|".join(map(re.escape, CURRENCY_AFTER_NUMBER)) + ")",
    ]
    units = [u for u in UNITS_AFTER_NUMBER if not (family == "es" and u == "%")]
    tails.append(r"(?<=[0-9])(?:" + "|".join(map(re.escape, units)) + ")")
    if family != "ar":
        tails += [f"[{ICON_RANGES}]", "—", "–", r"(?<=°[FfCcKk])\."]
        if family != "es":
            tails += ["'s", "'S", "’s", "’S"]
        extra = "—–" if family == "es" else ""
        # "." after a lower-case letter, digit, quote or punctuation mark ends a word...
        tails.append(rf"(?<=[0-9{lower}%²\-+{punct}|(?:{quotes}{extra}])\.")
    # ... and so does "." after two capitals (USA.), but not after one (Plan B.).
    tails.append(rf"(?<=[{upper}][{upper}])\.")
    suffix = re.compile("(?:" + "|".join(tails) + ")$")
    # Inside a word only "lower.Upper" makes a full stop a token of its own; dot runs and
    # ellipses are matched first so that they stay whole.
    alpha = cls["alpha"]
    q = quotes + ("—–" if family == "es" else "")
    inner = [
        r"\.\.+",
        "…",
        f"[{ICON_RANGES}]",
        r"(?<=[0-9])[+*^](?=[0-9-])" if family == "es" else r"(?<=[0-9])[+\-*^](?=[0-9-])",
        rf"(?<=[{lower}{q}])\.(?=[{upper}{q}])",
        rf"(?<=[{alpha}]),(?=[{alpha}])",
    ]
    if family != "es":
        inner.append(rf"(?<=[{alpha}0-9])(?:-|–|—|--|---|——|~)(?=[{alpha}])")
    inner.append(rf"(?<=[{alpha}0-9])[:<>=/](?=[{alpha}])")
    # Full stops inside a word split only as "lower.Upper"; the other infixes matter
    # because they free a special word (`y.` in `x—y.`) to be recognised.
    infix = re.compile("|".join(inner))
    label = r"[A-Za-z0-9\u00a1-\uffff]"
    url = re.compile(
        r"^(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?"
        r"(?:(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}"
        r"\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4])"
        rf"|(?:(?:{label}[A-Za-z0-9\u00a1-\uffff_-]{{0,62}})?{label}\.)+[{lower}]{{2,63}})"
        r"(?::\d{2,5})?(?:[/?#]\S*)?$"
    )
    return _Rules(frozenset(SPECIAL_CASES[family]), suffix, infix, url)


# ----------------------------------------------------------------------------------------
# Tokens


def _prefix_length(s: str) -> int:
    if s.startswith(".."):
        return len(s) - len(s.lstrip("."))
    c = s[0]
    if c == "+":
        return 0 if s[1:2].isdigit() and s[1:2].isascii() else 1
    if c in PREFIX_CHARS or _is_icon(c):
        return 1
    for cur in ("US$", "C$", "A$"):
        if s.startswith(cur):
            return len(cur)
    return 0


@lru_cache(maxsize=1)
def _icon_re() -> re.Pattern[str]:
    return re.compile(f"[{ICON_RANGES}]")


def _is_icon(c: str) -> bool:
    return _icon_re().fullmatch(c) is not None


def _suffix_length(s: str, rules: _Rules) -> int:
    # The leftmost tail that a rule matches in full wins, i.e. the longest one.
    m = rules.suffix.search(s)
    return m.end() - m.start() if m else 0


def _split_affixes(s: str, rules: _Rules, specials: frozenset[str]) -> list[str]:
    """Split one whitespace-free run into tokens: prefixes, a core, suffixes."""
    if s in specials:
        return [s]
    prefixes: list[str] = []
    suffixes: list[str] = []
    last = -1
    while s and len(s) != last:
        if s in specials:
            break
        last = len(s)
        pre = _prefix_length(s)
        if pre and s[pre:] and s[pre:] in specials:
            prefixes.append(s[:pre])
            s = s[pre:]
            break
        suf = _suffix_length(s[pre:], rules)
        if suf and s[:-suf] and s[:-suf] in specials:
            suffixes.append(s[-suf:])
            s = s[:-suf]
            break
        if pre and suf and pre + suf <= len(s):
            prefixes.append(s[:pre])
            suffixes.append(s[-suf:])
            s = s[pre:-suf]
        elif pre:
            prefixes.append(s[:pre])
            s = s[pre:]
        elif suf:
            suffixes.append(s[-suf:])
            s = s[:-suf]
        if s and s in specials:
            break
    core: list[str] = []
    if s:
        if s in specials or rules.url.match(s):
            core = [s]
        else:
            start = 0
            for m in rules.infix.finditer(s):
                if m.start() == 0:
                    continue  # an infix at the very start does not split
                core.append(s[start : m.start()])
                if m.end() > m.start():
                    core.append(m.group(0))
                start = m.end()
            if start < len(s):
                core.append(s[start:])
    return prefixes + core + suffixes[::-1]


@lru_cache(maxsize=8)
def _special_patterns(family: str) -> dict[tuple[str, ...], str]:
    """How each special word splits when it is not recognised as a whole (`Mr.` -> `Mr`,
    `.`): such token runs are merged back, e.g. inside `Dr.Smith`."""
    rules = _rules(family)
    patterns = {}
    for word in rules.specials:
        parts = tuple(_split_affixes(word, rules, frozenset()))
        if len(parts) > 1:
            patterns[parts] = word
    return patterns


def _merge_specials(tokens: list[str], family: str) -> list[str]:
    patterns = _special_patterns(family)
    spans = []
    for size in {len(p) for p in patterns}:
        for i in range(len(tokens) - size + 1):
            if tuple(tokens[i : i + size]) in patterns:
                spans.append((i, i + size))
    if not spans:
        return tokens
    # Longest first, then leftmost; a span may not share an end token with a kept one.
    spans.sort(key=lambda se: (-(se[1] - se[0]), se[0]))
    seen: set[int] = set()
    kept = []
    for start, end in spans:
        if start not in seen and end - 1 not in seen:
            kept.append((start, end))
        seen.update(range(start, end))
    out: list[str] = []
    i = 0
    for start, end in sorted(kept):
        out += tokens[i:start]
        out.append("".join(tokens[start:end]))
        i = end
    return out + tokens[i:]


_SPLIT_SPECIAL = re.compile(r"(°)([CFKcfk])(\.)|(\d+)([ap]\.m\.|m\.)")


def _special_pieces(token: str) -> list[str]:
    """The tokens a special word stands for: mostly itself, but `°C.` is `°`, `C`, `.`
    and `10a.m.` is `10`, `a.m.`."""
    m = _SPLIT_SPECIAL.fullmatch(token)
    return [g for g in m.groups() if g] if m else [token]


def _split_word(s: str, rules: _Rules, family: str) -> list[str]:
    tokens = _merge_specials(_split_affixes(s, rules, rules.specials), family)
    return [piece for t in tokens for piece in (_special_pieces(t) if t in rules.specials else [t])]


def _char_words(s: str) -> list[str]:
    """Chinese: every character is a token."""
    return list(s)


# Sudachi keeps a decimal number (3.5, 1,234.5) and an ellipsis of three dots whole, and
# reads ".…" after Latin text as one symbol. (Its dictionary makes other, rarer choices
# around dots that this does not follow.)
_JA_KEPT = re.compile(r"\d[\d,]*\.\d+(?![.\d])|\.\.\.|(?:(?<=[\x00-\x7f])|^)\.…")


def _japanese_words(s: str) -> list[str]:
    """Japanese: punctuation marks are tokens of their own; the words between them do not
    matter for sentence boundaries, so each run is kept whole."""
    out: list[str] = []
    word = ""
    i = 0
    while i < len(s):
        kept = _JA_KEPT.match(s, i)
        if kept:
            if word:
                out.append(word)
                word = ""
            out.append(kept.group(0))
            i = kept.end()
            continue
        c = s[i]
        if unicodedata.category(c).startswith("P"):
            if word:
                out.append(word)
                word = ""
            out.append(c)
        else:
            word += c
        i += 1
    if word:
        out.append(word)
    return out


_RUNS = re.compile(r"\s+|\S+")


def tokens(text: str, family: str) -> list[Token]:
    """Tokens with the whitespace that follows them, as spaCy lays text out.

    One space after a word belongs to it; any other whitespace run (several spaces, a
    newline, a tab) is a token of its own, less the one space its predecessor took.
    """
    rules = _rules(family) if family not in ("zh", "ja") else None
    out: list[Token] = []
    for run in _RUNS.findall(text):
        if run.isspace():
            if out and run[0] == " " and not out[-1].space:
                out[-1] = Token(out[-1].text, " ")
                run = run[1:]
            if run:
                out.append(Token(run, ""))
            continue
        if family == "zh":
            words = _char_words(run)
        elif family == "ja":
            words = _japanese_words(run)
        else:
            words = _split_word(run, rules, family)  # type: ignore[arg-type]
        out.extend(Token(w, "") for w in words)
    return out
