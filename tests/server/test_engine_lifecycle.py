"""The engine hub's lifecycle under concurrent requests: reloads, runtime switches and
idle unloads that happen while requests hold the engine (fakes: fast and deterministic)."""

from __future__ import annotations

import asyncio

from lowvox.engines.base import SynthesisRequest
from lowvox.errors import LowvoxError
from lowvox.server.engines import EngineHub
from tests.server.srv_fixtures import FakeFactory, make_settings


def test_a_job_arriving_while_its_engine_unloads_is_refused_not_run(tmp_path):
    # A request holding the slot from before a reload submits while the old engine is
    # being unloaded: it must be refused (the route turns that into a 503 with
    # Retry-After), not admitted to the old scheduler, where an XTTS engine would load
    # its model again beside the new one.
    hub = EngineHub(make_settings(tmp_path), FakeFactory())

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        slot = await hub.get()
        late: dict = {}

        def unload() -> None:
            try:
                late["job"] = slot.scheduler.submit(
                    [SynthesisRequest(text="late words here", voice="alpha")], loop=loop
                )
            except LowvoxError as e:
                late["error"] = e

        slot.engine.unload = unload  # type: ignore[method-assign]
        await hub.reload()
        await hub.close()
        return late

    late = asyncio.run(main())
    assert "job" not in late
    assert "shutting down" in str(late["error"])
