"""Language "auto": offline detection mapped onto the XTTS languages."""

from __future__ import annotations

import pytest

from lowvox.errors import UnknownLanguage
from lowvox.text import LANGUAGES, detect_language

pytest.importorskip("py3langid")


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("The weather is lovely today and we are going for a walk in the park.", "en"),
        ("Hoy hace un tiempo estupendo y vamos a dar un paseo por el parque.", "es"),
        ("Il fait très beau aujourd'hui et nous allons nous promener dans le parc.", "fr"),
        ("Heute ist das Wetter schön und wir gehen im Park spazieren.", "de"),
        ("Oggi il tempo è bellissimo e andiamo a fare una passeggiata nel parco.", "it"),
        ("Hoje o tempo está ótimo e vamos dar um passeio no parque.", "pt"),
        ("Dzisiaj jest piękna pogoda i idziemy na spacer do parku.", "pl"),
        ("Bugün hava çok güzel ve parkta yürüyüşe çıkıyoruz.", "tr"),
        ("Сегодня прекрасная погода, и мы идём гулять в парк.", "ru"),
        ("Vandaag is het prachtig weer en we gaan wandelen in het park.", "nl"),
        ("Dnes je krásné počasí a jdeme na procházku do parku.", "cs"),
        ("الطقس جميل اليوم وسنذهب في نزهة في الحديقة.", "ar"),
        ("今天天气很好，我们去公园散步。", "zh-cn"),
        ("Ma nagyon szép idő van, és elmegyünk sétálni a parkba.", "hu"),
        ("오늘은 날씨가 좋아서 공원에 산책하러 갑니다.", "ko"),
        ("今日はとても良い天気なので、公園に散歩に行きます。", "ja"),
        ("आज मौसम बहुत अच्छा है और हम पार्क में टहलने जा रहे हैं।", "hi"),
    ],
)
def test_each_language(text, lang):
    assert detect_language(text) == lang


def test_mixed_script_text():
    # Kana decides Japanese even when kanji dominate; Hangul decides Korean.
    assert detect_language("東京都庁舎は新宿にあります") == "ja"
    assert detect_language("Samsung 갤럭시 phone") == "ko"


@pytest.mark.parametrize(
    "text", ["", "   ", "12345 !!!", "😀🎉", "\x00\x07", "ok", "Ελλάδα είναι ωραία"]
)
def test_fallback_to_default(text):
    assert detect_language(text, default="de") == "de"
    assert detect_language(text) == "en"


def test_default_is_validated_and_result_is_an_xtts_code():
    with pytest.raises(UnknownLanguage):
        detect_language("hello", default="xx")
    assert detect_language("hello world how are you", default="ZH") in LANGUAGES
    assert detect_language("", default="zh") == "zh-cn"
