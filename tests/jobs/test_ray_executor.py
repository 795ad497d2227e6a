"""The Ray executor: a book spoken by two actors (a local Ray cluster, the tiny golden XTTS
model) comes out sample for sample as when this process speaks it, and killing an actor
mid-job costs nothing but a retry.

Ray's start and the actors' model loads take ~25 s on two cores: those tests are `slow`.
The retry bookkeeping and the errors' round trip are checked without a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lowvox.errors import Cancelled, InvalidRequest, LowvoxError, UnknownVoice
from lowvox.jobs.executors import Executor, LocalExecutor, Take
from lowvox.jobs.plan import create_job
from lowvox.jobs.runner import JobRunner, ProgressEvent
from lowvox.jobs.store import JobSettings, JobStore
from lowvox.settings import Settings
from tests.golden import GOLDEN, golden_available

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install lowvox[ray])")

from lowvox.jobs.ray_executor import RayExecutor, _Failure, _Worker  # noqa: E402


def on_a_cluster(test):
    """A test that starts a local Ray cluster whose actors load the golden model."""
    test = pytest.mark.slow(test)
    missing = f"golden bundle not found at {GOLDEN}"
    return pytest.mark.skipif(not golden_available(), reason=missing)(test)


# A dozen lines in two chapters (a paragraph each: the planner packs a paragraph's
# sentences into one line). The random model rarely stops on its own, so takes are capped
# at a few tokens; they are sampled with each take's seed, as a real job's are.
BOOK = """# A Short Book

## One

The first sentence starts the book.

A second one follows it.

The third is short.

Then a new paragraph begins.

It has a fifth sentence.

And a sixth to end the chapter.

## Two

The second chapter opens here.

Numbers like 42 are spoken too.

Here is the ninth.

A tenth sentence comes next.

The eleventh is almost the last.

This twelfth one ends it.
"""
OPTIONS = {"max_new_tokens": 24, "temperature": 0.75}


def settings_for(home: Path, cache: Path) -> Settings:
    return Settings(
        home=home,
        cache_dir=cache,
        engine="xtts",
        model_dir=GOLDEN,
        device="cpu",
        precision="fp32",
        vocoder_precision="fp32",
        threads=1,  # two cores, two actors and the head's engine
        executor="ray",
        ray_actors=2,
    )


def job_settings() -> JobSettings:
    return JobSettings(
        engine="xtts", voice="Alpha Voice", language="en", options=OPTIONS, seed=11,
        format="wav", retakes=0,
    )  # fmt: skip


async def speak_book(
    store: JobStore, executor: Executor, on_progress=None
) -> dict[int, np.ndarray]:
    """Create and run the job; each sentence's stored audio, as the FLAC's integers."""
    job = await create_job(
        store, executor, data=BOOK.encode(), filename="book.md", settings=job_settings(),
        max_chars=100_000, max_unpacked_bytes=10**7,
    )  # fmt: skip
    done = await JobRunner(store, executor, on_progress=on_progress).run(job.id)
    assert done.state == "done", done.error
    return {
        s.idx: sf.read(store.audio_path(job.id, s.idx), dtype="int32")[0]
        for s in store.sentences(job.id)
    }


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory) -> Path:
    """One converted-weights cache, written before any engine loads, that every engine
    (here, on the actors, on a replacement actor) loads from. A load that converts
    model.pth itself gets 64-byte-aligned tensors, one from the cache memory-mapped ones
    at 8-byte offsets, and torch's CPU convolutions (the HiFi-GAN vocoder) round ~1 ulp
    differently on those: a 1 LSB difference in the 24-bit sentence files."""
    from lowvox.engines.xtts.checkpoint import default_cache_path, load_weights

    cache = tmp_path_factory.mktemp("cache")
    checkpoint = GOLDEN / "model.pth"
    load_weights(checkpoint, default_cache_path(checkpoint, cache / "xtts"))
    return cache


@pytest.fixture(scope="module")
def local_audio(tmp_path_factory, weights_cache) -> dict[int, np.ndarray]:
    """The book spoken by this process's engine, through its scheduler (the reference)."""
    from lowvox.server.engines import EngineHub

    home = tmp_path_factory.mktemp("local")
    store = JobStore(home / "jobs")

    async def go() -> dict[int, np.ndarray]:
        hub = EngineHub(settings_for(home, weights_cache))
        try:
            executor = LocalExecutor(hub, "xtts")
            await executor.start()
            return await speak_book(store, executor)
        finally:
            await hub.close()

    try:
        audio = asyncio.run(go())
    finally:
        store.close()
    assert len(audio) >= 12  # (and chapter titles, where the planner speaks them)
    return audio


