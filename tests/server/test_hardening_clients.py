"""Issue 14 (hardening), the client and error items, each over real HTTP.

Memory (3, 4), clear 4xx/503 answers (10), AllTalk V1 and V2 clients (11), AllTalk's text
filter (12), OpenAI streaming by default (13), previews for every voice (14), engines
that cannot run left out of model lists (15), doubled slashes and clients that leave
(16), form fields in the OpenAPI schema (17), and no symbolic links out of /sample (8).
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import socket
import struct
import threading
import time
import tracemalloc
from urllib.parse import urljoin

import httpx
import numpy as np
import pytest
import soundfile as sf

from lowvox.engines.base import EngineCapabilities
from lowvox.errors import EngineUnavailable
from tests.server.srv_audio import decode
from tests.server.srv_fixtures import (
    CHUNK_SECONDS,
    FAKE_RATE,
    FakeFactory,
    fake_chunks,
    live_server,
    st_form,
    wait_for,
)

PAGE = "http://localhost:8000"  # SillyTavern's page, as its browser requests name it
TGWUI_PAGE = "http://127.0.0.1:7860/"  # text-generation-webui's chat page
TGWUI_HEADERS = {"User-Agent": "python-requests/2.32.3"}  # its extension runs in Python


def wav_bytes(seconds: float, rate: int = 22_050, channels: int = 1, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tones = [0.3 * np.sin(2 * np.pi * (220 + 55 * c) * t) for c in range(channels)]
    buf = io.BytesIO()
    sf.write(buf, np.stack(tones, axis=1), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def raw_wav(bits: int, channels: int = 1, rate: int = 24_000, frames: int = 48_000) -> bytes:
    """A WAV whose header says what we like, whatever its data."""
    data = b"\x01\x02" * frames
    block = channels * bits // 8
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, channels, rate,
        rate * block, block, bits, b"data", len(data),
    )  # fmt: skip
    return header + data


def upload(c: httpx.Client, name: str, *clips: bytes) -> httpx.Response:
    files = [("files", (f"clip{i}.wav", data, "audio/wav")) for i, data in enumerate(clips)]
    return c.post("/api/library/voices", data={"name": name}, files=files)


def tgwui_form(text: str, voice: str, **changes: str) -> dict[str, str]:
    """What text-generation-webui's AllTalk extension posts to /api/tts-generate, in its
    order and with its values for a chat reply (`output_modifier` → `send_and_generate`),
    the same in its default and legacy modes."""
    return {
        "text_input": text,
        "text_filtering": "html",
        "character_voice_gen": voice,
        "rvccharacter_voice_gen": "Disabled",
        "rvccharacter_pitch": "0",
        "narrator_enabled": "false",
        "narrator_voice_gen": voice,
        "rvcnarrator_voice_gen": "Disabled",
        "rvcnarrator_pitch": "0",
        "text_not_inside": "narrator",
        "language": "en",
        "output_file_name": "Assistant",
        "output_file_timestamp": "true",
        "autoplay": "false",
        "autoplay_volume": "0.8",
        "speed": "1",
        "pitch": "0",
        "temperature": "0.75",
        "repetition_penalty": "10",
        **changes,
    }


def tgwui_reply(c: httpx.Client, text: str, **changes: str) -> dict:
    """The extension's requests: "Refresh settings & voices" (voices, RVC voices, current
    settings, in that order), then one chat reply spoken with the first voice."""
    voices = c.get("/api/voices").json()["voices"]
    assert c.get("/api/rvcvoices").status_code == 200
    assert c.get("/api/currentsettings").status_code == 200
    r = c.post("/api/tts-generate", data=tgwui_form(text, voices[0], **changes))
    assert r.status_code == 200, r.text
    return r.json()


def plays(url: str) -> bool:
    r = httpx.get(url)
    return r.status_code == 200 and r.content[:4] == b"RIFF"


class SamplingFactory(FakeFactory):
    """Engines that take sampling options (seed, temperature), as XTTS does."""

    def __call__(self, name, settings):
        engine = super().__call__(name, settings)
        engine.capabilities = EngineCapabilities(streaming=True, temperature=True)
        return engine


class NoXttsFactory(FakeFactory):
    """XTTS with no model installed: constructing it fails, as the real one does."""

    def __call__(self, name, settings):
        if name == "xtts":
            raise EngineUnavailable("no XTTS model in /nowhere (missing model.pth)")
        return super().__call__(name, settings)


# -- 3. Whole responses are not held in memory ----------------------------------------------


def test_whole_file_answer_has_exact_sizes(client):
    text = "one two three four five"
    r = client.post(
        "/v1/audio/speech",
        json={"input": text, "voice": "alpha", "response_format": "wav", "stream": False},
    )
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content) == 44 + 2 * 5 * 2400
    riff, data = (
        struct.unpack_from("<I", r.content, 4)[0],
        struct.unpack_from("<I", r.content, 40)[0],
    )
    assert (riff, data) == (len(r.content) - 8, len(r.content) - 44)
    samples, rate, _ = decode(r.content, "wav")
    assert len(samples) == fake_chunks(text) * int(CHUNK_SECONDS * rate)


@pytest.mark.slow
def test_idle_readers_hold_no_audio_in_memory(tmp_path):
    """Twelve clients that send a long request and never read the answer (six streamed,
    six whole): the engine still finishes every job, and what the server holds for them
    is about the in-memory part of each response, not their 40 s of audio each."""
    words = 400  # 40 s of audio: 1.9 MB as WAV, 3.8 MB as float32, per client
    limit = 64 * 1024
    with live_server(tmp_path, FakeFactory(chunk_delay=0), response_memory_bytes=limit) as s:
        with s.client() as c:  # everything imported and warmed before measuring
            c.post("/v1/audio/speech", json={"input": "warm up", "voice": "alpha"})
        texts = [f"idle{i} " + "word " * (words - 1) for i in range(12)]
        tracemalloc.start()
        socks = []
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i, text in enumerate(texts):
                body = json.dumps(
                    {"input": text, "voice": "beta", "response_format": "wav", "stream": i % 2 == 0}
                ).encode()
                sock = socket.create_connection(("127.0.0.1", s.port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(
                    b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    % len(body)
                    + body
                )
                socks.append(sock)
            # Nobody reads, yet every job runs to its end: nothing waits on the readers.
            assert wait_for(lambda: all(t in s.engine.finished_jobs for t in texts), 60)
            time.sleep(0.5)  # the last answers reach their (full) sockets
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            for sock in socks:
                sock.close()
    # Held whole, the audio alone would be > 12 x 1.9 MB; spooled, it is on disk.
    assert held < 8 * 1024 * 1024, f"{held / 2**20:.1f} MiB held for 12 idle clients"


# -- 4. Voice uploads: checked from the header, decoded in blocks, stored small --------------


def test_multichannel_high_rate_upload_is_cheap_and_stored_small(tmp_path):
    """The 8-channel 192 kHz upload that cost +587 MB: its decoding and storing (the
    library's part, measured from the moment the route hands the bytes over) stay within
    a few MB, and it is stored mono at 48 kHz."""
    data = wav_bytes(6, rate=192_000, channels=8, fmt="FLAC")
    peaks: list[int] = []
    with live_server(tmp_path) as s, s.client() as c:
        assert upload(c, "warm up", wav_bytes(3)).status_code == 201  # first-use imports
        add = s.state.voices.add

        def measured_add(name, uploads):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            try:
                return add(name, uploads)
            finally:
                peaks.append(tracemalloc.get_traced_memory()[1] - before)

        s.state.voices.add = measured_add
        tracemalloc.start()
        try:
            r = upload(c, "big flac", data)
        finally:
            tracemalloc.stop()
        assert r.status_code == 201, r.text
        (clip,) = (s.settings.voices_path / "big flac").glob("*.wav")
        info = sf.info(str(clip))
    # Stored as mono at 48 kHz: 6 s are 576 kB, not the 18 MB of 8 x 192 kHz.
    assert (info.channels, info.samplerate) == (1, 48_000)
    assert abs(info.duration - 6) < 0.01
    assert os.path.getsize(clip) == 44 + 2 * 6 * 48_000
    # Decoded whole as float32, 8 channels at 192 kHz are 37 MB; in blocks, a few.
    assert peaks and peaks[0] < 8 * 1024 * 1024, f"{peaks[0] / 2**20:.1f} MiB at peak"


@pytest.mark.parametrize(
    ("clip", "words"),
    [
        (raw_wav(bits=0), "not a readable audio file"),
        (raw_wav(bits=16, channels=64), "64 channels"),
        (raw_wav(bits=16, rate=400_000), "sample rate"),
        (wav_bytes(3, rate=22_050, channels=12), "12 channels"),
    ],
)
def test_upload_header_problems_are_named(client, clip, words):
    r = upload(client, "odd header", clip)
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]


def test_voice_and_library_size_limits(tmp_path):
    limits = {"max_voice_bytes": 500_000, "max_library_bytes": 700_000}
    with live_server(tmp_path, **limits) as s, s.client() as c:
        r = upload(c, "too long", wav_bytes(6, rate=48_000))  # 576 kB stored
        assert r.status_code == 413
        assert "per voice" in r.json()["detail"]
        # 44.1 kHz is kept as it is (under 48 kHz): 4 s are 353 kB.
        assert upload(c, "first", wav_bytes(4, rate=44_100)).status_code == 201
        r = upload(c, "second", wav_bytes(4, rate=44_100))
        assert r.status_code == 413
        assert "library is full" in r.json()["detail"]
        assert [v["name"] for v in c.get("/api/library/voices").json()["voices"]] == ["first"]


# -- 10. What used to be a 500 ----------------------------------------------------------------


DEEP = b"[" * 50_000 + b"]" * 50_000


@pytest.mark.parametrize(
    "path",
    ["/v1/audio/speech", "/api/tts-generate", "/api/tts-generate-streaming", "/tts_to_audio/",
     "/tts_to_file", "/set_tts_settings", "/api/previewvoice/"],
)  # fmt: skip
def test_json_nested_50000_deep_is_a_400(client, path):
    r = client.post(path, content=DEEP, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert "nested too deeply" in r.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/jobs"), ("PATCH", "/api/library/voices/anyone"),
     ("POST", "/api/library/voices/anyone/rename")],
)  # fmt: skip
def test_json_nested_50000_deep_is_a_400_where_routes_read_their_body(client, method, path):
    r = client.request(method, path, content=DEEP, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["detail"]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_sent_as_another_type_is_named(client, ctype):
    """`curl -d '{...}'` without `-H` sends form-urlencoded: say what is missing, rather
    than pydantic's "Input should be a valid dictionary or object"."""
    headers = {"Content-Type": ctype} if ctype else {}
    r = client.post("/v1/audio/speech", content=b'{"input": "hi"}', headers=headers)
    assert r.status_code == 400  # OpenAI's status for a body it cannot read
    assert "Content-Type: application/json" in r.json()["detail"]
    assert r.json()["error"]["param"] == "body"
    r = client.post("/v1/audio/speech", json=["hi"])
    assert r.status_code == 400
    assert "must be a JSON object" in r.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/tts-generate-streaming", {"text": "hi", "format": 5}, "unsupported audio format"),
        ("/api/tts-generate-streaming", {"text": "hi", "format": ["wav"]}, "format"),
        ("/api/tts-generate-streaming", {"text": "hi", "engine": ["espeak"]}, "engine"),
        ("/api/tts-generate-streaming", {"text": "hi", "engine": 7}, "engine"),
        ("/api/tts-generate-streaming", {"text": {"a": 1}}, "text must be a string"),
        ("/api/tts-generate-streaming", {"text": "hi", "speed": 10**400}, "speed"),
        ("/api/tts-generate", {"text_input": "hi", "text_filtering": {"a": 1}}, "text_filtering"),
        ("/api/tts-generate", {"text_input": "hi", "text_filtering": 3}, "text filter"),
        ("/api/tts-generate", {"text_input": ["hi"]}, "text_input"),
        ("/tts_to_audio/", {"text": "hi", "speaker_wav": {"x": 1}}, "speaker_wav"),
        ("/tts_to_audio/", {"text": "hi", "language": [1]}, "language"),
        ("/v1/audio/speech", {"input": "hi", "voice": {"id": 5}}, "voice"),
        ("/v1/audio/speech", {"input": "hi", "options": {"seed": -1}}, "seed"),
    ],
)
def test_wrongly_typed_fields_are_4xx(client, path, body, words):
    r = client.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text
    assert words in r.text


