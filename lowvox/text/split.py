"""Sentence splitting for XTTS: sentence boundaries, then greedy packing up to a limit.

The reference front-end runs spaCy's rule-based `sentencizer` over a blank spaCy
pipeline and packs the sentences into chunks of at most the language's character limit,
wrapping a single over-long sentence at word boundaries. lowvox gets the same chunks
without spaCy: `sentence_tokens` reproduces the few tokenizer rules that decide where a sentence
can end (a full stop, "!" or "?" standing as a token of its own; closing quotes and
brackets staying with their sentence), and `_sentences` the sentencizer itself.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

from lowvox.text.languages import char_limit, rule_key
from lowvox.text.sentence_tokens import tokens as _tokens
from lowvox.text.split_rules import SENTENCE_END


def _sentences(text: str, family: str) -> list[str]:
    """spaCy's sentencizer: a sentence ends after a token that is a sentence-final mark,
    once the punctuation that follows it (closing quotes, brackets, more marks) is past."""
    tokens = _tokens(text, family)
    if not tokens:
        return []
    starts = [0]
    seen_end = False
    for i, tok in enumerate(tokens):
        is_end = tok.text in SENTENCE_END
        if seen_end and not tok.is_punct and not is_end:
            starts.append(i)
            seen_end = False
        elif is_end:
            seen_end = True
    starts.append(len(tokens))
    out = []
    for a, b in zip(starts, starts[1:], strict=False):
        if a == b:
            continue
        pieces = [t.text + t.space for t in tokens[a : b - 1]] + [tokens[b - 1].text]
        out.append("".join(pieces))
    return out


_FAMILY = {"zh": "zh", "ja": "ja", "ar": "ar", "es": "es", "hi": "hi"}


class _Wrapper(textwrap.TextWrapper):
    """textwrap's wrapping, with a word longer than a line cut in linear time.

    textwrap cuts one line off such a word per call and keeps the rest as a new string, so
    a word of n characters costs n * n / width (a 2,560,000-character word took 9 s, and a
    job may hold 5,000,000). Here the rest is cut into all its lines at once: each is
    exactly a line wide, as textwrap would cut it, and the last one starts a line of its
    own. Of a run of whitespace only that last piece is kept: textwrap drops every line
    cut from such a run (and the whole run once a line has been written). The lines are
    textwrap's; `test_wrapping_is_textwraps` compares them.
    """

    def _handle_long_word(
        self, reversed_chunks: list[str], cur_line: list[str], cur_len: int, width: int
    ) -> None:
        super()._handle_long_word(reversed_chunks, cur_line, cur_len, width)
        rest = reversed_chunks[-1] if reversed_chunks else ""
        if width < 1 or len(rest) <= width:
            return
        starts = range(0, len(rest), width)
        if rest.strip():
            reversed_chunks[-1:] = [rest[i : i + width] for i in reversed(starts)]
        else:
            reversed_chunks[-1] = rest[starts[-1] :]


def _wrap(text: str, width: int, tabsize: int = 8) -> list[str]:
    """`textwrap.wrap(text, width, break_on_hyphens=False, tabsize=tabsize)`, in linear time."""
    return _Wrapper(width=width, break_on_hyphens=False, tabsize=tabsize).wrap(text)


def split_sentences_exact(text: str, lang: str, limit: int | None) -> list[str]:
    """The reference's chunks, blank ones included (see `split_sentences`)."""
    if limit is None or len(text) < limit:
        return [text.lstrip()]
    family = _FAMILY.get(rule_key(lang), "en")
    chunks = [""]
    for sentence in _sentences(text, family):
        if len(chunks[-1]) + len(sentence) <= limit:
            # The joining space is not counted against the limit, as in the reference.
            chunks[-1] = (chunks[-1] + " " + sentence).lstrip()
        elif len(sentence) > limit:
            chunks += _wrap(sentence, limit, tabsize=1)
        else:
            chunks.append(sentence)
    if len(chunks) > 1 and chunks[0] == "":
        del chunks[0]
    return chunks


def split_sentences(text: str, lang: str, limit: int | None = None) -> list[str]:
    """Split `text` into chunks XTTS can speak one at a time.

    Sentences are packed greedily into chunks of at most `limit` characters (default: the
    language's XTTS limit); a sentence longer than that is wrapped at word boundaries. Text
    shorter than the limit is one chunk. Chunks that are only whitespace are dropped. As
    in the reference, the space that joins two sentences is not counted, so a packed
    chunk can be `limit + 1` characters long (XTTS only warns past its limit; the hard
    limit is 400 tokens, which the XTTS engine enforces by cutting again: `fit_pieces`).
    """
    if limit is None:
        limit = char_limit(lang)
    elif limit < 1:
        from lowvox.errors import InvalidRequest

        raise InvalidRequest(f"split limit must be positive, not {limit}", field="limit")
    return [c for c in split_sentences_exact(text, lang, limit) if c.strip()]


def split_into_sentences(text: str, lang: str, limit: int | None = None) -> list[str]:
    """One entry per sentence, by the same sentence rules as `split_sentences` but without
    packing (long-form jobs keep a row, a take and a subtitle cue per sentence); a sentence
    longer than `limit` (default: the language's) is wrapped at word boundaries."""
    if limit is None:
        limit = char_limit(lang)
    elif limit < 1:
        from lowvox.errors import InvalidRequest

        raise InvalidRequest(f"split limit must be positive, not {limit}", field="limit")
    out: list[str] = []
    for sentence in _sentences(text, _FAMILY.get(rule_key(lang), "en")):
        sentence = " ".join(sentence.split())
        if len(sentence) > limit:
            out += _wrap(sentence, limit)
        elif sentence:
            out.append(sentence)
    return out


def fit_pieces(piece: str, too_long: Callable[[str], bool]) -> list[str]:
    """`piece`, cut at word boundaries into halves and halves again until no part is
    `too_long`: a chunk within the character limit can still pass XTTS's 400-token limit
    once numbers are spelled out ("$1,234,567.89" is 17 words). A part that is a single
    character is given back as it is, for the caller to refuse."""
    if len(piece) < 2 or not too_long(piece):
        return [piece]
    halves = _wrap(piece, (len(piece) + 1) // 2)
    return [part for half in halves for part in fit_pieces(half, too_long)]
