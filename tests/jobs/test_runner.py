"""Running jobs: every sentence once, retakes of bad takes, failures, pause and resume,
edits re-baked without speaking anything else, and the same book however it was run."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.files import PART_SUFFIX, atomic_path
from lowvox.jobs import runner as runner_module
from lowvox.jobs.plan import MAX_CHAPTER_PARTS, create_job, parse_chapters
from lowvox.jobs.runner import JobRunner, book_file, subtitle_paths, take_seed
from lowvox.jobs.service import JobService
from lowvox.jobs.store import JobSettings, JobStore
from lowvox.settings import Settings
from tests.jobs.fakes import FakeExecutor

BOOK = """# The Book

## One

First sentence of the book. Second sentence here.

A new paragraph starts. [pause:1.0] After the pause.

## Two

[voice:beta]Beta speaks this one.[/voice] Alpha speaks again.
"""


@pytest.fixture()
def store(tmp_path):
    s = JobStore(tmp_path / "jobs")
    yield s
    s.close()


def settings(**kw):
    base = {"engine": "fake", "voice": "alpha", "format": "wav", "retakes": 2, "language": "en"}
    return JobSettings(**{**base, **kw})


async def new_job(store, executor, text=BOOK, name="book.md", **kw):
    return await create_job(
        store,
        executor,
        data=text.encode(),
        filename=name,
        settings=settings(**kw),
        max_chars=100_000,
        max_unpacked_bytes=10**7,
    )


def run(coro):
    return asyncio.run(coro)


def sentence_audio(store, job_id):
    return {
        s.idx: sf.read(store.audio_path(job_id, s.idx), dtype="float32")[0]
        for s in store.sentences(job_id)
    }


def test_a_job_speaks_every_sentence_once_and_assembles_book_and_subtitles(store):
    executor = FakeExecutor()

    async def go():
        job = await new_job(store, executor)
        return await JobRunner(store, executor).run(job.id)

    job = run(go())
    assert job.state == "done", job.error
    rows = store.sentences(job.id)
    assert len(rows) == 8  # six sentences and two chapter titles
    assert sorted(t.index for t in executor.calls) == [r.idx for r in rows]
    assert [t.voice for t in sorted(executor.calls, key=lambda t: t.index)][6] == "beta"
    assert all(r.state == "done" and not r.flags for r in rows)
    book = book_file(store, job)
    audio, rate = sf.read(book, dtype="float32")
    assert rate == 24_000
    spoken = sum(r.samples for r in rows)
    assert len(audio) > spoken  # the sentences plus the pauses between them
    srt, vtt = subtitle_paths(book)
    assert srt.read_text().count(" --> ") == 8
    assert vtt.read_text().startswith("WEBVTT")
    assert "Beta speaks this one." in vtt.read_text()


def test_seeds_come_from_job_sentence_and_attempt(store):
    executor = FakeExecutor()

    async def go():
        job = await new_job(store, executor, seed=42)
        await JobRunner(store, executor).run(job.id)
        return job

    job = run(go())
    seeds = {t.index: t.options["seed"] for t in executor.calls}
    assert seeds == {i: take_seed(42, i, 0, 0) for i in range(8)}
    assert store.get(job.id).language == "en"


def test_a_bad_take_is_retaken_with_the_next_seed_and_the_best_kept(store):
    executor = FakeExecutor()
    # Sentence 2's first two takes come out silent; the third is good.
    executor.silent_seeds = {take_seed(0, 2, 0, 0), take_seed(0, 2, 0, 1)}

    async def go():
        job = await new_job(store, executor)
        return await JobRunner(store, executor).run(job.id)

    job = run(go())
    takes = [t for t in executor.calls if t.index == 2]
    assert len(takes) == 3
    row = store.sentence(job.id, 2)
    assert row.state == "done" and row.flags == ()
    assert row.seed == take_seed(0, 2, 0, 2)  # the kept take's seed is recorded
    audio = sentence_audio(store, job.id)[2]
    assert np.abs(audio).max() > 0.05  # the good take, not a silent one


def test_a_sentence_that_stays_bad_is_kept_flagged_after_n_retakes(store):
    executor = FakeExecutor()
    executor.silent_seeds = {take_seed(0, 1, 0, k) for k in range(5)}

    async def go():
        job = await new_job(store, executor, retakes=1)
        return await JobRunner(store, executor).run(job.id)

    job = run(go())
    assert job.state == "done"
    assert len([t for t in executor.calls if t.index == 1]) == 2
    assert store.sentence(job.id, 1).flags  # the flag is shown to the user
    assert store.progress(job.id).flagged == 1


def test_a_failing_sentence_fails_the_job_resumably(store):
    executor = FakeExecutor()
    executor.fail_texts = {"Alpha speaks again."}

    async def go():
        job = await new_job(store, executor)
        first = await JobRunner(store, executor).run(job.id)
        states = [s.state for s in store.sentences(job.id)]
        executor.fail_texts.clear()
        calls = len(executor.calls)
        store.set_state(job.id, "queued")
        second = await JobRunner(store, executor).run(job.id)
        return first, states, second, executor.calls[calls:]

    first, states, second, again = run(go())
    assert first.state == "failed" and "Alpha speaks again." in first.error
    assert states == ["done"] * 7 + ["failed"]  # the others were spoken all the same
    assert second.state == "done"
    assert [t.index for t in again] == [7]  # only the failed one is spoken again


def test_a_full_disk_stops_the_job_and_resuming_finishes_it(store, monkeypatch):
    executor = FakeExecutor(concurrency=1)
    real = runner_module.write_sentence_audio
    writes = {"n": 0}

    def flaky(path, samples, rate):
        writes["n"] += 1
        if writes["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, samples, rate)

    monkeypatch.setattr(runner_module, "write_sentence_audio", flaky)

    async def go():
        job = await new_job(store, executor)
        first = await JobRunner(store, executor).run(job.id)
        done_then = store.progress(job.id).done
        second = await JobRunner(store, executor).run(job.id)
        return first, done_then, second

    first, done_then, second = run(go())
    assert first.state == "failed" and "disk is full" in first.error
    assert done_then == 2
    assert second.state == "done"
    assert not list(store.folder(first.id).rglob("*.part"))


# A job whose sentence cannot be written because the file system refuses (here a file size
# limit, EFBIG: a real error from write(2), like a full disk's ENOSPC, with no root needed).
_FILE_LIMIT_SCRIPT = """
import asyncio, json, os, resource, signal, sys
from lowvox.jobs.runner import JobRunner
from lowvox.jobs.store import JobStore
from tests.jobs.fakes import FakeExecutor
from tests.jobs.test_runner import new_job