def test_seed_beyond_64_bits_is_a_400(tmp_path):
    with live_server(tmp_path, SamplingFactory()) as s, s.client() as c:
        for seed in (2**63, 2**64 + 5, 1.5, "7"):
            r = c.post(
                "/v1/audio/speech",
                json={"input": "hi", "voice": "alpha", "options": {"seed": seed}},
            )
            assert r.status_code == 400, (seed, r.text)
            assert "seed must be an integer in 0..2**63-1" in r.json()["detail"]
        ok = {"input": "hi", "voice": "alpha", "options": {"seed": 2**63 - 1}}
        assert c.post("/v1/audio/speech", json=ok).status_code == 200


@pytest.mark.parametrize("how", ["reload", "runtime"])
def test_restart_under_load_is_a_503_with_retry_after(tmp_path, how):
    with live_server(tmp_path) as s:
        engine = s.engine
        engine.gate.clear()
        answers: dict[str, httpx.Response] = {}

        def send(name: str) -> None:
            with s.client() as c:
                body = {"input": f"{name} is speaking now", "voice": "alpha", "stream": False}
                answers[name] = c.post("/v1/audio/speech", json=body)

        senders = [threading.Thread(target=send, args=(n,)) for n in ("running", "queued")]
        senders[0].start()
        assert wait_for(lambda: engine.active == 1)
        senders[1].start()
        assert wait_for(lambda: s.state.hub.loaded()["espeak"].scheduler.queued == 1)

        def restart() -> None:
            with s.client() as c:
                if how == "reload":
                    answers["restart"] = c.post("/api/reload?tts_method=espeak")
                else:
                    answers["restart"] = c.post("/api/runtime", json={"precision": "fp32"})

        restarter = threading.Thread(target=restart)
        restarter.start()
        for t in senders:
            t.join(30)
        engine.gate.set()  # the new engine's warm-up needs the gate open
        restarter.join(30)
        for name in ("running", "queued"):
            r = answers[name]
            assert r.status_code == 503, (name, r.text)
            assert int(r.headers["retry-after"]) >= 1
            assert "restarting" in r.json()["detail"]
        assert answers["restart"].status_code == 200
        with s.client() as c:  # and the restarted engine speaks
            assert (
                c.post("/v1/audio/speech", json={"input": "back", "voice": "beta"}).status_code
                == 200
            )


