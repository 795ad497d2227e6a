"""lowvox's own implementation of XTTS v2: loads the released checkpoint, no coqui-tts needed.

The public entry point is `XttsModel` (imported lazily so that `import lowvox.engines.xtts`
stays cheap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowvox.engines.xtts.model import XttsModel

__all__ = ["XttsModel"]


def __getattr__(name: str) -> Any:
    if name == "XttsModel":
        from lowvox.engines.xtts.model import XttsModel

        return XttsModel
    raise AttributeError(name)
