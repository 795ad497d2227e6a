"""lowvox: a text-to-speech server for CPUs and small GPUs, built around XTTS v2."""

__version__ = "0.1.0"
