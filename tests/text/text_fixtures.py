"""Where the text tests find their data."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tests.golden import GOLDEN

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reference_text.json"


@lru_cache(maxsize=1)
def golden_cases() -> dict:
    return json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def reference_fixture() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))
