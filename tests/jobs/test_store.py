"""The job store: rows, leases, retakes and what a killed process leaves behind."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import pytest

from lowvox.cli import main
from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.jobs.model import BookMeta, Line, Pauses
from lowvox.jobs.store import (
    JobConflict,
    JobNotFound,
    JobSettings,
    JobStore,
    NarratorSettings,
    sentence_seed,
)
from lowvox.server.routes.jobs import describe

LINES = [
    Line(chapter=0, paragraph=0, text="One."),
    Line(chapter=0, paragraph=1, text="Two.", voice="beta", pause_after=1.5),
    Line(chapter=1, paragraph=0, text="Three.", pause_before=0.5),
]
META = BookMeta(title="Book", author="Ann", chapter_titles=("First", "Second"))


@pytest.fixture()
def store(tmp_path):
    s = JobStore(tmp_path / "jobs")
    yield s
    s.close()


def make(store, origin="server", output=None, **kw):
    return store.create(
        input_name="book.txt",
        data=b"One.\n\nTwo.",
        meta=META,
        settings=JobSettings(engine="espeak", voice="alpha", **kw),
        lines=LINES,
        origin=origin,
        output=output,
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_database_is_a_clear_error_and_is_left_as_it_is(tmp_path, capsys, damage):
    # It was a traceback from `lowvox jobs` and `lowvox serve` (sqlite3.DatabaseError).
    db = tmp_path / "jobs" / "jobs.sqlite3"
    if damage == "garbage":
        db.parent.mkdir()
        db.write_bytes(b"not a database at all\n" * 500)
    else:
        store = JobStore(tmp_path / "jobs")
        make(store)
        store.close()
        db.write_bytes(db.read_bytes()[:20_000])
    before = db.read_bytes()
    with pytest.raises(LowvoxError, match="cannot open the job store .*jobs.sqlite3"):
        JobStore(tmp_path / "jobs")
    assert main(["jobs", "list", "--home", str(tmp_path)]) == 2
    assert "move it aside" in capsys.readouterr().err
    assert db.read_bytes() == before


@pytest.mark.parametrize("settings", ["{not json", '{"engine": "x", "pauses": 7}', "[]"])
def test_a_job_whose_stored_settings_are_damaged_is_left_out_not_fatal(tmp_path, capsys, settings):
    # One such row (edited by hand, or written by another version) made every listing,
    # `lowvox jobs` and the server's start-up raise.
    store = JobStore(tmp_path / "jobs")
    bad, good = make(store), make(store)
    store.close()
    with sqlite3.connect(tmp_path / "jobs" / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET settings = ? WHERE id = ?", (settings, bad.id))
    store = JobStore(tmp_path / "jobs")
    try:
        assert [j.id for j in store.jobs()] == [good.id]
        with pytest.raises(LowvoxError, match=f"job {bad.id} is damaged in the job store"):
            store.get(bad.id)
    finally:
        store.close()
    assert main(["jobs", "list", "--home", str(tmp_path)]) == 0
    assert good.id[:12] in capsys.readouterr().out


def test_create_keeps_input_chapters_and_sentences(store):
    job = make(store)
    assert job.state == "queued" and job.title == "Book" and job.author == "Ann"
    assert store.input_path(job).read_bytes() == b"One.\n\nTwo."
    assert store.chapters(job.id) == ["First", "Second"]
    rows = store.sentences(job.id)
    assert [r.text for r in rows] == ["One.", "Two.", "Three."]
    assert rows[1].voice == "beta" and rows[1].pause_after == 1.5
    assert rows[2].chapter == 1 and rows[2].pause_before == 0.5
    assert all(r.state == "pending" and r.attempt == 0 for r in rows)
    assert [j.id for j in store.jobs()] == [job.id]


def test_settings_round_trip_through_the_database(store):
    settings = JobSettings(
        engine="xtts",
        voice="alpha",
        options={"temperature": 0.6},
        seed=7,
        pauses=Pauses(0.1, 0.2, 0.3),
        target_lufs=None,
        narrator=NarratorSettings("beta", "alpha"),
        chapters=(0, 2),
    )
    job = store.create(input_name="a.md", data=b"x", meta=META, settings=settings, lines=LINES)
    assert store.get(job.id).settings == settings


def test_a_job_with_nothing_to_say_is_not_stored(store):
    with pytest.raises(InvalidRequest):
        store.create(input_name="a.txt", data=b"", meta=META, settings=JobSettings("x"), lines=[])
    assert store.jobs() == []
    assert [p.name for p in store.root.iterdir() if p.is_dir()] == []


def test_a_full_disk_while_storing_a_job_says_so_and_stores_nothing(store, monkeypatch):
    import errno

    import lowvox.files

    def full(path, data, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lowvox.files, "write_atomic", full)
    with pytest.raises(LowvoxError, match="disk is full"):
        make(store)
    assert store.jobs() == []
    assert [p.name for p in store.root.iterdir() if p.is_dir()] == []


def test_two_book_runs_of_one_command_started_together_store_one_job(store):
    # Both looked for the job before either stored it: each made its own and spoke the
    # whole book, two processes doing the same hours of work.
    first = make(store, origin="cli", output="/books/a.m4b")
    second = make(store, origin="cli", output="/books/a.m4b")
    other = make(store, origin="cli", output="/books/b.m4b")
    assert second.id == first.id != other.id
    assert len(store.jobs()) == 2
    assert sorted(p.name for p in store.root.iterdir() if p.is_dir()) == sorted(
        [first.id, other.id]
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_job_of_many_chapters_is_described_in_linear_time(tmp_path, capsys):
    # The server's job description (every GET of a job, and the answer to its creation)
    # and `lowvox jobs show` looked through every sentence for each chapter: 30,000
    # chapters of a sentence each (a 1 MB Markdown file, under the job limit) took about
    # 100 s for each, on a thread of the server. Now a few seconds, growing linearly.
    n = 30_000
    store = JobStore(tmp_path / "jobs")
    lines = [Line(chapter=i, paragraph=0, text=f"Sentence {i}.") for i in range(n)]
    meta = BookMeta(title="Book", chapter_titles=tuple(f"Chapter {i}" for i in range(n)))
    job = store.create(
        input_name="book.md",
        data=b"...",
        meta=meta,
        settings=JobSettings(engine="espeak"),
        lines=lines,
    )
    state = SimpleNamespace(jobs=SimpleNamespace(store=store))
    try:
        chapters = describe(state, job, detail=True)["chapters"]
    finally:
        store.close()
    assert [c["first_sentence"] for c in chapters] == list(range(n))
    assert main(["jobs", "show", job.id, "--home", str(tmp_path)]) == 0
    assert f"{n:5d}  0/1  Chapter {n - 1}" in capsys.readouterr().out


def test_unknown_and_malformed_ids_are_404(store):
    with pytest.raises(JobNotFound):
        store.get("0" * 32)
    with pytest.raises(JobNotFound):
        store.get("../../etc")
    with pytest.raises(JobNotFound):
        store.folder("../x")


def test_one_owner_at_a_time_and_a_lapsed_lease_can_be_taken(store):
    job = make(store)
    assert store.claim(job.id, "host:1")
    assert store.claim(job.id, "host:1")  # the owner may renew by claiming again
    assert not store.claim(job.id, "host:2")
    # The owner was killed: its lease lapses and another process takes the job over.
    with sqlite3.connect(store.root / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET lease = 0 WHERE id = ?", (job.id,))
    assert store.claim(job.id, "host:2")
    store.release(job.id, "host:2")
    assert store.claim(job.id, "host:3")


def test_a_take_finished_after_a_retake_was_asked_for_is_stale(store):
    job = make(store)
    s = store.sentence(job.id, 1)
    store.retake(job.id, 1, text="Two again.")
    assert not store.finish_sentence(job.id, 1, attempt=s.attempt, samples=10, flags=(), score=0)
    row = store.sentence(job.id, 1)
    assert row.state == "pending" and row.attempt == 1 and row.text == "Two again."
    assert store.finish_sentence(job.id, 1, attempt=1, samples=10, flags=("clipped",), score=2)
    row = store.sentence(job.id, 1)
    assert row.state == "done" and row.flags == ("clipped",) and row.audio == "000001.flac"


def test_retake_keeps_what_is_not_changed(store):
    job = make(store)
    store.retake(job.id, 1, voice="alpha")
    row = store.sentence(job.id, 1)
    assert row.text == "Two." and row.voice == "alpha" and row.attempt == 1


def test_progress_counts(store):
    job = make(store)
    store.finish_sentence(job.id, 0, attempt=0, samples=24_000, flags=(), score=0)
    store.finish_sentence(job.id, 1, attempt=0, samples=12_000, flags=("too_long",), score=1)
    store.fail_sentence(job.id, 2, attempt=0, error="boom")
    p = store.progress(job.id, 24_000)
    assert (p.total, p.done, p.failed, p.flagged, p.pending) == (3, 2, 1, 1, 0)
    assert p.audio_seconds == pytest.approx(1.5)
    assert store.retry_failed(job.id) == 1
    assert store.progress(job.id).pending == 1


def test_state_changes_can_be_conditional(store):
    job = make(store)
    store.set_state(job.id, "paused", expect=("queued",))
    with pytest.raises(JobConflict):
        store.set_state(job.id, "paused", expect=("queued", "running"))


def test_delete_removes_row_and_folder_but_not_a_job_another_process_runs(store):
    job = make(store)
    folder = store.folder(job.id)
    assert store.claim(job.id, "elsewhere:1")
    with pytest.raises(JobConflict):
        store.delete(job.id)
    store.release(job.id, "elsewhere:1")
    store.delete(job.id)
    assert not folder.exists()
    with pytest.raises(JobNotFound):
        store.get(job.id)


def test_two_store_objects_share_one_database(tmp_path):
    a, b = JobStore(tmp_path), JobStore(tmp_path)
    try:
        job = make(a)
        assert b.get(job.id).title == "Book"
        b.finish_sentence(job.id, 0, attempt=0, samples=5, flags=(), score=0)
        assert a.sentence(job.id, 0).state == "done"
    finally:
        a.close()
        b.close()


def test_seeds_depend_on_job_sentence_and_attempt_only():
    assert sentence_seed(1, 2, 3) == sentence_seed(1, 2, 3)
    seeds = {sentence_seed(s, i, a) for s in range(3) for i in range(50) for a in range(3)}
    assert len(seeds) == 3 * 50 * 3
    assert all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("index", [-1, 3, 2**63, 10**23])
def test_a_sentence_number_out_of_reach_is_no_sentence(tmp_path, capsys, index):
    # `lowvox jobs retake ID 99999999999999999999999` was an OverflowError traceback.
    store = JobStore(tmp_path / "jobs")
    job = make(store)
    try:
        with pytest.raises(InvalidRequest, match=f"has no sentence {index}"):
            store.sentence(job.id, index)
    finally:
        store.close()
    rc = main(["jobs", "retake", job.id, str(index), "--home", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err == f"lowvox: error: job {job.id} has no sentence {index}\n"