@pytest.fixture(scope="module")
def executor(tmp_path_factory, weights_cache):
    """Two actors on a two-CPU local Ray cluster, shared by the module's tests."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ex = RayExecutor(settings_for(tmp_path_factory.mktemp("ray"), weights_cache), "xtts")
    try:
        asyncio.run(ex.start())
        yield ex
    finally:
        asyncio.run(ex.close())
        ray.shutdown()


def assert_same_audio(got: dict[int, np.ndarray], want: dict[int, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for idx in want:
        assert len(got[idx]) == len(want[idx]), f"sentence {idx}: another length"
        diff = np.abs(got[idx].astype(np.int64) - want[idx].astype(np.int64)).max()
        assert diff == 0, f"sentence {idx}: differs by up to {diff} (of 2^23) from local"


@pytest.mark.parametrize("error", [
    UnknownVoice("Bob", where="chapter 2"),
    InvalidRequest("text is empty", field=None),
    Cancelled("generation cancelled"),
])  # fmt: skip
def test_an_actors_error_comes_back_as_itself(error):
    back = _Failure.of(error).error()
    assert type(back) is type(error)
    assert str(back) == str(error) and back.status_code == error.status_code
    assert vars(back) == vars(error)


def test_an_error_of_an_unknown_kind_comes_back_as_a_lowvox_error():
    back = _Failure("nowhere", "Gone", "it failed").error()
    assert type(back) is LowvoxError and str(back) == "it failed"


class FakeActors:
    """Stands in for Ray (its `exceptions`, `kill`) and for the actor class (`options`,
    `remote`): the first `dead` actors it makes are dead, every call to them fails."""

    exceptions = ray.exceptions

    def __init__(self, dead: int) -> None:
        self.dead = dead
        self.made: list[FakeActor] = []
        self.cancelled: list[object] = []
        self.finished: list[int] = []  # indexes of the takes an actor finished

    def options(self, **_) -> FakeActors:
        return self

    def remote(self, *_) -> FakeActor:
        self.made.append(FakeActor(alive=len(self.made) >= self.dead, finished=self.finished))
        return self.made[-1]

    def kill(self, handle) -> None:
        pass

    def cancel(self, ref) -> None:
        self.cancelled.append(ref)


class FakeActor:
    def __init__(self, alive: bool, finished: list[int]) -> None:
        self.alive = alive
        self.finished = finished
        self.speak = self  # its one method: `speak.remote(take)`

    def remote(self, take: Take):
        async def call() -> np.ndarray:
            await asyncio.sleep(0)
            if not self.alive:
                raise ray.exceptions.ActorDiedError()
            if take.text == "slow":
                await asyncio.sleep(30)
            self.finished.append(take.index)
            return np.full(3, take.index, np.float32)

        return call()


def fake_executor(dead: int) -> tuple[RayExecutor, FakeActors]:
    """A started executor of one actor (a batch of 4) on the fakes: no cluster."""
    fake = FakeActors(dead)
    ex = RayExecutor(Settings(ray_actors=1), "espeak")
    ex._ray = ex._actor_class = fake
    ex._workers = [_Worker(0, ex._new_actor(), capacity=4)]
    return ex, fake


def take(index: int, text: str = "Hi.") -> Take:
    return Take(job="j", index=index, text=text, voice=None, language="en")


def test_takes_that_lose_their_actor_are_sent_again_and_it_is_replaced_once():
    ex, fake = fake_executor(dead=1)  # all three are in flight on it when it dies

    async def go() -> list[np.ndarray]:
        return await asyncio.gather(*(ex.speak(take(i)) for i in range(3)))

    audio = asyncio.run(go())
    assert [a.tolist() for a in audio] == [[i] * 3 for i in range(3)]
    assert ex.replacements == 1 and len(fake.made) == 2  # one death, one new actor
    assert ex._workers[0].busy == 0


def test_a_take_that_keeps_losing_its_actor_is_that_sentences_failure():
    ex, _ = fake_executor(dead=10)
    with pytest.raises(LowvoxError, match=f"lost the Ray worker {ex.max_lost + 1} times"):
        asyncio.run(ex.speak(take(0)))
    assert ex.replacements == ex.max_lost + 1


def test_a_take_stops_when_its_cancel_event_is_set_before_or_during():
    ex, fake = fake_executor(dead=0)
    cancel = threading.Event()

    async def stop_soon() -> None:
        await asyncio.sleep(0.05)
        cancel.set()

    async def go() -> None:
        stopper = asyncio.create_task(stop_soon())
        try:
            await ex.speak(take(0, "slow"), cancel)
        finally:
            await stopper

    with pytest.raises(Cancelled):
        asyncio.run(go())
    assert fake.finished == []  # the take was left, not waited for to the end
    assert len(fake.cancelled) == 1  # stopped on the actor too
    with pytest.raises(Cancelled):  # already set: nothing is sent
        asyncio.run(ex.speak(take(1), cancel))
    assert len(fake.cancelled) == 1 and ex._workers[0].busy == 0


@on_a_cluster
def test_a_book_on_two_ray_actors_is_the_book_spoken_locally(executor, local_audio, tmp_path):
    assert executor.sample_rate == 24_000
    # two actors, a full batch each
    assert executor.concurrency == 2 * executor.settings.max_batch_size == 2 * 16
    store = JobStore(tmp_path / "jobs")
    try:
        audio = asyncio.run(speak_book(store, executor))
    finally:
        store.close()
    assert_same_audio(audio, local_audio)


@on_a_cluster
def test_killing_an_actor_mid_job_loses_nothing(executor, local_audio, tmp_path):
    killed: list[int] = []  # takes in flight on the actor when it was killed
    before = executor.replacements

    def kill_after_first(event: ProgressEvent) -> None:
        if killed or event.done < 1:
            return
        worker = max(executor._workers, key=lambda w: w.busy)
        killed.append(worker.busy)
        ray.kill(worker.handle)

    store = JobStore(tmp_path / "jobs")
    try:
        audio = asyncio.run(speak_book(store, executor, on_progress=kill_after_first))
    finally:
        store.close()
    assert killed and killed[0] > 0, "no take was in flight on the killed actor"
    assert executor.replacements == before + 1
    assert_same_audio(audio, local_audio)
