"""lowvox's own implementation of XTTS v2: loads the released checkpoint, no coqui-tts needed.

The public entry points are `load_model` (`loader.py`) and the `XttsModel` it returns
(`model.py`), imported lazily so that `import lowvox.engines.xtts` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowvox.engines.xtts.loader import load_model
    from lowvox.engines.xtts.model import XttsModel

__all__ = ["XttsModel", "load_model"]


def __getattr__(name: str) -> object:
    if name == "XttsModel":
        from lowvox.engines.xtts.model import XttsModel

        return XttsModel
    if name == "load_model":
        from lowvox.engines.xtts.loader import load_model

        return load_model
    raise AttributeError(name)