def test_cancelling_a_queued_job_answers_at_once(server, client):
    engine = server.engine
    engine.gate.clear()
    answers: dict[str, httpx.Response] = {}

    def send(name: str) -> None:
        with server.client() as c:
            answers[name] = c.post(
                "/v1/audio/speech",
                json={"input": f"{name} speaks for a while", "voice": "gamma", "stream": False},
                headers={"X-Request-Id": f"q-{name}"},
            )

    running = threading.Thread(target=send, args=("first",))
    running.start()
    assert wait_for(lambda: engine.active == 1)
    queued = threading.Thread(target=send, args=("second",))
    queued.start()
    assert wait_for(lambda: server.state.hub.loaded()["espeak"].scheduler.queued == 1)
    assert client.post("/api/cancel/q-second").json() == {"cancelled": 1}
    queued.join(10)
    # Answered while the job ahead of it still holds the engine.
    assert not queued.is_alive() and engine.active == 1
    assert answers["second"].status_code == 499
    engine.gate.set()
    running.join(30)
    assert answers["first"].status_code == 200


# -- 11. AllTalk V1 and V2 clients, each answered in its form ------------------------------


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("pages"), cors_origins=[PAGE]) as s:
        yield s


def test_sillytavern_v2_mode_gets_a_relative_url(page_server):
    headers = {"Origin": PAGE, "User-Agent": "browser-v2"}
    with page_server.client(headers=headers) as c:
        c.get("/api/currentsettings")
        c.get("/api/rvcvoices")  # only V2 servers have RVC: only V2 mode asks
        c.get("/api/voices")
        data = c.post("/api/tts-generate", data=st_form("hello there", "alpha")).json()
        assert data["output_file_url"].startswith("/audio/st_output_")
        # V2 puts its endpoint in front.
        assert c.get(page_server.url + data["output_file_url"]).status_code == 200


