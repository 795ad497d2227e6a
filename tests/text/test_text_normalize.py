"""Normalisation behaviour beyond parity: language codes, bad input, lowvox's fallbacks."""

from __future__ import annotations

import sys

import pytest

from lowvox.errors import InvalidRequest, LowvoxError, UnknownLanguage
from lowvox.text import CHAR_LIMITS, LANGUAGES, char_limit, normalize, resolve_language
from lowvox.text.cjk import romanize_hangul
from lowvox.text.hindi import cardinal, ordinal
from lowvox.text.zh_numbers import spell_number


def test_seventeen_languages_with_their_limits():
    assert len(LANGUAGES) == 17
    assert set(CHAR_LIMITS) == set(LANGUAGES)
    assert CHAR_LIMITS["en"] == 250 and CHAR_LIMITS["zh-cn"] == 82 and CHAR_LIMITS["ja"] == 71
    assert CHAR_LIMITS["hi"] == 150 and CHAR_LIMITS["ko"] == 95 and CHAR_LIMITS["fr"] == 273


@pytest.mark.parametrize(
    ("given", "code"),
    [("zh", "zh-cn"), ("ZH-CN", "zh-cn"), ("zh_CN", "zh-cn"), ("En", "en"), (" de ", "de"),
     ("pt-BR", "pt"), ("en-US", "en")],
)  # fmt: skip
def test_language_codes_are_forgiving(given, code):
    assert resolve_language(given) == code
    assert char_limit(given) == CHAR_LIMITS[code]


def test_zh_and_zh_cn_normalise_alike():
    assert normalize("我有3个苹果。", "zh") == normalize("我有3个苹果。", "ZH-CN")
    assert normalize("我有3个苹果。", "zh") == "wo3you3san1ge4ping2guo3,"


@pytest.mark.parametrize("lang", ["xx", "", "english", "zz-cn", "el"])
def test_unknown_language_is_a_clear_error(lang):
    with pytest.raises(UnknownLanguage) as err:
        normalize("hello", lang)
    assert isinstance(err.value, InvalidRequest) and isinstance(err.value, LowvoxError)
    assert "supported" in str(err.value)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_empty_and_odd_input_never_crashes(lang):
    for text in [
        "",
        "   ",
        "😀🎉",
        "\x00\x07\x1b[31m",
        "$$$ £ € % # @ &",
        "1" * 60,
        "\u200b\ufeff",
    ]:
        assert isinstance(normalize(text, lang), str)


def test_numbers_by_language():
    assert normalize("I have 21 cats.", "en") == "i have twenty-one cats."
    assert normalize("Ich habe 21 Katzen.", "de") == "ich habe einundzwanzig katzen."
    assert normalize("J'ai 21 chats.", "fr") == "j'ai vingt et un chats."
    # Thousands separators follow the language: a comma in English, a dot in German.
    assert normalize("1,000", "en") == "one thousand"
    assert normalize("1.000", "de") == "eintausend"


def test_hindi_numbers_are_spelled_not_crashed():
    # num2words has no Hindi, so the reference raises on any digit in Hindi text.
    assert normalize("मेरे पास 5 किताबें हैं।", "hi") == "मेरे पास पाँच किताबें हैं।"
    assert normalize("12.5 सेकंड", "hi") == "बारह दशमलव पाँच सेकंड"
    assert normalize("1,00,000 रुपये", "hi") == "एक लाख रुपये"
    assert normalize("1st", "hi") == "पहला"


def test_hindi_number_words():
    assert cardinal(0) == "शून्य"
    assert cardinal(50) == "पचास"
    assert cardinal(99) == "निन्यानवे"
    assert cardinal(105) == "एक सौ पाँच"
    assert cardinal(2024) == "दो हज़ार चौबीस"
    assert cardinal(1_234_567) == "बारह लाख चौंतीस हज़ार पाँच सौ सड़सठ"
    assert cardinal(30_000_000) == "तीन करोड़"
    assert ordinal(2) == "दूसरा" and ordinal(5) == "पाँचवाँ"


def test_czech_ordinal_falls_back_to_the_number():
    # num2words has no Czech ordinals; the reference crashes on "1." followed by a space.
    assert normalize("Dne 1. května.", "cs") == "dne jedna. května."


def test_huge_numbers_are_read_digit_by_digit_where_num2words_gives_up():
    out = normalize("10000000000000000000000000000000000000000", "es")
    assert out.split() == ["uno"] + ["cero"] * 40


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("suffix", [".5", "st"])
def test_numbers_past_pythons_digit_limit_do_not_crash(lang, suffix):
    # int() refuses strings of over 4,300 digits; Hindi decimals and ordinals called it
    # outside the fallback and raised ValueError. Such a number is read digit by digit.
    assert normalize("7" * 4_400 + suffix, lang).strip()


def test_hindi_huge_decimal_and_ordinal_keep_their_reading():
    seven = "सात"
    assert normalize("7" * 5_000 + ".5", "hi").split() == [seven] * 5_000 + ["दशमलव", "पाँच"]
    assert normalize("7" * 5_000 + "th", "hi").split() == [seven] * 4_999 + [seven + "वाँ"]


def test_a_chinese_number_longer_than_the_stack_is_deep_is_spelled():
    # Past 载 (10^44) the count of 载 is itself a number: spelled by recursing once per
    # 44 digits, so "1" x 60,000 followed by 个 raised RecursionError from normalize.
    digits = "1" * (44 * (sys.getrecursionlimit() + 10))
    spelled = spell_number(digits)
    assert spelled.count("载") == len(digits) // 44 - 1
    assert spell_number("1" * 45) == "一载" + spell_number("1" * 44)


def test_turkish_dotted_capital_as_xtts_inference_sees_it():
    # XTTS lower-cases the sentence before its cleaners run, so İ arrives as i + U+0307.
    assert normalize("İstanbul", "tr") == "i\u0307stanbul"
    assert normalize("IŞIK", "tr") == "işik"


def test_korean_romanisation():
    assert romanize_hangul("물엿") == "mul-yeos"
    assert romanize_hangul("한국어 abc!") == "hangug-eo abc!"
    assert romanize_hangul("ㄱ") == "ㄱ"  # a lone jamo is not a syllable


def test_japanese_romaji():
    pytest.importorskip("cutlet")
    assert normalize("東京", "ja") == "tokyo"


@pytest.mark.parametrize("lang", ["en", "zh", "ja", "ko"])
def test_lone_surrogates_are_dropped(lang):
    # json.loads('"\\ud800"') yields one; UTF-8 cannot encode it, so the reference crashes.
    assert "\ud800" not in normalize("hello \ud800 world", lang)


def test_non_string_text_is_a_clear_error():
    with pytest.raises(InvalidRequest):
        normalize(None, "en")  # type: ignore[arg-type]
