"""The per-engine scheduler on its own: one worker, FIFO, cancel, batching hook, calls."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from lowvox.engines.base import SynthesisRequest
from lowvox.errors import Cancelled, InvalidRequest
from lowvox.runtime.scheduler import QueueFull, Scheduler
from tests.server.srv_fixtures import FakeEngine


def req(text: str, voice: str = "alpha") -> SynthesisRequest:
    return SynthesisRequest(text=text, voice=voice, language="en")


async def collect(job) -> np.ndarray:
    parts = [c.samples async for c in job.chunks()]
    return np.concatenate(parts)


class BatchFake(FakeEngine):
    """Decodes several requests together, interleaving their chunks like a batched model."""

    max_batch_size = 4

    def __init__(self) -> None:
        super().__init__(chunk_delay=0)
        self.batches: list[int] = []

    def synthesize_batch_stream(self, requests, cancels):
        self.batches.append(len(requests))
        streams = [list(self.synthesize_stream(r)) for r in requests]
        for step in range(max(len(s) for s in streams)):
            for i, s in enumerate(streams):
                if step < len(s) and not cancels[i].is_set():
                    yield i, s[step]


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


def test_batched_engine_gets_waiting_jobs_together_and_each_its_own_audio():
    engine = BatchFake()
    sched = Scheduler(engine, max_queue=8)
    texts = [("alpha", "one two"), ("beta", "three four five"), ("gamma", "six")]

    async def main():
        # Hold the worker with a call so the three jobs wait and are taken as one batch.
        gate = threading.Event()
        blocker = sched.call(gate.wait)
        jobs = [sched.submit([req(t, v)]) for v, t in texts]
        gate.set()
        await asyncio.wrap_future(blocker)
        return [await collect(j) for j in jobs]

    try:
        out = asyncio.run(main())
    finally:
        sched.stop()
    assert engine.batches == [3]
    for (voice, text), audio in zip(texts, out, strict=True):
        alone = np.concatenate(
            [c.samples for c in FakeEngine(chunk_delay=0).synthesize_stream(req(text, voice))]
        )
        assert np.array_equal(audio, alone)


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
