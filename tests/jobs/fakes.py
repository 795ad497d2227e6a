"""A fake executor for job tests: speech-like audio decided by (text, voice, seed) alone."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np

from lowvox.engines.base import SynthesisRequest
from lowvox.errors import Cancelled, LowvoxError, UnknownVoice
from lowvox.jobs.executors import Executor, Take

RATE = 24_000
VOICES = ("alpha", "beta")


def speechlike(text: str, voice: str, seed: int, rate: int = RATE) -> np.ndarray:
    """Syllable-shaped noise bursts, about 14 characters a second, like a speaker."""
    rng = np.random.default_rng(
        int(hashlib.sha256(f"{text}|{voice}|{seed}".encode()).hexdigest()[:12], 16)
    )
    seconds = max(0.4, len(text) / 14.0)
    n = int(seconds * rate)
    syll = int(0.18 * rate)
    t = np.arange(n)
    envelope = 0.5 - 0.5 * np.cos(2 * np.pi * (t % syll) / syll)
    pitch = 150.0 if voice == "alpha" else 230.0
    tone = np.sin(2 * np.pi * pitch * t / rate) + 0.3 * rng.standard_normal(n)
    return (0.25 * envelope * tone).astype(np.float32)


class FakeExecutor(Executor):
    """Speaks takes instantly. `silent_takes`: (text, take number) pairs that come out as
    silence (a bad take the quality check must catch); `fail_texts`: texts that fail."""

    def __init__(self, concurrency: int = 3, delay: float = 0.0) -> None:
        self.sample_rate = RATE
        self.concurrency = concurrency
        self.delay = delay
        self.calls: list[Take] = []
        self.silent_seeds: set[int] = set()
        self.fail_texts: set[str] = set()
        self.gate: asyncio.Event | None = None  # when set, speak waits for it
        self.cancels: dict[str, int] = {}  # job -> how many times it was cancelled

    async def start(self) -> None:
        pass

    async def validate(self, request: SynthesisRequest) -> SynthesisRequest:
        voice = request.voice or "alpha"
        if voice not in VOICES:
            raise UnknownVoice(voice)
        language = "en" if request.language in (None, "auto") else request.language
        return SynthesisRequest(
            text=request.text, voice=voice, language=language, speed=request.speed
        )

    async def speak(self, take: Take, cancel=None) -> np.ndarray:
        self.calls.append(take)
        epoch = self.cancels.get(take.job, 0)
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.cancels.get(take.job, 0) != epoch:  # cancelled while in flight
            raise Cancelled("generation cancelled")
        if take.text in self.fail_texts:
            raise LowvoxError(f"cannot say {take.text!r}")
        seed = int(take.options["seed"])
        if seed in self.silent_seeds:
            return np.zeros(int(len(take.text) / 14.0 * RATE), np.float32)
        return speechlike(take.text, take.voice or "alpha", seed)

    async def cancel(self, job: str) -> None:
        self.cancels[job] = self.cancels.get(job, 0) + 1
