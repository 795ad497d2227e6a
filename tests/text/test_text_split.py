"""split_sentences: limits, packing, and what it does with odd input."""

from __future__ import annotations

import random

import pytest

from lowvox.errors import InvalidRequest
from lowvox.text import CHAR_LIMITS, LANGUAGES, split_sentences
from lowvox.text.split import split_sentences_exact


def _chars(chunks: list[str]) -> str:
    return "".join("".join(chunks).split())


def test_short_text_is_one_chunk():
    assert split_sentences("  Hello there. How are you?", "en") == ["Hello there. How are you?"]


def test_sentences_are_packed_up_to_the_limit():
    text = "One two three. " * 10
    chunks = split_sentences(text, "en", limit=40)
    assert chunks == ["One two three. One two three."] * 5


def test_overlong_sentence_is_wrapped_at_words():
    text = "word " * 100
    chunks = split_sentences(text, "en", limit=50)
    assert len(chunks) > 1
    assert all(len(c) <= 50 for c in chunks)
    assert all(set(c.split()) == {"word"} for c in chunks)


def test_abbreviations_do_not_end_sentences():
    text = "Mr. Smith met Dr. Jones at 3 p.m. yesterday. " + "It rained a lot. " * 20
    chunks = split_sentences(text, "en", limit=60)
    assert chunks[0] == "Mr. Smith met Dr. Jones at 3 p.m. yesterday. It rained a lot."
    assert chunks[1] == "It rained a lot. It rained a lot. It rained a lot."


def test_closing_quotes_stay_with_their_sentence():
    text = 'He said "stop." Then he left. ' * 10
    chunks = split_sentences(text, "en", limit=40)
    assert chunks[0] == 'He said "stop." Then he left.'


def test_cjk_sentence_marks():
    # Sentences are joined with a space that the limit does not count (as the reference).
    chunks = split_sentences("你好。我们走吧！" * 12, "zh", limit=20)
    assert chunks == ["你好。 我们走吧！ 你好。 我们走吧！"] * 6
    ja = split_sentences("今日は晴れです。散歩に行きましょう！" * 6, "ja", limit=30)
    assert ja[0] == "今日は晴れです。 散歩に行きましょう！ 今日は晴れです。"


def test_blank_chunks_are_dropped():
    # The reference yields a whitespace-only last chunk here; XTTS cannot speak it.
    text = "Hello there. Abcdefghij klmnopqrst uvwxyz.\n\n"
    assert split_sentences_exact(text, "en", 30)[-1] == "\n\n"
    assert split_sentences(text, "en", 30) == ["Hello there.", "Abcdefghij klmnopqrst uvwxyz."]
    assert split_sentences("", "en") == []
    assert split_sentences("   \n\t ", "en", limit=3) == []


def test_bad_limit_and_language():
    with pytest.raises(InvalidRequest):
        split_sentences("Hello.", "en", limit=0)
    with pytest.raises(InvalidRequest):
        split_sentences("Hello.", "xx")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_random_text_keeps_every_character_and_the_limit(lang):
    rng = random.Random(lang)
    pieces = ["Hello", "world.", "¿Qué?", "你好。", "“quoted.”", "e.g.", "...", "!", "😀", "\n",
              "a—b.", "3.14", "Mr.", "한국어.", "नमस्ते।", "مرحبا.", "Ω.", "\x07", "*", '"']  # fmt: skip
    for _ in range(30):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 120)))
        limit = rng.choice([CHAR_LIMITS[lang], 20, 7])
        chunks = split_sentences(text, lang, limit=limit)
        assert _chars(chunks) == _chars([text])
        # The reference does not count the joining space, so a chunk may run one over.
        assert all(0 < len(c) <= limit + 1 for c in chunks)
