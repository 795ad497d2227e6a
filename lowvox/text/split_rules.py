"""Character and word tables behind `split.py`'s emulation of the reference splitter.

The reference splits sentences with spaCy's blank pipelines (English rules for most XTTS
languages; Spanish, Arabic, Hindi, Chinese and Japanese their own). These tables hold the
parts of those tokenizer rules that decide sentence boundaries, restated as data: which
marks end a sentence, which characters are split off the start or end of a word, and the
abbreviations that keep their full stop.
"""

from __future__ import annotations

# Sentence-final marks (Unicode Sentence_Terminal, as the sentencizer lists them).
SENTENCE_END = frozenset(
    "!.?\u0589\u061f\u06d4\u0700\u0701\u0702\u07f9\u0964\u0965\u104a\u104b\u1362\u1367\u1368"
    "\u166e\u1735\u1736\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e"
    "\u1b5f\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u3002\ua4ff"
    "\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f"
    "\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61"
    "\U00010a56\U00010a57\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1"
    "\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df"
    "\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2"
    "\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf"
    "\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7"
    "\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011a42\U00011a43\U00011a9b"
    "\U00011a9c\U00011c41\U00011c42\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38"
    "\U00016b44\U0001bc9f\U0001da88"
)

# Punctuation split off either end of a word.
PUNCT_CHARS = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
# Quotation marks and CJK brackets, also split off either end.
QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉〈〉⟦⟧"
_CURRENCY = "$£€¥฿₽﷼₴₠₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₵₶₷₸₹₺₻₼₾₿"
# Characters split off the start of a word ("+" only when no digit follows).
PREFIX_CHARS = frozenset("§%=—–" + PUNCT_CHARS + QUOTES + _CURRENCY)

# Split off the end of a word only right after a digit (5km, 20$).
CURRENCY_AFTER_NUMBER = tuple(_CURRENCY) + ("US$", "C$", "A$")
UNITS_AFTER_NUMBER = tuple(
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb "  # noqa: SIM905
    "oz m/s km/h kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K % км км² км³ м м² м³ "
    "дм дм² дм³ см см² см³ мм мм² мм³ нм кг г мг м/с км/ч кПа Па мбар Кб КБ кб Мб МБ мб Гб "
    "ГБ гб Тб ТБ тбكم كم² كم³ م م² م³ سم سم² سم³ مم مم² مم³ كم غرام جرام جم كغ ملغ كوب "
    "اكواب".split()
)

# Scripts without letter case, whose letters count as both lower and upper case: Ethiopic,
# Bengali, Hebrew, Arabic, Sinhala, Devanagari, Kannada, Tamil, Telugu, Hangul, kana, CJK.
UNCASED_RANGES = (
    "\u1200-\u137f\u0980-\u09ff\u0591-\u05f4\ufb1d-\ufb4f\u0620-\u064a\u066e-\u06d5"
    "\u06e5-\u06ff\u0750-\u077f\u08a0-\u08bd\ufb50-\ufbb1\ufbd3-\ufd3d\ufd50-\ufdc7"
    "\ufdf0-\ufdfb\ufe70-\ufefc\U0001ee00-\U0001eebb\u0d80-\u0dff\u0900-\u097f\u0c80-\u0cff"
    "\u0b80-\u0bff\u0c00-\u0c7f\uac00-\ud7af\u1100-\u11ff\u3040-\u30ff\u4e00-\u9fff"
    "\u3400-\u4dbf\U00020000-\U0002ebef\u2e80-\u2eff\u2f00-\u2fdf\u2ff0-\u2fff\u3000-\u303f"
    "\u31c0-\u31ef\u3200-\u32ff\u3300-\u33ff\uf900-\ufaff\ufe30-\ufe4f\U0001f200-\U0001f2ff"
    "\U0002f800-\U0002fa1f"
)

