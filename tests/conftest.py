"""Test tiers and the golden bundle, for the whole suite.

- `slow` tests (a real model behind a server, golden vocoder runs, whole benchmarks) are
  left out of a plain `pytest` run, the fast tier; `--run-slow` (or `LOWVOX_RUN_SLOW=1`)
  runs them too, as `make test` and CI do.
- The golden bundle is found through `tests/golden.py` (`LOWVOX_GOLDEN`). When it is
  missing, the run says so loudly, once, in its header and its summary, and every parity
  test skips; under CI (`CI` set) or with `--require-golden` the run stops instead: parity
  with the reference is how we know the engine loads the real model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.golden import GOLDEN, golden_available


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=os.environ.get("LOWVOX_RUN_SLOW") == "1",
        help="also run the tests marked slow (the whole suite; LOWVOX_RUN_SLOW=1 does too)",
    )
    parser.addoption(
        "--require-golden",
        action="store_true",
        default=bool(os.environ.get("CI")),
        help="fail, rather than skip, when the golden bundle is missing (on by default in CI)",
    )


def _missing_golden() -> str:
    return (
        f"GOLDEN BUNDLE MISSING: {GOLDEN} not found; every golden-parity test is skipped. "
        "Set LOWVOX_GOLDEN to the folder that holds xtts-tiny/."
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--require-golden") and not golden_available():
        raise pytest.UsageError(_missing_golden() + " (required: CI or --require-golden)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    tier = "all tiers (--run-slow)" if config.getoption("--run-slow") else "fast tier"
    golden = str(GOLDEN) if golden_available() else _missing_golden()
    return [f"lowvox tests: {tier}; golden bundle: {golden}"]


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="session", autouse=True)
def golden_bundle_untouched():
    """The suite never writes into the shared bundle: a test that loads it without a cache
    folder of its own would leave converted weights there (the default is beside the
    checkpoint, where writable), which every later run would then read."""
    before = _listing(GOLDEN) if GOLDEN.is_dir() else None
    yield
    if before is not None and (after := _listing(GOLDEN)) != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        pytest.fail(f"the tests changed the golden bundle {GOLDEN}: {changed}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the slow tests unless asked for: the fast tier is the default run."""
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not golden_available():
        terminalreporter.write_sep("!", _missing_golden(), red=True, bold=True)
    if not config.getoption("--run-slow"):
        terminalreporter.write_line("fast tier only: `pytest --run-slow` (or `make test`) runs all")
