"""The job store: one SQLite database (WAL) and one folder per job, in the data folder.

The database is the source of truth: a job's settings and metadata, its chapters, and one
row per sentence (text, voice, attempt, state, audio file, length, quality flags). A
sentence's audio is written (FLAC, atomically) *before* its row says `done`, so whatever
moment a process is killed, a `done` row always points at a whole file, and a file
without a `done` row is simply made again.

Layout under `<home>/jobs/`:

    jobs.sqlite3            the database
    <job id>/input.<ext>    the uploaded or given input, as received
    <job id>/cover.<ext>    the cover, when the input has one
    <job id>/audio/<n>.flac one file per finished sentence (n = sentence index)
    <job id>/out/           the assembled book, its chapters and subtitles

Processes share the store: each job has an owner and a lease, so a server and a `lowvox
book` on the same data folder never work on one job at once, and a killed owner's job is
taken over once its lease lapses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lowvox.errors import InvalidRequest, LowvoxError
from lowvox.jobs.model import BookMeta, Line, Pauses

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

JobState = Literal["queued", "running", "paused", "done", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = ("queued", "running", "paused", "done", "failed", "cancelled")
SentenceState = Literal["pending", "done", "failed"]

# A job whose owner has not renewed its lease for this long may be taken over.
LEASE_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    state TEXT NOT NULL,
    origin TEXT NOT NULL,              -- 'server' or 'cli': who resumes it
    title TEXT NOT NULL,
    author TEXT,
    language TEXT NOT NULL,
    input_name TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    settings TEXT NOT NULL,            -- JobSettings as JSON
    output TEXT,                       -- where `lowvox book` writes the book
    sample_rate INTEGER,
    cover_type TEXT,
    error TEXT,
    owner TEXT,
    lease REAL,
    assembled REAL                     -- when the outputs were last assembled
);
CREATE TABLE IF NOT EXISTS chapters (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    title TEXT NOT NULL,
    PRIMARY KEY (job, idx)
);
CREATE TABLE IF NOT EXISTS sentences (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    chapter INTEGER NOT NULL,
    paragraph INTEGER NOT NULL,
    text TEXT NOT NULL,
    voice TEXT,
    pause_before REAL NOT NULL DEFAULT 0,
    pause_after REAL NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    seed INTEGER,                      -- the kept take's seed
    state TEXT NOT NULL DEFAULT 'pending',
    audio TEXT,
    samples INTEGER,
    flags TEXT NOT NULL DEFAULT '[]',
    score REAL,
    error TEXT,
    PRIMARY KEY (job, idx)
);
CREATE INDEX IF NOT EXISTS sentences_state ON sentences (job, state);
"""


@dataclass(frozen=True)
class NarratorSettings:
    """Narrator mode: `*narration*` in one voice, `"speech"` in another."""

    narrator_voice: str | None = None
    character_voice: str | None = None
    text_not_inside: str = "character"


@dataclass(frozen=True)
class JobSettings:
    """How a job speaks and what it makes; stored with the job, fixed once it starts
    (except by explicit edits), so a resumed job speaks exactly as it began."""

    engine: str
    voice: str | None = None
    language: str = "en"
    speed: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # sampling options (temperature ...)
    seed: int = 0
    format: str = "m4b"
    retakes: int = 2  # extra takes of a sentence the quality check flags
    pauses: Pauses = field(default_factory=Pauses)
    target_lufs: float | None = -18.0
    narrator: NarratorSettings | None = None
    chapters: tuple[int, ...] | None = None  # 0-based chapters to speak; None: all

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSettings:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["pauses"] = Pauses(**raw.get("pauses") or {})
        if raw.get("narrator") is not None:
            raw["narrator"] = NarratorSettings(**raw["narrator"])
        if raw.get("chapters") is not None:
            raw["chapters"] = tuple(raw["chapters"])
        return cls(**raw)


@dataclass(frozen=True)
class JobInfo:
    """A job's row."""

    id: str
    created: float
    updated: float
    state: str
    origin: str
    title: str
    author: str | None
    language: str
    input_name: str
    input_sha256: str
    settings: JobSettings
    output: str | None
    sample_rate: int | None
    cover_type: str | None
    error: str | None
    owner: str | None
    lease: float | None
    assembled: float | None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled")