def test_sillytavern_v1_mode_gets_an_absolute_url(page_server):
    headers = {"Origin": PAGE, "User-Agent": "browser-v1"}
    with page_server.client(headers=headers) as c:
        c.get("/api/ready")
        c.get("/api/currentsettings")
        c.get("/api/voices")  # no /api/rvcvoices: a V1 client
        data = c.post("/api/tts-generate", data=st_form("hello there", "beta")).json()
        url = data["output_file_url"]
        assert url.startswith(page_server.url + "/audio/st_output_")
        assert data["output_cache_url"].startswith(page_server.url + "/audiocache/")
        assert httpx.get(url).status_code == 200  # used as it is
        r = c.post("/api/previewvoice/", data={"voice": "beta"})
        assert r.json()["output_file_url"].startswith(page_server.url + "/audio/preview_")


def test_sillytavern_1_12_names_voices_after_files(page_server):
    # Its only mode was V1: voices and the narrator go out as `<name>.wav`.
    with page_server.client(headers={"User-Agent": "old-sillytavern"}) as c:
        form = st_form("old client", "gamma.wav", narrator_voice_gen="Please set a voice.wav")
        url = c.post("/api/tts-generate", data=form).json()["output_file_url"]
        assert url.startswith(page_server.url + "/audio/")
        assert httpx.get(url).status_code == 200
        preview = c.post("/api/previewvoice/", data={"voice": "gamma.wav"}).json()
        assert preview["output_file_url"].startswith(page_server.url + "/audio/preview_")


