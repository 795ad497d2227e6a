"""The engines a server runs: each loaded once, each owned by its own scheduler."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lowvox.engines import ENGINE_NAMES, Engine, VoiceInfo, create_engine
from lowvox.errors import EngineUnavailable, LowvoxError, UnknownEngine
from lowvox.server.scheduler import Scheduler
from lowvox.settings import Settings

logger = logging.getLogger(__name__)

EngineFactory = Callable[[str, Settings], Engine]


@dataclass
class EngineSlot:
    name: str
    engine: Engine
    scheduler: Scheduler
    last_used: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_used = time.monotonic()


class EngineHub:
    """Creates engines by name on first use, loads them on their own worker, and stops them."""

    def __init__(
        self,
        settings: Settings,
        factory: EngineFactory = create_engine,
        names: tuple[str, ...] = ENGINE_NAMES,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.names = tuple(names)
        self.default = settings.engine.lower()
        self._slots: dict[str, EngineSlot] = {}
        self._lock = asyncio.Lock()

    def resolve_name(self, name: str | None) -> str:
        wanted = (name or self.default).strip().lower()
        if wanted not in self.names:
            raise UnknownEngine(wanted, list(self.names))
        return wanted

    def loaded(self) -> dict[str, EngineSlot]:
        return dict(self._slots)

    @staticmethod
    async def voices(slot: EngineSlot) -> list[VoiceInfo]:
        """An engine's voices, listed off the event loop (it may read the voice library)."""
        return await asyncio.to_thread(slot.engine.voices)

    async def get(self, name: str | None = None, warmup: bool = False) -> EngineSlot:
        """The slot for `name` (default engine when None), loading it if needed."""
        key = self.resolve_name(name)
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        async with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = await self._start(key, warmup)
                self._slots[key] = slot
        return slot

    async def _start(self, key: str, warmup: bool) -> EngineSlot:
        try:
            engine = await asyncio.to_thread(self.factory, key, self.settings)
        except LowvoxError:
            raise
        except ImportError as e:
            raise EngineUnavailable(f"engine {key!r} is not available: {e}") from e
        scheduler = Scheduler(engine, max_queue=self.settings.max_queue, name=key)
        try:
            await scheduler.run(engine.load)
            if warmup:
                await scheduler.run(engine.warmup)
        except BaseException as e:
            scheduler.stop()
            if isinstance(e, LowvoxError):
                raise
            raise EngineUnavailable(f"engine {key!r} failed to load: {e}") from e
        logger.info("engine %s ready", key)
        return EngineSlot(key, engine, scheduler)

    async def reload(self, name: str | None = None) -> EngineSlot:
        """Stop the engine (if running) and start it again; becomes the default engine."""
        key = self.resolve_name(name)
        async with self._lock:
            old = self._slots.pop(key, None)
        if old is not None:
            await asyncio.to_thread(self._stop_slot, old)
        slot = await self.get(key, warmup=True)
        self.default = key  # only once it works: a failed switch keeps the old default
        return slot

    def cancel(self, tag: str) -> int:
        return sum(slot.scheduler.cancel(tag) for slot in list(self._slots.values()))

    def cancel_all(self) -> int:
        return sum(slot.scheduler.cancel_all() for slot in list(self._slots.values()))

    @staticmethod
    def _stop_slot(slot: EngineSlot) -> None:
        slot.scheduler.cancel_all()
        try:
            slot.scheduler.call(slot.engine.unload).result(timeout=30)
        except Exception as e:  # shutting down anyway; say why and carry on
            logger.warning("unloading %s failed: %s", slot.name, e)
        slot.scheduler.stop()

    async def unload_idle(self, idle_seconds: float) -> list[str]:
        """Unload engines unused for `idle_seconds` (settings.keep_alive); the next request
        loads them again."""
        now = time.monotonic()
        async with self._lock:
            idle = [
                slot
                for slot in self._slots.values()
                if now - slot.last_used > idle_seconds and not slot.scheduler.busy
            ]
            for slot in idle:
                del self._slots[slot.name]
        for slot in idle:
            logger.info("unloading %s after %.0f s idle", slot.name, now - slot.last_used)
            await asyncio.to_thread(self._stop_slot, slot)
        return [slot.name for slot in idle]

    async def close(self) -> None:
        async with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            await asyncio.to_thread(self._stop_slot, slot)
