"""Sentence splitting and narrator segmentation do work linear in their input.

Both run on whole requests (20,000 characters through the server, whole books through
jobs) before any audio is made. A long run without spaces made of punctuation (`((((`,
`====`, `a:a:a:`) took the splitter minutes: every character peeled off the run searched
the whole rest of it again. A text full of curly quotes took the narrator seconds, and many unclosed <script>
tags made the HTML filter search to the end of the text from each one. Work is
counted, not timed: the characters handed to the splitter's patterns, and the lines of
the narrator's Python run, the text the HTML filter searches for closing tags; over a ladder of sizes (n to 4n) linear work grows about 4x,
quadratic 16x.
"""

from __future__ import annotations

import dataclasses
import random
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from lowvox.text import filters, narrator, sentence_tokens, split_sentences
from lowvox.text.split import _wrap, split_into_sentences

LADDER = (500, 2000)
GROWTH_LIMIT = 6.0


class _CountingPattern:
    """A compiled pattern that adds up the length of text it is asked to look at."""

    def __init__(self, pattern: re.Pattern[str], counter: list[int]) -> None:
        self._pattern = pattern
        self._counter = counter

    def search(self, text: str, *args: Any) -> re.Match[str] | None:
        self._counter[0] += len(text)
        return self._pattern.search(text, *args)

    def fullmatch(self, text: str, pos: int = 0, endpos: int = sys.maxsize) -> Any:
        self._counter[0] += min(endpos, len(text)) - pos
        return self._pattern.fullmatch(text, pos, endpos)

    def finditer(self, text: str, *args: Any) -> Any:
        self._counter[0] += len(text)
        return self._pattern.finditer(text, *args)


def _split_work(monkeypatch: pytest.MonkeyPatch, family: str, text: str) -> int:
    counter = [0]
    real = sentence_tokens._rules(family)
    counted = dataclasses.replace(
        real,
        suffix=_CountingPattern(real.suffix, counter),
        infix=_CountingPattern(real.infix, counter),
        host=_CountingPattern(real.host, counter),
    )
    monkeypatch.setattr(sentence_tokens, "_rules", lambda _family: counted)
    tokens = sentence_tokens.tokens(text, family)
    # Nothing is lost or made up on the way.
    assert "".join(t.text + t.space for t in tokens) == text
    return counter[0]


RUNS = {
    "brackets": "(",
    "equals": "=",
    "percent": "%",
    "quotes": '"',
    "dollars": "$",
    "emoji": "🙂",
    "colons": "a:",
    "at signs": "a@",
    "dots and brackets": ".(",
    "abbreviation": "Mr.",
    "hyphens": "a-",
}


@pytest.mark.parametrize("family", ["en", "es", "ar", "hi"])
@pytest.mark.parametrize("name", sorted(RUNS))
def test_splitter_work_on_a_long_run_is_linear(monkeypatch, family, name):
    unit = RUNS[name]
    small, large = (_split_work(monkeypatch, family, unit * n) for n in LADDER)
    ratio = large / max(small, 1)
    assert ratio < GROWTH_LIMIT, f"{name!r}: work grew {ratio:.1f}x over 4x input"


def test_a_20000_character_run_splits_without_losing_anything():
    # Before the fix this one call ran for minutes on a 2-core machine.
    text = "Look: " + "(=)" * 3_000 + " and then. " + "a:" * 5_000 + " end."
    chunks = split_sentences(text, "en")
    assert "".join("".join(chunks).split()) == "".join(text.split())
    assert all(len(c) <= 251 for c in chunks)
    assert "".join(split_into_sentences(text, "en")).replace(" ", "") == text.replace(" ", "")