def test_text_generation_webui_plays_in_default_and_legacy_modes(server):
    # Both modes send the same requests; they differ only in what they do with the URL
    # (its script.py, send_and_generate): default mode writes server URL + output_file_url
    # into the chat page, legacy mode output_file_url as it is, which the browser resolves
    # against the chat page. `//host:port/audio/...` works both ways.
    with httpx.Client(base_url=server.url, headers=TGWUI_HEADERS) as c:
        data = tgwui_reply(c, "Hello from the chat.")
    url = data["output_file_url"]
    assert url.startswith("//127.0.0.1:") and "/audio/Assistant_" in url
    default_mode, legacy_mode = server.url + url, urljoin(TGWUI_PAGE, url)
    assert legacy_mode.startswith(server.url + "/audio/Assistant_")
    assert plays(default_mode) and plays(legacy_mode)
    assert plays(server.url + data["output_cache_url"])
    assert plays(urljoin(TGWUI_PAGE, data["output_cache_url"]))
    # Its voice preview: the same call with other values, played with `?<time>` added.
    with httpx.Client(base_url=server.url, headers=TGWUI_HEADERS) as c:
        preview = tgwui_reply(
            c,
            "A preview sentence.",
            text_filtering="standard",
            output_file_name="previewvoice",
            output_file_timestamp="false",
        )
    url = preview["output_file_url"] + "?1733480000"
    assert plays(server.url + url) and plays(urljoin(TGWUI_PAGE, url))


