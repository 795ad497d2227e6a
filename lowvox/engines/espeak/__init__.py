"""espeak-ng, embedded: lowvox's default engine, needing no model download."""

from lowvox.engines.espeak.engine import EspeakEngine

__all__ = ["EspeakEngine"]
