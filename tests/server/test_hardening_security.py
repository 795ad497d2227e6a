"""Hardening over real HTTP: who may call the server (Host, Origin, key, session cookie,
trusted networks), how much and how slowly a client may send, symbolic links in the voice
library, and the leftovers of a crash.

The slow-client and access-log tests run the server the way `lowvox serve` does
(`server_config`), since those defences live in uvicorn's configuration.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import time

import numpy as np
import pytest
import soundfile as sf

from lowvox.cli import main as cli_main
from lowvox.errors import EngineUnavailable, LowvoxError
from lowvox.server.app import body_limit
from lowvox.server.security import redact_api_keys
from lowvox.settings import Settings, load_settings
from tests.server.srv_fixtures import FakeFactory, live_server, make_settings, production_server

EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("hard-keyed"), api_key="s3cret") as s:
        yield s


def raw(server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, within: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if it does not
    close it within `within` seconds."""
    sock.settimeout(within)
    chunks = []
    try:
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"the server kept the connection open: {chunks!r}") from None
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        sock.close()
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b"\r\n", 1)[0].split()[1])


# -- 1. Cross-origin pages and the Host header ------------------------------------------------


def test_pages_elsewhere_cannot_use_the_server_by_default(server):
    with server.client() as c:
        r = c.get("/api/recent", headers={"Origin": EVIL})
        assert r.status_code == 403
        assert "cors_origins" in r.json()["detail"]
        assert "access-control-allow-origin" not in r.headers
        # What CORS would let through unread still does nothing: a form post, a preflight.
        r = c.post("/api/stop", data={"x": "1"}, headers={"Origin": EVIL})
        assert r.status_code == 403
        r = c.post(
            "/api/runtime",
            content=b'{"device": "cpu"}',
            headers={"Origin": EVIL, "Content-Type": "text/plain"},
        )
        assert r.status_code == 403
        r = c.options(
            "/api/library/voices/alpha",
            headers={"Origin": EVIL, "Access-Control-Request-Method": "DELETE"},
        )
        assert r.status_code == 403
        assert "access-control-allow-origin" not in r.headers
        assert c.get("/api/recent", headers={"Origin": "null"}).status_code == 403
        # The server's own page (same origin) and clients without an Origin are served.
        assert c.get("/api/recent", headers={"Origin": server.url}).status_code == 200
        assert c.get("/api/recent").status_code == 200


