"""`lowvox book` and `lowvox jobs` on the embedded espeak voice: a book with subtitles, a
rerun after SIGKILL that finishes the same book, retakes, and clear errors."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lowvox.cli import main
from tests.golden import GOLDEN, golden_available

BOOK = "\n\n".join(
    [
        "# The Test Book",
        "## Chapter One",
        "It was a bright cold day in April. The clocks were striking thirteen.",
        "He walked home slowly. The wind was sharp.",
        "## Chapter Two",
        "Nothing happened for a while. Then the telephone rang.",
        "She picked it up and listened. Nobody spoke.",
    ]
)


def lowvox(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowvox", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture()
def book(tmp_path) -> Path:
    path = tmp_path / "book.md"
    path.write_text(BOOK)
    return path


def test_book_writes_audio_and_subtitles_and_jobs_lists_it(tmp_path, book, capsys):
    out = tmp_path / "out" / "book.flac"
    home = tmp_path / "home"
    rc = main(["book", str(book), "-o", str(out), "--engine", "espeak", "--home", str(home),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    audio, rate = sf.read(out, dtype="float32")
    assert len(audio) / rate > 5
    srt = out.with_suffix(".srt").read_text()
    vtt = out.with_suffix(".vtt").read_text()
    assert srt.count(" --> ") == 10 and vtt.startswith("WEBVTT")  # 8 + 2 titles
    assert "The clocks were striking thirteen." in srt
    capsys.readouterr()
    assert main(["jobs", "list", "--home", str(home)]) == 0
    listing = capsys.readouterr().out
    assert "done" in listing and "10/10" in listing and "The Test Book" in listing
    job_id = listing.split()[0]
    assert main(["jobs", "show", job_id, "--home", str(home)]) == 0
    shown = capsys.readouterr().out
    assert "Chapter One" in shown and "Chapter Two" in shown


def test_chapter_selection_speaks_only_those_chapters(tmp_path, book):
    out = tmp_path / "two.wav"
    rc = main(["book", str(book), "-o", str(out), "--engine", "espeak", "--chapters", "2",
               "--home", str(tmp_path / "h"), "--no-progress"])  # fmt: skip
    assert rc == 0
    srt = out.with_suffix(".srt").read_text()
    assert srt.count(" --> ") == 5 and "telephone" in srt and "April" not in srt


def test_retake_from_the_cli_re_bakes_the_book(tmp_path, book, capsys):
    out = tmp_path / "book.wav"
    home = tmp_path / "home"
    args = ["--home", str(home)]
    assert main(["book", str(book), "-o", str(out), "--engine", "espeak", "--no-progress",
                 *args]) == 0  # fmt: skip
    capsys.readouterr()
    main(["jobs", "list", *args])
    job_id = capsys.readouterr().out.split()[0]
    rc = main(["jobs", "retake", job_id, "2", "--text", "The clocks were silent.",
               "--engine", "espeak", *args])  # fmt: skip
    assert rc == 0
    srt = out.with_suffix(".srt").read_text()
    assert "The clocks were silent." in srt and "striking thirteen" not in srt


def test_rerun_after_the_book_and_a_sentence_file_were_deleted_makes_them_again(
    tmp_path, book, capsys
):
    # It failed "cannot read the audio of sentence 4" on every rerun: nothing spoke it again.
    out = tmp_path / "book.wav"
    home = tmp_path / "home"
    cmd = ["book", str(book), "-o", str(out), "--engine", "espeak", "--no-progress",
           "--home", str(home)]  # fmt: skip
    assert main(cmd) == 0
    srt = out.with_suffix(".srt").read_text()
    out.unlink()
    (lost,) = (home / "jobs").glob("*/audio/000004.flac")
    lost.unlink()
    capsys.readouterr()
    assert main(cmd) == 0, capsys.readouterr().err
    assert out.is_file() and lost.is_file()
    # espeak-ng's takes depend on what it spoke before in the process: a sample or so.
    cues = [block.split("\n", 2)[2] for block in srt.strip().split("\n\n")]
    again = out.with_suffix(".srt").read_text()
    assert [block.split("\n", 2)[2] for block in again.strip().split("\n\n")] == cues


def test_rerun_of_a_finished_book_whose_subtitles_were_deleted_writes_them_again(
    tmp_path, book, capsys
):
    # It said "wrote book.wav (+ book.srt, book.vtt)" and wrote neither.
    out = tmp_path / "book.wav"
    cmd = ["book", str(book), "-o", str(out), "--engine", "espeak", "--no-progress",
           "--home", str(tmp_path / "home")]  # fmt: skip
    assert main(cmd) == 0
    srt, vtt = out.with_suffix(".srt"), out.with_suffix(".vtt")
    cues = srt.read_text()
    srt.unlink()
    vtt.unlink()
    assert main(cmd) == 0
    assert srt.read_text() == cues and vtt.is_file()


def test_a_retake_with_an_unknown_voice_is_refused_and_changes_nothing(tmp_path, book, capsys):
    out = tmp_path / "book.wav"
    args = ["--home", str(tmp_path / "home")]
    assert main(["book", str(book), "-o", str(out), "--engine", "espeak", "--no-progress",
                 *args]) == 0  # fmt: skip
    capsys.readouterr()
    main(["jobs", "list", *args])
    job_id = capsys.readouterr().out.split()[0]
    rc = main(["jobs", "retake", job_id, "2", "--voice", "nobody-at-all", "--engine", "espeak",
               *args])  # fmt: skip
    assert rc == 2 and "nobody-at-all" in capsys.readouterr().err
    main(["jobs", "show", job_id, "--all", *args])
    shown = capsys.readouterr().out
    assert "state     done" in shown and "failed" not in shown
    assert "10/10 sentences" in shown


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.write_bytes(b"PK\x03\x04garbage"), "epub"),
        (lambda p: p.write_text(""), "no text"),
    ],
)
def test_bad_input_is_a_clear_cli_error(tmp_path, capsys, setup, message):
    src = tmp_path / ("bad.epub" if message == "epub" else "empty.txt")
    setup(src)
    rc = main(["book", str(src), "-o", str(tmp_path / "x.wav"), "--engine", "espeak",
               "--home", str(tmp_path / "h"), "--no-progress"])  # fmt: skip
    assert rc == 2
    assert message in capsys.readouterr().err.lower()
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_an_output_that_cannot_be_written_is_refused_before_anything_is_spoken(
    tmp_path, book, capsys, where
):
    # Not hours later, when the book is assembled.
    out = book / "x.wav" if where == "under a file" else tmp_path / "x.wav"
    if where == "a folder":
        out.mkdir()
    home = tmp_path / "h"
    rc = main(["book", str(book), "-o", str(out), "--engine", "espeak", "--home", str(home),
               "--no-progress"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "lowvox: error:" in err and str(book if where == "under a file" else out) in err
    assert _done(home) == 0


def test_unknown_voice_is_a_clear_cli_error(tmp_path, book, capsys):
    rc = main(["book", str(book), "-o", str(tmp_path / "x.wav"), "--engine", "espeak",
               "--voice", "nobody-at-all", "--home", str(tmp_path / "h")])  # fmt: skip
    assert rc == 2
    assert "nobody-at-all" in capsys.readouterr().err


def _done(home: Path) -> int:
    db = home / "jobs" / "jobs.sqlite3"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM sentences WHERE state = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _sentence_files(home: Path, done_only: bool = False) -> dict[str, bytes]:
    """Sentence audio files; with `done_only`, of the sentences whose rows say done (a file
    written just before a kill, whose row was not yet done, is spoken again)."""
    if not done_only:
        return {p.name: p.read_bytes() for p in sorted((home / "jobs").glob("*/audio/*.flac"))}
    with sqlite3.connect(home / "jobs" / "jobs.sqlite3", timeout=5) as db:
        rows = db.execute("SELECT job, audio FROM sentences WHERE state='done'").fetchall()
    return {name: (home / "jobs" / job / "audio" / name).read_bytes() for job, name in rows}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["xtts", "espeak"])
def test_rerun_after_sigkill_finishes_the_same_book(tmp_path, engine):
    """XTTS (fp32, sampled with seeds): the book is sample for sample an uninterrupted
    run's. espeak-ng carries state from one utterance to the next inside a process, so
    after a restart its later sentences differ by a few samples: there the check is that
    nothing finished before the kill is spoken again and the book completes."""
    if engine == "xtts" and not golden_available():
        pytest.skip(f"no golden bundle at {GOLDEN}")
    # espeak-ng speaks a sentence in a blink: 39 (36 and 3 titles) for the kill to land
    # mid-book. XTTS's full-size vocoder takes ~1.5 s a sentence on 2 cores: 12 are enough.
    per_part = 3 if engine == "xtts" else 12
    text = "\n\n".join(
        f"## Part {c}\n\n" + " ".join(f"Sentence {c} {i} is spoken here." for i in range(per_part))
        for c in range(1, 4)
    )
    total = 3 * (per_part + 1)
    src = tmp_path / "long.md"
    src.write_text(text)
    args = ["book", str(src), "--no-progress", "--seed", "5"]
    if engine == "xtts":
        args += ["--engine", "xtts", "--model-dir", str(GOLDEN), "--precision", "fp32",
                 "--device", "cpu", "--max-new-tokens", "20", "--retakes", "0"]  # fmt: skip
    else:
        args += ["--engine", "espeak"]

    whole = tmp_path / "whole.flac"
    assert lowvox(tmp_path / "h1", *args, "-o", str(whole)).returncode == 0

    cut = tmp_path / "cut.flac"
    home = tmp_path / "h2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowvox", *args, "-o", str(cut), "--home", str(home)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while _done(home) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _sentence_files(home, done_only=True)
    assert 5 <= len(before) < total and not cut.exists()

    rerun = lowvox(home, *args, "-o", str(cut))
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    after = _sentence_files(home)
    assert len(after) == total
    assert all(after[name] == data for name, data in before.items())
    srt_whole = whole.with_suffix(".srt").read_text()
    srt_cut = cut.with_suffix(".srt").read_text()
    if engine == "xtts":
        a, _ = sf.read(whole, dtype="float32")
        b, _ = sf.read(cut, dtype="float32")
        assert np.array_equal(a, b)
        assert srt_whole == srt_cut
    else:

        def texts(srt: str) -> list[str]:
            return [block.split("\n", 2)[2] for block in srt.strip().split("\n\n")]

        assert texts(srt_whole) == texts(srt_cut)


def test_an_endless_input_is_refused_after_reading_just_past_the_job_limit(
    tmp_path, capsys, monkeypatch
):
    # `lowvox book /dev/zero` (or a pipe, or a huge file) was read whole into memory:
    # 4.7 GB in 4 s. Here a pipe offers 20 MB against a limit of 1,000 bytes; the reader
    # must stop at 1,001, so the writer is cut off within the pipe's buffer (64 kB).
    monkeypatch.setenv("LOWVOX_MAX_JOB_BYTES", "1000")
    fifo = tmp_path / "endless.txt"
    os.mkfifo(fifo)
    written = 0

    def feed() -> None:
        nonlocal written
        chunk = b"word " * 1000
        try:
            with open(fifo, "wb") as f:
                for _ in range(4000):
                    f.write(chunk)
                    written += len(chunk)
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    rc = main(["book", str(fifo), "-o", str(tmp_path / "x.wav"), "--engine", "espeak",
               "--home", str(tmp_path / "h"), "--no-progress"])  # fmt: skip
    writer.join(60)
    err = capsys.readouterr().err
    assert written < 1_000_000
    assert rc == 2
    assert "lowvox: error:" in err and "over the job limit of 1,000" in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--speed", "0"],  # every sentence failed, after the job was made
        ["--speed", "nan"],
        ["--lufs", "nan"],  # a book of clipped noise, "wrote ..." and exit 0
        ["--lufs", "0"],
        ["--lufs", "nan", "--no-normalize"],
        ["--retakes", "-1"],
        ["--retakes", "11"],
        ["--temperature", "-1"],
        ["--temperature", "inf"],
        ["--seed", "-1"],
        ["--seed", str(2**64)],
        ["--max-new-tokens", "0"],
        ["--title", "t" * 301],
    ],
)
def test_out_of_range_options_are_refused_before_a_job_exists(tmp_path, book, capsys, flags):
    # The HTTP jobs route's ranges (lowvox.jobs.options), not a second copy of them.
    home = tmp_path / "h"
    rc = main(["book", str(book), "-o", str(tmp_path / "x.wav"), "--engine", "espeak",
               "--home", str(home), "--no-progress", *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"lowvox: error: invalid job: {flags[0]}: ") and err.count("\n") == 1
    assert main(["jobs", "list", "--home", str(home)]) == 0
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.slow
def test_title_names_the_job_and_the_book(tmp_path, book, capsys):
    # `--title` was parsed and then dropped: the book kept the title from the input.
    home = tmp_path / "h"
    rc = main(["book", str(book), "-o", str(tmp_path / "x.wav"), "--engine", "espeak",
               "--home", str(home), "--no-progress", "--chapters", "2",
               "--title", "A Title Given"])  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    assert main(["jobs", "list", "--home", str(home)]) == 0
    listing = capsys.readouterr().out
    assert "A Title Given" in listing and "The Test Book" not in listing


@pytest.mark.parametrize("why", ["bad option", "nothing to speak"])
def test_a_refused_book_makes_no_folders_for_its_output(tmp_path, book, capsys, why):
    # The output check made the book's folders before anything else was checked, and left
    # them behind when the job was refused.
    out = tmp_path / "new" / "deeper" / "x.wav"
    src, flags = book, ["--speed", "0"]
    if why == "nothing to speak":
        src, flags = tmp_path / "empty.txt", []
        src.write_text("")
    rc = main(["book", str(src), "-o", str(out), "--engine", "espeak",
               "--home", str(tmp_path / "h"), "--no-progress", *flags])  # fmt: skip
    assert rc == 2 and "lowvox: error:" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_an_output_format_no_book_is_written_in_is_refused_naming_those_that_are(
    tmp_path, book, capsys
):
    # The message left out m4a, which `book` writes.
    rc = main(["book", str(book), "-o", str(tmp_path / "x.aac"), "--engine", "espeak",
               "--home", str(tmp_path / "h"), "--no-progress"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert err == "lowvox: error: a book can be m4b, m4a, mp3, opus, flac or wav, not aac\n"


def test_a_retake_text_over_the_routes_limit_is_refused_and_changes_nothing(tmp_path, capsys):
    # The retake route takes at most 2,000 characters; `jobs retake --text` took up to the
    # engine's 20,000 as one sentence's take.
    from lowvox.jobs.model import BookMeta, Line
    from lowvox.jobs.store import JobSettings, JobStore

    store = JobStore(tmp_path / "jobs")
    job = store.create(
        input_name="book.txt",
        data=b"One.",
        meta=BookMeta(title="Book"),
        settings=JobSettings(engine="espeak"),
        lines=[Line(chapter=0, paragraph=0, text="One.")],
        origin="cli",
    )
    store.close()
    rc = main(["jobs", "retake", job.id, "0", "--text", "word " * 401, "--engine", "espeak",
               "--home", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lowvox: error: invalid retake: --text: ") and "2000" in err
    store = JobStore(tmp_path / "jobs")
    try:
        assert store.sentence(job.id, 0).text == "One."
    finally:
        store.close()


@pytest.mark.slow
def test_max_new_tokens_over_the_models_limit_is_refused_before_a_job_exists(
    tmp_path, book, capsys
):
    # 4,000 is within the route's bound (4,096) but over the model's own limit: the job
    # was stored and every sentence then failed "max_new_tokens must be in 1..602".
    if not golden_available():
        pytest.skip(f"no golden bundle at {GOLDEN}")
    home = tmp_path / "h"
    rc = main(["book", str(book), "-o", str(tmp_path / "x.wav"), "--engine", "xtts",
               "--model-dir", str(GOLDEN), "--device", "cpu", "--precision", "fp32",
               "--home", str(home), "--no-progress", "--max-new-tokens", "4000"])  # fmt: skip
    assert rc == 2
    assert "max_new_tokens must be in 1.." in capsys.readouterr().err
    assert main(["jobs", "list", "--home", str(home)]) == 0
    assert capsys.readouterr().out == ""
