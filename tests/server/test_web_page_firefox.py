"""The web page in Firefox: the same flow as the Chromium test, driven over WebDriver BiDi.

Debian's firefox-esr is driven by puppeteer-core (npm, no browser or driver download) from
tests/server/firefox/. Skips cleanly when node, the npm packages or Firefox are missing.
CI: `apt-get install -y firefox-esr` and `npm ci --prefix tests/server/firefox`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.server.srv_fixtures import live_server

HERE = Path(__file__).resolve().parent / "firefox"
FIREFOX = os.environ.get("LOWVOX_FIREFOX") or shutil.which("firefox-esr") or shutil.which("firefox")
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(FIREFOX is None, reason="no firefox binary"),
    pytest.mark.skipif(NODE is None, reason="no node"),
    pytest.mark.skipif(
        not (HERE / "node_modules" / "puppeteer-core").is_dir(),
        reason="puppeteer-core not installed (npm ci --prefix tests/server/firefox)",
    ),
]


@pytest.mark.slow
def test_page_works_in_firefox(tmp_path):
    t = np.arange(3 * 16_000) / 16_000
    clip = tmp_path / "me.wav"
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 200 * t), 16_000, format="WAV")
    clip.write_bytes(buf.getvalue())
    with live_server(tmp_path / "srv") as server:
        proc = subprocess.run(
            [NODE, str(HERE / "page_flow.mjs"), server.url, str(clip), FIREFOX],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        assert "failure" not in seen, seen
        assert seen["errors"] == []
        # Generate: ten 0.1 s chunks, decoded and playable in Firefox.
        assert seen["generate"]["error"] is None
        assert abs(seen["generate"]["duration"] - 1.0) < 0.05
        assert seen["download"].endswith(".wav")
        assert "one two three" in seen["recent"]
        # Streaming plays from the streaming endpoint.
        assert seen["stream"]["error"] is None
        assert "tts-generate-streaming" in seen["stream"]["src"]
        assert "text is empty" in seen["badInput"]
        assert seen["uploaded"] is True
        assert (server.settings.voices_path / "Firefox Voice").is_dir()
