"""The synthetic world's natural class tree: shape > colour and shape > the class.

Every class of a world is a colour, a texture and a shape (``red striped
circle``); its ancestors are the colour and shape (``red circle``), then the
shape (``circle``): the prompts file of :func:`write_hierarchy_prompts` gives
each class that chain (docs/prompts.md, "Ancestors"), for roll-up
(:mod:`hybridcls.hierarchy`). The world's own ``prompts.txt`` is left as it is.

Example:
    >>> hierarchy_prompts(["red striped circle", "blue plain star"])
    'red striped circle > red circle > circle\\nblue plain star > blue star > star\\n'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hybridcls.cache import atomic_write_text
from hybridcls.synth.render import Attributes
from hybridcls.synth.world import World

__all__ = ["HIERARCHY_PROMPTS_FILE", "hierarchy_prompts", "write_hierarchy_prompts"]

#: The file :func:`write_hierarchy_prompts` writes in a world's folder by default.
HIERARCHY_PROMPTS_FILE = "prompts_hierarchy.txt"


def hierarchy_prompts(classes: Sequence[str]) -> str:
    """Prompts-file lines of ``classes`` (``colour texture shape``), each with its ancestors
    ``colour shape`` and ``shape``.

    Raises:
        ValueError: A name that is not three words (not a class of a world).
    """
    lines = []
    for name in classes:
        words = name.split()
        if len(words) != len(Attributes._fields):
            raise ValueError(f"{name!r} is not a class of a synthetic world (colour texture shape)")
        a = Attributes(*words)
        lines.append(f"{a.name} > {a.colour} {a.shape} > {a.shape}\n")
    return "".join(lines)


def write_hierarchy_prompts(world: World, path: str | os.PathLike[str] | None = None) -> Path:
    """Write the world's classes, in its prompts-file order, with their ancestors.

    Args:
        world: The world.
        path: Where (default: :data:`HIERARCHY_PROMPTS_FILE` in the world's folder).

    Returns:
        The file written.
    """
    out = Path(path) if path is not None else world.root / HIERARCHY_PROMPTS_FILE
    atomic_write_text(out, f"# {world.root.name}: shape > colour and shape > class\n"
                      + hierarchy_prompts(world.classes))
    return out
