"""Fixtures for the server tests (helpers live in srv_fixtures.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
from srv_fixtures import LiveServer, live_server


def pytest_collection_modifyitems(config, items) -> None:
    """`slow` tests here run only with --run-slow (when registered) or LOWVOX_RUN_SLOW=1."""
    if config.getoption("--run-slow", default=False) or os.environ.get("LOWVOX_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: use --run-slow or LOWVOX_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords and "tests/server" in str(item.fspath):
            item.add_marker(skip)


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