def _narrator_lines(text: str) -> int:
    """Lines of narrator.py run to segment `text` (a deterministic measure of its work)."""
    lines = [0]
    path = narrator.__file__

    def local(frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        if event == "line":
            lines[0] += 1
        return local

    def trace(frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        return local if frame.f_code.co_filename == path else None

    old = sys.gettrace()
    sys.settrace(trace)
    try:
        narrator.segment_narrator(text, "narrator")
    finally:
        sys.settrace(old)
    return lines[0]


NARRATOR_TEXTS: dict[str, Callable[[int], str]] = {
    "curly quotes": lambda n: "“a” " * n,
    "unclosed curly quotes": lambda n: "“a " * n,
    "straight and curly": lambda n: '"a" ' * n + "“b " * n,
    "speech and narration": lambda n: '*a* "." ' * n,
}


@pytest.mark.parametrize("name", sorted(NARRATOR_TEXTS))
def test_narrator_work_is_linear(name):
    make = NARRATOR_TEXTS[name]
    small, large = (_narrator_lines(make(n // 4)) for n in LADDER)
    ratio = large / small
    assert ratio < GROWTH_LIMIT, f"{name!r}: work grew {ratio:.1f}x over 4x input"


def _html_filter_work(monkeypatch: pytest.MonkeyPatch, text: str) -> int:
    counter = [0]

    class Counting:
        def __init__(self, pattern: re.Pattern[str]) -> None:
            self._pattern = pattern

        def search(self, text: str, pos: int = 0) -> re.Match[str] | None:
            found = self._pattern.search(text, pos)
            counter[0] += (found.end() if found else len(text)) - pos  # what was read
            return found

    counted = {name: Counting(p) for name, p in filters._HIDDEN_CLOSE.items()}
    monkeypatch.setattr(filters, "_HIDDEN_CLOSE", counted)
    filters.filter_text(text, "html")
    return counter[0]


@pytest.mark.parametrize(
    "unit", ["<script>a ", "<style>b ", "<script>x</script><style>y "], ids=str.strip
)
def test_html_filter_work_on_unclosed_elements_is_linear(monkeypatch, unit):
    small, large = (_html_filter_work(monkeypatch, unit * (n // 4)) for n in LADDER)
    assert large / max(small, 1) < GROWTH_LIMIT


def _japanese_work(monkeypatch: pytest.MonkeyPatch, text: str) -> int:
    """Characters Japanese tokenizing's kept-symbol pattern reads: to its match's end, or
    when it fails to the end of the run of digits and commas it had to look through."""
    counter = [0]
    run = re.compile(r"[\d,]*")

    class Counting:
        def __init__(self, pattern: re.Pattern[str]) -> None:
            self._pattern = pattern

        def match(self, text: str, pos: int = 0) -> re.Match[str] | None:
            found = self._pattern.match(text, pos)
            read = run.match(text, pos)
            counter[0] += max(found.end() if found else 0, read.end() if read else pos) - pos + 1
            return found

    monkeypatch.setattr(sentence_tokens, "_JA_KEPT", Counting(sentence_tokens._JA_KEPT))
    tokens = sentence_tokens.tokens(text, "ja")
    assert "".join(t.text + t.space for t in tokens) == text
    return counter[0]


@pytest.mark.parametrize("unit", ["1", "1,", "12,345", "１"])
def test_japanese_tokens_work_on_a_run_of_digits_is_linear(monkeypatch, unit):
    # From every digit of a run of digits and commas the pattern for decimal numbers
    # ("3.5") read to the end of the run looking for its dot: 80,000 digits took 10 s.
    small, large = (_japanese_work(monkeypatch, unit * (n // len(unit))) for n in LADDER)
    assert large / max(small, 1) < GROWTH_LIMIT


@pytest.mark.timeout(20)
@pytest.mark.parametrize("unit", ["1", "あ", "漢字"])
def test_japanese_tokens_of_a_long_word_take_linear_time(unit):
    # A word was grown one character at a time with +=, copying it each time: 1,280,000
    # digits took 48 s. The timeout only stops a hang.
    text = unit * (1_000_000 // len(unit))
    assert [t.text for t in sentence_tokens.tokens(text, "ja")] == [text]


def _wrap_work(
    monkeypatch: pytest.MonkeyPatch, split: Callable[[str], list[str]], text: str
) -> int:
    """Characters of over-long words that textwrap's long-word step is handed (it copies
    what it keeps of each)."""
    counter = [0]
    real = textwrap.TextWrapper._handle_long_word

    def counted(self: Any, chunks: list[str], *args: Any) -> None:
        counter[0] += len(chunks[-1])
        real(self, chunks, *args)

    monkeypatch.setattr(textwrap.TextWrapper, "_handle_long_word", counted)
    pieces = split(text)
    assert "".join(pieces) == text.strip()
    return counter[0]


WRAPPED: dict[str, Callable[[str], list[str]]] = {
    "split_sentences": lambda text: split_sentences(text, "ja"),
    "split_into_sentences": lambda text: split_into_sentences(text, "ja"),
}


@pytest.mark.parametrize("unit", ["あ", "a", "1"])
@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_wrapping_a_long_word_is_linear(monkeypatch, name, unit):
    # textwrap kept the rest of a word longer than a line as a new string once per line:
    # a 2,560,000-character word (a job may hold 5,000,000) took 9 s to plan.
    small, large = (_wrap_work(monkeypatch, WRAPPED[name], unit * n) for n in LADDER)
    assert large / max(small, 1) < GROWTH_LIMIT


def test_wrapping_a_long_run_of_whitespace_is_linear(monkeypatch):
    def split(text: str) -> list[str]:
        return [c.strip() for c in split_sentences(text, "ja")]

    small, large = (_wrap_work(monkeypatch, split, " " * n + "a") for n in LADDER)
    assert large / max(small, 1) < GROWTH_LIMIT


def test_wrapping_is_textwraps():
    # The linear long-word step cuts what textwrap cuts, runs of whitespace included.
    rng = random.Random(4)
    for _ in range(3000):
        text = "".join(
            rng.choice("ab- \t\nあ") * rng.choice((1, 2, 5, 13, 30))
            for _ in range(rng.randint(0, 6))
        )
        width = rng.randint(1, 12)
        for options in ({"tabsize": 1}, {}):
            expected = textwrap.wrap(text, width=width, break_on_hyphens=False, **options)
            assert _wrap(text, width, **options) == expected, (text, width, options)