@pytest.mark.slow
def test_text_generation_webui_urls_play_in_chromium(server):
    # The chat page, on its own origin, as each mode writes it: <audio src=...>.
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.server.test_web_page import CHROMIUM, LAUNCH_ARGS

    if CHROMIUM is None:
        pytest.skip("no chromium binary")
    with httpx.Client(base_url=server.url, headers=TGWUI_HEADERS) as c:
        url = tgwui_reply(c, "Hello from the chat.")["output_file_url"]
    html = f'<audio id="default" src="{server.url}{url}"></audio><audio id="legacy" src="{url}">'

    class ChatPage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html.encode())

        def log_message(self, *args) -> None:
            pass

    # A real server: Playwright's request interception makes media requests fail.
    chat = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ChatPage)
    threading.Thread(target=chat.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{chat.server_port}/chat")
                for mode in ("default", "legacy"):
                    audio = f"document.getElementById('{mode}')"
                    page.wait_for_function(f"{audio}.readyState >= 1 || {audio}.error !== null")
                    assert page.evaluate(f"{audio}.error") is None, mode
                    assert page.evaluate(f"{audio}.duration") > 0, mode
            finally:
                browser.close()
    finally:
        chat.shutdown()
        chat.server_close()


def test_only_this_servers_address_prefixes_audio(server):
    with httpx.Client(base_url=server.url, headers=TGWUI_HEADERS) as c:
        name = tgwui_reply(c, "Just one file.")["output_file_url"].rsplit("/", 1)[1]
    assert plays(f"{server.url}/audio/{name}")
    for prefix in ("//example.com", "//127.0.0.1:1", "/v1", "/api"):
        assert httpx.get(f"{server.url}{prefix}/audio/{name}").status_code == 404, prefix


def test_text_generation_webui_behind_a_public_url(tmp_path):
    # A reverse proxy serves lowvox under /tts: the extension's server URL is the public one.
    with live_server(tmp_path, public_url="https://tts.example.org/tts") as s:
        with httpx.Client(base_url=s.url, headers=TGWUI_HEADERS) as c:
            url = tgwui_reply(c, "Through the proxy.")["output_file_url"]
        assert url.startswith("//tts.example.org/tts/audio/Assistant_")
        legacy = urljoin("https://chat.example.org/", url)
        assert legacy.startswith("https://tts.example.org/tts/audio/")
        # Default mode asks the proxy for /tts//tts.example.org/tts/audio/...; the proxy
        # strips /tts and sends the rest on, with the public Host.
        r = httpx.get(s.url + url, headers={"Host": "tts.example.org"})
        assert r.status_code == 200 and r.content[:4] == b"RIFF"


def test_scripts_get_relative_urls_and_settings_can_force_either(tmp_path):
    with live_server(tmp_path) as s, s.client() as c:
        c.get("/api/currentsettings")  # a script: no Origin, so no guess from its calls
        url = c.post("/api/tts-generate", data=st_form("a script", "alpha")).json()
        assert url["output_file_url"].startswith("/audio/")
    with live_server(tmp_path, alltalk_url_style="absolute") as s, s.client() as c:
        url = c.post("/api/tts-generate", data=st_form("forced", "alpha")).json()
        assert url["output_file_url"].startswith(s.url + "/audio/")
    with live_server(tmp_path, alltalk_url_style="relative") as s, s.client() as c:
        url = c.post("/api/tts-generate", data=st_form("forced", "alpha.wav")).json()
        assert url["output_file_url"].startswith("/audio/")


# -- 12. AllTalk's standard filter --------------------------------------------------------


def test_standard_filter_drops_what_alltalk_drops(server, client):
    # SillyTavern's AllTalk provider turns on "pass asterisks": the marks reach the server.
    text = "*waves* Hello ~there~ (laughs) [aside] {x} <y> _under_ `code` # Title | done"
    r = client.post("/api/tts-generate", data=st_form(text, "alpha"))
    assert r.status_code == 200
    spoken = server.engine.finished_jobs[-1]
    assert spoken == "waves Hello there laughs aside x y under code Title done"


# -- 13. OpenAI speech streams by default ----------------------------------------------------


def test_openai_speech_streams_without_being_asked(server, client):
    engine = server.engine
    engine.gate.clear()  # the last chunk waits: the first ones must arrive before it
    text = "streamed by default to home assistant"
    try:
        with client.stream(
            "POST",
            "/v1/audio/speech",
            json={"input": text, "voice": "alpha", "response_format": "mp3"},
        ) as r:
            assert r.status_code == 200
            assert "content-length" not in r.headers
            assert r.headers["x-accel-buffering"] == "no"
            chunks = r.iter_raw()
            assert next(chunks)  # bytes while the engine is still speaking
            assert text not in engine.finished_jobs
            engine.gate.set()
            rest = b"".join(chunks)
    finally:
        engine.gate.set()
    assert rest


def test_openai_stream_false_is_a_whole_file(client):
    r = client.post(
        "/v1/audio/speech",
        json={
            "input": "whole please",
            "voice": "alpha",
            "response_format": "flac",
            "stream": False,
        },
    )
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content)
    samples, rate, _ = decode(r.content, "flac")
    assert len(samples) == 2 * int(CHUNK_SECONDS * rate)