@dataclass(frozen=True)
class Sentence:
    """A sentence's row."""

    idx: int
    chapter: int
    paragraph: int
    text: str
    voice: str | None
    pause_before: float
    pause_after: float
    attempt: int
    seed: int | None
    state: str
    audio: str | None
    samples: int | None
    flags: tuple[str, ...]
    score: float | None
    error: str | None


@dataclass(frozen=True)
class Progress:
    """How far a job has come."""

    total: int
    done: int
    failed: int
    flagged: int
    audio_seconds: float

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed


def by_chapter(sentences: Iterable[Sentence]) -> dict[int, list[Sentence]]:
    """Sentences grouped by chapter, in one pass (a book may have many thousands)."""
    groups: dict[int, list[Sentence]] = {}
    for s in sentences:
        groups.setdefault(s.chapter, []).append(s)
    return groups


class JobNotFound(LowvoxError):
    status_code = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no such job: {job_id!r}")


class DamagedJob(LowvoxError):
    """A job's row cannot be read (edited by hand, or written by another version)."""

    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(f"job {job_id} is damaged in the job store ({why})")


class TooManyJobs(InvalidRequest):
    """The server already keeps `max_jobs` jobs."""

    status_code = 413

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            f"the job store is full: it keeps {count} jobs, the limit is {limit} (max_jobs); "
            "delete finished jobs to make room",
            field="file",
        )


