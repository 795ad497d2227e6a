"""Parity with the golden bundle: every text case and split case of cases.json, exactly."""

from __future__ import annotations

import pytest

from lowvox.text import normalize, split_sentences
from lowvox.text.split import split_sentences_exact
from tests.text.text_fixtures import GOLDEN, golden_cases

pytestmark = pytest.mark.skipif(
    not (GOLDEN / "cases.json").is_file(), reason="golden bundle not present"
)


def _text_cases() -> list[dict]:
    return golden_cases()["text_cases"] if (GOLDEN / "cases.json").is_file() else []


def _split_cases() -> list[dict]:
    return golden_cases()["split_cases"] if (GOLDEN / "cases.json").is_file() else []


@pytest.fixture(scope="module")
def tokenizer():
    from lowvox.text.tokenizer import XttsTokenizer

    return XttsTokenizer.from_file(GOLDEN / "vocab.json")


def test_golden_has_all_cases():
    assert len(_text_cases()) == 20
    assert len(_split_cases()) == 3


@pytest.mark.parametrize("case", _text_cases(), ids=lambda c: f"{c['id']}-{c['language']}")
def test_normalized_matches_reference(case):
    assert normalize(case["text"], case["language"]) == case["normalized"]


@pytest.mark.parametrize("case", _text_cases(), ids=lambda c: f"{c['id']}-{c['language']}")
def test_token_ids_match_reference(case, tokenizer):
    assert tokenizer.normalize(case["text"], case["language"]) == case["normalized"]
    assert tokenizer.encode(case["text"], case["language"]) == case["token_ids"]


@pytest.mark.parametrize("case", _split_cases(), ids=lambda c: c["language"])
def test_split_matches_reference(case):
    assert split_sentences_exact(case["text"], case["language"], case["limit"]) == case["sentences"]
    # The public function adds nothing here: these cases have no blank chunks.
    assert split_sentences(case["text"], case["language"], case["limit"]) == case["sentences"]
    # ... and the limit defaults to the language's, which these cases use.
    assert split_sentences(case["text"], case["language"]) == case["sentences"]
