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


def pick_language(
    requested: str | None,
    available: list[str] | tuple[str, ...],
    text: str = "",
    default: str = "en",
) -> str:
    """The one language resolver of lowvox (CLI, server and every engine): the code from
    `available` that `requested` means.

    Empty means `default`; "auto" detects the language of `text` (offline), falling back to
    `default`. Case, `_` and `-` do not matter, and a region may be added or left out:
    `zh`, `zh_CN`, `zh-cn` all mean XTTS's `zh-cn`; `pt_BR` means `pt` where only `pt` is
    available, and `en` means `en-us` where only regional variants are.
    """
    if requested is not None and not isinstance(requested, str):
        raise UnknownLanguage(str(requested), list(available))
    code = (requested or "").strip().lower().replace("_", "-") or default.lower()
    if code == "auto":
        from lowvox.text.detect import detect_language

        code = detect_language(text, default)
    codes = {a.lower().replace("_", "-"): a for a in available}
    base = code.split("-")[0]
    candidates = [code, "zh-cn" if base == "zh" else base]
    for candidate in candidates:
        if candidate in codes:
            return codes[candidate]
    for key, original in codes.items():  # a regional variant of the base language
        if key.split("-")[0] == base:
            return original
    raise UnknownLanguage(requested or code, list(available))


def rule_key(lang: str) -> str:
    """The key of the text-rule tables for a language (`zh-cn` -> `zh`)."""
    code = resolve_language(lang)
    return "zh" if code == "zh-cn" else code


def char_limit(lang: str) -> int:
    return CHAR_LIMITS[resolve_language(lang)]
