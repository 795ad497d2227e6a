"""Chinese text normalisation: numbers, dates, money, phone numbers, fractions and
percentages written as Chinese characters, then punctuation turned into commas.

This reproduces the rules XTTS's reference front-end applies before pinyin (its
`zh_num2words.TextNorm()` with default options), including their quirks: every rewrite is
found on the text as it stood before that rule ran and then replaces the *first*
occurrence of the matched string, which is not always where it was found.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

_DIGITS = "零一二三四五六七八九"
_LIANG = "两"  # "two" before a unit of a hundred or more
_POINT = "点"
# Unit characters by power of ten, the "mid" system XTTS uses: 万 = 10^4, 亿 = 10^8,
# and each larger unit multiplies by 10^4.
_UNITS: tuple[tuple[int, str], ...] = (
    (1, "十"), (2, "百"), (3, "千"), (4, "万"), (8, "亿"), (12, "兆"), (16, "京"),
    (20, "垓"), (24, "秭"), (28, "穰"), (32, "沟"), (36, "涧"), (40, "正"), (44, "载"),
)  # fmt: skip

# A symbol of a spelled number: ("d", value) a digit, ("u", power) a unit, ("p", 0) the point.
_Symbol = tuple[str, int]


def _grouped(digits: str) -> list[_Symbol]:
    """Symbols for an integer string read with units; zeros inside are said once."""
    # Past the largest unit, the count of that unit is itself a number read with units.
    # Those counts are taken off the right in a loop: recursing once per unit ran out of
    # stack on a run of 45,000 digits.
    top = _UNITS[-1][0]
    first = len(digits) - len(digits.lstrip("0"))
    end = len(digits)
    tails: list[list[_Symbol]] = []
    while end - first > top:
        tails.append([("u", top), *_grouped_below_top(digits[end - top : end])])
        end -= top
    return _grouped_below_top(digits[:end]) + [s for tail in reversed(tails) for s in tail]


def _grouped_below_top(digits: str) -> list[_Symbol]:
    """`_grouped` for at most as many significant digits as the largest unit has zeros."""
    stripped = digits.lstrip("0")
    if not stripped:
        return []
    if len(stripped) == 1:
        value = ("d", int(stripped))
        return [("d", 0), value] if len(digits) != len(stripped) else [value]
    power = next(p for p, _ in reversed(_UNITS) if p < len(stripped))
    return (
        _grouped_below_top(digits[:-power]) + [("u", power)] + _grouped_below_top(stripped[-power:])
    )


def _use_liang(symbols: list[_Symbol]) -> list[_Symbol]:
    out = list(symbols)
    for i, (kind, value) in enumerate(out):
        if kind != "d" or value != 2:
            continue
        after = out[i + 1] if i + 1 < len(out) else None
        before = out[i - 1] if i > 0 else None
        if (
            after is not None
            and after[0] == "u"
            and after[1] != 1
            and (before is None or (before[0] == "u" and before[1] != 1))
        ):
            out[i] = ("l", 2)
    return out


def spell_number(number: str, *, units: bool = True, liang: bool = True) -> str:
    """Chinese characters for a digit string such as "2024" or "12.5".

    With `units` the integer part is read as a quantity (两千零二十四); without, digit by
    digit (二零二四), as for years and phone numbers.
    """
    whole, _, fraction = number.partition(".")
    if "." in fraction:
        raise ValueError(f"number with more than one dot: {number}")
    symbols = _grouped(whole) if units and len(whole) > 1 else [("d", int(c)) for c in whole]
    if fraction:
        symbols += [("p", 0)] + [("d", int(c)) for c in fraction]
    if liang:
        symbols = _use_liang(symbols)
    unit_chars = dict(_UNITS)
    text = "".join(
        _DIGITS[v] if k == "d" else _LIANG if k == "l" else _POINT if k == "p" else unit_chars[v]
        for k, v in symbols
    )
    if text.startswith(_POINT):
        return _DIGITS[0] + text
    # 10..19 are read without the leading "one": 十二, not 一十二.
    if len(text) >= 2 and text[0] == "一" and text[1] == "十":
        text = text[1:]
    return text


def _spell_digits(number: str) -> str:
    return spell_number(number, units=False, liang=False)


def _spell_date(date: str) -> str:
    year, sep, rest = date.strip().partition("年")
    if sep:
        year = _spell_digits(year) + "年"
    else:
        year, rest = "", date
    month = day = ""
    if rest:
        m, sep, d = rest.strip().partition("月")
        if sep:
            month = spell_number(m) + "月"
        else:
            d = date
        if d:
            day = spell_number(d[:-1]) + d[-1]
    return year + month + day


def _spell_money(money: str) -> str:
    for number in re.findall(r"\d+(?:\.\d+)?", money):
        money = money.replace(number, spell_number(number))
    return money


def _spell_phone(phone: str, fixed: bool) -> str:
    parts = phone.split("-") if fixed else phone.strip("+").split()
    return "".join(_spell_digits(p) for p in parts)


def _spell_fraction(fraction: str) -> str:
    numerator, denominator = fraction.split("/")
    return spell_number(denominator) + "分之" + spell_number(numerator)


def _spell_percentage(percentage: str) -> str:
    return "百分之" + spell_number(percentage.strip().strip("%"))


_CURRENCY_UNIT = r"(?:(?:亿|千万|百万|万|千|百)|(?:亿|千万|百万|万|千|百|)元|(?:亿|千万|百万|万|千|百|)块|角|毛|分)"
_QUANTIFIER = (
    r"(?:[匹张座回场尾条个首阙阵网炮顶丘棵只支袭辆挑担颗壳窠曲墙群腔砣客贯扎捆刀令打手罗坡山"
    r"岭江溪钟队单双对出口头脚板跳枝件贴针线管名位身堂课本页家户层丝毫厘分钱两斤铢石钧锱忽寸"
    r"尺丈里寻常铺程撮勺合升斗盘碗碟叠桶笼盆盒杯斛锅簋篮罐瓶壶卮盏箩箱煲啖袋钵年月日季刻时周"
    r"天秒旬纪岁世更夜春夏秋冬代伏辈丸泡粒幢堆根道面片块]|[千毫微]克|[千分厘毫微]米)"
)

# Each rule: the pattern, and how its first group is said. Order matters. The patterns are
# linear in their input: a number's match starts only where its digits start (the
# lookbehinds), which finds the same numbers as trying every position, without the
# quadratic work of trying them inside a long run of digits (or, for the money rule,
# of a leading `\D+` tried at every position of a long run of text).
_RULES: tuple[tuple[re.Pattern[str], Callable[[str], str]], ...] = (
    (re.compile(r"\D+((?:(?:[089]\d|(?:19|20)\d{2})年)?(?:\d{1,2}月(?:\d{1,2}[日号])?)?)"), _spell_date),
    (re.compile(r"(?<=\D)(\d+(?:\.\d+)?[多余几]?" + _CURRENCY_UNIT + r"(?:\d" + _CURRENCY_UNIT + r"?)?)"), _spell_money),
    (re.compile(r"\D((?:\+?86 ?)?1(?:[38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D"), lambda s: _spell_phone(s, False)),
    (re.compile(r"\D((?:0(?:10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D"), lambda s: _spell_phone(s, True)),
    (re.compile(r"(?<!\d)(\d+/\d+)"), _spell_fraction),
    (re.compile(r"(?<!\d)(\d+(?:\.\d+)?%)"), _spell_percentage),
    (re.compile(r"(?<!\d)(\d+(?:\.\d+)?)[多余几]?" + _QUANTIFIER), spell_number),
    (re.compile(r"(\d{4,32})"), _spell_digits),
    (re.compile(r"(\d+(?:\.\d+)?)"), spell_number),
)  # fmt: skip

# Latin-digit-Latin codes (P2P, B2B) keep their digit. A match starts only where a run of
# letters starts: the reference's pattern, tried at every letter of a long run, reads to
# the end of the run each time (quadratic), and finds nothing a run's start does not.
_CODE = re.compile(r"((?<![a-zA-Z])([a-zA-Z]+)二([a-zA-Z]+))")

_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕"
    "〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏·〈〉-"
)
_TO_COMMA = str.maketrans({c: "," for c in _CN_PUNCTUATION + string.punctuation})


def _apply(text: str, pattern: re.Pattern[str], say: Callable[[str], str]) -> str:
    for found in [m.group(1) for m in pattern.finditer(text)]:
        text = text.replace(found, say(found), 1)
    return text


def normalize_chinese_numbers(text: str) -> str:
    """Chinese characters for the numbers in `text`, and punctuation as commas."""
    # Anchors let the rules that need a non-digit on each side match at the ends.
    text = "^" + text + "$"
    for pattern, say in _RULES:
        if say is _spell_percentage:
            text = text.replace("％", "%")  # full-width percent sign, before its rule only
        text = _apply(text, pattern, say)
    for m in list(_CODE.finditer(text)):
        text = text.replace(m.group(1), m.group(2) + "2" + m.group(3), 1)
    text = text.lstrip("^").rstrip("$")
    return text.translate(_TO_COMMA)
