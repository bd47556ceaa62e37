"""Module attributes resolved on first access (PEP 562).

Heavy names (anything importing torch or open_clip) are exposed by package
``__init__`` modules without importing them, so that ``import hybridcls`` and
reading a prompts file or generating a world stay cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``names[attr]`` when ``attr`` is first asked for.

    Example:
        >>> __getattr__ = lazy_getattr("hybridcls", {"train": "hybridcls.train"})
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
