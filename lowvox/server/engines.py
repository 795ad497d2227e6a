"""The engines a server runs: each loaded once, each owned by its own scheduler."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lowvox.engines import ENGINE_NAMES, Engine, VoiceInfo, create_engine
from lowvox.errors import EngineUnavailable, InvalidRequest, LowvoxError, UnknownEngine
from lowvox.server.scheduler import Priority, Scheduler
from lowvox.settings import Settings

logger = logging.getLogger(__name__)

EngineFactory = Callable[[str, Settings], Engine]

# How long a "no" to "can this engine run here?" is kept: a model installed while the
# server runs shows up in the model lists within this time.
AVAILABILITY_TTL_S = 30.0


class EngineRestarting(EngineUnavailable):
    """The engine a request was meant for is being stopped (a reload, a runtime change, an
    idle unload): a 503 whose Retry-After is about how long loading took last time."""

    def __init__(self, name: str, retry_after: int) -> None:
        super().__init__(
            f"the {name} engine is restarting (reload or runtime change); retry in {retry_after} s"
        )
        self.retry_after = retry_after


@dataclass
class EngineSlot:
    name: str
    engine: Engine
    scheduler: Scheduler
    last_used: float = field(default_factory=time.monotonic)
    # Set once the hub has let go of this slot (reload, unload, shutdown): what still
    # holds it fails with EngineRestarting rather than a bare "shutting down".
    retired: bool = False
    # Seconds its engine took to load: the Retry-After of a request caught by a restart.
    load_seconds: float = 0.0

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def restarting(self) -> EngineRestarting:
        return EngineRestarting(self.name, max(1, math.ceil(self.load_seconds)))


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
        # One reload or runtime change at a time: each is "stop, change, start" (and a
        # failed runtime change puts the old settings back), which must not interleave.
        self._switching = asyncio.Lock()
        # name -> (can run here, when that was found out), for the model lists.
        self._availability: dict[str, tuple[bool, float]] = {}

    def resolve_name(self, name: str | None) -> str:
        if name is not None and not isinstance(name, str):
            raise InvalidRequest("engine must be a string (an engine's name)", field="engine")
        wanted = (name or self.default).strip().lower()
        if wanted not in self.names:
            raise UnknownEngine(wanted, list(self.names))
        return wanted

    def loaded(self) -> dict[str, EngineSlot]:
        return dict(self._slots)

    async def available(self) -> list[str]:
        """The engines that can run here, for the model lists clients pick from: a loaded
        engine can; another can when it can be constructed (its files and libraries are
        there; XTTS without a model is not). Nothing is loaded to find out."""
        out = []
        for name in self.names:
            if name in self._slots:
                out.append(name)
                continue
            known = self._availability.get(name)
            # A "no" is asked again after a while (a model may be installed meanwhile);
            # a "yes" is kept, so constructing an engine is not repeated for every list.
            if known is None or (not known[0] and time.monotonic() - known[1] > AVAILABILITY_TTL_S):
                known = (await asyncio.to_thread(self._can_construct, name), time.monotonic())
                self._availability[name] = known
            if known[0]:
                out.append(name)
        return out

    def _can_construct(self, name: str) -> bool:
        try:
            self.factory(name, self.settings)
        except (LowvoxError, ImportError, OSError) as e:
            logger.debug("engine %s is not offered: %s", name, e)
            return False
        return True

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
        began = time.monotonic()
        try:
            await scheduler.run(engine.load)
            if warmup:
                await scheduler.run(engine.warmup)
        except BaseException as e:
            scheduler.stop(last=engine.unload)  # what a failed warm-up had loaded
            if isinstance(e, LowvoxError) and e.status_code < 500:
                raise  # the request's own fault (an impossible device plan): a 4xx
            # A damaged or half-copied model file is the server's state, not a bug: a 503
            # with Retry-After, and the next request tries to load it again.
            raise EngineUnavailable(f"engine {key!r} failed to load: {e}") from e
        logger.info("engine %s ready", key)
        self._availability[key] = (True, time.monotonic())
        return EngineSlot(key, engine, scheduler, load_seconds=time.monotonic() - began)

    async def reload(self, name: str | None = None) -> EngineSlot:
        """Stop the engine (if running) and start it again; becomes the default engine."""
        key = self.resolve_name(name)
        async with self._switching:
            return await self._reload(key)

    async def reconfigure(self, updates: dict[str, object]) -> EngineSlot:
        """Apply settings `updates` (device, precision, residency) by reloading the default
        engine with them. A change that cannot load (cuda without a GPU) changes nothing:
        the old settings come back, the engine is reloaded with them, and the error is
        raised. Changes asked for together apply one after another, each on the last."""
        async with self._switching:
            previous = self.settings
            self.settings = previous.model_copy(update=updates)
            try:
                return await self._reload(self.default)
            except LowvoxError:
                self.settings = previous
                await self._reload(self.default)
                raise

    async def _reload(self, key: str) -> EngineSlot:
        async with self._lock:
            old = self._slots.pop(key, None)
        if old is not None:
            old.retired = True
            await asyncio.to_thread(self._stop_slot, old)
        slot = await self.get(key, warmup=True)
        self.default = key  # only once it works: a failed switch keeps the old default
        return slot

    def cancel(self, tag: str) -> int:
        return sum(slot.scheduler.cancel(tag) for slot in list(self._slots.values()))

    def cancel_all(self, priority: Priority | None = None) -> int:
        slots = list(self._slots.values())
        return sum(slot.scheduler.cancel_all(priority) for slot in slots)

    @staticmethod
    def _stop_slot(slot: EngineSlot) -> None:
        # New work is refused first (a request that already holds the slot gets
        # EngineRestarting), then the model is unloaded on its own thread as it ends.
        slot.scheduler.stop(timeout=30, last=slot.engine.unload)

    @staticmethod
    def idle_for(slot: EngineSlot, now: float) -> float:
        """Seconds since `slot` was last asked for or last worked (0 while it works): a
        long request keeps its engine for `keep_alive` after it ends, not after it began."""
        if slot.scheduler.busy:
            return 0.0
        return now - max(slot.last_used, slot.scheduler.idle_since)

    async def unload_idle(self, idle_seconds: float) -> list[str]:
        """Unload engines unused for `idle_seconds` (settings.keep_alive); the next request
        loads them again."""
        now = time.monotonic()
        async with self._lock:
            idle = [s for s in self._slots.values() if self.idle_for(s, now) > idle_seconds]
            for slot in idle:
                del self._slots[slot.name]
                slot.retired = True
        for slot in idle:
            logger.info("unloading %s after %.0f s idle", slot.name, self.idle_for(slot, now))
            await asyncio.to_thread(self._stop_slot, slot)
        return [slot.name for slot in idle]

    async def close(self) -> None:
        async with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            slot.retired = True
            await asyncio.to_thread(self._stop_slot, slot)