# Symbols (dingbats, emoji, ...) split off as tokens of their own.
ICON_RANGES = (
    "\u00a6\u00a9\u00ae\u00b0\u0482\u058d\u058e\u060e\u060f\u06de\u06e9\u06fd\u06fe\u07f6"
    "\u09fa\u0b70\u0bf3-\u0bf8\u0bfa\u0c7f\u0d4f\u0d79\u0f01-\u0f03\u0f13\u0f15-\u0f17"
    "\u0f1a-\u0f1f\u0f34\u0f36\u0f38\u0fbe-\u0fc5\u0fc7-\u0fcc\u0fce\u0fcf\u0fd5-\u0fd8"
    "\u109e\u109f\u1390-\u1399\u1940\u19de-\u19ff\u1b61-\u1b6a\u1b74-\u1b7c\u2100\u2101"
    "\u2103-\u2106\u2108\u2109\u2114\u2116\u2117\u211e-\u2123\u2125\u2127\u2129\u212e\u213a"
    "\u213b\u214a\u214c\u214d\u214f\u218a\u218b\u2195-\u2199\u219c-\u219f\u21a1\u21a2\u21a4"
    "\u21a5\u21a7-\u21ad\u21af-\u21cd\u21d0\u21d1\u21d3\u21d5-\u21f3\u2300-\u2307"
    "\u230c-\u231f\u2322-\u2328\u232b-\u237b\u237d-\u239a\u23b4-\u23db\u23e2-\u2426"
    "\u2440-\u244a\u249c-\u24e9\u2500-\u25b6\u25b8-\u25c0\u25c2-\u25f7\u2600-\u266e"
    "\u2670-\u2767\u2794-\u27bf\u2800-\u28ff\u2b00-\u2b2f\u2b45\u2b46\u2b4d-\u2b73"
    "\u2b76-\u2b95\u2b98-\u2bc8\u2bca-\u2bfe\u2ce5-\u2cea\u2e80-\u2e99\u2e9b-\u2ef3"
    "\u2f00-\u2fd5\u2ff0-\u2ffb\u3004\u3012\u3013\u3020\u3036\u3037\u303e\u303f\u3190\u3191"
    "\u3196-\u319f\u31c0-\u31e3\u3200-\u321e\u322a-\u3247\u3250\u3260-\u327f\u328a-\u32b0"
    "\u32c0-\u32fe\u3300-\u33ff\u4dc0-\u4dff\ua490-\ua4c6\ua828-\ua82b\ua836\ua837\ua839"
    "\uaa77-\uaa79\ufdfd\uffe4\uffe8\uffed\uffee\ufffc\ufffd\U00010137-\U0001013f"
    "\U00010179-\U00010189\U0001018c-\U0001018e\U00010190-\U0001019b\U000101a0"
    "\U000101d0-\U000101fc\U00010877\U00010878\U00010ac8\U0001173f\U00016b3c-\U00016b3f"
    "\U00016b45\U0001bc9c\U0001d000-\U0001d0f5\U0001d100-\U0001d126\U0001d129-\U0001d164"
    "\U0001d16a-\U0001d16c\U0001d183\U0001d184\U0001d18c-\U0001d1a9\U0001d1ae-\U0001d1e8"
    "\U0001d200-\U0001d241\U0001d245\U0001d300-\U0001d356\U0001d800-\U0001d9ff"
    "\U0001da37-\U0001da3a\U0001da6d-\U0001da74\U0001da76-\U0001da83\U0001da85\U0001da86"
    "\U0001ecac\U0001f000-\U0001f02b\U0001f030-\U0001f093\U0001f0a0-\U0001f0ae"
    "\U0001f0b1-\U0001f0bf\U0001f0c1-\U0001f0cf\U0001f0d1-\U0001f0f5\U0001f110-\U0001f16b"
    "\U0001f170-\U0001f1ac\U0001f1e6-\U0001f202\U0001f210-\U0001f23b\U0001f240-\U0001f248"
    "\U0001f250\U0001f251\U0001f260-\U0001f265\U0001f300-\U0001f3fa\U0001f400-\U0001f6d4"
    "\U0001f6e0-\U0001f6ec\U0001f6f0-\U0001f6f9\U0001f700-\U0001f773\U0001f780-\U0001f7d8"
    "\U0001f800-\U0001f80b\U0001f810-\U0001f847\U0001f850-\U0001f859\U0001f860-\U0001f887"
    "\U0001f890-\U0001f8ad\U0001f900-\U0001f90b\U0001f910-\U0001f93e\U0001f940-\U0001f970"
    "\U0001f973-\U0001f976\U0001f97a\U0001f97c-\U0001f9a2\U0001f9b0-\U0001f9b9"
    "\U0001f9c0-\U0001f9c2\U0001f9d0-\U0001f9ff\U0001fa60-\U0001fa6d"
)

# Words that keep their dots (abbreviations, initials, emoticons), per rule family.
_BASE = (  # noqa: SIM905 - a word list reads better as text
    "a. b. c. d. e. f. g. h. i. j. k. l. m. n. o. p. q. r. s. t. u. v. w. x. y. z. ä. ö. "
    "ü. °C. °F. °K. °c. °f. °k. (._.) ._. 0.0 0.o o.0 o.O o.o O.O O.o V.V v.v <.< >.< >.>"
).split()
_TIMES = [f"{h}{m}" for h in range(1, 13) for m in ("a.m.", "p.m.")]
_ENGLISH = (  # noqa: SIM905 - a word list reads better as text
    "Adm. Ak. Ala. Apr. Ariz. Ark. Aug. Bros. Calif. Co. Colo. Conn. Corp. D.C. Dec. Del. "
    "Dr. E.G. E.g. Feb. Fla. Ga. Gen. Gov. I.E. I.e. Ia. Id. Ill. Inc. Ind. Jan. Jr. Jul. "
    "Jun. Kan. Kans. Ky. La. Ltd. Mar. Mass. Md. Messrs. Mich. Minn. Miss. Mo. Mont. Mr. "
    "Mrs. Ms. Mt. N.C. N.D. N.H. N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. "
    "Ph.D. Prof. Rep. Rev. S.C. Sen. Sep. Sept. St. Tenn. Va. Wash. Wis. a.m. co. e.g. "
    "i.e. p.m. v.s. vs."
).split()
_SPANISH = (  # noqa: SIM905 - a word list reads better as text
    "Av. Avda. Cía. Dr. Dra. EE.UU. Ee.Uu. Gob. Gral. Ing. J.C. Lic. P.D. Prof. Profa. "
    "Q.E.P.D. S.A. S.L. S.R.L. Sr. Sra. Srta. Ud. Uds. Vd. Vds. a.C. a.J.C. apdo. aprox. "
    "d.C. d.J.C. dna. dpto. ej. esq. etc. fig. m.n. núm. p.ej. pág. q.e.p.d. s.s.s. vol. "
    "12m."
).split()
_ARABIC = [".ت", ".م", ".هـ", "أ.", "أ.د", "ب.", "ت.", "د.", "ص.ب", "ق.م"]

SPECIAL_CASES: dict[str, frozenset[str]] = {
    "en": frozenset(_BASE + _TIMES + _ENGLISH),
    "es": frozenset(_BASE + _TIMES + _SPANISH),
    "ar": frozenset(_BASE + _ARABIC),
    "hi": frozenset(_BASE),
}
