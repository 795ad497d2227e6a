"""The engine hub's lifecycle under concurrent requests: reloads, runtime switches and
idle unloads that happen while requests hold the engine (fakes: fast and deterministic)."""

from __future__ import annotations

import asyncio
import logging
import threading

import httpx
import pytest

from lowvox.engines.base import SynthesisRequest
from lowvox.errors import EngineUnavailable, LowvoxError
from lowvox.runtime.planner import PlanError
from lowvox.server.engines import EngineHub
from tests.golden import GOLDEN
from tests.server.srv_fixtures import (
    FakeEngine,
    FakeFactory,
    ProductionServer,
    live_server,
    make_settings,
    wait_for,
)


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


class _StubModel:
    """Stands for a loaded XttsModel on the GPU: records where it was asked to move."""

    def __init__(self) -> None:
        self.moves: list[str] = []

    def to(self, device: str) -> _StubModel:
        self.moves.append(device)
        return self


@pytest.mark.slow  # builds an XttsEngine (reads the golden config; imports torch)
def test_low_vram_cannot_move_the_weights_under_running_requests(tmp_path):
    # On a GPU, turning low-VRAM on mid-batch moved the weights to RAM under the batch's
    # GPU KV cache (its next step failed every row); turning it off let the running
    # requests' residency put the weights back in RAM as they ended. Mid-request the
    # switch is now refused (503 with Retry-After); between requests it applies.
    if not (GOLDEN / "model.pth").is_file():
        pytest.skip("golden xtts-tiny bundle not found")
    from lowvox.engines.xtts.engine import LowVramBusy, XttsEngine
    from lowvox.runtime.planner import Plan

    plan = Plan(device="cuda:0", precision="fp16", residency="gpu", compute_dtype="float16")
    engine = XttsEngine(GOLDEN, cache_dir=tmp_path, plan=plan)
    model = _StubModel()
    engine._model = model  # type: ignore[assignment]
    engine._make_residency = lambda m: None  # type: ignore[method-assign,assignment,return-value]
    with engine._on_device():  # a request is running
        with pytest.raises(LowVramBusy) as refused:
            engine.set_low_vram(True)
        assert refused.value.status_code == 503 and refused.value.retry_after > 0
        assert model.moves == [] and not engine.low_vram
    engine.set_low_vram(True)  # between requests
    assert model.moves == ["cpu"] and engine.low_vram


class _NoGpuFactory(FakeFactory):
    """A machine without a GPU: an engine for device cuda fails to build, once `release`
    is set (so a test can send another change while this one is loading)."""

    def __init__(self) -> None:
        super().__init__()
        self.cuda_asked = threading.Event()
        self.release = threading.Event()

    def __call__(self, name, settings):
        if settings.device.startswith("cuda"):
            self.cuda_asked.set()
            assert self.release.wait(30)
            raise PlanError("device cuda was asked for, but no CUDA GPU is available")
        return super().__call__(name, settings)


@pytest.mark.slow  # a live server
def test_runtime_changes_sent_together_apply_one_after_another(tmp_path):
    # A change that fails put back the settings it had found, including those another
    # change had set meanwhile: that change was answered 200 yet silently undone.
    factory = _NoGpuFactory()
    with live_server(tmp_path, factory) as server, server.client() as client:
        answers: dict[str, httpx.Response] = {}

        def change(key: str, body: dict) -> None:
            with server.client() as c:
                answers[key] = c.post("/api/runtime", json=body)

        cuda = threading.Thread(target=change, args=("cuda", {"device": "cuda"}))
        cuda.start()
        assert factory.cuda_asked.wait(30)
        int8 = threading.Thread(target=change, args=("int8", {"precision": "int8"}))
        int8.start()
        # Time for it to arrive; it cannot be answered before the cuda change ends.
        assert not wait_for(lambda: "int8" in answers, timeout=0.3)
        factory.release.set()
        cuda.join(30)
        int8.join(30)
        assert answers["cuda"].status_code == 400 and "no CUDA GPU" in answers["cuda"].text
        assert answers["int8"].status_code == 200, answers["int8"].text
        assert answers["int8"].json()["precision"] == "int8"
        now = client.get("/api/runtime").json()
        assert (now["device"], now["precision"]) == ("auto", "int8")


