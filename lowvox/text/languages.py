"""The 17 XTTS languages, their per-request character limits and code resolution."""

from __future__ import annotations

from lowvox.errors import UnknownLanguage

# Public codes, in the order XTTS lists them. Chinese is `zh-cn` on the wire and in the
# vocab's language tag; the text rules key it as `zh`.
LANGUAGES: tuple[str, ...] = (
    "en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru",
    "nl", "cs", "ar", "zh-cn", "hu", "ko", "ja", "hi",
)  # fmt: skip

# Characters per generation chunk that XTTS was trained to handle; longer text is split.
CHAR_LIMITS: dict[str, int] = {
    "en": 250, "de": 253, "fr": 273, "es": 239, "it": 213, "pt": 203, "pl": 224,
    "zh-cn": 82, "ar": 166, "cs": 186, "ru": 182, "nl": 251, "tr": 226, "ja": 71,
    "hu": 224, "ko": 95, "hi": 150,
}  # fmt: skip

# The hard limit of the GPT's text positions (XTTS `max_text_tokens`).
MAX_TEXT_TOKENS = 400


def resolve_language(lang: str) -> str:
    """Return the public code for `lang` (case-insensitive; `zh`, `zh_CN` -> `zh-cn`)."""
    if not isinstance(lang, str):
        raise UnknownLanguage(str(lang), list(LANGUAGES))
    code = lang.strip().lower().replace("_", "-")
    if code in CHAR_LIMITS:
        return code
    base = code.split("-")[0]
    if base == "zh":
        return "zh-cn"
    if base in CHAR_LIMITS:
        return base
    raise UnknownLanguage(lang, list(LANGUAGES))


def rule_key(lang: str) -> str:
    """The key of the text-rule tables for a language (`zh-cn` -> `zh`)."""
    code = resolve_language(lang)
    return "zh" if code == "zh-cn" else code


def char_limit(lang: str) -> int:
    return CHAR_LIMITS[resolve_language(lang)]
