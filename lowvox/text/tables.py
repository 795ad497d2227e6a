"""Per-language word tables of the XTTS text rules: abbreviations and symbols.

The entries and their order follow the reference front-end (coqui-tts XTTS tokenizer), so
that lowvox feeds the model exactly the words it was trained on. Order matters: a longer
abbreviation that shares a prefix with a shorter one comes first (`mrs` before `mr`).
"""

from __future__ import annotations

import re

# Abbreviations are matched after lower-casing, at a word start and followed by a dot.
ABBREVIATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "en": (
        ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"),
        ("co", "company"), ("jr", "junior"), ("maj", "major"), ("gen", "general"),
        ("drs", "doctors"), ("rev", "reverend"), ("lt", "lieutenant"), ("hon", "honorable"),
        ("sgt", "sergeant"), ("capt", "captain"), ("esq", "esquire"), ("ltd", "limited"),
        ("col", "colonel"), ("ft", "fort"),
    ),
    "es": (
        ("sra", "señora"), ("sr", "señor"), ("dr", "doctor"), ("dra", "doctora"),
        ("st", "santo"), ("co", "compañía"), ("jr", "junior"), ("ltd", "limitada"),
    ),
    "fr": (
        ("mme", "madame"), ("mr", "monsieur"), ("dr", "docteur"), ("st", "saint"),
        ("co", "compagnie"), ("jr", "junior"), ("ltd", "limitée"),
    ),
    "de": (("fr", "frau"), ("dr", "doktor"), ("st", "sankt"), ("co", "firma"), ("jr", "junior")),
    "pt": (
        ("sra", "senhora"), ("sr", "senhor"), ("dr", "doutor"), ("dra", "doutora"),
        ("st", "santo"), ("co", "companhia"), ("jr", "júnior"), ("ltd", "limitada"),
    ),
    "it": (
        ("sig", "signore"), ("dr", "dottore"), ("st", "santo"), ("co", "compagnia"),
        ("jr", "junior"), ("ltd", "limitata"),
    ),
    "pl": (("p", "pani"), ("m", "pan"), ("dr", "doktor"), ("sw", "święty"), ("jr", "junior")),
    "ar": (),
    "zh": (),
    "cs": (("dr", "doktor"), ("ing", "inženýr"), ("p", "pan")),
    # Russian abbreviations carry their hyphen instead of a dot and match as whole words.
    "ru": (("г-жа", "госпожа"), ("г-н", "господин"), ("д-р", "доктор")),
    "nl": (("dhr", "de heer"), ("mevr", "mevrouw"), ("dr", "dokter"), ("jhr", "jonkheer")),
    "tr": (("b", "bay"), ("byk", "büyük"), ("dr", "doktor")),
    "hu": (("dr", "doktor"), ("b", "bácsi"), ("nőv", "nővér")),
    "ko": (),
    "hi": (),
}  # fmt: skip

# Symbols are replaced by a word with a space on each side; see `expand_symbols`.
SYMBOLS: dict[str, tuple[tuple[str, str], ...]] = {
    "en": (("&", "and"), ("@", "at"), ("%", "percent"), ("#", "hash"), ("$", "dollar"),
           ("£", "pound"), ("°", "degree")),
    "es": (("&", "y"), ("@", "arroba"), ("%", "por ciento"), ("#", "numeral"), ("$", "dolar"),
           ("£", "libra"), ("°", "grados")),
    "fr": (("&", "et"), ("@", "arobase"), ("%", "pour cent"), ("#", "dièse"), ("$", "dollar"),
           ("£", "livre"), ("°", "degrés")),
    "de": (("&", "und"), ("@", "at"), ("%", "prozent"), ("#", "raute"), ("$", "dollar"),
           ("£", "pfund"), ("°", "grad")),
    "pt": (("&", "e"), ("@", "arroba"), ("%", "por cento"), ("#", "cardinal"), ("$", "dólar"),
           ("£", "libra"), ("°", "graus")),
    "it": (("&", "e"), ("@", "chiocciola"), ("%", "per cento"), ("#", "cancelletto"),
           ("$", "dollaro"), ("£", "sterlina"), ("°", "gradi")),
    "pl": (("&", "i"), ("@", "małpa"), ("%", "procent"), ("#", "krzyżyk"), ("$", "dolar"),
           ("£", "funt"), ("°", "stopnie")),
    "ar": (("&", "و"), ("@", "على"), ("%", "في المئة"), ("#", "رقم"), ("$", "دولار"),
           ("£", "جنيه"), ("°", "درجة")),
    "zh": (("&", "和"), ("@", "在"), ("%", "百分之"), ("#", "号"), ("$", "美元"),
           ("£", "英镑"), ("°", "度")),
    "cs": (("&", "a"), ("@", "na"), ("%", "procento"), ("#", "křížek"), ("$", "dolar"),
           ("£", "libra"), ("°", "stupně")),
    "ru": (("&", "и"), ("@", "собака"), ("%", "процентов"), ("#", "номер"), ("$", "доллар"),
           ("£", "фунт"), ("°", "градус")),
    "nl": (("&", "en"), ("@", "bij"), ("%", "procent"), ("#", "hekje"), ("$", "dollar"),
           ("£", "pond"), ("°", "graden")),
    "tr": (("&", "ve"), ("@", "at"), ("%", "yüzde"), ("#", "diyez"), ("$", "dolar"),
           ("£", "sterlin"), ("°", "derece")),
    "hu": (("&", "és"), ("@", "kukac"), ("%", "százalék"), ("#", "kettőskereszt"),
           ("$", "dollár"), ("£", "font"), ("°", "fok")),
    "ko": (("&", "그리고"), ("@", "에"), ("%", "퍼센트"), ("#", "번호"), ("$", "달러"),
           ("£", "파운드"), ("°", "도")),
    "hi": (("&", "और"), ("@", "ऐट दी रेट"), ("%", "प्रतिशत"), ("#", "हैश"), ("$", "डॉलर"),
           ("£", "पाउंड"), ("°", "डिग्री")),
}  # fmt: skip


def _abbreviation_pattern(lang: str, abbr: str) -> re.Pattern[str]:
    # Russian entries end in a letter and are bounded like words; the others need their dot.
    tail = r"\b" if lang == "ru" else r"\."
    return re.compile(r"\b" + re.escape(abbr) + tail, re.IGNORECASE)


_ABBREVIATION_RES: dict[str, list[tuple[re.Pattern[str], str]]] = {
    lang: [(_abbreviation_pattern(lang, a), word) for a, word in entries]
    for lang, entries in ABBREVIATIONS.items()
}


def expand_abbreviations(text: str, key: str) -> str:
    for pattern, word in _ABBREVIATION_RES[key]:
        text = pattern.sub(word, text)
    return text


def expand_symbols(text: str, key: str) -> str:
    """Spell symbols as words; one double space is squeezed after each symbol, as XTTS was fed."""
    for symbol, word in SYMBOLS[key]:
        text = text.replace(symbol, f" {word} ").replace("  ", " ")
    return text.strip()