class StoreFull(LowvoxError):
    """The job store cannot be written: its disk is full."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"cannot write the job store {path}: the disk is full")


class JobConflict(LowvoxError):
    """The job is not in a state that allows what was asked."""

    status_code = 409


def this_owner() -> str:
    """Who is working: host and process id (a lease names its owner)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def sentence_seed(job_seed: int, index: int, attempt: int) -> int:
    """The seed of one take of one sentence: the same for a resumed, retaken or distributed
    run as for an uninterrupted one, and different for every (sentence, attempt)."""
    digest = hashlib.blake2b(f"{job_seed}:{index}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _is_job_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


class JobStore:
    """The database and the job folders; safe to use from several threads and processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        path = self.root / "jobs.sqlite3"
        self._db = sqlite3.connect(
            path, check_same_thread=False, timeout=30.0, isolation_level=None
        )
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            with self._lock:
                self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
        except sqlite3.DatabaseError as e:
            # A damaged or foreign file: say which, and leave it as it is for its owner.
            self._db.close()
            raise LowvoxError(
                f"cannot open the job store {path} ({e}); move it aside to start afresh"
            ) from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: one writer at a time, across processes).
        A full disk (SQLite's SQLITE_FULL) is a `StoreFull`; the transaction is undone."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite ends some failed ones itself
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as e:
                # SQLITE_FULL's own words (Python 3.10 does not give the error's code).
                if "database or disk is full" in str(e):
                    raise StoreFull(self.root / "jobs.sqlite3") from e
                raise

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- folders ----------------------------------------------------------------------

    def folder(self, job_id: str) -> Path:
        if not _is_job_id(job_id):
            raise JobNotFound(job_id)
        return self.root / job_id

    def audio_path(self, job_id: str, index: int) -> Path:
        return self.folder(job_id) / "audio" / f"{index:06d}.flac"

    def out_folder(self, job_id: str) -> Path:
        return self.folder(job_id) / "out"

    def input_path(self, job: JobInfo) -> Path:
        return self.folder(job.id) / f"input{Path(job.input_name).suffix.lower()}"

    def cover_path(self, job: JobInfo) -> Path | None:
        if not job.cover_type:
            return None
        ext = ".png" if job.cover_type == "image/png" else ".jpg"
        return self.folder(job.id) / f"cover{ext}"

    # -- jobs -------------------------------------------------------------------------

    def create(
        self,
        *,
        input_name: str,
        data: bytes,
        meta: BookMeta,
        settings: JobSettings,
        lines: Sequence[Line],
        origin: str = "server",
        output: str | None = None,
        state: JobState = "queued",
        max_jobs: int = 0,
    ) -> JobInfo:
        """Store a planned job: its input, cover, chapters and sentences, in one go. The
        folder is complete before the row appears, so a half-made job is never listed.
        `max_jobs` (0: none): how many jobs of this `origin` the store may keep, counted
        in the same transaction that adds one."""
        from lowvox.files import why_not_written, write_atomic

        if not lines:
            raise InvalidRequest("the input has nothing to speak", field="file")
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        suffix = Path(input_name).suffix.lower()
        now = time.time()
        try:
            (folder / "audio").mkdir(parents=True)
            write_atomic(folder / f"input{suffix}", data)
            cover_type = meta.cover_type if meta.cover else None
            if meta.cover and cover_type:
                ext = ".png" if cover_type == "image/png" else ".jpg"
                write_atomic(folder / f"cover{ext}", meta.cover)
            sha = hashlib.sha256(data).hexdigest()
            with self._tx() as db:
                # Two `lowvox book` runs of one command started together: the second
                # continues the first's job (and finds it held) rather than making another.
                twin = _cli_job(db, output, sha, settings) if origin == "cli" and output else None
                if twin is not None:
                    raise _Twin(twin)
                if max_jobs:
                    sql = "SELECT COUNT(*) FROM jobs WHERE origin = ?"
                    (count,) = db.execute(sql, (origin,)).fetchone()
                    if count >= max_jobs:
                        raise TooManyJobs(count, max_jobs)
                db.execute(
                    "INSERT INTO jobs (id, created, updated, state, origin, title, author,"
                    " language, input_name, input_sha256, settings, output, cover_type)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        job_id, now, now, state, origin, meta.title, meta.author,
                        meta.language or settings.language, Path(input_name).name[:200],
                        sha, settings.to_json(), output, cover_type,
                    ),
                )  # fmt: skip
                db.executemany(
                    "INSERT INTO chapters (job, idx, title) VALUES (?,?,?)",
                    [(job_id, i, t) for i, t in enumerate(meta.chapter_titles)],
                )
                db.executemany(
                    "INSERT INTO sentences (job, idx, chapter, paragraph, text, voice,"
                    " pause_before, pause_after) VALUES (?,?,?,?,?,?,?,?)",
                    [
                        (job_id, i, ln.chapter, ln.paragraph, ln.text, ln.voice,
                         ln.pause_before, ln.pause_after)
                        for i, ln in enumerate(lines)
                    ],
                )  # fmt: skip
        except BaseException as e:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(e, _Twin):
                return self.get(e.job_id)
            if isinstance(e, (OSError, sqlite3.OperationalError)):  # a full disk, say
                raise LowvoxError(f"cannot store the job ({why_not_written(e)})") from e
            raise
        return self.get(job_id)

    def get(self, job_id: str) -> JobInfo:
        if not _is_job_id(job_id):
            raise JobNotFound(job_id)
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return _job(rows[0])

    def jobs(
        self, *, origin: str | None = None, states: Sequence[str] | None = None
    ) -> list[JobInfo]:
        sql = "SELECT * FROM jobs WHERE 1=1"
        args: list[Any] = []
        if origin is not None:
            sql += " AND origin = ?"
            args.append(origin)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        jobs = []
        for row in self._query(sql + " ORDER BY created", args):
            try:
                jobs.append(_job(row))
            except DamagedJob as e:  # one damaged row must not hide or stop the others
                logger.warning("%s; it is left out", e)
        return jobs

    def find_cli_job(self, output: str, input_sha256: str, settings: JobSettings) -> JobInfo | None:
        """The `lowvox book` job that a rerun of the same command continues."""
        with self._lock:
            found = _cli_job(self._db, output, input_sha256, settings)
        return None if found is None else self.get(found)

    def set_state(
        self, job_id: str, state: JobState, error: str | None = None, *, expect: Sequence[str] = ()
    ) -> JobInfo:
        """Move a job to `state`; with `expect`, only from one of those states (else 409)."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if expect and row["state"] not in expect:
                raise JobConflict(f"job {job_id} is {row['state']}, cannot make it {state}")
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ?",
                (state, error, time.time(), job_id),
            )
        return self.get(job_id)

    def set_sample_rate(self, job_id: str, rate: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET sample_rate = ? WHERE id = ?", (rate, job_id))

    def mark_assembled(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET assembled = ? WHERE id = ?", (time.time(), job_id))

    def delete(self, job_id: str) -> None:
        folder = self.folder(job_id)
        with self._tx() as db:
            row = db.execute("SELECT owner, lease FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if _leased(row, exclude=this_owner()):
                raise JobConflict(
                    f"job {job_id} is being worked on by {row['owner']}; cancel it first"
                )
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        # The row is gone first: a folder without a row is never listed, only swept.
        shutil.rmtree(folder, ignore_errors=True)

    def sweep_orphans(self, older_than_s: float) -> int:
        """Remove job folders without a row, left by a process killed while it created or
        deleted a job; returns how many. A folder is spared until it is `older_than_s`
        old: a job being created has its folder a moment before its row."""
        rows = {r["id"] for r in self._query("SELECT id FROM jobs")}
        now = time.time()
        removed = 0
        for folder in self.root.iterdir():
            if not _is_job_id(folder.name) or folder.name in rows:
                continue
            try:
                st = folder.lstat()
                if not stat.S_ISDIR(st.st_mode) or now - st.st_mtime < older_than_s:
                    continue
                shutil.rmtree(folder)
            except OSError:  # gone already, or not ours to remove
                continue
            removed += 1
        return removed

    # -- leases: one process works on a job at a time ---------------------------------

    def claim(self, job_id: str, owner: str | None = None) -> bool:
        """Take the job's lease if nobody else holds a live one."""
        owner = owner or this_owner()
        with self._tx() as db:
            row = db.execute("SELECT owner, lease FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if _leased(row, exclude=owner):
                return False
            db.execute(
                "UPDATE jobs SET owner = ?, lease = ? WHERE id = ?",
                (owner, time.time() + LEASE_S, job_id),
            )
        return True

    def renew(self, job_id: str, owner: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET lease = ? WHERE id = ? AND owner = ?",
                (time.time() + LEASE_S, job_id, owner or this_owner()),
            )

    def release(self, job_id: str, owner: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET owner = NULL, lease = NULL WHERE id = ? AND owner = ?",
                (job_id, owner or this_owner()),
            )

    # -- chapters and sentences ---------------------------------------------------------

    def chapters(self, job_id: str) -> list[str]:
        rows = self._query("SELECT title FROM chapters WHERE job = ? ORDER BY idx", (job_id,))
        return [r["title"] for r in rows]

    def sentences(
        self, job_id: str, *, state: str | None = None, chapter: int | None = None
    ) -> list[Sentence]:
        sql = "SELECT * FROM sentences WHERE job = ?"
        args: list[Any] = [job_id]
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        if chapter is not None:
            sql += " AND chapter = ?"
            args.append(chapter)
        return [_sentence(r) for r in self._query(sql + " ORDER BY idx", args)]

    def sentence(self, job_id: str, index: int) -> Sentence:
        # A number SQLite cannot hold (`jobs retake ID 99999999999999999999`) is no
        # sentence either, not an OverflowError.
        rows = []
        if -(2**63) <= index < 2**63:
            rows = self._query("SELECT * FROM sentences WHERE job = ? AND idx = ?", (job_id, index))
        if not rows:
            raise InvalidRequest(f"job {job_id} has no sentence {index}", field="sentence")
        return _sentence(rows[0])

    def finish_sentence(
        self,
        job_id: str,
        index: int,
        *,
        attempt: int,
        samples: int,
        flags: Sequence[str],
        score: float,
        seed: int | None = None,
    ) -> bool:
        """Record a sentence as done; its audio file must already be in place. False when
        the sentence changed meanwhile (edited or retaken): the take is stale."""
        audio = self.audio_path(job_id, index).name
        with self._tx() as db:
            cur = db.execute(
                "UPDATE sentences SET state = 'done', audio = ?, samples = ?, flags = ?,"
                " score = ?, seed = ?, error = NULL WHERE job = ? AND idx = ? AND attempt = ?"
                " AND state = 'pending'",
                (audio, samples, json.dumps(list(flags)), score, seed, job_id, index, attempt),
            )
            db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (time.time(), job_id))
        return cur.rowcount == 1

    def fail_sentence(self, job_id: str, index: int, *, attempt: int, error: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE sentences SET state = 'failed', error = ? WHERE job = ? AND idx = ?"
                " AND attempt = ?",
                (error[:500], job_id, index, attempt),
            )

    def retake(
        self, job_id: str, index: int, *, text: str | None = None, voice: str | None = None
    ) -> Sentence:
        """Ask for a new take of one sentence (with a new seed), optionally with new text or
        voice; everything else is kept. The old audio stays until the new take replaces it."""
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM sentences WHERE job = ? AND idx = ?", (job_id, index)
            ).fetchone()
            if row is None:
                raise InvalidRequest(f"job {job_id} has no sentence {index}", field="sentence")
            new_text = row["text"] if text is None else text
            new_voice = row["voice"] if voice is None else (voice or None)
            db.execute(
                "UPDATE sentences SET text = ?, voice = ?, attempt = attempt + 1,"
                " state = 'pending', error = NULL WHERE job = ? AND idx = ?",
                (new_text, new_voice, job_id, index),
            )
            db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (time.time(), job_id))
        return self.sentence(job_id, index)

    def redo(self, job_id: str, indices: Sequence[int]) -> int:
        """Done sentences back to pending with the same attempt (so the same seeds): their
        audio was lost or damaged after they were done."""
        with self._tx() as db:
            cur = db.executemany(
                "UPDATE sentences SET state = 'pending', error = NULL"
                " WHERE job = ? AND idx = ? AND state = 'done'",
                [(job_id, i) for i in indices],
            )
        return cur.rowcount

    def retry_failed(self, job_id: str) -> int:
        """Failed sentences back to pending (resume after the cause was fixed)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE sentences SET state = 'pending', error = NULL"
                " WHERE job = ? AND state = 'failed'",
                (job_id,),
            )
        return cur.rowcount

    def progress(self, job_id: str, sample_rate: int | None = None) -> Progress:
        rows = self._query(
            "SELECT state, COUNT(*) AS n, COALESCE(SUM(samples), 0) AS s,"
            " SUM(CASE WHEN flags != '[]' THEN 1 ELSE 0 END) AS f"
            " FROM sentences WHERE job = ? GROUP BY state",
            (job_id,),
        )
        by = {r["state"]: r for r in rows}
        total = sum(r["n"] for r in rows)
        done = by["done"]["n"] if "done" in by else 0
        samples = by["done"]["s"] if "done" in by else 0
        flagged = by["done"]["f"] if "done" in by else 0
        return Progress(
            total=total,
            done=done,
            failed=by["failed"]["n"] if "failed" in by else 0,
            flagged=flagged or 0,
            audio_seconds=samples / sample_rate if sample_rate else 0.0,
        )


class _Twin(Exception):
    """The job being stored exists already (it rolls the transaction back)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


def _cli_job(
    db: sqlite3.Connection, output: str, input_sha256: str, settings: JobSettings
) -> str | None:
    """The id of the `lowvox book` job of this output, input and settings, if any."""
    rows = db.execute(
        "SELECT id, settings FROM jobs WHERE origin = 'cli' AND output = ?"
        " AND input_sha256 = ? AND state != 'cancelled' ORDER BY created",
        (output, input_sha256),
    ).fetchall()
    for row in rows:
        with contextlib.suppress(DamagedJob):
            if _settings(row) == settings:
                return str(row["id"])
    return None


def _leased(row: sqlite3.Row, exclude: str) -> bool:
    """Whether someone other than `exclude` holds a live lease: one not yet lapsed, whose
    owner (when it is a process on this host) is still alive."""
    owner = row["owner"]
    if not owner or owner == exclude or (row["lease"] or 0) <= time.time():
        return False
    return _alive(owner)


def _alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's process: only its lease can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _settings(row: sqlite3.Row) -> JobSettings:
    try:
        return JobSettings.from_json(row["settings"])
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not settings
        raise DamagedJob(row["id"], f"its settings cannot be read: {e}") from e


def _job(row: sqlite3.Row) -> JobInfo:
    values = dict(row)
    values["settings"] = _settings(row)
    return JobInfo(**values)


def _sentence(row: sqlite3.Row) -> Sentence:
    values = {k: row[k] for k in row.keys() if k != "job"}  # noqa: SIM118 -- sqlite3.Row
    values["flags"] = tuple(json.loads(values["flags"] or "[]"))
    return Sentence(**values)
