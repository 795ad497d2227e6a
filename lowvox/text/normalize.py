"""Text normalisation for XTTS: what the model is given to read, per language.

The pipeline is the reference's (XTTS inference strips and lower-cases each sentence,
then its tokenizer cleans it): drop double quotes, fold Turkish capitals, lower-case,
spell numbers, expand abbreviations, spell symbols, collapse whitespace; then Chinese
goes to pinyin and Korean to Latin letters. Japanese instead goes straight to romaji
(cutlet reads the digits itself).
"""

from __future__ import annotations

import re

from lowvox.errors import InvalidRequest
from lowvox.text import cjk
from lowvox.text.languages import rule_key
from lowvox.text.numbers import expand_numbers
from lowvox.text.tables import expand_abbreviations, expand_symbols

_WHITESPACE = re.compile(r"\s+")
# Lone surrogates (from bad JSON escapes) cannot be encoded; the reference crashes on them.
_SURROGATES = re.compile("[\ud800-\udfff]")
# The tokenizer folds these Turkish capitals before lower-casing. In the XTTS inference path
# the sentence is already lower-cased, so İ has become "i" + a combining dot by then; lowvox
# keeps that, because it is what the model was given.
_TURKISH_CAPITALS = str.maketrans({"İ": "i", "Ö": "ö", "Ü": "ü"})


def clean(text: str, key: str) -> str:
    """The shared rules for every language but Japanese; `key` is a rule key (`zh` for Chinese)."""
    text = text.replace('"', "")
    if key == "tr":
        text = text.translate(_TURKISH_CAPITALS)
    text = text.lower()
    if key == "zh":
        from lowvox.text.zh_numbers import normalize_chinese_numbers

        text = normalize_chinese_numbers(text)
    else:
        text = expand_numbers(text, key)
    text = expand_abbreviations(text, key)
    text = expand_symbols(text, key)
    return _WHITESPACE.sub(" ", text).strip()


def normalize(text: str, lang: str) -> str:
    """The text XTTS reads for `text` in `lang` (any case; `zh` or `zh-cn`).

    Raises UnknownLanguage for a language XTTS does not speak.
    """
    key = rule_key(lang)
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string", field="text")
    text = _SURROGATES.sub("", text).strip().lower()
    if key == "ja":
        return cjk.to_romaji(text)
    text = clean(text, key)
    if key == "zh":
        return cjk.to_pinyin(text)
    if key == "ko":
        return cjk.romanize_hangul(text)
    return text
