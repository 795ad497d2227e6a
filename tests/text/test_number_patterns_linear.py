"""The number-spelling patterns do work linear in their input (issue 14, item 10).

Written as the XTTS reference has them, `[0-9.,]*[0-9]+£` tried at every position of a
run of digits is cubic: 4,000 digits took 35 s, and the jobs API takes millions of
characters. Python's `re` cannot count its own steps, so each pattern is run on a model
backtracking matcher that can: it follows the parsed pattern as `re` does (same order of
alternatives, greedy repeats giving back one at a time) but without any of `re`'s
shortcuts, so its step count is an upper bound of the real work. On a ladder of input
sizes (n, 2n, 4n) linear work grows about 4x from n to 4n; quadratic grows 16x.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest

from lowvox.text import numbers, zh_numbers
from lowvox.text.numbers import expand_numbers

try:  # Python 3.11+
    import re._constants as C
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as C  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

import re

LADDER = (120, 240, 480)  # multiples of 4 and 3: the same shape of input at each size
# Linear work grows ~4x over the ladder (n to 4n), quadratic ~16x.
GROWTH_LIMIT = 6.0

_SINGLE = (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN)


def _category(cat: Any, ch: str) -> bool:
    if cat == C.CATEGORY_DIGIT:
        return unicodedata.category(ch) == "Nd"
    if cat == C.CATEGORY_NOT_DIGIT:
        return unicodedata.category(ch) != "Nd"
    if cat == C.CATEGORY_SPACE:
        return ch.isspace()
    if cat == C.CATEGORY_NOT_SPACE:
        return not ch.isspace()
    if cat == C.CATEGORY_WORD:
        return ch.isalnum() or ch == "_"
    if cat == C.CATEGORY_NOT_WORD:
        return not (ch.isalnum() or ch == "_")
    raise NotImplementedError(cat)


class Model:
    """A counting backtracking matcher for the subset of syntax the patterns use."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.tree = sre_parse.parse(pattern.pattern, pattern.flags)
        self.dotall = bool(pattern.flags & re.DOTALL)
        self.steps = 0
        self.text = ""

    def _char(self, op: Any, av: Any, ch: str) -> bool:
        if op == C.LITERAL:
            return ord(ch) == av
        if op == C.NOT_LITERAL:
            return ord(ch) != av
        if op == C.ANY:
            return self.dotall or ch != "\n"
        negate = False
        hit = False
        for iop, iav in av:
            if iop == C.NEGATE:
                negate = True
            elif iop == C.LITERAL:
                hit = hit or ord(ch) == iav
            elif iop == C.RANGE:
                hit = hit or iav[0] <= ord(ch) <= iav[1]
            elif iop == C.CATEGORY:
                hit = hit or _category(iav, ch)
            else:
                raise NotImplementedError(iop)
        return hit != negate

    def _word(self, pos: int) -> bool:
        return 0 <= pos < len(self.text) and _category(C.CATEGORY_WORD, self.text[pos])

    def _at(self, av: Any, pos: int) -> bool:
        if av == C.AT_BOUNDARY:
            return self._word(pos - 1) != self._word(pos)
        if av == C.AT_NON_BOUNDARY:
            return self._word(pos - 1) == self._word(pos)
        if av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            return pos == 0
        if av in (C.AT_END, C.AT_END_STRING):
            return pos == len(self.text) or (av == C.AT_END and pos == len(self.text) - 1)
        raise NotImplementedError(av)

    def seq(self, nodes: list, i: int, pos: int, k: Callable[[int], bool]) -> bool:
        if i == len(nodes):
            return k(pos)
        self.steps += 1
        op, av = nodes[i]

        def nxt(p: int) -> bool:
            return self.seq(nodes, i + 1, p, k)

        text = self.text
        if op in _SINGLE:
            return pos < len(text) and self._char(op, av, text[pos]) and nxt(pos + 1)
        if op == C.SUBPATTERN:
            return self.seq(av[-1].data, 0, pos, nxt)
        if op == C.BRANCH:
            return any(self.seq(alt.data, 0, pos, nxt) for alt in av[1])
        if op == C.AT:
            return self._at(av, pos) and nxt(pos)
        if op in (C.ASSERT, C.ASSERT_NOT):
            direction, sub = av
            if direction == 1:
                ok = self.seq(sub.data, 0, pos, lambda e: True)
            else:
                width = sub.getwidth()[0]
                ok = pos >= width and self.seq(sub.data, 0, pos - width, lambda e: e == pos)
            return ok == (op == C.ASSERT) and nxt(pos)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            return self._repeat(op == C.MAX_REPEAT, av, pos, nxt)
        raise NotImplementedError(op)

    def _repeat(self, greedy: bool, av: Any, pos: int, nxt: Callable[[int], bool]) -> bool:
        low, high, sub = av
        items = sub.data
        if len(items) == 1 and items[0][0] in _SINGLE:
            op, iav = items[0]
            count = 0
            while count < high and pos + count < len(self.text):
                self.steps += 1
                if not self._char(op, iav, self.text[pos + count]):
                    break
                count += 1
            if count < low:
                return False
            order = range(count, low - 1, -1) if greedy else range(low, count + 1)
            for taken in order:
                self.steps += 1
                if nxt(pos + taken):
                    return True
            return False

        def again(done: int, at: int) -> bool:
            more = done < high and self.seq(items, 0, at, lambda e: e != at and again(done + 1, e))
            if greedy:
                return more or (done >= low and nxt(at))
            return (done >= low and nxt(at)) or more

        return again(0, pos)

    def finditer(self, text: str) -> list[tuple[int, int]]:
        """The spans `re.finditer` finds, counting steps on the way."""
        self.text = text
        spans = []
        pos = 0
        ends: list[int] = []

        def found(end: int) -> bool:
            ends.append(end)
            return True

        while pos <= len(text):
            ends.clear()
            if self.seq(self.tree.data, 0, pos, found):
                spans.append((pos, ends[0]))
                pos = ends[0] if ends[0] > pos else pos + 1
            else:
                pos += 1
        return spans