def test_a_listed_origin_works_for_sillytavern(tmp_path):
    page = "http://localhost:8000"
    with live_server(tmp_path, cors_origins=[page + "/"]) as s, s.client() as c:
        r = c.options(
            "/tts_to_audio/",
            headers={"Origin": page, "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == page
        r = c.get("/speakers", headers={"Origin": page})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == page
        assert c.get("/speakers", headers={"Origin": EVIL}).status_code == 403


def test_an_origin_is_compared_as_browsers_send_it(tmp_path):
    """Browsers leave the scheme's default port out of `Origin`: a page configured as
    `http://webui.lan:80` sends `http://webui.lan`. Anything but scheme, host and port is
    refused when the settings load."""
    origins = ["HTTP://WebUI.lan:80/", "https://ui.lan:443", "http://[::1]:80", "http://b:3000"]
    assert Settings(cors_origins=origins).cors_origins == [
        "http://webui.lan",
        "https://ui.lan",
        "http://[::1]",
        "http://b:3000",
    ]
    for bad in ["http://user@webui.lan", "http://webui.lan:port", "http://h/x", "http://h#top"]:
        with pytest.raises(ValueError, match="is not an origin"):
            Settings(cors_origins=[bad])
    with live_server(tmp_path, cors_origins=["http://webui.lan:80"]) as s, s.client() as c:
        r = c.get("/speakers", headers={"Origin": "http://webui.lan"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://webui.lan"


def test_any_origin_needs_a_key(tmp_path):
    with pytest.raises(ValueError, match="api_key"):
        Settings(cors_origins=["*"])
    with pytest.raises(LowvoxError, match='cors_origins "\\*"'):
        load_settings(cors_origins=["*"])
    with live_server(tmp_path, cors_origins=["*"], api_key="k") as s, s.client() as c:
        r = c.get("/api/ready", headers={"Origin": EVIL, "X-API-Key": "k"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "*"
        assert c.get("/api/ready", headers={"Origin": EVIL}).status_code == 401


def test_a_wildcard_inside_a_name_is_refused_with_the_form_that_works():
    # Both were taken and then matched nothing: every request by those names was refused
    # while the setting looked right.
    with pytest.raises(LowvoxError, match="'.home.lan' allows"):
        load_settings(allowed_hosts=["*.home.lan"])
    with pytest.raises(LowvoxError, match="list each origin"):
        load_settings(cors_origins=["http://*.home.lan:8000"])
    assert load_settings(allowed_hosts=["*"]).allowed_hosts == ["*"]


def test_origins_from_the_environment_and_the_command_line(monkeypatch, capsys):
    monkeypatch.setenv("LOWVOX_CORS_ORIGINS", "http://localhost:8000, https://webui.lan")
    assert load_settings().cors_origins == ["http://localhost:8000", "https://webui.lan"]
    monkeypatch.setenv("LOWVOX_CORS_ORIGINS", '["http://localhost:8000"]')
    assert load_settings().cors_origins == ["http://localhost:8000"]
    monkeypatch.delenv("LOWVOX_CORS_ORIGINS")

    seen = {}
    monkeypatch.setattr("lowvox.server.app.serve", lambda settings: seen.update(s=settings))
    argv = ["serve", "--cors-origin", "http://localhost:8000", "--cors-origin", "http://b:3000"]
    argv += ["--allowed-host", "lowvox", "--trusted-network", "192.168.1.0/24"]
    assert cli_main(argv) == 0
    assert seen["s"].cors_origins == ["http://localhost:8000", "http://b:3000"]
    assert seen["s"].allowed_hosts == ["lowvox"]
    assert seen["s"].trusted_networks == ["192.168.1.0/24"]
    # "*" without a key stops the CLI with the reason.
    assert cli_main(["serve", "--cors-origin", "*"]) == 2
    assert "set api_key" in capsys.readouterr().err


def test_a_foreign_host_header_is_refused(server):
    """DNS rebinding: a page at evil.example, its name pointed at 127.0.0.1, sends its own
    name as the Host."""
    with server.client() as c:
        r = c.get("/api/recent", headers={"Host": f"evil.example:{server.port}"})
        assert r.status_code == 400
        assert "allowed_hosts" in r.json()["detail"]
        for host in ("localhost", "127.0.0.1", "[::1]", "192.168.1.5", "host.docker.internal"):
            r = c.get("/api/ready", headers={"Host": f"{host}:{server.port}"})
            assert r.status_code == 200, host


def test_two_host_headers_are_refused(server):
    # The check read the last Host and the routes the first (the page's own URLs): a
    # request must have one (RFC 9112, 3.2).
    for hosts in ((b"evil.example", b"127.0.0.1"), (b"127.0.0.1", b"127.0.0.1")):
        head = b"".join(b"Host: " + h + b"\r\n" for h in hosts)
        sock = raw(server, b"GET /speakers HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n")
        answer = read_until_closed(sock)
        assert status_of(answer) == 400 and b"one Host header" in answer


def test_allowed_hosts_and_public_url_open_more_names(tmp_path):
    with (
        live_server(
            tmp_path, allowed_hosts=["lowvox", ".home.lan"], public_url="https://tts.example.org"
        ) as s,
        s.client() as c,
    ):
        for host in ("lowvox:7851", "tts.example.org", "box.home.lan:7851"):
            assert c.get("/api/ready", headers={"Host": host}).status_code == 200, host
        assert c.get("/api/ready", headers={"Host": "other.lan"}).status_code == 400
        # A page behind the TLS proxy at public_url posts as its own origin.
        r = c.post(
            "/api/stop",
            headers={"Host": "tts.example.org", "Origin": "https://tts.example.org"},
        )
        assert r.status_code == 200


# -- 2. Body sizes ----------------------------------------------------------------------------


def test_a_text_route_refuses_a_large_body_before_reading_it(server):
    limit = body_limit(server.settings)
    assert limit < 1024 * 1024
    sock = raw(
        server,
        b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n",
    )
    answer = read_until_closed(sock)
    assert status_of(answer) == 413
    assert f"limit of {limit} bytes".encode() in answer


def test_a_text_route_refuses_a_large_chunked_body_while_it_arrives(server):
    limit = body_limit(server.settings)
    sock = raw(
        server,
        b"POST /api/tts-generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    # Just over the limit, so that everything sent is read before the answer.
    piece = b"a" * 16384
    for _ in range(limit // len(piece) + 1):
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    answer = read_until_closed(sock)
    assert status_of(answer) == 413
    assert b"over the limit of" in answer


def test_upload_routes_keep_their_large_limit(server):
    big = b"\x00" * (1024 * 1024)  # over the text limit, under the upload limits
    with server.client() as c:
        r = c.post("/api/library/voices", data={"name": "Big"}, files={"files": ("big.wav", big)})
        assert r.status_code == 400  # read, and refused as audio, not for its size
        assert "readable audio" in r.json()["detail"]
        r = c.post("/api/jobs", files={"file": ("book.pdf", b"%PDF-1.4" + big)})
        assert r.status_code == 400
        assert "unsupported document kind" in r.json()["detail"]


def test_upload_routes_keep_their_limit_under_doubled_slashes(server):
    """A client whose base URL ends in a slash (item 16) reaches the upload routes as
    `/api//library/voices`: the route matches it, and so must the route's body limit."""
    big = b"\x00" * (1024 * 1024)
    with server.client() as c:
        r = c.post(
            server.url + "/api//library/voices",
            data={"name": "Big"},
            files={"files": ("big.wav", big)},
        )
        assert r.status_code == 400, r.text  # read, and refused as audio, not for its size
        assert "readable audio" in r.json()["detail"]
        r = c.post(server.url + "//api/jobs", files={"file": ("book.pdf", b"%PDF-1.4" + big)})
        assert r.status_code == 400, r.text
        assert "unsupported document kind" in r.json()["detail"]


def test_the_keyless_static_paths_serve_only_the_page_files(tmp_path):
    """/static/ needs no key (the page's own files). With the Host check off, a client
    naming its Host "static" used to read any generated file there without the key, through
    AllTalk's `/{address}/audio/{name}` route (text-generation-webui's URLs)."""
    with live_server(tmp_path, api_key="k", allowed_hosts=["*"]) as s, s.client() as c:
        form = {"text_input": "a private text", "character_voice_gen": "alpha"}
        r = c.post("/api/tts-generate", data=form, headers={"X-API-Key": "k"})
        url = r.json()["output_file_url"]
        assert c.get(url).status_code == 401
        for path in (f"/static{url}", f"/static/{url}", f"/static/static{url}"):
            r = c.get(path, headers={"Host": "static"})
            assert r.status_code == 404, path
            assert not r.content.startswith(b"RIFF")
        assert c.get("/static/app.js").status_code == 200


# -- 5. The key out of URLs: the session cookie, and redacted logs ----------------------------


def test_the_page_trades_the_key_for_a_session_cookie(keyed):
    name = f"lowvox_session_{keyed.port}"
    with keyed.client() as c:
        assert c.post("/api/session").status_code == 401
        r = c.post("/api/session", headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{name}=")
        assert "httponly" in cookie.lower()
        assert "samesite=strict" in cookie.lower()
        token = cookie.split(";", 1)[0].split("=", 1)[1]
    same_origin = {"Sec-Fetch-Site": "same-origin"}
    with keyed.client(cookies={name: token}) as c:
        # What <audio>, download links and EventSource send: the cookie, no key.
        assert c.get("/api/recent", headers=same_origin).status_code == 200
        assert c.get("/audio/nothing.wav", headers=same_origin).status_code == 404
        # A page on another port of this host (same site) gets nothing from the cookie.
        assert c.get("/api/recent", headers={"Sec-Fetch-Site": "same-site"}).status_code == 401
        # A cookie cannot renew itself into a new session: that takes the key.
        assert c.post("/api/session", headers=same_origin).status_code == 401
        assert c.delete("/api/session").status_code == 200
    with keyed.client(cookies={name: token.split(".")[0] + ".forged"}) as c:
        assert c.get("/api/recent").status_code == 401
    with keyed.client() as c:  # whatever bytes a cookie holds, the answer is a 401
        weird = f"{name}=9999999999.".encode() + "é".encode()
        assert c.get("/api/recent", headers={"Cookie": weird}).status_code == 401
    with keyed.client() as c:  # scripts keep using ?api_key=
        assert c.get("/api/ready", params={"api_key": "s3cret"}).text == "Ready"


def test_access_log_hides_api_keys(tmp_path):
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    access = logging.getLogger("uvicorn.access")
    with production_server(tmp_path, api_key="s3cret") as s:
        access.addHandler(handler)  # after start-up: uvicorn's logging set-up drops handlers
        try:
            with s.client() as c:
                assert c.get("/api/ready", params={"api_key": "s3cret"}).text == "Ready"
                assert c.get("/api/ready?x=1&api%5Fkey=s3cret").status_code == 200
                # Any spelling of the name the key check accepts is hidden too.
                assert c.get("/api/ready?ap%69_key=s3cret&y=2").status_code == 200
        finally:
            access.removeHandler(handler)
    lines = [r for r in records if "/api/ready" in r]
    assert len(lines) == 3, records
    assert all("s3cret" not in line and "[redacted]" in line for line in lines), lines


@pytest.mark.timeout(20)
@pytest.mark.parametrize("unit", ["?a", "?"])
def test_hiding_keys_in_a_long_query_takes_linear_time(unit):
    # From every `?` of a query made of `?a` pairs the pattern read to the end of the line
    # looking for an `=`: one 60 KB request line (a 401 without a key) held the event
    # loop, which writes the access log, for 16 s, and every other client with it. The
    # timeout only stops a hang.
    line = "GET /api/ready?" + unit * 200_000 + "&api_key=s3cret HTTP/1.1"
    assert redact_api_keys(line).endswith("&api_key=[redacted] HTTP/1.1")


@pytest.mark.slow
def test_the_web_page_never_puts_the_key_in_a_url(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.server.test_web_page import CHROMIUM, LAUNCH_ARGS

    if CHROMIUM is None:
        pytest.skip("no chromium binary")
    urls: list[str] = []
    with (
        live_server(tmp_path, api_key="k") as s,
        sync_api.sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: urls.append(request.url))
            page.goto(s.url + "/")
            page.fill("#api-key", "k")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function(
                "document.querySelector('#status').textContent === 'ready'", timeout=30_000
            )
            page.fill("#text", "a b c d")
            page.click("#stream")  # an <audio src> stream: the cookie carries the session
            page.wait_for_function(
                "(() => { const a = document.querySelector('#player');"
                " return a.readyState >= 1 && a.duration > 0 && !a.error; })()",
                timeout=30_000,
            )
        finally:
            browser.close()
    assert any("tts-generate-streaming" in u for u in urls)
    assert not [u for u in urls if "api_key" in u.lower()]


# -- 6. Trusted networks ----------------------------------------------------------------------


def test_clients_on_a_trusted_network_need_no_key(tmp_path):
    trusted = ["127.0.0.0/8"]
    with production_server(tmp_path, api_key="k", trusted_networks=trusted) as s, s.client() as c:
        assert c.get("/api/voices").status_code == 200
        # Through a proxy, the peer is the proxy: its clients could be anyone.
        r = c.get("/api/voices", headers={"X-Forwarded-For": "127.0.0.1"})
        assert r.status_code == 401


def test_a_forwarded_address_does_not_make_a_client_trusted(tmp_path):
    trusted = ["10.0.0.0/8"]
    with production_server(tmp_path, api_key="k", trusted_networks=trusted) as s, s.client() as c:
        assert c.get("/api/voices").status_code == 401
        r = c.get("/api/voices", headers={"X-Forwarded-For": "10.1.2.3"})
        assert r.status_code == 401
        assert c.get("/api/voices", headers={"X-API-Key": "k"}).status_code == 200


def test_trusted_networks_are_checked():
    with pytest.raises(LowvoxError, match="not a network"):
        load_settings(trusted_networks=["192.168.1/24x"])
    assert load_settings(trusted_networks=["192.168.1.7/24"]).trusted_networks == ["192.168.1.0/24"]


# -- 7. Slow clients --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    with production_server(
        tmp_path_factory.mktemp("slow"), header_timeout=2.0, body_timeout=1.0, max_connections=12
    ) as s:
        yield s


@pytest.mark.slow
def test_half_sent_requests_are_closed_and_others_served(slow):
    half_headers = [
        raw(slow, b"GET /api/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ") for _ in range(4)
    ]
    half_bodies = [
        raw(
            slow,
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"input": ',
        )
        for _ in range(2)
    ]
    silent = [raw(slow) for _ in range(2)]
    with slow.client() as c:  # the held connections do not stop others
        assert c.get("/api/ready").text == "Ready"
    for sock in half_headers:
        answer = read_until_closed(sock)
        assert status_of(answer) == 408
    for sock in half_bodies:
        answer = read_until_closed(sock)
        assert status_of(answer) == 408
        assert b"stopped arriving" in answer
    for sock in silent:
        assert read_until_closed(sock) == b""
    with slow.client() as c:
        assert c.get("/api/ready").text == "Ready"


@pytest.mark.slow
def test_a_body_trickled_a_byte_at_a_time_is_closed(slow):
    """Slow-POST: a client that sends its body a byte at a time, never silent for
    body_timeout, held its connection for as long as the body lasted (a 300 KB text
    body at a byte every 29 s: 100 days; max_connections of them shut everyone out)."""
    sock = raw(
        slow,
        b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
    )
    sock.settimeout(0.25)  # a byte every 0.25 s: never the 1 s body_timeout of silence
    answer = b""
    for _ in range(40):
        with contextlib.suppress(OSError):  # the server may have closed it already
            sock.sendall(b" ")
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        break
    sock.close()
    assert answer, "the server was still waiting for the body after 40 bytes in 10 s"
    assert status_of(answer) == 408 and b"too slowly" in answer


@pytest.mark.slow
def test_a_keep_alive_connection_cannot_stall_its_next_request(slow):
    """uvicorn's keep-alive timeout stops at the first byte of the next request."""
    sock = raw(slow, b"GET /api/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = b""
    while not first.endswith(b"Ready"):
        first += sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /api/re")
    assert status_of(read_until_closed(sock)) == 408


def test_oversized_headers_are_refused(slow):
    sock = raw(slow, b"GET /api/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000)
    assert status_of(read_until_closed(sock)) == 431


@pytest.mark.slow
def test_the_connection_limit_holds_and_frees(slow):
    held = [raw(slow) for _ in range(slow.settings.max_connections - 1)]
    time.sleep(0.2)  # let the server accept them all
    try:
        with slow.client() as c:
            assert c.get("/api/ready").status_code == 503
    finally:
        for sock in held:
            read_until_closed(sock)  # the header timeout closes each
    with slow.client() as c:
        assert c.get("/api/ready").text == "Ready"


# -- 8. Symbolic links in the voice library ---------------------------------------------------


def _wav() -> bytes:
    buf = io.BytesIO()
    t = np.arange(16_000 * 2) / 16_000
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 220 * t), 16_000, format="WAV")
    return buf.getvalue()


@pytest.fixture()
def linked_library(server):
    root = server.settings.voices_path
    secret = root.parent / "secret.txt"
    secret.write_text("the secret")
    (root / "Linked").mkdir()
    (root / "Linked" / "clip_01.wav").symlink_to(secret)
    (root / "Mixed").mkdir()
    (root / "Mixed" / "clip_01.wav").symlink_to(secret)
    (root / "Mixed" / "clip_02.wav").write_bytes(_wav())
    (root / "Real").mkdir()
    (root / "Real" / "clip_01.wav").write_bytes(_wav())
    yield
    for name in ("Linked", "Mixed", "Real"):
        for f in (root / name).iterdir():
            f.unlink()
        (root / name).rmdir()


def test_library_preview_refuses_a_symlinked_clip(server, linked_library):
    # A linked clip is no clip: a folder holding only links is no voice, and a voice's
    # other clips are all it has (an engine that clones never reads the link's target).
    with server.client() as c:
        r = c.get("/api/library/voices/Real/preview")
        assert r.status_code == 200
        assert r.content == _wav()
        r = c.get("/api/library/voices/Linked/preview")
        assert r.status_code == 404
        assert b"the secret" not in r.content
        r = c.get("/api/library/voices/Mixed/preview")
        assert r.status_code == 200 and r.content == _wav()
        listed = {v["name"]: v["clips"] for v in c.get("/api/library/voices").json()["voices"]}
        assert listed == {"Mixed": 1, "Real": 1}
    assert [p.name for p in server.state.voices.get("Mixed").clips] == ["clip_02.wav"]


def test_xtts_sample_refuses_a_symlinked_clip(server, linked_library):
    with server.client() as c:
        r = c.get("/sample/Linked.wav")
        assert r.status_code == 404
        assert b"the secret" not in r.content


def test_served_file_refuses_links_on_the_way(tmp_path):
    # The routes' last check, for a link that appears after the library was listed.
    from lowvox.server.outputs import FileRefused, served_file

    root = tmp_path / "voices"
    (root / "Real").mkdir(parents=True)
    (root / "Real" / "clip_01.wav").write_bytes(b"RIFF")
    (root / "Via").symlink_to(root / "Real")
    (root / "Real" / "link.wav").symlink_to(root / "Real" / "clip_01.wav")
    assert served_file(root / "Real" / "clip_01.wav", root) == root / "Real" / "clip_01.wav"
    for path in (root / "Via" / "clip_01.wav", root / "Real" / "link.wav", tmp_path / "x"):
        with pytest.raises(FileRefused):
            served_file(path, root)


# -- 9. What a crash leaves behind ------------------------------------------------------------


def test_leftovers_are_swept_at_start_up(tmp_path):
    settings = make_settings(tmp_path)
    old = time.time() - 2 * 3600
    outputs, voices, cache = settings.outputs_path, settings.voices_path, settings.cache_path
    leftovers = [
        outputs / ".speech.wav.k2j3.part",
        voices / ".upload-1f2e" / "clip_01.wav",
        voices / ".trash-9a8b" / "clip_01.wav",
        voices / "Real" / ".voice.json.x1.part",
        cache / "xtts" / ".weights.safetensors.a1.part",
        cache / "weights.safetensors.tmp",
        cache / "xtts" / ".tmpAb3xYz",  # safetensors' save_file, killed converting weights
    ]
    kept = [
        outputs / "speech.wav",
        voices / "Real" / "clip_01.wav",
        cache / ".being-written.safetensors.b2.part",  # recent: a live writer's
    ]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)
    for path in leftovers:
        if path.is_relative_to(cache):
            os.utime(path, (old, old))
    with live_server(tmp_path):
        pass
    assert [p for p in leftovers if p.exists()] == []
    assert not (voices / ".upload-1f2e").exists() and not (voices / ".trash-9a8b").exists()
    assert all(p.exists() for p in kept)


def test_unfinished_outputs_count_towards_the_size_limit(tmp_path):
    with live_server(tmp_path, outputs_max_bytes=300_000) as s, s.client() as c:
        # A write a crash cut short, found after start-up (as a second process would leave).
        (s.settings.outputs_path / ".lost.wav.z9.part").write_bytes(b"x" * 290_000)
        first = c.post(
            "/v1/audio/speech",
            json={"input": "one two", "voice": "alpha", "save": True, "response_format": "wav"},
        )
        second = c.post(
            "/v1/audio/speech",
            json={"input": "three four", "voice": "alpha", "save": True, "response_format": "wav"},
        )
        assert first.status_code == second.status_code == 200
        # Two 9.6 kB files fit in 300 kB; with the lost 290 kB, only the newest stays.
        assert c.get(first.headers["x-output-file-url"]).status_code == 404
        assert c.get(second.headers["x-output-file-url"]).status_code == 200
        assert s.state.outputs.sweep_partials(older_than_s=0) == 1


# -- 10. An engine that cannot run says when to retry -----------------------------------------


class BrokenXtts(FakeFactory):
    def __call__(self, name: str, settings: Settings):
        if name == "xtts":
            raise EngineUnavailable("engine 'xtts' is not available: no model")
        return super().__call__(name, settings)


def test_unavailable_is_503_with_retry_after(tmp_path):
    with live_server(tmp_path, factory=BrokenXtts()) as s, s.client() as c:
        r = c.get("/api/engines/xtts")
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) > 0
