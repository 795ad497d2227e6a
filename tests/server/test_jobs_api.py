"""`/api/jobs` over real HTTP: create, follow, download, retake, pause, resume, cancel,
delete, bad input, and a job that resumes when the server comes back."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
import zipfile

import pytest
import soundfile as sf

from tests.server.srv_fixtures import FakeFactory, live_server, wait_for

TEXT = """# A Small Book

## Morning

The sun rose over the hills. Birds began to sing.

It was a quiet day in the village.

## Evening

The lamps were lit one by one. Everyone went home.
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("jobs"), max_job_bytes=200_000, job_retakes=0) as s:
        yield s


@pytest.fixture()
def client(server):
    server.engine.gate.set()
    with server.client() as c:
        yield c
    server.engine.gate.set()


def wait_state(client, job_id, states=("done",), timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()["job"]
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stayed {job['state']}")


def create(client, **body):
    r = client.post("/api/jobs", json={"text": TEXT, "markdown": True, "format": "wav", **body})
    assert r.status_code == 201, r.text
    return r.json()["job"]


def test_a_job_from_json_text_runs_to_a_book_with_chapters_and_subtitles(client):
    job = create(client, title="Custom title")
    assert job["title"] == "Custom title"
    assert [c["title"] for c in job["chapters"]] == ["Morning", "Evening"]
    assert job["progress"]["total"] == 7  # five sentences, two chapter titles
    job = wait_state(client, job["id"])
    assert job["progress"]["done"] == 7 and job["progress"]["fraction"] == 1.0
    book = client.get(job["downloads"]["book"])
    assert book.status_code == 200 and book.headers["content-type"] == "audio/wav"
    assert "attachment" in book.headers["content-disposition"]
    audio, rate = sf.read(io.BytesIO(book.content), dtype="float32")
    assert rate == 24_000 and len(audio) / rate > job["progress"]["audio_seconds"]
    srt = client.get(job["downloads"]["srt"]).text
    vtt = client.get(job["downloads"]["vtt"])
    assert srt.count(" --> ") == 7 and "Birds began to sing." in srt
    assert vtt.headers["content-type"].startswith("text/vtt") and vtt.text.startswith("WEBVTT")
    chapter = client.get(job["chapters"][1]["url"])
    assert chapter.status_code == 200
    ch_audio, _ = sf.read(io.BytesIO(chapter.content), dtype="float32")
    assert 0 < len(ch_audio) < len(audio)
    listed = client.get("/api/jobs").json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]


def test_a_chapter_the_job_does_not_speak_is_a_client_error(client):
    job = wait_state(client, create(client, chapters="2")["id"])
    assert [c["index"] for c in job["chapters"]] == [2]
    url = f"/api/jobs/{job['id']}/download"
    assert client.get(url, params={"part": "chapter", "chapter": 2}).status_code == 200
    for chapter in (1, 3, 99):  # left out by `chapters`, past the book's end
        r = client.get(url, params={"part": "chapter", "chapter": chapter})
        assert r.status_code == 400, r.text
        assert f"chapter {chapter}" in r.json()["detail"]