def _inputs(n: int) -> dict[str, str]:
    return {
        "digits": "1" * n,
        "digits then x": "1" * n + "x",
        "1.1.1": "1." * (n // 2),
        "1,1,1": "1," * (n // 2),
        "12 12 12": "12 " * (n // 3),
        "£ then digits": "£" + "1" * n,
        "text": "^" + "中" * n + "$",
        "digits in anchors": "^" + "1" * n + "$",
        "letters": "^" + "x" * n + "$",
    }


def _patterns() -> dict[str, re.Pattern[str]]:
    found = {
        "comma grouped": numbers._COMMA_GROUPED,
        "dot grouped": numbers._DOT_GROUPED,
        "decimal": numbers._DECIMAL,
        "hindi grouped": numbers._HINDI_GROUPED,
        "hindi decimal": numbers._HINDI_DECIMAL,
        "cardinal": numbers._CARDINAL,
    }
    found.update({f"currency {c}": p for c, p in numbers._CURRENCIES})
    found.update({f"ordinal {lang}": p for lang, p in numbers._ORDINALS.items()})
    found.update({f"zh rule {i}": p for i, (p, _) in enumerate(zh_numbers._RULES)})
    found["zh code"] = zh_numbers._CODE
    return found


def growth(pattern: re.Pattern[str], make: Callable[[int], str]) -> float:
    """Steps on the largest input of the ladder over steps on the smallest."""
    counts = []
    for n in LADDER:
        model = Model(pattern)
        text = make(n)
        spans = model.finditer(text)
        # The model is faithful: it finds what `re` finds.
        assert spans == [m.span() for m in pattern.finditer(text)], pattern.pattern
        counts.append(model.steps)
    return counts[-1] / counts[0]


@pytest.fixture(autouse=True)
def _deep_enough():
    # The model recurses once per repeated group it matches.
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20_000))
    yield
    sys.setrecursionlimit(old)


def test_the_model_tells_quadratic_from_linear():
    # The reference's decimal pattern, tried inside a run of digits: quadratic.
    assert growth(re.compile(r"[0-9]+[.,][0-9]+"), lambda n: "1" * n) > 12
    assert growth(re.compile(r"(?<![0-9])[0-9]+[.,][0-9]+"), lambda n: "1" * n) < GROWTH_LIMIT


@pytest.mark.parametrize("name", sorted(_patterns()))
def test_number_pattern_work_is_linear(name):
    pattern = _patterns()[name]
    for label in _inputs(LADDER[0]):
        ratio = growth(pattern, lambda n, label=label: _inputs(n)[label])
        assert ratio < GROWTH_LIMIT, f"{name} on {label!r}: work grew {ratio:.1f}x over 4x input"


def test_a_100000_digit_run_is_spoken_digit_by_digit():
    # Past num2words' limit a run is read digit by digit; before the fix the currency
    # and decimal patterns alone would have run for days on it.
    words = expand_numbers("7" * 100_000 + " and 2.5", "en")
    assert words.startswith("seven seven seven")
    assert words.count("seven") == 100_000
    assert words.endswith("and two point five")
