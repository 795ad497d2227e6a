"""Regenerate tests/text/fixtures/reference_text.json by running the REFERENCE front-end.

The expected outputs in the fixture come from coqui-tts's XTTS tokenizer, never from
lowvox, so the tests compare lowvox against the reference. This script needs a Python
environment with coqui-tts 0.28.0 and its language extras (num2words, pypinyin, cutlet +
unidic-lite, ko-speech-tools, six, spacy + sudachipy + sudachidict_core for Japanese
splitting):

    /work/refvenv/bin/python tests/text/make_fixtures.py

It is not run by the tests. Texts are written here by hand; the reference decides their
normalised form, token ids (with the golden tiny model's vocab.json) and sentence splits.
A case where the reference raises records the exception name instead of an output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import types
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN_ROOT = Path(os.environ.get("LOWVOX_GOLDEN") or HERE.parents[1] / "../shared/golden")
VOCAB = GOLDEN_ROOT / "xtts-tiny" / "vocab.json"
OUT = HERE / "fixtures" / "reference_text.json"


@lru_cache(maxsize=1)
def _load_reference():
    # TTS/__init__.py insists on torchaudio/torchcodec; the tokenizer needs neither, so the
    # package is registered without running its __init__.
    spec = importlib.util.find_spec("TTS")
    pkg = types.ModuleType("TTS")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["TTS"] = pkg
    from TTS.tts.layers.xtts import tokenizer

    return tokenizer


NORMALIZE_CASES: dict[str, list[str]] = {
    "en": [
        "Mr. and Mrs. Brown met Dr. Jones, Capt. Hook and Sgt. Pepper on St. Patrick's day.",
        "Gen. Lee, Col. Mustard, Lt. Dan, Maj. Tom, Rev. Green and Hon. Smith Jr. arrived.",
        "Ft. Knox Ltd. & Co. sold it for $1,234.56 yesterday.",
        "I paid $5 and then £3.20, and she paid 7€ or €12.99 for 2 tickets.",
        "It costs 20$ or 1,000,000$, or 0.99$.",
        "The 1st, 2nd, 3rd and 21st runners came 4th, 11th and 102nd.",
        "Pi is about 3.14159 and e is roughly 2.718; 0.5 is a half.",
        "There were 1,500 people and 12,345,678 ants, and 1,23 is odd.",
        "Call me @ 5 or email joe@example.com #hashtag 50% off!",
        "It was -5° outside, then 30°C inside.",
        "Version 2.0.1 was released in 2024 on the 5th.",
        'She said "hello" and left.  Then   she came back.',
        "In 12.5 seconds there were 50 soldiers.",
        "He has 10000000000000000000000000000000000000000 coins.",
        "1st place, 2nd place and 3rd place, numbers 007 and 0.",
        "HELLO World, THIS is LOUD.",
        "Tabs\tand\nnewlines\r\nare whitespace.",
        "",
    ],
    "es": [
        "El Sr. Pérez y la Sra. López visitaron al Dr. Gómez y a la Dra. Ruiz.",
        "St. Tomás y Co. Ltd. son compañías; Jr. también.",
        "Pagué $20 y 3,50€ por 2 cafés y 1.234 galletas.",
        "El 1º y la 2ª llegaron; el 3er puesto fue para el 10o.",
        "La temperatura fue de 25° y el 30% llovió & nevó.",
        "Escríbeme @ casa #5.",
        "Había 1.000.000 de personas y 12,75 kilos.",
        "Eso le costará 20,15€ señor.",
    ],
    "fr": [
        "Mme. Dubois et Mr. Martin voient le Dr. Petit à St. Malo.",
        "La Co. Ltd. de Jr. Durand.",
        "Il a payé 20€, $5 et £2,50 pour 3 livres.",
        "Le 1er, la 1re, le 2e et le 3ème étaient là.",
        "Il fait 15° et 50% & plus.",
        "Ce sera 100.000,5 ou 12,5 secondes.",
        "Écrivez-moi @ maison #1.",
        "Il y avait 1.234 personnes et 21 chats.",
    ],
    "de": [
        "Fr. Schmidt und Dr. Weber wohnen in St. Gallen bei Co. Jr.",
        "Das kostet 20€, $15 und £3,50.",
        "Am 1. Mai und am 24. Dezember, das 3. Mal.",
        "Es sind 12,5 Grad und 30% & mehr @ home #1.",
        "Es gab 1.234.567 Menschen und 99 Luftballons.",
        "Der 1st und 2nd Platz.",
        "Das macht 20,15€ Herr.",
        "Heute ist es 25°.",
    ],
    "it": [
        "Il Sig. Bianchi e il Dr. Verdi a St. Pietro con Co. Ltd. e Jr.",
        "Costa 20€, $5 e £2,50 per 3 libri.",
        "Il 1º, la 2ª, il 3° e il 4o posto.",
        "Ci sono 12,5 gradi e il 30% & più @ casa #1.",
        "C'erano 1.234 persone e 1.000.000 di stelle.",
        "Ti costerà 20,15€ signore.",
        "Il 5i e 6e.",
    ],
    "pt": [
        "A Sra. Costa e o Sr. Silva foram ao Dr. Lima e à Dra. Souza.",
        "St. António, Co. Ltd. e Jr. Santos.",
        "Custa 20€, $5 e £2,50 por 3 livros.",
        "O 1º, a 2ª, o 3o e as 4as.",
        "Temos 12,5 graus e 30% & mais @ casa #1.",
        "Havia 1.234 pessoas e 1.000.000 de estrelas.",
        "Isso custará 20,15€ senhor.",
    ],
    "pl": [
        "P. Nowak i M. Kowalski oraz Dr. Zieliński i Sw. Jan Jr.",
        "To kosztuje 20€, $5 i 3,75 zł.",
        "1st i 2nd miejsce oraz 3º i 4ª.",
        "Jest 12,5 stopni i 30% & więcej @ dom #1.",
        "Było 1.234 ludzi i 1.000.000 gwiazd.",
        "To będzie kosztować 20,15€ panie.",
        "Moja temperatura to 36,6°.",
        "Kosztuje £5.",
    ],
    "tr": [
        "B. Yılmaz, Byk. Ahmet ve Dr. Ayşe geldi.",
        "İstanbul'da Ömer ve Ümit 1. oldu, 2nci ve 3üncü geldi.",
        "Bu 12,5 saniye ve 3.5 metre sürdü.",
        "Fiyat 20€ ve $5 ve £3.",
        "Pilim %14 dolu & 25° sıcak @ ev #1.",
        "1.234 kişi ve 1.000.000 yıldız vardı.",
        "Işık ILIK İNCE Ölçü Üzüm.",
    ],
    "ru": [
        "Г-н Иванов, г-жа Петрова и д-р Смирнов пришли.",
        "Это стоит 20€, $5 и £3.",
        "1-й, 2-я, 3-е, 5-ое и 10-го числа.",
        "Температура 12.5 градусов и 30% & больше @ дом #1.",
        "Было 1,234 человек и 1,000,000 звёзд.",
        "Это будет 20.15€ сэр.",
        "В 2024 году было 365 дней и 25° тепла.",
    ],
    "nl": [
        "Dhr. Jansen, Mevr. de Vries, Dr. Bakker en Jhr. van Dam.",
        "Het kost 20€, $5 en £3,50.",
        "De 1ste, 2de en 3e plaats; de 8ste dag.",
        "Het is 12,5 graden en 30% & meer @ huis #1.",
        "Er waren 1.234 mensen en 1.000.000 sterren.",
        "Dat wordt dan 20,15€ meneer.",
    ],
    "cs": [
        "Dr. Novák, Ing. Svoboda a P. Dvořák přišli.",
        "To stojí 20€, $5 a £3.",
        "Je 12,5 stupňů a 30% & více @ dům #1.",
        "Bylo tam 1.234 lidí a 1.000.000 hvězd.",
        "To bude 20.15€ pane.",
        "Dnes je 25° a je to 5 let.",
        "Dne 1. května přišel.",
    ],
    "ar": [
        "لدي 3 كتب و 25 قلما و 100 ورقة.",
        "السعر 20€ و $5 و £3.",
        "في الـ 12,5 ثانية كان 30% & أكثر @ البيت #1.",
        "كان هناك 1.234 شخصا و 1.000.000 نجمة.",
        "الحرارة 25° اليوم.",
        "جاء 3ون و 5ين.",
    ],
    "zh-cn": [
        "我有3个苹果和25本书。",
        "今天是2024年5月3日，天气很好！",
        "这件衣服卖120元，那件卖3.5元。",
        "我的电话是13812345678，座机是010-12345678。",
        "这次考试有3/4的人及格，及格率75%。",
        "他跑了1500米，用了12.5秒。",
        "编号2024的房间住了2000人和2个人。",
        "P2P和B2B都很流行，还有O2O。",
        "价格是$5和£3，温度是25°。",
        "他说：“你好”，然后走了……",
        "一共有100000000颗星星和10个月亮。",
        "Hello world 你好世界",
        "第1名和第22名。",
        "05和00.5还有0.5。",
        "我今年20岁，他今年12岁。",
        "这是一个测试。这是另一个测试？是的！",
    ],
    "hu": [
        "Dr. Kovács, B. Nagy és Nőv. Tóth itt van.",
        "Ez 20€, $5 és £3 volt.",
        "Az 1. helyezett és a 2. és 3. helyezett.",
        "Most 12,5 fok és 30% & több @ ház #1 van.",
        "Volt 1.234 ember és 1.000.000 csillag.",
        "Kovács úr 40 éves és 2,5 kilót fogyott.",
        "Az 5ödik és a 10edik.",
    ],
    "ko": [
        "나는 사과 3개를 먹었다.",
        "가격은 20€ 그리고 $5 입니다.",
        "1번째, 2번, 3차, 4째 순서입니다.",
        "온도는 12.5도이고 30% & 더 @ 집 #1 입니다.",
        "1,234명과 1.000.000개의 별이 있었다.",
        "안녕하세요. 물엿과 신라면을 좋아해요!",
        "배터리 잔량이 14%입니다.",
    ],
    "ja": [
        "私は3本のペンを持っています。",
        "今日は2024年5月3日です。",
        "東京タワーは333メートルです！",
        "コンピューターとスマートフォンを使います。",
        "彼は「こんにちは」と言いました。",
        "値段は1,500円です。",
        "ABCとXYZの会社。",
        "午後3時15分に、4人で2,500円のケーキを食べた。",
        "第1章の50%は「東京」について。",
        "ＡＢＣ１２３と全角の文字。",
        "えーと、ちょっと待って！",
        "メールはtest@example.comです。",
    ],
    "hi": [
        "मेरे पास पाँच किताबें हैं।",
        "मेरे पास 14% बैटरी है & @ #.",
        "यह $ और £ और ° है।",
        "नमस्ते दुनिया, आप कैसे हैं?",
        "50 सैनिक थे।",
        "12.5 सेकंड में।",
    ],
}

SPLIT_TEXTS: dict[str, list[str]] = {
    "en": [
        'Hello there Mr. Smith. How are you?  I am fine!! "Really." Yes. ' * 5,
        "This is a sentence. " * 20,
        "Dr. Watson met Mrs. Hudson at 221b Baker St. on Jan. 5th. They talked about the U.S. "
        "economy, e.g. inflation, i.e. rising prices... Then they left! Was it late? Yes: "
        "it was 11 p.m. and the streets were dark. " * 3,
        "No punctuation at all in this very long run of words that just keeps going and going "
        "without ever stopping for breath because the writer forgot what a full stop is and "
        "therefore the splitter has to wrap it at word boundaries somewhere sensible here ok",
        "Short text. Under the limit.",
        "   Leading spaces are removed when the text is short.",
        'He said (quietly). Then [he] left; she stayed... The end? Maybe! (Or not.) "Quoted." '
        "'Single.' Numbers like 3.14 and 2.5 stay. Version v1.2.3 too. Email a.b@c.de works. " * 2,
        "Line one.\nLine two.\n\nLine three after a blank line. " * 6,
        "A. B. C. Plan A. Plan B. Mr.Smith.Next.sentence.here. " * 6,
        "Ellipsis… then more text! Really?! Yes?! No!? " * 8,
        "Wow!!! Amazing??? Sure... okay. " * 10,
    ],
    "es": [
        "Hoy es un buen día. Mañana lloverá mucho en la ciudad. " * 6,
        "¿Cómo estás? ¡Muy bien! El Sr. García llegó. La Sra. López también. " * 5,
    ],
    "fr": [
        "Bonjour tout le monde. Comment allez-vous aujourd'hui ? Très bien, merci ! " * 6,
        "M. Dupont est arrivé. Mme Martin aussi... Et puis ? Rien. " * 6,
    ],
    "de": [
        "Das ist ein Satz. Das ist noch ein Satz! Ist das ein Satz? " * 8,
        "Am 3. Mai kam Dr. Müller z.B. mit Frau Schmidt. Sie war u.a. müde. " * 5,
    ],
    "it": ["Questa è una frase. Questa è un'altra frase! Davvero? Sì. " * 7],
    "pt": ["Esta é uma frase. Esta é outra frase! Verdade? Sim. " * 7],
    "pl": ["To jest zdanie. To jest inne zdanie! Naprawdę? Tak. " * 7],
    "tr": ["Bu bir cümle. Bu başka bir cümle! Gerçekten mi? Evet. " * 7],
    "ru": ["Это предложение. Это другое предложение! Правда? Да. " * 6],
    "nl": ["Dit is een zin. Dit is een andere zin! Echt? Ja. " * 8],
    "cs": ["Toto je věta. Toto je jiná věta! Opravdu? Ano. " * 7],
    "ar": ["هذه جملة. هذه جملة أخرى! حقا؟ نعم. " * 8],
    "zh-cn": [
        "今天天气很好。我们去公园散步吧。" * 6,
        "你好！你叫什么名字？我叫小明。很高兴认识你。" * 4,
        "这是一个没有标点符号的很长很长的句子它一直在继续而且不会停下来因为作者忘记了句号是什么东西所以分割器必须把它切开",
    ],
    "hu": ["Ez egy mondat. Ez egy másik mondat! Tényleg? Igen. " * 7],
    "ko": [
        "안녕하세요. 만나서 반갑습니다! 잘 지내세요? 네. " * 6,
        "오늘은 날씨가 좋다. 공원에 가자. " * 8,
    ],
    "ja": [
        "今日はいい天気です。公園に行きましょう！本当ですか？はい。" * 4,
        "私は学生です。東京に住んでいます。" * 5,
    ],
    "hi": [
        "यह एक वाक्य है। यह दूसरा वाक्य है! सच में? हाँ। " * 6,
        "नमस्ते दुनिया. आप कैसे हैं? मैं ठीक हूँ! " * 6,
    ],
}


# Number-shaped words, spelled by every language's rules in generated sentences.
NUMBERS = [
    "0", "7", "13", "21", "99", "100", "101", "1000", "2024", "1000000", "1,000", "1.000",
    "1.234.567", "12,345,678", "12,5", "3.14", "0.5", "0,25", "10.000,75", "$3", "$12.50",
    "$1,000", "£7", "£2.05", "€9", "9€", "12,34€", "100$", "5£", "1st", "2nd", "3rd", "4th",
    "2.", "5. ", "1º", "2ª", "3er", "1o", "2a", "4e", "5ème", "1re", "1-й", "2-я", "7ste",
    "8de", "3üncü", "2nci", "5ödik", "3번째", "2차", "v2.0", "-5", "+7", "1/2", "50%", "12:30",
    "10000000000000000000000000000000000000000",
]  # fmt: skip
SYMBOLS = ["&", "@", "%", "#", "$", "£", "°", "€"]


def generated_cases() -> list[dict]:
    """Sentences built from the rule tables: every abbreviation, symbol and number shape."""
    ref = _load_reference()
    cases = []
    for lang in NORMALIZE_CASES:
        base = lang.split("-")[0]
        # Japanese skips the abbreviation table (cutlet reads the text itself).
        for regex, _ in ref._abbreviations.get(base, []) if base != "ja" else []:
            abbr = regex.pattern[2:].split("\\")[0]
            cases.append(f"{abbr.capitalize()}. Kowalski and {abbr}. Nowak.")
        for sym in SYMBOLS:
            cases.append(f"a {sym} b{sym}c {sym}")
        for i in range(0, len(NUMBERS), 4):
            cases.append("x " + " y ".join(NUMBERS[i : i + 4]) + " z.")
        yield from ({"text": t, "language": lang} for t in cases)
        cases = []


# Fragments for random texts whose sentence boundaries the reference's spaCy splitter
# decides; the family is the spaCy language the reference uses for that XTTS language.
SENTENCE_FRAGMENTS = {
    "en": [
        "Hello", "world", "Mr.", "Mrs.", "Dr.", "e.g.", "i.e.", "etc.", "U.S.", "USA.", "A.",
        "a.", "B.", "3.14", "$5.", "5%.", "end.", "end!", "end?", "end?!", "end!!", "end...",
        "end…", "(end.)", "\"end.\"", "'end.'", "“end.”", "end.)", "Next", "it's", "John's.",
        "x.com.", "a.b@c.de.", "end.Next", "Mr.Smith", "—", "...", "!", "?", ".", "9.", "1st.",
        "°C.", "10p.m.", "p.m.", "Ph.D.", "Jan.", "St.", "v1.2.", "#tag.", "@home.", "50km.",
        "😀", "¿Qué?", "¡Sí!", "ÉCOLE.", "Straße.", "z.B.", "вот.", "ЛЕС.", "είναι.", "x—y.",
        "a-b.", "O.K.", "한국어.", "안녕!", "İstanbul.", "eBay.", "1.Mai", "“Yes!”", "(Yes?)",
    ],
    "zh": ["你好", "。", "！", "？", "，", "我们", "“", "”", "「", "」", "...", "…", "Hello.", "A.", "3.5", "好的。", "吗？", "！！"],
    "ja": ["今日は", "いい", "天気", "です", "。", "！", "？", "、", "「", "」", "『", "』", "…", "ABC", "Hello.", "（", "）", "ー", "はい。", "本当？！", "〜"],
    "ar": ["مرحبا", "بالعالم.", "جملة.", "حقا؟", "نعم!", "5.", "3.14", "أ.", "د.", "ABC.", "abc.", "«", "»", "،", "؛", "(", ")", "\"", "...", "…", "USA.", "٪"],
    "hi": ["नमस्ते", "दुनिया।", "है।", "हैं.", "सच?", "हाँ!", "5.", "3.14", "a.", "Mr.", "॥", "...", "\"", "(", ")", "A.", "USA.", "end."],
    "es": ["Hola", "mundo.", "Sr.", "Sra.", "etc.", "EE.UU.", "¿Qué", "tal?", "¡Bien!", "1º.", "aprox.", "Dr.", "fin.", "Fin.", "—dijo.", "«Sí.»", "\"No.\"", "...", "5%.", "Mr.", "e.g.", "A.", "a.", "—dijo.—dijo."],
}  # fmt: skip
_SPACES = [" ", " ", " ", " ", "  ", "\n", " \n", "\n\n", "\t", ""]


def sentence_cases(per_family: int = 60) -> list[dict]:
    ref = _load_reference()
    rng = random.Random(20261123)
    cases = []
    for family, words in SENTENCE_FRAGMENTS.items():
        nlp = ref.get_spacy_lang(family)
        nlp.add_pipe("sentencizer")
        for _ in range(per_family):
            parts = [
                p
                for _ in range(rng.randint(1, 14))
                for p in (rng.choice(words), rng.choice(_SPACES))
            ]
            text = "".join(parts)
            cases.append(
                {"family": family, "text": text, "sentences": [s.text for s in nlp(text).sents]}
            )
    return cases


def main() -> None:
    ref = _load_reference()
    tok = ref.VoiceBpeTokenizer(str(VOCAB))
    normalize_cases = []
    for lang, texts in NORMALIZE_CASES.items():
        base = lang.split("-")[0]
        for text in texts:
            case = {"text": text, "language": lang}
            sent = text.strip().lower()  # what XTTS inference does before encoding
            try:
                case["normalized"] = tok.preprocess_text(sent, base)
                case["token_ids"] = tok.encode(sent, lang)
            except Exception as e:  # noqa: BLE001 - recorded, lowvox must not crash there
                case["reference_error"] = type(e).__name__
            normalize_cases.append(case)
    for case in generated_cases():
        try:
            case["normalized"] = tok.preprocess_text(
                case["text"].strip().lower(), case["language"].split("-")[0]
            )
        except Exception as e:  # noqa: BLE001
            case["reference_error"] = type(e).__name__
        case["generated"] = True
        normalize_cases.append(case)
    split_cases = []
    for lang, texts in SPLIT_TEXTS.items():
        base = lang.split("-")[0]
        limit = tok.char_limits[base]
        for text in texts:
            for lim in sorted({limit, 60, 120}):
                split_cases.append(
                    {
                        "text": text,
                        "language": lang,
                        "limit": lim,
                        "sentences": ref.split_sentence(text, base, lim),
                    }
                )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fixture = {
        "normalize_cases": normalize_cases,
        "split_cases": split_cases,
        "sentence_cases": sentence_cases(),
    }
    # One case per line keeps the file small and its diffs readable.
    lines = ["{"]
    for i, (key, cases) in enumerate(fixture.items()):
        body = ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases)
        lines.append(f"{json.dumps(key)}: [\n{body}\n]" + ("," if i < len(fixture) - 1 else ""))
    lines.append("}")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(normalize_cases)} normalize and {len(split_cases)} split cases to {OUT}")


if __name__ == "__main__":
    main()
