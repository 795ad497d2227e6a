"""Numbers spelled out as words, per language, the way the XTTS reference front-end does it.

The steps and their order are the reference's: thousands separators are dropped, then
currencies ($ £ € with their cents), then decimals, then ordinals, then cardinals. Words
come from num2words, whose output defines what XTTS was trained on. Where num2words has no
rule (Hindi; Czech ordinals; huge numbers) the reference raises; lowvox falls back to
something speakable instead (see `_spell`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from lowvox.text import hindi

logger = logging.getLogger(__name__)

# Thousands separators: English and Russian write 1,234.5; the others write 1.234,5. The
# dot in the second pattern is deliberately unescaped (any one character), as in the
# reference, which matters for text like "1 234".
_COMMA_GROUPED = re.compile(r"\b\d{1,3}(?:,\d{3})*(?:\.\d+)?\b")
_DOT_GROUPED = re.compile(r"\b\d{1,3}(?:.\d{3})*(?:,\d+)?\b")

# Every pattern below is linear in its input. A match may only start where a run of its
# characters starts (a lookbehind says so), and no two unbounded repeats overlap: written
# as the reference has them (`[0-9.,]*[0-9]+£` tried at every position of a digit run),
# they take cubic time in a long run of digits. The matches are the reference's: a match
# that cannot start at the start of a run cannot start later in it either.
_CURRENCIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("GBP", re.compile(r"£[0-9.,]*[0-9]|(?<![0-9.,])[0-9.,]*[0-9]£")),
    ("USD", re.compile(r"\$[0-9.,]*[0-9]|(?<![0-9.,])[0-9.,]*[0-9]\$")),
    ("EUR", re.compile(r"(?<![0-9.,])[0-9.,]*[0-9]€|€[0-9.,]*[0-9]")),
)

# What num2words puts between the main unit and the cents; a whole amount loses it.
_CENTS_JOINER = {"es": " con ", "fr": " et ", "de": " und ", "pt": " e ", "it": " e "}

_DECIMAL = re.compile(r"(?<![0-9])[0-9]+[.,][0-9]+")
# Hindi (which the reference cannot spell at all) is read the way it is written in India:
# commas group digits (1,00,000 is a lakh) and the point is the decimal separator.
_HINDI_GROUPED = re.compile(r"\b\d{1,3}(?:,\d{2,3})+\b")
_HINDI_DECIMAL = re.compile(r"(?<![0-9])[0-9]+\.[0-9]+")
_CARDINAL = re.compile(r"[0-9]+")

_ORDINALS: dict[str, re.Pattern[str]] = {
    lang: re.compile(r"(?<![0-9])([0-9]+)" + suffix)
    for lang, suffix in {
        "en": r"(st|nd|rd|th)",
        "es": r"(º|ª|er|o|a|os|as)",
        "fr": r"(º|ª|er|re|e|ème)",
        "de": r"(st|nd|rd|th|º|ª|\.(?=\s|$))",
        "pt": r"(º|ª|o|a|os|as)",
        "it": r"(º|°|ª|o|a|i|e)",
        "pl": r"(º|ª|st|nd|rd|th)",
        "ar": r"(ون|ين|ث|ر|ى)",
        "cs": r"(\.)(?=\s|$)",
        "ru": r"(-й|-я|-е|-ое|-ье|-го)",
        "nl": r"(de|ste|e)",
        "tr": r"(\.|inci|nci|uncu|üncü)",
        "hu": r"(\.|adik|edik|odik|ödik|ödike|ik)",
        "ko": r"(번째|번|차|째)",
        "hi": r"(st|nd|rd|th)",
    }.items()
}


def num2words(number: int | float, **kwargs: object) -> str:
    # Imported on first use: num2words loads every language module, which is slow.
    from num2words import num2words as spell

    return spell(number, **kwargs)


def _digit_by_digit(digits: str, lang: str) -> str:
    return " ".join(_cardinal_words(int(d), lang) for d in digits)


def _cardinal_words(value: int, lang: str) -> str:
    if lang == "hi":
        return hindi.cardinal(value)
    return num2words(value, lang=lang)


def _spell(make: Callable[[], str], fallback: Callable[[], str], what: str) -> str:
    """Words from num2words, or the fallback where num2words has no rule for this input."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - NotImplementedError, OverflowError, KeyError,
        # even RecursionError (hu, 123456781.0): the reference crashes, lowvox reads on.
        logger.debug("num2words cannot spell %s (%s); using the fallback", what, e)
        return fallback()