store, executor = JobStore(sys.argv[1]), FakeExecutor(concurrency=1)

async def go():
    job = await new_job(store, executor, text=sys.argv[2], name="long.txt")
    # Room for the database to grow, none for a sentence's audio.
    biggest = max(p.stat().st_size for p in store.root.rglob("*") if p.is_file())
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 256 * 1024, resource.RLIM_INFINITY))
    job = await JobRunner(store, executor).run(job.id)
    print(json.dumps({"id": job.id, "state": job.state, "error": job.error}))

asyncio.run(go())
"""


@pytest.mark.slow
def test_a_sentence_the_file_system_refuses_stops_the_job_resumably(tmp_path):
    # soundfile turns a failed write into its own "System error." (not an OSError): the
    # job died with it instead of stopping with a reason and waiting to be resumed.
    long = ", ".join(["this sentence takes far more room than is left"] * 4) + "."
    done = subprocess.run(
        [sys.executable, "-c", _FILE_LIMIT_SCRIPT, str(tmp_path / "jobs"), long],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout.splitlines()[-1])
    assert first["state"] == "failed"
    assert "cannot write sentence audio ([Errno 27] File too large)" in first["error"]
    assert "resume once fixed" in first["error"]
    store = JobStore(tmp_path / "jobs")
    try:
        assert not list(store.folder(first["id"]).rglob("*.part"))
        again = run(JobRunner(store, FakeExecutor()).run(first["id"]))
        assert again.state == "done" and store.progress(again.id).done == 1
    finally:
        store.close()


@pytest.mark.slow
def test_a_job_store_too_full_to_record_a_sentence_is_a_clear_error_and_resumes(store):
    # SQLite's own "database or disk is full" escaped as sqlite3.OperationalError: a
    # traceback from `lowvox book`. Here the database may not grow (max_page_count), which
    # SQLite reports exactly as a full disk (SQLITE_FULL).
    text = "\n\n".join(f"Sentence number {i} is here to fill the page." for i in range(300))
    executor = FakeExecutor()
    job = run(new_job(store, executor, text=text, name="long.txt"))
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(LowvoxError, match="cannot write the job store .* the disk is full"):
        run(JobRunner(store, executor).run(job.id))
    kept, calls = store.progress(job.id).done, len(executor.calls)
    store._db.execute("PRAGMA max_page_count = 1073741823")  # room is made
    again = run(JobRunner(store, executor).run(job.id))
    assert again.state == "done" and store.progress(job.id).done == 300
    assert len(executor.calls) - calls == 300 - kept  # what was kept is not spoken again


def test_pause_then_resume_gives_the_same_book_as_an_uninterrupted_run(tmp_path):
    async def uninterrupted():
        store = JobStore(tmp_path / "a")
        executor = FakeExecutor()
        job = await new_job(store, executor)
        await JobRunner(store, executor).run(job.id)
        return store, job

    async def interrupted():
        store = JobStore(tmp_path / "b")
        executor = FakeExecutor(concurrency=2)
        job = await new_job(store, executor)
        executor.gate = asyncio.Event()
        runner = JobRunner(store, executor)
        task = asyncio.create_task(runner.run(job.id))
        while len(executor.calls) < 2:
            await asyncio.sleep(0.01)
        await runner.stop(job.id, "paused")
        executor.gate.set()
        paused = await task
        executor.gate = None
        resumed = await JobRunner(store, executor).run(job.id)
        return store, paused, resumed

    store_a, job_a = run(uninterrupted())
    store_b, paused, resumed = run(interrupted())
    assert paused.state == "paused" and resumed.state == "done"
    a = sf.read(book_file(store_a, job_a), dtype="float32")[0]
    b = sf.read(book_file(store_b, resumed), dtype="float32")[0]
    assert np.array_equal(a, b)
    assert subtitle_paths(book_file(store_a, job_a))[0].read_text() == (
        subtitle_paths(book_file(store_b, resumed))[0].read_text()
    )


def test_edit_and_retake_re_bake_without_speaking_anything_else(store):
    executor = FakeExecutor()

    async def go():
        job = await new_job(store, executor)
        runner = JobRunner(store, executor)
        await runner.run(job.id)
        before = sentence_audio(store, job.id)
        calls = len(executor.calls)
        store.retake(job.id, 3, text="A brand new sentence replaces it.")
        store.retake(job.id, 5)
        done = await runner.run(job.id)
        return job, before, executor.calls[calls:], done

    job, before, again, done = run(go())
    assert done.state == "done"
    assert sorted(t.index for t in again) == [3, 5]
    assert {t.options["seed"] for t in again if t.index == 5} == {take_seed(0, 5, 1, 0)}
    after = sentence_audio(store, job.id)
    for i in before:
        same = np.array_equal(before[i], after[i])
        assert same == (i not in (3, 5)), i
    vtt = subtitle_paths(book_file(store, job))[1].read_text()
    assert "A brand new sentence replaces it." in vtt
    assert "A new paragraph starts." not in vtt


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_sentence_audio_lost_after_it_was_done_is_spoken_again_with_its_seed(store, damage):
    # Re-baking a book whose sentence files were deleted (to save room, say) or damaged
    # failed the job "resume once fixed", and every resume failed the same way.
    executor = FakeExecutor()

    async def go():
        job = await new_job(store, executor)
        runner = JobRunner(store, executor)
        await runner.run(job.id)
        before = sentence_audio(store, job.id)
        calls = len(executor.calls)
        lost = [store.audio_path(job.id, i) for i in (1, 6)]
        for path in lost:
            if damage == "missing":
                path.unlink()
            else:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        store.retake(job.id, 3)
        done = await runner.run(job.id)
        return job, before, executor.calls[calls:], done

    job, before, again, done = run(go())
    assert done.state == "done", done.error
    assert sorted(t.index for t in again) == [1, 3, 6]
    after = sentence_audio(store, job.id)
    assert all(np.array_equal(before[i], after[i]) for i in before if i != 3)
    assert [s.attempt for s in store.sentences(job.id)] == [0, 0, 0, 1, 0, 0, 0, 0]


def test_a_sentence_whose_audio_is_damaged_again_stops_the_job_after_one_redo(store, monkeypatch):
    executor = FakeExecutor()
    real = runner_module.write_sentence_audio

    def damaging(path, samples, rate):
        real(path, samples, rate)
        if path.name == "000001.flac":
            path.write_bytes(b"not FLAC")

    monkeypatch.setattr(runner_module, "write_sentence_audio", damaging)

    async def go():
        job = await new_job(store, executor)
        return await JobRunner(store, executor).run(job.id)

    job = run(go())
    assert job.state == "failed" and "cannot read the audio of sentence 1" in job.error
    assert [t.index for t in executor.calls].count(1) == 2  # spoken again once, no more


def test_unknown_voice_in_a_tag_stores_nothing(store):
    from lowvox.errors import UnknownVoice

    executor = FakeExecutor()
    with pytest.raises(UnknownVoice):
        run(new_job(store, executor, text="Hi. [voice:nobody]Who?[/voice]", name="a.txt"))
    assert store.jobs() == []


def test_a_second_runner_cannot_take_a_job_in_progress(store):
    executor = FakeExecutor()

    async def go():
        job = await new_job(store, executor)
        executor.gate = asyncio.Event()
        first = JobRunner(store, executor)
        task = asyncio.create_task(first.run(job.id))
        while not executor.calls:
            await asyncio.sleep(0.01)
        # Another process (another owner) must not start the same job.
        store_b = JobStore(store.root)
        try:
            other = store_b.claim(job.id, "other-host:1")
        finally:
            store_b.close()
        executor.gate.set()
        await task
        return other

    assert run(go()) is False


def test_what_a_killed_runner_was_writing_is_removed_when_the_job_is_taken_again(store):
    # `lowvox book` never swept its store: every kill left the sentences in flight behind.
    executor = FakeExecutor()

    async def go():
        job = await new_job(store, executor)
        audio = store.audio_path(job.id, 3)
        tmp = audio.with_name(f".{audio.name}.killed{PART_SUFFIX}")  # as atomic_path names it
        tmp.write_bytes(b"half a FLAC")
        return await JobRunner(store, executor).run(job.id), tmp

    job, tmp = run(go())
    assert job.state == "done" and not tmp.exists()
    assert not list(store.folder(job.id).rglob("*.part"))


def test_a_book_a_killed_runner_was_assembling_is_removed_when_the_job_is_taken_again(
    store, tmp_path
):
    # Each `lowvox book` killed while assembling left a hidden partial book (as big as the
    # book, at the end) in the user's folder, and no rerun removed it.
    out = tmp_path / "out" / "My Book [1].wav"
    out.parent.mkdir()
    mine = [out.parent / f".{name}.killed{PART_SUFFIX}" for name in
            ("My Book [1].wav", "My Book [1].srt", "My Book [1].vtt")]  # fmt: skip
    others = [out.parent / f".My Book 1.wav.other{PART_SUFFIX}",  # another book's
              out.parent / "sub" / f".{out.name}.other{PART_SUFFIX}"]  # fmt: skip
    others[1].parent.mkdir()
    for path in mine + others:
        path.write_bytes(b"half a book")
    executor = FakeExecutor()

    async def go():
        job = await new_job(store, executor)
        return await JobRunner(store, executor).run(job.id, book_path=out)

    assert run(go()).state == "done" and out.is_file()
    assert not any(p.exists() for p in mine) and all(p.exists() for p in others)


def test_a_server_starting_spares_what_another_process_is_writing_into_the_store(tmp_path):
    # Another server or a `lowvox book` on the same data folder: the store is shared, so a
    # fresh temporary may belong to a live writer (only old ones are a dead writer's).
    service = JobService(Settings(home=tmp_path), hub=None)
    out = service.store.root / ("a" * 32) / "out"
    out.mkdir(parents=True)
    stale = out / ".chapter-001.wav.dead.part"
    stale.write_bytes(b"left by a writer killed long ago")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))

    async def go():
        with atomic_path(out / "book.wav") as tmp:
            tmp.write_bytes(b"a book being assembled")
            await service.start()
            await service.close()

    run(go())
    assert (out / "book.wav").read_bytes() == b"a book being assembled"
    assert not stale.exists()


def test_job_folders_left_without_a_job_are_removed_once_stale(store, tmp_path):
    # A process killed while it created a job (folder and input written, no row yet) or
    # deleted one (row gone, folder half removed) left the folder for good.
    kept = run(new_job(store, FakeExecutor()))
    old, fresh = store.root / ("b" * 32), store.root / ("c" * 32)
    for folder in (old, fresh):
        (folder / "audio").mkdir(parents=True)
        (folder / "input.md").write_bytes(b"# A book nobody will ever see")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(store.folder(kept.id), (time.time() - 3600, time.time() - 3600))
    service = JobService(Settings(home=tmp_path), hub=None, store=store)

    async def go():
        await service.start()
        await service.close()  # before the job it queued runs: only the sweep is tested

    run(go())
    assert not old.exists() and fresh.exists() and store.folder(kept.id).exists()


def test_a_speech_recognition_mismatch_is_retaken(store):
    text = "Only one sentence here."

    class Recognizer:
        """Hears babble in the first take, the sentence in the next."""

        calls = 0

        def transcribe(self, samples, sample_rate, language):
            self.calls += 1
            return "some other words entirely" if self.calls == 1 else text

    executor = FakeExecutor()
    recognizer = Recognizer()

    async def go():
        job = await new_job(store, executor, text=text, name="a.txt")
        return await JobRunner(store, executor, recognizer=recognizer).run(job.id)

    job = run(go())
    assert job.state == "done"
    assert len(executor.calls) == 2 and recognizer.calls == 2
    assert store.sentence(job.id, 0).flags == ()


def test_retake_with_another_voice_uses_it(store):
    executor = FakeExecutor()

    async def go():
        job = await new_job(store, executor)
        runner = JobRunner(store, executor)
        await runner.run(job.id)
        store.retake(job.id, 2, voice="beta")
        calls = len(executor.calls)
        await runner.run(job.id)
        return job, executor.calls[calls:]

    job, again = run(go())
    assert [(t.index, t.voice) for t in again] == [(2, "beta")]
    assert store.sentence(job.id, 2).voice == "beta"


def test_asr_check_without_its_extra_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("lowvox.jobs.quality")
    try:
        import faster_whisper  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("faster-whisper is installed here")
    from lowvox.cli import main

    src = tmp_path / "a.txt"
    src.write_text("Hello there.")
    rc = main(["book", str(src), "-o", str(tmp_path / "a.wav"), "--engine", "espeak",
               "--asr-model", "tiny", "--home", str(tmp_path / "h")])  # fmt: skip
    assert rc == 2 and "lowvox[asr]" in capsys.readouterr().err


@pytest.mark.parametrize("state", ["cancelled", "paused"])
def test_a_job_stopped_by_another_process_stops_here_too(store, state):
    # `lowvox jobs cancel`, or the server's routes for a `lowvox book` job, only change the
    # store: the process that holds the job must notice and stop, not finish it as done.
    executor = FakeExecutor(concurrency=1)
    other = JobStore(store.root)

    def after_two(event):
        if event.done == 2 and event.state == "running":
            other.set_state(event.job, state)

    async def go():
        job = await new_job(store, executor)
        return await JobRunner(store, executor, on_progress=after_two).run(job.id)

    try:
        job = run(go())
    finally:
        other.close()
    assert job.state == state
    assert store.get(job.id).state == state
    assert store.progress(job.id).done < 8
    assert store.get(job.id).assembled is None


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_retake_asked_for_while_the_book_is_assembled_is_spoken(store, monkeypatch, when):
    # The retake lands as assembly starts (before it reads the sentences, or after): the
    # run speaks it and assembles again instead of stopping, or ending done with a
    # sentence still pending.
    executor = FakeExecutor()
    real = runner_module.assemble_book
    asked = []

    def assemble_with_a_retake(runner, job, path):
        if not asked:
            asked.append(True)
            if when == "before":
                store.retake(job.id, 3, text="Asked for during assembly.")
            real(runner, job, path)
            if when == "after":
                store.retake(job.id, 3, text="Asked for during assembly.")
            return
        real(runner, job, path)

    monkeypatch.setattr(runner_module, "assemble_book", assemble_with_a_retake)

    async def go():
        job = await new_job(store, executor)
        return await JobRunner(store, executor).run(job.id)

    job = run(go())
    assert job.state == "done", job.error
    row = store.sentence(job.id, 3)
    assert row.state == "done" and row.attempt == 1
    assert [t.index for t in executor.calls].count(3) == 2
    srt = subtitle_paths(book_file(store, job))[0].read_text()
    assert "Asked for during assembly." in srt


def test_a_full_disk_while_assembling_fails_the_job_and_resuming_only_assembles(store, monkeypatch):
    executor = FakeExecutor()
    real = runner_module.assembly.write_srt
    full = {"once": True}

    def write_srt(cues, path):
        if full.pop("once", False):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(cues, path)

    monkeypatch.setattr(runner_module.assembly, "write_srt", write_srt)

    async def go():
        job = await new_job(store, executor)
        first = await JobRunner(store, executor).run(job.id)
        calls = len(executor.calls)
        second = await JobRunner(store, executor).run(job.id)
        return first, calls, second

    first, calls, second = run(go())
    assert first.state == "failed" and "disk is full" in first.error
    assert store.progress(first.id).done == 8  # every sentence is kept
    assert second.state == "done" and len(executor.calls) == calls  # nothing spoken again
    assert subtitle_paths(book_file(store, second))[0].is_file()


def test_chapter_ranges_that_overlap_count_each_chapter_once():
    assert parse_chapters("5-7, 2-3,6-9,2") == (1, 2, 4, 5, 6, 7, 8)
    spec = ",".join(["1-100000"] * MAX_CHAPTER_PARTS)
    assert parse_chapters(spec) == tuple(range(100_000))
    with pytest.raises(InvalidRequest, match="at most 1,000") as e:
        parse_chapters(spec + ",3")
    assert e.value.field == "chapters"


def test_a_speed_the_engine_refuses_is_refused_before_the_job_is_stored(tmp_path, store):
    # The job's speed and options were first seen by the engine sentence by sentence:
    # the job was stored and then every sentence failed.
    from lowvox.jobs.executors import LocalExecutor
    from lowvox.server.engines import EngineHub

    async def go() -> None:
        hub = EngineHub(Settings(home=tmp_path / "home", engine="espeak"))
        try:
            executor = LocalExecutor(hub, "espeak")
            await executor.start()
            with pytest.raises(InvalidRequest, match="speed 0.1 is out of range"):
                await create_job(
                    store,
                    executor,
                    data=b"One sentence.",
                    filename="book.txt",
                    settings=JobSettings(engine="espeak", speed=0.1),
                    max_chars=100_000,
                    max_unpacked_bytes=10**7,
                )
        finally:
            await hub.close()

    run(go())
    assert store.jobs() == []