# -- 14. A preview for every voice ---------------------------------------------------------


def test_every_speaker_has_a_preview_made_once(tmp_path):
    with live_server(tmp_path) as s, s.client() as c:
        speakers = c.get("/speakers").json()
        assert speakers and all(sp["preview_url"] for sp in speakers)
        url = next(sp["preview_url"] for sp in speakers if sp["voice_id"] == "beta")
        assert url == f"{s.url}/sample/beta.wav"
        spoken = len(s.engine.finished_jobs)
        first = httpx.get(url)
        assert first.status_code == 200 and first.headers["content-type"] == "audio/wav"
        samples, rate, _ = decode(first.content, "wav")
        assert rate == FAKE_RATE and len(samples) > 0
        assert len(s.engine.finished_jobs) == spoken + 1
        assert httpx.get(url).content == first.content  # from the cache: not spoken again
        assert len(s.engine.finished_jobs) == spoken + 1
        assert list((s.settings.cache_path / "previews").rglob("*.wav"))
        assert c.get("/sample/nobody.wav").status_code == 404


# -- 15. Engines that cannot run are not offered ---------------------------------------------


def test_engines_without_their_model_are_not_offered(tmp_path):
    with live_server(tmp_path, NoXttsFactory()) as s, s.client() as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert "espeak" in ids and "xtts" not in ids and "tts-1" in ids
        ids = [m["id"] for m in c.get("/v1/audio/models").json()["models"]]
        assert "xtts" not in ids
        settings = c.get("/api/currentsettings").json()
        assert settings["engines_available"] == ["espeak"]
        assert [m["name"] for m in settings["models_available"]] == ["espeak"]
        assert settings["multimodel_capable"] is False
        # Asked for by name anyway, it is a 503 that says why.
        r = c.post("/v1/audio/speech", json={"input": "hi", "model": "xtts"})
        assert r.status_code == 503 and "no XTTS model" in r.json()["detail"]


# -- 16. Base URLs ending in a slash; clients that leave -------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1//audio/speech", {"json": {"input": "slash", "voice": "alpha"}}),
        ("GET", "//v1/models", {}),
        ("POST", "//api/tts-generate", {"data": {"text_input": "slash", "character_voice_gen": "alpha"}}),
        ("POST", "//tts_to_audio/", {"json": {"text": "slash", "speaker_wav": "alpha"}}),
        ("GET", "//speakers", {}),
    ],
)  # fmt: skip
def test_doubled_slashes_reach_their_route(server, client, method, path, body):
    r = client.request(method, server.url + path, **body)  # whole: no URL joining
    assert r.status_code == 200, r.text