def test_progress_arrives_as_server_sent_events(client, server):
    server.engine.gate.clear()  # hold the engine so the stream sees the job run
    job = create(client)
    events = []
    with client.stream("GET", f"/api/jobs/{job['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        server.engine.gate.set()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1].get("state") in ("done", "failed", "cancelled"):
                    break
    done = [e["done"] for e in events[1:]]
    assert done == sorted(done) and done[-1] == 7
    assert events[-1]["state"] == "done" and events[-1]["total"] == 7


def test_an_uploaded_markdown_file_with_voice_tags(client, server):
    text = "# T\n\n## C\n\nAlpha here. [voice:beta]Beta here.[/voice] [pause:2] Alpha again.\n"
    r = client.post(
        "/api/jobs",
        files={"file": ("story.md", text.encode(), "text/markdown")},
        data={"format": "flac", "voice": "alpha"},
    )
    assert r.status_code == 201, r.text
    job = wait_state(client, r.json()["job"]["id"])
    sentences = client.get(f"/api/jobs/{job['id']}/sentences").json()["sentences"]
    assert [s["voice"] for s in sentences] == [None, None, "beta", None]  # the title first
    clip = client.get(sentences[2]["audio_url"])
    assert clip.status_code == 200 and clip.headers["content-type"] == "audio/flac"


def test_retake_with_new_text_respeaks_that_sentence_only(client, server):
    job = wait_state(client, create(client)["id"])
    spoken = len(server.engine.finished_jobs)
    r = client.post(
        f"/api/jobs/{job['id']}/sentences/2/retake", json={"text": "A changed sentence."}
    )
    assert r.status_code == 200, r.text
    job = wait_state(client, job["id"])
    assert server.engine.finished_jobs[spoken:] == ["A changed sentence."]
    assert "A changed sentence." in client.get(job["downloads"]["srt"]).text
    s = client.get(f"/api/jobs/{job['id']}/sentences").json()["sentences"][2]
    assert s["attempt"] == 1 and s["text"] == "A changed sentence."


def test_pause_resume_cancel_delete(client, server):
    server.engine.gate.clear()
    job = create(client)
    paused = client.post(f"/api/jobs/{job['id']}/pause")
    assert paused.status_code == 200
    server.engine.gate.set()
    assert wait_state(client, job["id"], ("paused",))["state"] == "paused"
    done_while_paused = client.get(f"/api/jobs/{job['id']}").json()["job"]["progress"]["done"]
    assert done_while_paused < 7
    client.post(f"/api/jobs/{job['id']}/resume").raise_for_status()
    wait_state(client, job["id"])
    # A finished job cannot be paused; an unknown one is 404.
    assert client.post(f"/api/jobs/{job['id']}/pause").status_code == 409
    assert client.post(f"/api/jobs/{'0' * 32}/pause").status_code == 404

    server.engine.gate.clear()
    job = create(client)
    assert client.post(f"/api/jobs/{job['id']}/cancel").json()["job"]["state"] == "cancelled"
    server.engine.gate.set()
    assert client.post(f"/api/jobs/{job['id']}/resume").status_code == 409
    assert client.get(f"/api/jobs/{job['id']}/download").status_code == 409
    assert client.delete(f"/api/jobs/{job['id']}").status_code == 200
    assert client.get(f"/api/jobs/{job['id']}").status_code == 404


def test_an_interactive_request_is_served_while_a_book_renders(client, server):
    long_text = "\n\n".join(f"Paragraph number {i} has a few words in it." for i in range(40))
    job = create(client, text=long_text, markdown=False)
    r = client.post("/v1/audio/speech", json={"input": "Quick question.", "voice": "alpha"})
    assert r.status_code == 200
    state = client.get(f"/api/jobs/{job['id']}").json()["job"]
    assert state["progress"]["done"] < 40  # the book was still rendering
    client.post(f"/api/jobs/{job['id']}/cancel")


def test_a_job_outlives_a_reload_of_its_engine(client, server):
    # A reload (or a runtime switch, which is one) cancels the takes in flight; the job
    # speaks them again on the reloaded engine instead of failing with "generation
    # cancelled".
    server.engine.gate.clear()
    server.engine.started.clear()
    job = create(client)
    assert wait_for(server.engine.started.is_set)
    assert client.post("/api/reload").json()["status"] == "model-success"
    server.engine.gate.set()
    done = wait_state(client, job["id"], ("done", "failed", "paused", "cancelled"))
    assert done["state"] == "done", done
    assert done["progress"]["done"] == 7


def _epub(encrypted: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("mimetype", "application/epub+zip")
        z.writestr(
            "META-INF/container.xml",
            '<?xml version="1.0"?><container version="1.0" '
            'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
            '<rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
            "</rootfiles></container>",
        )
        if encrypted:
            z.writestr(
                "META-INF/encryption.xml",
                '<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
                'xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:EncryptedData>'
                '<enc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/>'
                '<enc:CipherData><enc:CipherReference URI="OEBPS/ch1.xhtml"/></enc:CipherData>'
                "</enc:EncryptedData></encryption>",
            )
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"files": {"file": ("book.epub", b"not a zip", "application/epub+zip")}}, 400, "epub"),
        ({"files": {"file": ("book.epub", _epub(True), "application/epub+zip")}}, 400, "drm"),
        ({"files": {"file": ("book.pdf", b"%PDF-1.4", "application/pdf")}}, 400, ".pdf"),
        ({"json": {"text": "Hello there.", "voice": "nobody"}}, 404, "nobody"),
        ({"json": {"text": "Hi. [voice:ghost]Boo.[/voice]"}}, 404, "ghost"),
        # A tag names a voice, never a file on the server (XTTS would have cloned it).
        ({"json": {"text": "Hi. [voice:/etc/ref.wav]Boo.[/voice]"}}, 400, "not a path"),
        ({"json": {"text": "Hi. [voice:..\\x\\ref.wav]Boo.[/voice]"}}, 400, "not a path"),
        ({"json": {"text": "   "}}, 400, "text"),
        # A broken \u escape: JSON allows it, UTF-8 cannot store it (it was a 500).
        (
            {
                "content": rb'{"text": "Hi \ud800."}',
                "headers": {"content-type": "application/json"},
            },
            400,
            "lone surrogate",
        ),
        ({"json": {"text": "Hi.", "format": "exe"}}, 400, "format"),
        ({"json": {"text": "Hi.", "seed": 2**70}}, 400, "seed"),
        ({"json": {"text": "Hi.", "chapters": "9-x"}}, 400, "chapters"),
        ({"json": {"text": "Hi.", "chapters": "1-200001"}}, 400, "chapter numbers"),
        ({"json": {"text": "Hi.", "chapters": "1-999999999999"}}, 400, "chapter numbers"),
        # Parsed on the event loop: 3,000 parts of "1-100000" held every request 5 s.
        ({"json": {"text": "Hi.", "chapters": ",".join(["1-100000"] * 1001)}}, 400, "1,000"),
        # Pauses that meet are bound as one is (they made hours of silence).
        ({"json": {"text": "Hi. [pause:20] [pause:20]"}}, 400, "add up to"),
        ({"json": {"text": "x" * 300_000}}, 413, "limit"),
        ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "json"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_stores_nothing(client, server, kwargs, status, words):
    before = len(client.get("/api/jobs").json()["jobs"])
    r = client.post("/api/jobs", **kwargs)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower()
    assert len(client.get("/api/jobs").json()["jobs"]) == before


