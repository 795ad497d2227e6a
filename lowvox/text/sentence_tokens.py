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
    host: re.Pattern[str]  # a URL's host and port
    # The longest tail `suffix` can match, dot runs aside (they are measured directly).
    longest_tail: int


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
    # spaCy's URL pattern less its scheme and user info, which `_is_url` finds itself.
    host = re.compile(
        r"(?:(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}"
        r"\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4])"
        rf"|(?:(?:{label}[A-Za-z0-9\u00a1-\uffff_-]{{0,62}})?{label}\.)+[{lower}]{{2,63}})"
        r"(?::\d{2,5})?"
    )
    longest_tail = max(len("……"), len("'s"), *map(len, CURRENCY_AFTER_NUMBER), *map(len, units))
    return _Rules(frozenset(SPECIAL_CASES[family]), suffix, infix, host, longest_tail)


# ----------------------------------------------------------------------------------------
# Tokens


def _prefix_length(s: str, a: int, b: int) -> int:
    """The length of the prefix split off the word `s[a:b]` (0: none)."""
    if s.startswith("..", a, b):
        end = a
        while end < b and s[end] == ".":
            end += 1
        return end - a
    c = s[a]
    if c == "+":
        following = s[a + 1 : min(a + 2, b)]
        return 0 if following.isdigit() and following.isascii() else 1
    if c in PREFIX_CHARS or _is_icon(c):
        return 1
    for cur in ("US$", "C$", "A$"):
        if s.startswith(cur, a, b):
            return len(cur)
    return 0


@lru_cache(maxsize=1)
def _icon_re() -> re.Pattern[str]:
    return re.compile(f"[{ICON_RANGES}]")


def _is_icon(c: str) -> bool:
    return _icon_re().fullmatch(c) is not None


# Characters a tail's lookbehind may look at before the tail itself (`(?<=°C)\.`).
_LOOKBEHIND = 2


def _suffix_length(s: str, a: int, b: int, rules: _Rules) -> int:
    """The length of the suffix split off the word `s[a:b]` (0: none)."""
    # The leftmost tail that a rule matches in full wins, i.e. the longest one. Only a run
    # of dots can be longer than `longest_tail`, so the search looks at the end of the word
    # alone: searching all of it for every character peeled off a long run of punctuation
    # made one 20,000-character "word" take minutes.
    if b - a >= 2 and s[b - 2 : b] == "..":
        start = b
        while start > a and s[start - 1] == ".":
            start -= 1
        return b - start
    m = rules.suffix.search(s[max(a, b - rules.longest_tail - _LOOKBEHIND) : b])
    return m.end() - m.start() if m else 0


@lru_cache(maxsize=16)
def _longest(words: frozenset[str]) -> int:
    return max(map(len, words), default=0)


_SCHEME = re.compile(r"[\w+\-.]{2,}://")


def _is_url(s: str, rules: _Rules) -> bool:
    """Whether the whitespace-free `s` is a URL by spaCy's pattern: an optional scheme,
    optional user info up to an "@", a host with an optional port, then "/", "?" or "#"
    and anything. As one regex its user info part backtracks over every ":" and "@" of a
    long run (seconds for 20,000 characters); here each place a host may start is tried
    once, over the stretch up to the next "@", so the whole check is linear."""
    starts = [0]
    scheme = _SCHEME.match(s)
    if scheme:
        starts.append(scheme.end())
    at = s.find("@", 1)  # user info is at least one character
    while at != -1:
        starts.append(at + 1)
        at = s.find("@", at + 1)
    for start in starts:
        stop = s.find("@", start)
        stop = len(s) if stop == -1 else stop
        path = [i for i in (s.find(c, start, stop) for c in "/?#") if i != -1]
        if path:
            end = min(path)
        elif stop == len(s):
            end = len(s)
        else:
            continue  # a host has no "@" in it
        if rules.host.fullmatch(s, start, end):
            return True
    return False


def _is_special(s: str, specials: frozenset[str]) -> bool:
    return _is_special_at(s, 0, len(s), specials)


def _is_special_at(s: str, a: int, b: int, specials: frozenset[str]) -> bool:
    """Whether `s[a:b]` is a special word; the length is checked before anything is copied."""
    return b - a <= _longest(specials) and s[a:b] in specials


def _split_affixes(s: str, rules: _Rules, specials: frozenset[str]) -> list[str]:
    """Split one whitespace-free run into tokens: prefixes, a core, suffixes."""
    if _is_special(s, specials):
        return [s]
    prefixes: list[str] = []
    suffixes: list[str] = []
    # The part still to split is s[a:b]: indices, not slices, keep a long run linear.
    a, b = 0, len(s)
    last = -1
    while a < b and b - a != last:
        if _is_special_at(s, a, b, specials):
            break
        last = b - a
        pre = _prefix_length(s, a, b)
        if pre and a + pre < b and _is_special_at(s, a + pre, b, specials):
            prefixes.append(s[a : a + pre])
            a += pre
            break
        suf = _suffix_length(s, a + pre, b, rules)
        if suf and a < b - suf and _is_special_at(s, a, b - suf, specials):
            suffixes.append(s[b - suf : b])
            b -= suf
            break
        if pre and suf and pre + suf <= b - a:
            prefixes.append(s[a : a + pre])
            suffixes.append(s[b - suf : b])
            a, b = a + pre, b - suf
        elif pre:
            prefixes.append(s[a : a + pre])
            a += pre
        elif suf:
            suffixes.append(s[b - suf : b])
            b -= suf
        if a < b and _is_special_at(s, a, b, specials):
            break
    s = s[a:b]
    core: list[str] = []
    if s:
        if _is_special(s, specials) or _is_url(s, rules):
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
# A run of digits and commas: `_JA_KEPT` looks to its end from any digit in it, and
# finds a decimal number from all of them or from none (only what follows the run counts).
_JA_DIGIT_RUN = re.compile(r"\d[\d,]*")


def _japanese_words(s: str) -> list[str]:
    """Japanese: punctuation marks are tokens of their own; the words between them do not
    matter for sentence boundaries, so each run is kept whole."""
    out: list[str] = []
    start = 0  # where the word being read began: a word is a slice, not grown by +=
    i = 0
    unkept = 0  # no number, ellipsis or symbol starts before this: a run of digits it failed in
    while i < len(s):
        kept = _JA_KEPT.match(s, i) if i >= unkept else None
        if kept is None and i >= unkept and (run := _JA_DIGIT_RUN.match(s, i)):
            unkept = run.end()
        if kept:
            if start < i:
                out.append(s[start:i])
            out.append(kept.group(0))
            i = start = kept.end()
            continue
        if unicodedata.category(s[i]).startswith("P"):
            if start < i:
                out.append(s[start:i])
            out.append(s[i])
            start = i + 1
        i += 1
    if start < len(s):
        out.append(s[start:])
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
