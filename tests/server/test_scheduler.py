"""The per-engine scheduler on its own: one worker, FIFO, cancel, batching hook, calls."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from lowvox.engines.base import EngineBatch, StreamBatch, SynthesisRequest
from lowvox.errors import Cancelled, InvalidRequest
from lowvox.server.scheduler import Priority, QueueFull, Scheduler
from tests.server.srv_fixtures import FakeEngine


def req(text: str, voice: str = "alpha") -> SynthesisRequest:
    return SynthesisRequest(text=text, voice=voice, language="en")


async def collect(job) -> np.ndarray:
    parts = [c.samples async for c in job.chunks()]
    return np.concatenate(parts)


class BatchFake(FakeEngine):
    """Speaks up to `capacity` requests together, one chunk of each per step, like a
    continuously batched model; records which requests shared each step."""

    def __init__(self, capacity: int = 4, fits=None) -> None:
        super().__init__(chunk_delay=0)
        self.capacity = capacity
        self.steps: list[list[str]] = []
        self.fits = fits

    def open_batch(self) -> EngineBatch:
        engine = self

        class Recording(StreamBatch):
            def add(self, request, cancel, bulk=False):
                rid = super().add(request, cancel)
                self.texts[rid] = request.text
                return rid

            def fits(self, request):
                ok = engine.fits(self, request) if engine.fits is not None else True
                return super().fits(request) and ok

            def step(self):
                engine.steps.append(sorted(self.texts[r] for r in self._streams))
                return super().step()

        batch = Recording(self, self.capacity)
        batch.texts = {}
        return batch


def test_jobs_run_in_order_on_one_thread():
    engine = FakeEngine(chunk_delay=0)
    sched = Scheduler(engine, max_queue=8)

    async def main():
        jobs = [sched.submit([req(f"job {i} words")]) for i in range(5)]
        return [await collect(j) for j in jobs]

    try:
        out = asyncio.run(main())
    finally:
        sched.stop()
    assert engine.finished_jobs == [f"job {i} words" for i in range(5)]
    assert engine.max_active == 1
    assert all(len(o) == 3 * 2400 for o in out)


def alone(text: str, voice: str) -> np.ndarray:
    engine = FakeEngine(chunk_delay=0)
    return np.concatenate([c.samples for c in engine.synthesize_stream(req(text, voice))])


def run_jobs(sched, submit):
    """Run `submit(sched)` (which submits jobs, maybe while the worker is held) on an event
    loop; the audio of every job it returns, or the exception it ended with."""

    async def main():
        jobs = submit(sched)
        out = []
        for job in jobs:
            try:
                out.append(await collect(job))
            except Exception as e:  # noqa: BLE001 -- returned for the test to check
                out.append(e)
        return out

    try:
        return asyncio.run(main())
    finally:
        sched.stop()


def test_waiting_jobs_share_steps_and_each_gets_its_own_audio():
    engine = BatchFake()
    sched = Scheduler(engine, max_queue=8)
    texts = [("alpha", "one two"), ("beta", "three four five"), ("gamma", "six")]

    def submit(sched):
        gate = threading.Event()
        sched.call(gate.wait)  # hold the worker so that all three wait
        jobs = [sched.submit([req(t, v)]) for v, t in texts]
        gate.set()
        return jobs

    out = run_jobs(sched, submit)
    assert engine.steps[0] == sorted(t for _, t in texts)  # one step, all three rows
    for (voice, text), audio in zip(texts, out, strict=True):
        assert np.array_equal(audio, alone(text, voice))  # the fake engine is exact


@pytest.mark.slow
def test_a_job_joins_a_running_batch_and_leaves_when_its_own_audio_is_done():
    engine = BatchFake()
    engine.chunk_delay = 0.01  # 100 chunks: the long job runs for a second or more
    sched = Scheduler(engine, max_queue=8)
    long_text = " ".join(["word"] * 100)

    async def main():
        long_job = sched.submit([req(long_text, "alpha")])
        async for first in long_job.chunks():  # noqa: B007 -- kept: the first chunk
            break  # the long job is running
        short = sched.submit([req("short one", "beta")])
        audio = await collect(short)  # joins at the next step, not after the long job
        assert not long_job.finished.is_set()
        return audio, np.concatenate([first.samples, await collect(long_job)])

    try:
        short_audio, long_audio = asyncio.run(main())
    finally:
        sched.stop()
    assert np.array_equal(short_audio, alone("short one", "beta"))
    assert len(long_audio) == len(alone(long_text, "alpha"))
    assert any(step == sorted([long_text, "short one"]) for step in engine.steps)


def test_a_failing_request_fails_alone():
    engine = BatchFake()
    original = engine.synthesize_stream

    def flaky(request, cancel=None):
        if request.text == "explode at start":
            raise InvalidRequest("this request is bad")
        stream = original(request, cancel)
        if request.text == "explode midway please":
            next(stream)
            raise RuntimeError("secret internals")
        return stream

    engine.synthesize_stream = flaky
    sched = Scheduler(engine, max_queue=8)
    texts = ["fine one", "explode at start", "explode midway please", "fine two here"]

    def submit(sched):
        gate = threading.Event()
        sched.call(gate.wait)
        jobs = [sched.submit([req(t)]) for t in texts]
        gate.set()
        return jobs

    out = run_jobs(sched, submit)
    assert isinstance(out[1], InvalidRequest) and "this request is bad" in str(out[1])
    assert isinstance(out[2], Exception) and "secret" not in str(out[2])
    assert np.array_equal(out[0], alone("fine one", "alpha"))
    assert np.array_equal(out[3], alone("fine two here", "alpha"))


def test_interactive_jobs_go_first_and_bulk_leaves_a_slot_free():
    engine = BatchFake(capacity=3)
    sched = Scheduler(engine, max_queue=16)

    def submit(sched):
        gate = threading.Event()
        sched.call(gate.wait)
        bulk = [sched.submit([req(f"bulk {i}")], priority=Priority.BULK) for i in range(4)]
        live = sched.submit([req("live request")])
        gate.set()
        return [*bulk, live]

    out = run_jobs(sched, submit)
    assert all(isinstance(o, np.ndarray) for o in out)
    assert "live request" in engine.steps[0]  # submitted last, spoken first
    assert max(sum(t.startswith("bulk") for t in step) for step in engine.steps) == 2


def _one_big_at_a_time(batch, request):
    """A batch budget that holds one request with "big" in its text at a time."""
    busy = any("big" in batch.texts[r] for r in batch._streams)
    return not (busy and "big" in request.text)


def test_admission_waits_for_room_in_the_batch():
    # A budget of one big request at a time: the second waits until the first has left.
    engine = BatchFake(fits=_one_big_at_a_time)
    sched = Scheduler(engine, max_queue=8)

    def submit(sched):
        gate = threading.Event()
        sched.call(gate.wait)
        big = [sched.submit([req("big one here")]), sched.submit([req("big two here now")])]
        jobs = [*big, sched.submit([req("small")])]
        gate.set()
        return jobs

    out = run_jobs(sched, submit)
    assert all(isinstance(o, np.ndarray) for o in out)
    assert not any(sum("big" in t for t in step) > 1 for step in engine.steps)
    # First come, first served: the waiting big job keeps its place ahead of the small one.
    assert engine.steps[0] == ["big one here"]


def test_a_later_segment_also_waits_for_room_in_the_batch():
    """A job's next segment (a narrator turn) joins within the batch's bound as a new job
    does: it once joined unchecked, so a short first turn let a long one past the KV
    budget beside another long request."""

    engine = BatchFake(fits=_one_big_at_a_time)
    sched = Scheduler(engine, max_queue=8)

    def submit(sched):
        gate = threading.Event()
        sched.call(gate.wait)
        turns = sched.submit([req("short turn"), req("big turn comes next")])
        jobs = [turns, sched.submit([req("big one here now")])]
        gate.set()
        return jobs

    out = run_jobs(sched, submit)
    assert all(isinstance(o, np.ndarray) for o in out)
    assert len(out[0]) == 6 * 2400  # both turns, in order
    assert not any(sum("big" in t for t in step) > 1 for step in engine.steps)
    assert engine.finished_jobs.index("big one here now") < engine.finished_jobs.index(
        "big turn comes next"
    )


def test_a_full_queue_says_when_to_retry():
    engine = FakeEngine(chunk_delay=0)
    sched = Scheduler(engine, max_queue=2)

    async def main():
        gate = threading.Event()
        sched.call(gate.wait)
        jobs = [sched.submit([req("one")]), sched.submit([req("two")])]
        with pytest.raises(QueueFull) as full:
            sched.submit([req("three")])
        gate.set()
        for job in jobs:
            await collect(job)
        return full.value

    try:
        error = asyncio.run(main())
    finally:
        sched.stop()
    assert error.status_code == 429
    # Two jobs ahead on a one-slot engine, each taking ~2 s by the initial estimate.
    assert 1 <= error.retry_after <= 10


def test_cancelling_a_waiting_job_releases_it_at_once():
    engine = FakeEngine(chunk_delay=0)
    engine.gate.clear()  # the running job holds before its last chunk
    sched = Scheduler(engine, max_queue=4)

    async def main():
        running = sched.submit([req("running job words")])
        async for _ in running.chunks():
            break
        waiting = sched.submit([req("waiting job")], tag="mine")
        assert sched.cancel("mine") == 1
        with pytest.raises(Cancelled):
            await collect(waiting)  # while the running job is still held
        assert not running.finished.is_set()
        engine.gate.set()
        return await collect(running)

    try:
        asyncio.run(main())
    finally:
        sched.stop()
    assert "waiting job" not in engine.finished_jobs


def test_cancelled_waiting_job_never_runs_and_frees_its_place():
    engine = FakeEngine(chunk_delay=0)
    sched = Scheduler(engine, max_queue=1)

    async def main():
        gate = threading.Event()
        blocker = sched.call(gate.wait)
        waiting = sched.submit([req("never said")])
        with pytest.raises(QueueFull):
            sched.submit([req("no room")])
        waiting.cancel.set()
        replacement = sched.submit([req("room again")])  # the cancelled job no longer counts
        gate.set()
        await asyncio.wrap_future(blocker)
        with pytest.raises(Cancelled):
            await collect(waiting)
        return await collect(replacement)

    try:
        asyncio.run(main())
    finally:
        sched.stop()
    assert engine.finished_jobs == ["room again"]


def test_engine_errors_reach_the_caller_and_the_worker_survives():
    engine = FakeEngine(chunk_delay=0)
    sched = Scheduler(engine, max_queue=4)

    def broken(request, cancel=None):
        raise InvalidRequest("bad text for this engine")
        yield  # pragma: no cover

    async def main():
        engine.synthesize_stream, original = broken, engine.synthesize_stream
        with pytest.raises(InvalidRequest):
            await collect(sched.submit([req("x")]))
        engine.synthesize_stream = original
        return await collect(sched.submit([req("fine now")]))

    try:
        out = asyncio.run(main())
    finally:
        sched.stop()
    assert len(out) == 2 * 2400


def test_call_runs_on_the_worker_thread():
    sched = Scheduler(FakeEngine(), max_queue=1)
    try:
        name = sched.call(lambda: threading.current_thread().name).result(5)
    finally:
        sched.stop()
    assert name.startswith("lowvox-")


def test_multi_segment_job_keeps_segments_together():
    engine = FakeEngine(chunk_delay=0)
    sched = Scheduler(engine, max_queue=4)

    async def main():
        a = sched.submit([req("first part", "alpha"), req("second part here", "gamma")])
        b = sched.submit([req("other job", "beta")])
        return await collect(a), await collect(b)

    try:
        a, b = asyncio.run(main())
    finally:
        sched.stop()
    assert len(a) == 5 * 2400 and len(b) == 2 * 2400
    assert engine.finished_jobs == ["first part", "second part here", "other job"]


class SlowJoin(FakeEngine):
    """Its batch takes a while to add the request saying `slow` (as XTTS does while it
    clones a library voice): `adding` is set meanwhile, until `go` is."""

    def __init__(self, slow: str) -> None:
        super().__init__(chunk_delay=0)
        self.slow = slow
        self.adding = threading.Event()
        self.go = threading.Event()

    def open_batch(self) -> EngineBatch:
        engine = self

        class Slow(StreamBatch):
            def add(self, request, cancel, bulk=False):
                if request.text == engine.slow:
                    engine.adding.set()
                    assert engine.go.wait(10)
                return super().add(request, cancel, bulk)

        return Slow(self, 2)


@pytest.mark.parametrize("slow", ["first turn", "second turn"])
def test_a_job_joining_the_batch_is_busy_work_and_can_be_stopped(slow):
    """Between leaving the queue and running (its first segment, or a later narrator turn,
    being added) a job is neither waiting nor running: it still counts as the engine's
    work (keep-alive leaves the engine alone) and a stop still reaches it."""
    engine = SlowJoin(slow)
    sched = Scheduler(engine, max_queue=4)

    async def main():
        job = sched.submit([req("first turn"), req("second turn", "beta")], tag="t")
        assert await asyncio.to_thread(engine.adding.wait, 10)
        assert sched.busy
        assert sched.cancel("t") == 1
        engine.go.set()
        with pytest.raises(Cancelled):
            await collect(job)

    try:
        asyncio.run(main())
    finally:
        engine.go.set()
        sched.stop()
    assert "second turn" not in engine.finished_jobs


def test_keep_alive_counts_from_when_the_engine_last_worked(tmp_path):
    """An engine asked for long ago but working until now is not idle: keep-alive counts
    from the end of its last request, not from its start."""
    from lowvox.server.engines import EngineHub
    from tests.server.srv_fixtures import FakeFactory, make_settings

    hub = EngineHub(make_settings(tmp_path), FakeFactory(chunk_delay=0))

    async def main():
        slot = await hub.get("espeak")
        slot.last_used -= 100  # asked for 100 s ago, and spoke until now
        await collect(slot.scheduler.submit([req("a long request")]))
        assert await hub.unload_idle(50) == []
        assert "espeak" in hub.loaded()
        while slot.scheduler.busy:
            await asyncio.sleep(0.01)
        slot.scheduler.idle_since -= 100  # ... and then nothing for 100 s
        assert await hub.unload_idle(50) == ["espeak"]
        assert slot.retired and "espeak" not in hub.loaded()
        await hub.close()

    asyncio.run(main())