@pytest.mark.slow  # builds an XttsEngine (reads the golden config; imports torch)
def test_the_fast_path_switch_reaches_the_next_batch(tmp_path, monkeypatch):
    # The scheduler keeps one XttsBatch for good, and its pipeline batch was only made
    # anew for a reloaded model: AllTalk's "DeepSpeed" switch (CUDA graphs) never took
    # effect, and low-VRAM on would have kept replaying graphs over weights that move.
    if not (GOLDEN / "model.pth").is_file():
        pytest.skip("golden xtts-tiny bundle not found")
    from lowvox.engines.xtts import pipeline
    from lowvox.engines.xtts.engine import XttsBatch, XttsEngine
    from lowvox.runtime.planner import Plan

    class FakePipelineBatch:
        def __init__(self, model, max_rows, graphs, kv_positions) -> None:
            self.model = model
            self.decoder = type("Decoder", (), {"graphs": graphs})()

        def __len__(self) -> int:
            return 0

    monkeypatch.setattr(pipeline, "Batch", FakePipelineBatch)
    plan = Plan(device="cuda:0", precision="fp16", residency="gpu", compute_dtype="float16")
    engine = XttsEngine(GOLDEN, cache_dir=tmp_path, plan=plan)
    engine._model = _StubModel()  # type: ignore[assignment]
    engine._make_residency = lambda m: None  # type: ignore[method-assign,assignment,return-value]
    engine.kv_positions = lambda m: 64  # type: ignore[method-assign]
    batch = XttsBatch(engine)
    assert not batch._pipeline().decoder.graphs
    engine.set_fast_path(True)
    assert batch._pipeline().decoder.graphs
    engine.set_low_vram(True)  # weights that move: no graphs
    assert not batch._pipeline().decoder.graphs


def test_a_model_that_fails_to_load_is_a_503_and_the_next_request_loads_it(tmp_path):
    # A damaged model file (the loader's own LowvoxError, a 500) was passed on as a 500
    # without Retry-After; the slot is not kept, so once the file is restored the next
    # request loads it.
    factory = FakeFactory()
    hub = EngineHub(make_settings(tmp_path), factory)
    damaged = [True]

    def load() -> None:
        if damaged[0]:
            raise LowvoxError("cannot read checkpoint model.pth: truncated")

    async def main() -> None:
        factory.engines["espeak"] = engine = FakeEngine()
        engine.load = load  # type: ignore[method-assign]
        with pytest.raises(EngineUnavailable) as failed:
            await hub.get()
        assert failed.value.status_code == 503 and "truncated" in str(failed.value)
        assert hub.loaded() == {}
        damaged[0] = False  # the file restored
        slot = await hub.get()
        assert slot.engine is engine
        await hub.close()

    asyncio.run(main())
    assert [t for t in threading.enumerate() if t.name.startswith("lowvox-")] == []


@pytest.mark.slow  # a live server
def test_stopping_the_server_ends_a_stream_cleanly_and_at_once(tmp_path, caplog):
    # uvicorn waits for open responses before the application's shutdown: a stream ran on
    # until that wait's bound (5 s) and was then killed mid-body with a traceback. Its job
    # is now cancelled as the server stops; the body ends with what was made.
    server = ProductionServer(make_settings(tmp_path), FakeFactory()).__enter__()
    server.engine.gate.clear()  # the stream holds before its last chunk
    got: dict = {}

    def listen() -> None:
        with (
            server.client() as c,
            c.stream(
                "POST",
                "/v1/audio/speech",
                json={"input": "one two three four", "voice": "alpha", "response_format": "pcm"},
            ) as r,
        ):
            got["status"] = r.status_code
            try:
                got["bytes"] = sum(len(b) for b in r.iter_bytes())
            except httpx.HTTPError as e:
                got["error"] = repr(e)

    listener = threading.Thread(target=listen)
    with caplog.at_level(logging.INFO):
        listener.start()
        assert wait_for(server.engine.started.is_set)
        server.server.should_exit = True
        listener.join(30)
        server.thread.join(30)
    assert not server.thread.is_alive()
    assert got.get("status") == 200 and "error" not in got and got["bytes"] > 0, got
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "1 request(s) in progress cut short" in caplog.text
