"""SIGKILL a real `lowvox serve` in the middle of a job, start it again: the job resumes on
its own, nothing finished before the kill is spoken again, and with XTTS (fp32, the tiny
golden model, sampled with seeds) the book is sample for sample the one an uninterrupted
server makes. espeak-ng carries state from one utterance to the next inside a process, so
its sentences after a restart differ by a few samples: there the texts and count match."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.golden import GOLDEN, golden_available
from tests.server.srv_fixtures import free_port

pytestmark = pytest.mark.slow


def book_text(parts: int, sentences: int) -> str:
    return "\n\n".join(
        f"## Part {c}\n\n"
        + " ".join(
            f"In part {c}, sentence {i} tells a little more of the story." for i in range(sentences)
        )
        for c in range(1, parts + 1)
    )


# espeak-ng speaks a sentence in a blink: 27 (24 and 3 titles) for the kill to land
# mid-book. XTTS's full-size vocoder takes ~1.5 s a sentence on 2 cores: 10 are enough.
TEXT = {"espeak": book_text(3, 8), "xtts": book_text(2, 4)}

ENGINES = {
    "espeak": ["--engine", "espeak"],
    "xtts": [
        "--engine",
        "xtts",
        "--model-dir",
        str(GOLDEN),
        "--precision",
        "fp32",
        "--device",
        "cpu",
    ],  # fmt: skip
}


class Server:
    def __init__(self, home: Path, engine: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LOWVOX_HOME": str(home), "LOWVOX_JOB_RETAKES": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lowvox", "serve", *ENGINES[engine], "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{self.url}/api/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(30)


def wait_done(url: str, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/api/jobs/{job_id}", timeout=10).json()["job"]
        if job["state"] in ("done", "failed", "cancelled"):
            assert job["state"] == "done", job["error"]
            return job
        time.sleep(0.1)
    raise AssertionError("the job did not finish")


def done_count(home: Path) -> int:
    try:
        with sqlite3.connect(home / "jobs" / "jobs.sqlite3", timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM sentences WHERE state='done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def done_files(home: Path) -> dict[str, bytes]:
    """The audio of the sentences marked done (a file written just before a kill, whose
    row was not yet done, is spoken again: that is the point)."""
    with sqlite3.connect(home / "jobs" / "jobs.sqlite3", timeout=5) as db:
        rows = db.execute("SELECT job, audio FROM sentences WHERE state='done'").fetchall()
    return {name: (home / "jobs" / job / "audio" / name).read_bytes() for job, name in rows}


def book(url: str, job: dict) -> tuple[np.ndarray, str]:
    audio = httpx.get(url + job["downloads"]["book"], timeout=60).content
    srt = httpx.get(url + job["downloads"]["srt"], timeout=60).text
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lowvox-kill-{os.getpid()}.flac"
    path.write_bytes(audio)
    try:
        return sf.read(path, dtype="float32")[0], srt
    finally:
        path.unlink()


@pytest.mark.parametrize("engine", ["espeak", "xtts"])
def test_sigkill_mid_job_then_restart_resumes_to_the_same_book(tmp_path, engine):
    if engine == "xtts" and not golden_available():
        pytest.skip(f"no golden bundle at {GOLDEN}")
    body = {"text": TEXT[engine], "markdown": True, "format": "flac", "seed": 11, "lufs": -20}
    if engine == "xtts":
        body["max_new_tokens"] = 20  # ~1 s of audio a sentence (its vocoder is full-size)

    whole = Server(tmp_path / "a", engine)
    try:
        job = httpx.post(f"{whole.url}/api/jobs", json=body, timeout=60).json()["job"]
        expected = book(whole.url, wait_done(whole.url, job["id"]))
    finally:
        whole.stop()

    home = tmp_path / "b"
    first = Server(home, engine)
    job = httpx.post(f"{first.url}/api/jobs", json=body, timeout=60).json()["job"]
    total = job["progress"]["total"]
    deadline = time.monotonic() + 300
    while done_count(home) < total // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.stop(signal.SIGKILL)
    assert done_count(home) < total, "the job finished before the kill"

    before = done_files(home)  # sentences whose rows said done at the kill
    second = Server(home, engine)  # nobody asks: it resumes on its own
    try:
        got = book(second.url, wait_done(second.url, job["id"]))
    finally:
        second.stop()
    after = {p.name: p.read_bytes() for p in (home / "jobs").glob("*/audio/*.flac")}
    assert len(after) == total and all(after[k] == v for k, v in before.items())
    assert not list((home / "jobs").rglob("*.part"))
    if engine == "xtts":
        assert got[1] == expected[1]
        assert np.array_equal(got[0], expected[0])
    else:
        cues = [b.split("\n", 2)[2] for b in got[1].strip().split("\n\n")]
        assert cues == [b.split("\n", 2)[2] for b in expected[1].strip().split("\n\n")]