def _records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("lowvox", "uvicorn"))]


@pytest.mark.slow
def test_a_client_leaving_while_waiting_is_one_log_line(tmp_path, caplog):
    # Each step of this engine takes 1.5 s (a long prefill, say): the job ends well after
    # its client has gone, which used to log "client left" every 0.25 s meanwhile.
    caplog.set_level(logging.INFO)
    with live_server(tmp_path, FakeFactory(chunk_delay=1.5)) as s:
        engine = s.engine
        text = "nobody will wait for this one"
        body = json.dumps({"input": text, "voice": "beta", "stream": False}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        assert wait_for(lambda: engine.active == 1)
        caplog.clear()
        sock.close()
        assert wait_for(lambda: text in engine.cancelled_jobs)
        time.sleep(0.3)
    lines = [r.getMessage() for r in _records(caplog)]
    assert len([m for m in lines if "client left" in m]) == 1, lines
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in _records(caplog)), lines


HALF_JSON = ("application/json", b'{"text": "hal')
HALF_FORM = ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="na')


@pytest.mark.parametrize(
    ("path", "half"),
    [
        ("/tts_to_audio/", HALF_JSON),  # the AllTalk/xtts-api-server field reader
        ("/v1/audio/speech", HALF_JSON),  # a declared (pydantic) body
        ("/api/jobs", HALF_JSON),  # routes reading their own body
        ("/api/library/voices", HALF_FORM),
    ],
)
def test_a_client_leaving_mid_body_is_one_log_line(server, caplog, path, half):
    caplog.set_level(logging.INFO)
    ctype, body = half
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n".encode()
        + b"Content-Length: 1000\r\n\r\n"
        + body
    )
    time.sleep(0.3)
    sock.close()
    assert wait_for(lambda: any("client left" in r.getMessage() for r in _records(caplog)))
    time.sleep(0.3)
    lines = [r.getMessage() for r in _records(caplog)]
    assert len([m for m in lines if "client left" in m]) == 1, lines
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in _records(caplog)), lines


# -- 17. AllTalk and xtts-api-server fields in the OpenAPI schema ----------------------------


def test_form_fields_are_in_the_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]

    def body_fields(path: str, kind: str) -> set[str]:
        content = paths[path]["post"]["requestBody"]["content"][kind]
        return set(content["schema"]["properties"])

    def query_fields(path: str) -> set[str]:
        return {p["name"] for p in paths[path]["get"]["parameters"] if p["in"] == "query"}

    generate = body_fields("/api/tts-generate", "application/x-www-form-urlencoded")
    assert {"text_input", "character_voice_gen", "text_filtering", "narrator_enabled"} <= generate
    assert {"text", "voice"} <= body_fields("/api/tts-generate-streaming", "application/json")
    assert {"text", "voice", "language", "output_file"} <= query_fields(
        "/api/tts-generate-streaming"
    )
    assert {"voice"} <= body_fields("/api/previewvoice/", "application/x-www-form-urlencoded")
    assert {"text", "speaker_wav", "language"} <= body_fields("/tts_to_audio/", "application/json")
    assert {"file_name_or_path"} <= body_fields("/tts_to_file", "application/json")
    assert {"temperature", "top_k"} <= body_fields("/set_tts_settings", "application/json")
    assert {"text", "speaker_wav", "language"} <= query_fields("/tts_stream")


# -- 8. /sample serves no file a symbolic link leads to ---------------------------------------


def test_sample_refuses_a_symlinked_clip(tmp_path):
    outside = tmp_path / "secret.wav"
    outside.write_bytes(wav_bytes(3))
    with live_server(tmp_path / "home") as s, s.client() as c:
        folder = s.settings.voices_path / "linked"
        folder.mkdir(parents=True)
        (folder / "clip_01.wav").symlink_to(outside)
        r = c.get("/sample/linked.wav")
        assert r.status_code == 404  # a folder of links is no voice
        assert r.content != outside.read_bytes()