def test_a_job_the_server_was_running_resumes_when_it_starts_again(tmp_path):
    factory = FakeFactory()
    with live_server(tmp_path, factory, job_retakes=0) as first, first.client() as c:
        first.engine.gate.clear()
        job = create(c)
        deadline = time.monotonic() + 10
        while not first.engine.started.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.get(f"/api/jobs/{job['id']}").json()["job"]["state"] == "running"
        first.engine.gate.set()
        first.server.should_exit = True  # stops mid-job, like a restart
    with live_server(tmp_path, FakeFactory(), job_retakes=0) as second, second.client() as c:
        done = wait_state(c, job["id"])
        assert done["progress"]["done"] == 7


@pytest.mark.slow
def test_a_job_whose_failure_cannot_be_recorded_does_not_stop_the_jobs_after_it(
    tmp_path, monkeypatch
):
    # A full disk fails the database's writes too: recording the job's failure raised in
    # the job loop's error handler, and that ended the loop: no job ran again until a
    # restart (a resume was accepted and never acted on).
    from lowvox.jobs.store import JobStore

    real_finish, real_set_state = JobStore.finish_sentence, JobStore.set_state
    full = threading.Event()
    tried = threading.Event()

    def finish_sentence(self, *args, **kwargs):
        if full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return real_finish(self, *args, **kwargs)

    def set_state(self, job_id, state, *args, **kwargs):
        if full.is_set() and state == "failed":
            tried.set()
            raise sqlite3.OperationalError("database or disk is full")
        return real_set_state(self, job_id, state, *args, **kwargs)

    monkeypatch.setattr(JobStore, "finish_sentence", finish_sentence)
    monkeypatch.setattr(JobStore, "set_state", set_state)
    with live_server(tmp_path, job_retakes=0) as server, server.client() as c:
        full.set()
        create(c)
        assert tried.wait(30), "the job never failed"
        full.clear()  # room is made
        assert wait_state(c, create(c)["id"])["progress"]["done"] == 7


