"""Hindi number words, which num2words lacks (the reference front-end crashes on them).

Cardinals use the Indian grouping (hazaar, lakh, crore); decimals are read digit by digit
after "dashamlav"; ordinals use the irregular first forms and "-vaan" after that.
"""

from __future__ import annotations

# 0..99 are irregular in Hindi, so each has its own word.
_BELOW_100 = (
    "शून्य", "एक", "दो", "तीन", "चार", "पाँच", "छह", "सात", "आठ", "नौ",
    "दस", "ग्यारह", "बारह", "तेरह", "चौदह", "पंद्रह", "सोलह", "सत्रह", "अठारह", "उन्नीस",
    "बीस", "इक्कीस", "बाईस", "तेईस", "चौबीस", "पच्चीस", "छब्बीस", "सत्ताईस", "अट्ठाईस", "उनतीस",
    "तीस", "इकतीस", "बत्तीस", "तैंतीस", "चौंतीस", "पैंतीस", "छत्तीस", "सैंतीस", "अड़तीस", "उनतालीस",
    "चालीस", "इकतालीस", "बयालीस", "तैंतालीस", "चवालीस", "पैंतालीस", "छियालीस", "सैंतालीस", "अड़तालीस", "उनचास",
    "पचास", "इक्यावन", "बावन", "तिरपन", "चौवन", "पचपन", "छप्पन", "सत्तावन", "अट्ठावन", "उनसठ",
    "साठ", "इकसठ", "बासठ", "तिरसठ", "चौंसठ", "पैंसठ", "छियासठ", "सड़सठ", "अड़सठ", "उनहत्तर",
    "सत्तर", "इकहत्तर", "बहत्तर", "तिहत्तर", "चौहत्तर", "पचहत्तर", "छिहत्तर", "सतहत्तर", "अठहत्तर", "उन्यासी",
    "अस्सी", "इक्यासी", "बयासी", "तिरासी", "चौरासी", "पचासी", "छियासी", "सत्तासी", "अट्ठासी", "नवासी",
    "नब्बे", "इक्यानवे", "बानवे", "तिरानवे", "चौरानवे", "पचानवे", "छियानवे", "सत्तानवे", "अट्ठानवे", "निन्यानवे",
)  # fmt: skip

# Largest first: crore = 10^7, lakh = 10^5, hazaar = 10^3, sau = 10^2.
_SCALES = ((10**7, "करोड़"), (10**5, "लाख"), (1000, "हज़ार"), (100, "सौ"))

_ORDINAL_FORMS = {1: "पहला", 2: "दूसरा", 3: "तीसरा", 4: "चौथा", 6: "छठा"}
_POINT = "दशमलव"


def cardinal(value: int) -> str:
    """Hindi words for a non-negative integer."""
    if value < 100:
        return _BELOW_100[value]
    words: list[str] = []
    rest = value
    for size, name in _SCALES:
        if rest >= size:
            # Above a hundred crore the count of crores is itself a number in words.
            words += [cardinal(rest // size), name]
            rest %= size
    if rest:
        words.append(_BELOW_100[rest])
    return " ".join(words)


def decimal(whole_words: str, fraction: str) -> str:
    """The whole part (already in words), "dashamlav", then the fraction digit by digit."""
    digits = " ".join(_BELOW_100[int(d)] for d in fraction)
    return f"{whole_words} {_POINT} {digits}"


ORDINAL_SUFFIX = "वाँ"


def ordinal(value: int) -> str:
    return _ORDINAL_FORMS.get(value) or cardinal(value) + ORDINAL_SUFFIX
