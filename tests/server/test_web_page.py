"""The web page in headless Chromium (Playwright): type, generate, play; upload a voice.

Skips cleanly when the Python `playwright` package or a Chromium binary is missing.
CI: `apt-get install -y chromium` and `pip install playwright` (no browser download needed).
"""

from __future__ import annotations

import io
import os
import shutil

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


def test_bad_input_shows_the_message(page):
    page.fill("#text", "   ")
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('#message').classList.contains('error')", timeout=15_000
    )
    assert "text is empty" in page.inner_text("#message")


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
