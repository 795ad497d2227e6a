"""The web page in headless Chromium (Playwright): type, generate, play; upload a voice.

Skips cleanly when the Python `playwright` package or a Chromium binary is missing.
CI: `apt-get install -y chromium` and `pip install playwright` (no browser download needed).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from tests.server.srv_fixtures import live_server

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = (
    os.environ.get("LOWVOX_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary")

LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("web")) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, page_server):
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(page_server.url + "/")
    pg.wait_for_function(
        "document.querySelector('#status').textContent === 'ready'", timeout=15_000
    )
    pg.wait_for_function("document.querySelectorAll('#voice option').length > 0", timeout=15_000)
    yield pg
    context.close()
    assert errors == []


def audio_state(page) -> dict:
    """Wait until the <audio> element has decoded the media, then report what it holds."""
    page.wait_for_function(
        "(() => { const a = document.querySelector('#player'); return a.readyState >= 1 && a.duration > 0; })()",
        timeout=15_000,
    )
    return page.evaluate(
        "(() => { const a = document.querySelector('#player');"
        " return {duration: a.duration, error: a.error && a.error.code, src: a.src}; })()"
    )


def test_type_generate_and_play(page, page_server):
    page.fill("#text", "one two three four five six seven eight nine ten")
    page.select_option("#voice", "beta")
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('#message').textContent.startsWith('done')", timeout=15_000
    )
    info = audio_state(page)
    assert info["error"] is None
    assert abs(info["duration"] - 1.0) < 0.05  # ten 0.1 s chunks, decoded by the browser
    assert page.get_attribute("#download", "download").endswith(".wav")
    # The generation was saved and shows up in the recent list.
    page.wait_for_selector("#recent-list li")
    assert "one two three" in page.inner_text("#recent-list")


def test_stream_and_play(page):
    page.fill("#text", "a b c d e f")
    page.click("#stream")
    info = audio_state(page)
    assert info["error"] is None
    assert "tts-generate-streaming" in info["src"]


def test_stream_download_is_the_kept_file(page, page_server):
    """Once a stream has played, Download offers the file the server kept, not the
    streaming URL (which would speak the text again)."""
    text = "stream then download me"
    page.fill("#text", text)
    page.select_option("#voice", "gamma")
    page.click("#stream")
    page.wait_for_function(
        "document.querySelector('#download').href.includes('/audio/web_stream_')",
        timeout=15_000,
    )
    href = page.get_attribute("#download", "href")
    assert page.get_attribute("#download", "download") == href.rsplit("/", 1)[1]
    with page_server.client() as c:
        r = c.get(href)
    assert r.status_code == 200
    samples, rate = sf.read(io.BytesIO(r.content))
    assert abs(len(samples) / rate - 0.4) < 0.01  # four 0.1 s chunks
    assert page_server.engine.finished_jobs.count(text) == 1


def test_stop_stops_this_page_only(page, page_server):
    """Stop ends the page's own stream; another client's request goes on."""
    engine = page_server.engine
    engine.gate.clear()  # every job holds its last chunk
    answers: list[int] = []
    try:
        page.fill("#text", "the page streams this")
        page.click("#stream")
        deadline = time.monotonic() + 10
        while engine.active == 0:  # the page's stream is being spoken
            assert time.monotonic() < deadline, "the page's stream never started"
            time.sleep(0.01)

        def other_client() -> None:
            with page_server.client() as c:
                body = {"input": "someone else speaks", "voice": "alpha", "stream": False}
                answers.append(c.post("/v1/audio/speech", json=body).status_code)

        t = threading.Thread(target=other_client)
        t.start()
        while page_server.state.hub.loaded()["espeak"].scheduler.queued == 0:
            assert time.monotonic() < deadline, "the other request never queued"
            time.sleep(0.01)
        page.click("#stop")
        while "the page streams this" not in engine.cancelled_jobs:
            assert time.monotonic() < deadline, "the page's stream was not stopped"
            time.sleep(0.01)
    finally:
        engine.gate.set()
    t.join(30)
    assert answers == [200]
    assert "someone else speaks" in engine.finished_jobs
    # What the stream had made is kept, and offered for download.
    page.wait_for_function(
        "document.querySelector('#download').href.includes('/audio/web_stream_')",
        timeout=15_000,
    )


def test_bad_input_shows_the_message(page):
    page.fill("#text", "   ")
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('#message').classList.contains('error')", timeout=15_000
    )
    assert "text is empty" in page.inner_text("#message")


@pytest.mark.slow
def test_a_refused_stream_shows_an_error(page):
    """<audio> cannot read the server's answer: a stream the server refuses (here a voice
    deleted since the page loaded; a 429 or 401 the same) says so instead of showing
    "streaming…" for ever."""
    page.evaluate(
        "(() => { const s = document.querySelector('#voice');"
        " s.add(new Option('gone', 'gone')); s.value = 'gone'; })()"
    )
    page.fill("#text", "a voice that is gone")
    page.click("#stream")
    page.wait_for_function(
        "document.querySelector('#message').classList.contains('error')", timeout=15_000
    )
    assert "stream" in page.inner_text("#message")


def test_upload_a_voice(page, page_server, tmp_path):
    t = np.arange(3 * 16_000) / 16_000
    clip = tmp_path / "me.wav"
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 200 * t), 16_000, format="WAV")
    clip.write_bytes(buf.getvalue())
    page.fill("#voice-name", "Browser Voice")
    page.set_input_files("#voice-files", str(clip))
    page.click("#upload-form button[type=submit]")
    page.wait_for_function(
        "document.querySelector('#voice-table tbody').textContent.includes('Browser Voice')",
        timeout=15_000,
    )
    assert (page_server.settings.voices_path / "Browser Voice").is_dir()
