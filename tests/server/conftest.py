"""Fixtures for the server tests (helpers live in srv_fixtures.py)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server.srv_fixtures import LiveServer, live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    """One fake-engine server shared by a test module (start-up costs stay low)."""
    with live_server(tmp_path_factory.mktemp("lowvox")) as s:
        yield s


@pytest.fixture()
def client(server) -> Iterator[httpx.Client]:
    server.engine.gate.set()
    with server.client() as c:
        yield c
    server.engine.gate.set()
