"""Parity with the reference front-end on lowvox's own sentences.

The expected outputs in fixtures/reference_text.json were produced by running coqui-tts's
XTTS tokenizer and spaCy splitter (see make_fixtures.py), not by lowvox.
"""

from __future__ import annotations

import pytest

from lowvox.text import normalize
from lowvox.text.split import _sentences, split_sentences_exact
from tests.text.text_fixtures import GOLDEN, reference_fixture

_FIXTURE = reference_fixture()
_OK = [c for c in _FIXTURE["normalize_cases"] if "reference_error" not in c]
_CRASHES = [c for c in _FIXTURE["normalize_cases"] if "reference_error" in c]


def _id(case: dict) -> str:
    return f"{case['language']}:{case['text'][:40]}"


def test_fixture_covers_every_language():
    langs = {c["language"] for c in _OK}
    assert langs == {
        "en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn",
        "hu", "ko", "ja", "hi",
    }  # fmt: skip
    for lang in langs:
        assert sum(c["language"] == lang for c in _OK) >= 5, lang


@pytest.mark.parametrize("case", _OK, ids=_id)
def test_normalize_matches_reference(case):
    assert normalize(case["text"], case["language"]) == case["normalized"]


@pytest.mark.skipif(not (GOLDEN / "vocab.json").is_file(), reason="golden bundle not present")
def test_token_ids_match_reference():
    from lowvox.text.tokenizer import XttsTokenizer

    tok = XttsTokenizer.from_file(GOLDEN / "vocab.json")
    cases = [c for c in _OK if "token_ids" in c]
    assert len(cases) > 100
    for case in cases:
        assert tok.encode(case["text"], case["language"]) == case["token_ids"], case["text"]


@pytest.mark.parametrize("case", _CRASHES, ids=_id)
def test_no_crash_where_the_reference_crashes(case):
    # Hindi numbers, Czech ordinals and numbers too big for num2words raise in the
    # reference; lowvox spells something instead of failing mid-request.
    out = normalize(case["text"], case["language"])
    assert out.strip()
    assert not any(c.isascii() and c.isdigit() for c in out), out


@pytest.mark.parametrize(
    "case", _FIXTURE["split_cases"], ids=lambda c: f"{c['language']}-{c['limit']}-{c['text'][:20]}"
)
def test_split_matches_reference(case):
    assert split_sentences_exact(case["text"], case["language"], case["limit"]) == case["sentences"]


def test_sentence_boundaries_match_reference():
    """Random texts full of abbreviations, quotes, ellipses and odd spacing, per spaCy
    language the reference uses; lowvox's light splitter must agree on every one."""
    cases = _FIXTURE["sentence_cases"]
    assert {c["family"] for c in cases} == {"en", "es", "ar", "hi", "zh", "ja"}
    wrong = [c for c in cases if _sentences(c["text"], c["family"]) != c["sentences"]]
    assert not wrong, wrong[:3]