def _cardinal(digits: str, lang: str) -> str:
    return _spell(
        lambda: _cardinal_words(int(digits), lang),
        lambda: _digit_by_digit(digits, lang),
        digits,
    )


def _decimal(match: re.Match[str], lang: str) -> str:
    text = match.group(0)
    whole, frac = re.split(r"[.,]", text, maxsplit=1)
    if lang == "hi":
        return hindi.decimal(_cardinal(whole, lang), frac)
    return _spell(
        lambda: num2words(float(text.replace(",", ".")), lang=lang),
        lambda: f"{_cardinal(whole, lang)} {_cardinal(frac, lang)}",
        text,
    )


def _ordinal(match: re.Match[str], lang: str) -> str:
    digits = match.group(1)
    if lang == "hi":
        return _spell(
            lambda: hindi.ordinal(int(digits)),
            lambda: _cardinal(digits, lang) + hindi.ORDINAL_SUFFIX,
            match.group(0),
        )
    # Without an ordinal rule (Czech) the number is read as a cardinal and keeps its marker,
    # which for Czech is a dot that may also end the sentence.
    return _spell(
        lambda: num2words(int(digits), ordinal=True, lang=lang),
        lambda: _cardinal(digits, lang) + match.group(2),
        match.group(0),
    )


def _currency(match: re.Match[str], lang: str, currency: str) -> str:
    amount = float(re.sub(r"[^\d.]", "", match.group(0).replace(",", ".")))
    words = num2words(amount, to="currency", currency=currency, lang=lang)
    if amount.is_integer():
        # num2words always adds "and zero cents"; a whole amount is said without it.
        cut = words.rfind(_CENTS_JOINER.get(lang, ", "))
        if cut != -1:
            words = words[:cut]
    return words


def _expand_currencies(text: str, lang: str) -> str:
    # The reference stops at the first currency that num2words cannot say for this
    # language (or a malformed amount) and leaves that and later currencies as symbols.
    for currency, pattern in _CURRENCIES:

        def say(match: re.Match[str], currency: str = currency) -> str:
            return _currency(match, lang, currency)

        try:
            text = pattern.sub(say, text)
        except Exception as e:  # noqa: BLE001 - any num2words failure means "leave it"
            logger.debug("currency %s not expanded for %s: %s", currency, lang, e)
            break
    return text


def expand_numbers(text: str, lang: str) -> str:
    """Spell out the numbers in lower-cased text; `lang` is a rule key (not `zh`)."""
    if lang == "hi":
        text = _HINDI_GROUPED.sub(lambda m: m.group(0).replace(",", ""), text)
        text = _HINDI_DECIMAL.sub(lambda m: _decimal(m, lang), text)
    else:
        grouped = _COMMA_GROUPED if lang in ("en", "ru") else _DOT_GROUPED
        sep = "," if lang in ("en", "ru") else "."
        text = grouped.sub(lambda m: m.group(0).replace(sep, ""), text)
        text = _expand_currencies(text, lang)
        if lang != "tr":  # Turkish decimals are left to the ordinal and cardinal rules
            text = _DECIMAL.sub(lambda m: _decimal(m, lang), text)
    text = _ORDINALS[lang].sub(lambda m: _ordinal(m, lang), text)
    return _CARDINAL.sub(lambda m: _cardinal(m.group(0), lang), text)
