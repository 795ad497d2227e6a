"""The XTTS text tokenizer: normalised text to the BPE ids of the checkpoint's vocab.json."""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer

from lowvox.errors import EngineUnavailable, InvalidRequest
from lowvox.text.languages import MAX_TEXT_TOKENS, char_limit, resolve_language
from lowvox.text.normalize import normalize

logger = logging.getLogger(__name__)

_SPACE = "[SPACE]"


class XttsTokenizer:
    """Turns text in one of the XTTS languages into the ids the GPT reads.

    The id list starts with the language tag (`[en]`, `[zh-cn]`, ...); spaces are the
    `[SPACE]` token. All ids come from the vocab file.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if _SPACE not in vocab:
            raise EngineUnavailable(f"XTTS vocab has no {_SPACE} token")
        self._vocab = vocab

    @classmethod
    def from_file(cls, vocab_path: str | Path) -> XttsTokenizer:
        path = Path(vocab_path)
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise EngineUnavailable(f"cannot read XTTS vocab {path}: {e}") from e

    def _id(self, token: str) -> int | None:
        return self._vocab.get(token)

    @property
    def space_id(self) -> int:
        return self._vocab[_SPACE]

    @property
    def start_text(self) -> int | None:
        """Id of `[START]`, if the vocab has one (XTTS's GPT uses its own start id)."""
        return self._id("[START]")

    @property
    def stop_text(self) -> int | None:
        """Id of `[STOP]`, if the vocab has one."""
        return self._id("[STOP]")

    @property
    def unk_id(self) -> int | None:
        return self._id("[UNK]")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def language_id(self, lang: str) -> int:
        code = resolve_language(lang)
        token_id = self._id(f"[{code}]")
        if token_id is None:
            raise EngineUnavailable(f"XTTS vocab has no [{code}] language token")
        return token_id

    @staticmethod
    def char_limit(lang: str) -> int:
        return char_limit(lang)

    @staticmethod
    def normalize(text: str, lang: str) -> str:
        """The text the model reads (see `lowvox.text.normalize`)."""
        return normalize(text, lang)

    def encode(self, text: str, lang: str) -> list[int]:
        """All ids for `text`, language tag first, as XTTS inference builds them."""
        code = resolve_language(lang)
        body = normalize(text, code).replace(" ", _SPACE)
        if len(text) > char_limit(code):
            # Not an error: XTTS may cut such text short, which is why callers split first.
            logger.debug("text of %d chars is over the %s limit", len(text), code)
        return self._tok.encode(f"[{code}]{body}").ids

    def decode(self, ids: list[int]) -> str:
        """Readable text for ids (for logs and debugging): `[SPACE]` back to a space."""
        text = self._tok.decode(list(ids), skip_special_tokens=False).replace(" ", "")
        for token in ("[STOP]", "[UNK]", "[START]"):
            text = text.replace(token, "")
        return text.replace(_SPACE, " ")

    @staticmethod
    def check_length(ids: list[int]) -> None:
        """Raise InvalidRequest when the GPT cannot take this many text tokens.

        XTTS asserts fewer than 400 (`gpt_max_text_tokens`) per generation.
        """
        if len(ids) >= MAX_TEXT_TOKENS:
            raise InvalidRequest(
                f"text is {len(ids)} tokens after normalisation; XTTS takes at most "
                f"{MAX_TEXT_TOKENS - 1} per sentence: split it (lowvox.text.split_sentences)",
                field="text",
            )
