"""API key (Bearer or X-API-Key) on every route when set; CORS preflights as browsers send
them, for the origins `cors_origins` lists (none by default: see test_hardening_security.py)."""

from __future__ import annotations

import pytest

from tests.server.srv_fixtures import live_server

# SillyTavern's page, as its users allow it.
SILLYTAVERN = "http://localhost:8000"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with live_server(
        tmp_path_factory.mktemp("keyed"), api_key="s3cret", cors_origins=[SILLYTAVERN]
    ) as s:
        yield s


@pytest.fixture(scope="module")
def open_to_pages(tmp_path_factory):
    """No key, two listed web pages: one on the internet, one on the LAN."""
    with live_server(
        tmp_path_factory.mktemp("cors"),
        cors_origins=["http://example.org", "http://192.168.1.20:8000"],
    ) as s:
        yield s


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/ready"),
        ("GET", "/api/voices"),
        ("GET", "/v1/models"),
        ("POST", "/v1/audio/speech"),
        ("GET", "/speakers"),
        ("POST", "/api/tts-generate"),
        ("GET", "/audio/x.wav"),
        ("GET", "/api/library/voices"),
    ],
)
def test_routes_need_the_key(keyed, method, path):
    with keyed.client() as c:
        assert c.request(method, path).status_code == 401
        assert c.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_bearer_and_x_api_key_and_query_work(keyed):
    with keyed.client() as c:
        assert c.get("/api/ready", headers={"Authorization": "Bearer s3cret"}).text == "Ready"
        assert c.get("/api/ready", headers={"X-API-Key": "s3cret"}).text == "Ready"
        assert c.get("/api/ready", params={"api_key": "s3cret"}).text == "Ready"
        r = c.post(
            "/v1/audio/speech",
            json={"input": "keyed", "voice": "alpha", "response_format": "wav"},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert r.status_code == 200


def test_unauthorised_answer_is_clear(keyed):
    with keyed.client() as c:
        r = c.get("/api/voices")
        assert r.json()["detail"] == "missing API key"
        assert (
            c.get("/api/voices", headers={"X-API-Key": "nope"}).json()["detail"]
            == "invalid API key"
        )


def test_preflight_with_authorization_and_cache_control(keyed):
    """What a browser sends before SillyTavern's fetch with Authorization and Cache-Control."""
    with keyed.client() as c:
        r = c.options(
            "/tts_to_audio/",
            headers={
                "Origin": SILLYTAVERN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,cache-control,content-type",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == SILLYTAVERN
        allowed = r.headers["access-control-allow-headers"].lower()
        for h in ("authorization", "cache-control", "content-type"):
            assert h in allowed
        assert "POST" in r.headers["access-control-allow-methods"]


def test_cors_headers_on_responses(open_to_pages):
    with open_to_pages.client() as client:
        r = client.get("/api/ready", headers={"Origin": "http://example.org"})
        assert r.headers["access-control-allow-origin"] == "http://example.org"
        r = client.post(
            "/v1/audio/speech",
            json={"input": "cors", "voice": "alpha", "save": True},
            headers={"Origin": "http://example.org"},
        )
        assert r.status_code == 200
        assert "x-output-file-url" in r.headers["access-control-expose-headers"].lower()


def test_web_page_is_open_without_key(keyed):
    with keyed.client() as c:
        assert c.get("/").status_code == 200


def test_private_network_access_preflight(open_to_pages):
    with open_to_pages.client() as client:
        r = client.options(
            "/api/tts-generate",
            headers={
                "Origin": "http://192.168.1.20:8000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Private-Network": "true",
            },
        )
    assert r.status_code == 200
    assert r.headers["access-control-allow-private-network"] == "true"
