"""XttsTokenizer: ids from the vocab file, language tags, limits and bad input."""

from __future__ import annotations

import json

import pytest

from lowvox.errors import EngineUnavailable, InvalidRequest, UnknownLanguage
from lowvox.text.tokenizer import XttsTokenizer
from tests.text.text_fixtures import GOLDEN

pytestmark = pytest.mark.skipif(
    not (GOLDEN / "vocab.json").is_file(), reason="golden bundle not present"
)


@pytest.fixture(scope="module")
def tok() -> XttsTokenizer:
    return XttsTokenizer.from_file(GOLDEN / "vocab.json")


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    data = json.loads((GOLDEN / "vocab.json").read_text(encoding="utf-8"))
    ids = dict(data["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in data["added_tokens"]})
    return ids


def test_special_ids_come_from_the_vocab(tok, vocab):
    assert tok.space_id == vocab["[SPACE]"]
    assert tok.stop_text == vocab["[STOP]"]
    assert tok.start_text == vocab["[START]"]
    assert tok.unk_id == vocab["[UNK]"]
    assert tok.language_id("zh") == vocab["[zh-cn]"]
    assert tok.vocab_size == len(vocab)


def test_language_tag_first_and_spaces_as_tokens(tok, vocab):
    ids = tok.encode("hello world", "EN")
    assert ids[0] == vocab["[en]"]
    assert vocab["[SPACE]"] in ids
    assert tok.decode(ids) == "[en]hello world"


def test_zh_spellings_give_the_same_ids(tok, vocab):
    ids = {tuple(tok.encode("你好", lang)) for lang in ("zh", "zh-cn", "ZH-CN", "zh_cn")}
    assert len(ids) == 1
    assert next(iter(ids))[0] == vocab["[zh-cn]"]


def test_unknown_language(tok):
    with pytest.raises(UnknownLanguage):
        tok.encode("hello", "klingon")


def test_char_limits(tok):
    assert tok.char_limit("en") == 250
    assert tok.char_limit("zh") == 82
    assert tok.char_limit("JA") == 71


def test_400_token_limit(tok):
    tok.check_length(list(range(399)))
    with pytest.raises(InvalidRequest) as err:
        tok.check_length(list(range(400)))
    assert err.value.field == "text"
    assert "split" in str(err.value)
    long_ids = tok.encode("zebra quokka " * 80, "en")
    assert len(long_ids) >= 400
    with pytest.raises(InvalidRequest):
        tok.check_length(long_ids)


@pytest.mark.parametrize("lang", ["en", "de", "ru", "es", "hi"])
def test_chunks_that_numbers_push_past_the_token_limit_are_cut_again(tok, lang):
    from lowvox.engines.xtts.pipeline import encode_text
    from lowvox.text import split_sentences

    # Every chunk is within the character limit, but spelled out it is thousands of tokens:
    # splitting on must still speak all of it, in pieces the GPT can take.
    text = " ".join(str(n) for n in range(123_456_789, 123_456_789 + 40 * 7_919, 7_919))
    assert all(len(c) <= tok.char_limit(lang) + 1 for c in split_sentences(text, lang))
    pieces = encode_text(tok, text, lang, True, 402)
    assert len(pieces) > len(split_sentences(text, lang))
    assert all(p.shape[1] < 402 for p in pieces)

    # Nothing lost or repeated: less their language tags and joined by spaces, the pieces
    # are the ids of the chunks as they were.
    def joined(ids: list[list[int]]) -> list[int]:
        out: list[int] = []
        for one in ids:
            out += ([tok.space_id] if out else []) + one[1:]
        return out

    chunks = [tok.encode(c.strip().lower(), lang) for c in split_sentences(text, lang)]
    assert joined([p[0].tolist() for p in pieces]) == joined(chunks)
    with pytest.raises(InvalidRequest, match="turn sentence splitting on"):
        encode_text(tok, text, lang, False, 402)


def test_missing_or_bad_vocab_file(tmp_path):
    with pytest.raises(EngineUnavailable):
        XttsTokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(EngineUnavailable):
        XttsTokenizer.from_file(bad)