@pytest.mark.slow
def test_a_retake_the_server_was_killed_before_queueing_is_spoken_when_it_starts_again(tmp_path):
    from lowvox.jobs.store import JobStore

    with live_server(tmp_path, FakeFactory(), job_retakes=0) as first, first.client() as c:
        job = wait_state(c, create(c)["id"])
        first.server.should_exit = True
    # A retake writes the sentence's row, then queues the job: killed between the two, the
    # job was left done with a sentence to speak, and no start ever ran it again.
    store = JobStore(tmp_path / "jobs")
    store.retake(job["id"], 2, text="A retake nobody heard.")
    store.close()
    with live_server(tmp_path, FakeFactory(), job_retakes=0) as second, second.client() as c:
        deadline = time.monotonic() + 10
        while "A retake nobody heard." not in (srt := c.get(job["downloads"]["srt"]).text):
            assert time.monotonic() < deadline, "the retake was never spoken"
            time.sleep(0.05)
        assert wait_state(c, job["id"])["progress"]["done"] == 7 and srt.count(" --> ") == 7


@pytest.mark.slow
def test_a_job_still_leased_by_a_dead_server_elsewhere_resumes_once_the_lease_lapses(
    tmp_path, monkeypatch
):
    from lowvox.jobs import store as store_module
    from lowvox.jobs.store import JobStore

    with live_server(tmp_path, FakeFactory(), job_retakes=0) as first, first.client() as c:
        first.engine.gate.clear()
        job = create(c)
        first.server.should_exit = True
    # Killed on another host (a container made anew): its lease is still live.
    monkeypatch.setattr(store_module, "LEASE_S", 0.5)
    store = JobStore(tmp_path / "jobs")
    store.set_state(job["id"], "running")
    assert store.claim(job["id"], "some-other-host:1")
    store.close()
    with live_server(tmp_path, FakeFactory(), job_retakes=0) as second, second.client() as c:
        assert wait_state(c, job["id"])["progress"]["done"] == 7


def test_the_server_keeps_at_most_max_jobs_jobs(tmp_path):
    # The job store had no bound: every POST kept its input (up to max_job_bytes) and its
    # audio until someone deleted the job.
    with live_server(tmp_path, max_jobs=2) as s, s.client() as c:
        first = create(c)
        create(c)
        folders = sorted(p.name for p in (tmp_path / "jobs").iterdir())
        r = c.post("/api/jobs", json={"text": TEXT, "format": "wav"})
        assert r.status_code == 413, r.text
        assert "max_jobs" in r.json()["error"]["message"]
        assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == folders
        assert len(c.get("/api/jobs").json()["jobs"]) == 2
        wait_state(c, first["id"])
        assert c.delete(f"/api/jobs/{first['id']}").status_code == 200
        assert c.post("/api/jobs", json={"text": TEXT, "format": "wav"}).status_code == 201


def test_jobs_need_the_api_key_when_one_is_set(tmp_path):
    with live_server(tmp_path, api_key="sekrit") as s, s.client() as c:
        assert c.get("/api/jobs").status_code == 401
        assert c.post("/api/jobs", json={"text": "Hi."}).status_code == 401
        ok = c.get("/api/jobs", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200


def test_the_openapi_schema_lists_the_job_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events"} <= set(paths)
