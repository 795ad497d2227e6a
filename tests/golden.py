"""Where the tests find the golden reference bundle (`../shared/golden` unless told).

The bundle is a tiny random XTTS v2 model in the released format plus the reference
implementation's outputs for it (see its README). It lives outside the repository;
`LOWVOX_GOLDEN` points at the folder that holds `xtts-tiny/`.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def golden_root() -> Path:
    """`$LOWVOX_GOLDEN`, else `../shared/golden` beside the repository."""
    configured = os.environ.get("LOWVOX_GOLDEN")
    return Path(configured).expanduser() if configured else (REPO / ".." / "shared" / "golden")


GOLDEN_ROOT = golden_root().resolve()
GOLDEN = GOLDEN_ROOT / "xtts-tiny"


def golden_available() -> bool:
    return (GOLDEN / "model.pth").is_file() and (GOLDEN / "reference.safetensors").is_file()
