"""lowvox's text front-end: what XTTS is given to read, and how long text is cut up.

- `normalize(text, lang)`: numbers, abbreviations and symbols spelled out per language,
  Chinese to pinyin, Japanese to romaji, Korean to Latin letters, exactly as the XTTS
  reference front-end does (so the model hears what it was trained on).
- `split_sentences(text, lang, limit=None)`: chunks of at most the language's limit.
- `detect_language(text)`: language "auto", offline.
- `segment_narrator(text, mode)`: AllTalk's *narrator* / "character" split.
- `filter_text(text, mode)`: AllTalk's none | standard | html text filtering.
- `XttsTokenizer` (in `lowvox.text.tokenizer`): text to the ids of an XTTS vocab.json.

Heavy language libraries (pypinyin, cutlet, py3langid's model) load on first use.
"""

from __future__ import annotations

from lowvox.text.detect import detect_language
from lowvox.text.filters import FILTER_MODES, filter_text
from lowvox.text.languages import (
    CHAR_LIMITS,
    LANGUAGES,
    MAX_TEXT_TOKENS,
    char_limit,
    pick_language,
    resolve_language,
)
from lowvox.text.narrator import NARRATOR_MODES, Segment, segment_narrator
from lowvox.text.normalize import normalize
from lowvox.text.split import split_sentences

__all__ = [
    "CHAR_LIMITS",
    "FILTER_MODES",
    "LANGUAGES",
    "MAX_TEXT_TOKENS",
    "NARRATOR_MODES",
    "Segment",
    "char_limit",
    "detect_language",
    "filter_text",
    "normalize",
    "pick_language",
    "resolve_language",
    "segment_narrator",
    "split_sentences",
]
