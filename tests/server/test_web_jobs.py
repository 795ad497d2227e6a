"""The web page's Jobs panel in headless Chromium (Playwright): start a book from pasted
text, follow it to the end, play its chapters and flagged sentences, retake and edit a
sentence, pause, resume, cancel and delete, see the server's errors, and all of it with
an API key.

Skips like test_web_page.py when Playwright or Chromium is missing.
"""

from __future__ import annotations

import re

import pytest

from tests.server.srv_fixtures import live_server

sync_api = pytest.importorskip("playwright.sync_api")

from tests.server.test_web_page import CHROMIUM, LAUNCH_ARGS  # noqa: E402

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary")

expect = sync_api.expect
WAIT_MS = 30_000  # a 2-core CI machine runs the fake engine, uvicorn and Chromium at once

BOOK = """# A Small Book

## Morning

The sun rose over the hills. Birds began to sing.

It was a quiet day in the village.

## Evening

The lamps were lit one by one. Everyone went home.
"""


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("web-jobs"), job_retakes=0) as s:
        yield s


@pytest.fixture(scope="module")
def key_server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("web-jobs-key"), api_key="k", job_retakes=0) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


def open_page(browser, server, *, ready: bool = True):
    """A fresh page on `server`, and the list its uncaught script errors are added to."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: d.accept())  # the delete confirmation
    page.goto(server.url + "/")
    if ready:
        wait_ready(page)
    return page, errors


def wait_ready(page) -> None:
    page.wait_for_function(
        "document.querySelector('#status').textContent === 'ready'", timeout=WAIT_MS
    )
    page.wait_for_function(
        "document.querySelectorAll('#job-voice option').length > 0", timeout=WAIT_MS
    )


@pytest.fixture()
def page(browser, jobs_server):
    pg, errors = open_page(browser, jobs_server)
    yield pg
    jobs_server.engine.gate.set()
    pg.context.close()
    assert errors == []


def start_job(page, title: str, text: str = BOOK, fmt: str = "wav"):
    """Start a job from pasted Markdown in the page; returns its row in the list."""
    page.fill("#job-text", text)
    page.check("#job-markdown")
    page.fill("#job-title", title)
    page.select_option("#job-format", fmt)
    page.click("#job-form button[type=submit]")
    row = page.locator("#job-list li.job", has_text=title)
    expect(row).to_have_count(1, timeout=WAIT_MS)
    return row


def check_loads(page, url: str) -> bytes:
    """GET a URL the page shows, as the browser would (same cookies, the page's query)."""
    response = page.request.get(url)
    assert response.status == 200, (url, response.status, response.text()[:200])
    return response.body()


def wait_audio(page, selector: str) -> list[float]:
    """Wait until every <audio> matching `selector` has loaded its media; their durations."""
    page.wait_for_function(
        f"""(() => {{ const all = [...document.querySelectorAll({selector!r})];
        return all.length > 0 && all.every((a) => a.readyState >= 1 && a.duration > 0 && !a.error); }})()""",
        timeout=WAIT_MS,
    )
    return page.eval_on_selector_all(selector, "all => all.map((a) => a.duration)")


def test_a_pasted_book_runs_to_chapters_downloads_and_flagged_sentences(page):
    row = start_job(page, "Web Book")
    expect(row).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    assert row.locator("progress").evaluate("p => p.value") == 1
    stats = row.locator(".job-stats").inner_text()
    done, total = map(int, re.match(r"(\d+)/(\d+) sentences", stats).groups())
    assert done == total > 1

    # The new job is the selected one: its chapters play in the browser.
    detail = page.locator("#job-detail")
    expect(detail.locator("h3")).to_have_text("Web Book")
    expect(detail.locator("audio.chapter-audio")).to_have_count(2, timeout=WAIT_MS)
    assert "Morning" in detail.inner_text() and "Evening" in detail.inner_text()
    durations = wait_audio(page, "#job-detail audio.chapter-audio")
    assert all(d > 0.2 for d in durations)
    for src in detail.locator("audio.chapter-audio").evaluate_all("all => all.map(a => a.src)"):
        assert check_loads(page, src)[:4] == b"RIFF"

    # Downloads: the whole book and its subtitles.
    links = {
        part: detail.locator(f"a.download-{part}").evaluate("a => a.href")
        for part in ("book", "srt", "vtt")
    }
    assert check_loads(page, links["book"])[:4] == b"RIFF"
    assert check_loads(page, links["srt"]).decode().count(" --> ") == total
    assert check_loads(page, links["vtt"]).decode().startswith("WEBVTT")

    # The fake engine's audio is short for its text: every sentence is flagged (a
    # one-word chapter title so short that it counts as silent).
    flagged = page.locator("#job-flagged li")
    expect(flagged.nth(1)).to_contain_text("too_short")
    assert flagged.count() == total
    flagged.nth(1).locator("button.play").click()
    wait_audio(page, "#job-player")
    assert "/sentences/1/audio" in page.get_attribute("#job-player", "src")


@pytest.mark.slow
def test_retake_and_edit_a_flagged_sentence(page, jobs_server):
    row = start_job(page, "Retake Book")
    expect(row).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    first = page.locator("#job-flagged li[data-index='0']")
    expect(first).to_contain_text("take 1")

    # Hold the engine: the job is seen back at work before it is done again.
    jobs_server.engine.gate.clear()
    first.locator("button.retake").click()
    expect(row).to_have_attribute("data-state", re.compile("queued|running"), timeout=WAIT_MS)
    jobs_server.engine.gate.set()
    expect(row).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    expect(first).to_contain_text("take 2", timeout=WAIT_MS)

    # Edit the text, then retake: the new words are spoken and reach the subtitles.
    second = page.locator("#job-flagged li[data-index='1']")
    second.locator("button.edit").click()
    second.locator(".edit textarea").fill("A changed sentence from the page.")
    second.locator(".edit button.save").click()
    expect(second).to_contain_text("A changed sentence from the page.", timeout=WAIT_MS)
    expect(row).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    assert "A changed sentence from the page." in jobs_server.engine.finished_jobs
    expect(second).to_contain_text("take 2", timeout=WAIT_MS)
    srt = page.locator("#job-detail a.download-srt").evaluate("a => a.href")
    assert "A changed sentence from the page." in check_loads(page, srt).decode()


def test_pause_resume_cancel_and_delete_buttons(page, jobs_server):
    jobs_server.engine.gate.clear()  # hold the engine so the job stays at work
    row = start_job(page, "Paused Book")
    expect(row).to_have_attribute("data-state", re.compile("queued|running"), timeout=WAIT_MS)
    expect(row.locator("button.job-resume")).to_have_count(0)

    row.locator("button.job-pause").click()
    expect(row).to_have_attribute("data-state", "paused", timeout=WAIT_MS)
    expect(row.locator(".job-state")).to_have_text("paused")
    expect(row.locator("button.job-pause")).to_have_count(0)

    row.locator("button.job-resume").click()
    expect(row).to_have_attribute("data-state", re.compile("queued|running"), timeout=WAIT_MS)
    row.locator("button.job-cancel").click()
    expect(row).to_have_attribute("data-state", "cancelled", timeout=WAIT_MS)
    expect(row.locator("button.job-resume")).to_have_count(0)
    jobs_server.engine.gate.set()

    row.locator("button.job-delete").click()
    expect(row).to_have_count(0, timeout=WAIT_MS)
    assert page.locator("#job-message").get_attribute("class") == "message"


def test_an_unsupported_file_shows_the_servers_message(page):
    page.set_input_files(
        "#job-file",
        files=[{"name": "book.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.4"}],
    )
    page.click("#job-form button[type=submit]")
    message = page.locator("#job-message.error")
    expect(message).to_contain_text("unsupported document kind .pdf", timeout=WAIT_MS)
    expect(message).to_contain_text("400")


@pytest.mark.slow
def test_the_panel_works_with_an_api_key(browser, key_server):
    page, errors = open_page(browser, key_server, ready=False)
    try:
        # Without the key the page says so in place; with it, everything loads.
        expect(page.locator("#job-message.error")).to_contain_text("401", timeout=WAIT_MS)
        page.fill("#api-key", "k")
        page.dispatch_event("#api-key", "change")
        wait_ready(page)
        row = start_job(page, "Keyed Book")
        # Progress arrives over Server-Sent Events, which carry the key in the query.
        expect(row).to_have_attribute("data-state", "done", timeout=WAIT_MS)
        detail = page.locator("#job-detail")
        expect(detail.locator("audio.chapter-audio")).to_have_count(2, timeout=WAIT_MS)
        wait_audio(page, "#job-detail audio.chapter-audio")
        for part in ("book", "srt", "vtt"):
            check_loads(page, detail.locator(f"a.download-{part}").evaluate("a => a.href"))
        page.locator("#job-flagged li button.play").first.click()
        wait_audio(page, "#job-player")
        assert errors == []
    finally:
        key_server.engine.gate.set()
        page.context.close()
