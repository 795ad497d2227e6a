"""Schema-driven fuzzing of every route (issue 14's done-criterion): no server errors.

Schemathesis reads the server's own `/openapi.json` (the AllTalk and xtts-api-server form
fields included, item 17) and sends each operation a few generated requests, valid ones
and invalid ones, to a live fake-engine server. Whatever a client sends, the answer is
never a 5xx. Examples per operation are few and fixed (derandomised), so the run is the
same every time and stays well under a minute on two cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.server.srv_fixtures import FakeFactory, LiveServer, live_server

EXAMPLES = {GenerationMode.POSITIVE: 6, GenerationMode.NEGATIVE: 4}
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> Iterator[LiveServer]:
    # Short texts and an engine without pauses keep each generated request quick.
    with live_server(
        tmp_path_factory.mktemp("fuzz"), FakeFactory(chunk_delay=0), max_text_chars=300
    ) as s:
        yield s


def fuzz(operation, mode: GenerationMode, examples: int, url: str, session, failures: list[str]):
    """`examples` generated requests for one operation, their 5xx answers noted."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case) -> None:
        where = f"{operation.label} ({mode.value})"
        try:
            response = case.call(base_url=url, session=session, timeout=TIMEOUT_S)
        except requests.RequestException as e:
            failures.append(f"{where}: {e!r}")
            return
        if response.status_code >= 500:
            failures.append(
                f"{where}: {response.status_code} {response.text[:200]!r} "
                f"for {case.as_curl_command()[:400]}"
            )

    # An operation without parameters or body has nothing to make invalid.
    with contextlib.suppress(Unsatisfiable):
        call()


@pytest.mark.slow
def test_no_operation_answers_with_a_server_error(fuzzed):
    schema = schemathesis.openapi.from_dict(fuzzed.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 40  # every API: OpenAI, AllTalk, xtts-api-server, library, jobs
    failures: list[str] = []
    with requests.Session() as session:
        for operation in operations:
            for mode, examples in EXAMPLES.items():
                fuzz(operation, mode, examples, fuzzed.url, session, failures)
    assert not failures, "\n".join(failures)
