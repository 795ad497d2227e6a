"""Errors that carry a user-facing message; the CLI and server turn them into clear answers."""

from __future__ import annotations


class LowvoxError(Exception):
    """Base class for errors whose message is meant for the user."""

    status_code = 500


class InvalidRequest(LowvoxError):
    """The request itself is wrong (empty text, speed out of range, bad format, ...)."""

    status_code = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownVoice(InvalidRequest):
    status_code = 404

    def __init__(self, voice: str, where: str | None = None) -> None:
        # `where` places a voice named inside a document ("chapter 2, paragraph 3").
        at = f" ({where})" if where else ""
        super().__init__(f"unknown voice: {voice!r}{at}", field="voice")
        self.voice = voice


class UnknownLanguage(InvalidRequest):
    def __init__(self, language: str, supported: list[str] | None = None) -> None:
        hint = f" (supported: {', '.join(supported)})" if supported else ""
        super().__init__(f"unknown language: {language!r}{hint}", field="language")


class BadDocument(InvalidRequest):
    """An uploaded document (text, Markdown, EPUB) that cannot be read: damaged, encrypted,
    too large once unpacked, empty, or with malformed inline tags."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="file")


class UnsupportedFormat(InvalidRequest):
    def __init__(self, fmt: str, supported: list[str]) -> None:
        super().__init__(
            f"unsupported audio format: {fmt!r} (supported: {', '.join(supported)})",
            field="format",
        )


class UnknownEngine(InvalidRequest):
    status_code = 404

    def __init__(self, engine: str, available: list[str]) -> None:
        super().__init__(
            f"unknown engine: {engine!r} (available: {', '.join(available)})", field="engine"
        )


class EngineUnavailable(LowvoxError):
    """An engine exists but cannot run here (missing model files, missing library)."""

    status_code = 503


class Cancelled(LowvoxError):
    """A generation was stopped on request or because its client went away."""

    status_code = 499
