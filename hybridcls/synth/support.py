"""Few-shot support images for a synthetic world: more images of its classes, never test images.

Rendered by the world's own renderer (:func:`hybridcls.synth.render.render`) from a
random stream of their own (:func:`hybridcls.synth.world.image_rng` keyed by the
world's seed, :data:`STREAM_SUPPORT`, the draw, the class and the image), so that
they are none of the world's training or test images and every draw is reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hybridcls.cache import atomic_path
from hybridcls.errors import InputError
from hybridcls.synth.render import all_attributes, render
from hybridcls.synth.world import World, image_rng

__all__ = ["STREAM_SUPPORT", "render_support"]

#: The world's random streams are 1 (training), 2 (test) and 3 (split); support images use 4.
STREAM_SUPPORT = 4


def render_support(world: World, out_dir: str | os.PathLike[str], k: int, *, draw: int = 0,
                   classes: Sequence[str] | None = None) -> Path:
    """Write ``k`` new images of each class as an ImageFolder (``out_dir/<class folder>/``).

    Args:
        world: The world (its seed, image size, nuisance and vocabulary).
        out_dir: The folder to create (must not exist or be empty).
        k: Images per class (at least 1).
        draw: Which draw: another draw renders other images of the same classes.
        classes: Readable class names; default: the world's unseen classes.

    Returns:
        ``out_dir``.

    Raises:
        InputError: ``k`` below 1, a class the world does not have, or a non-empty ``out_dir``.

    Example:
        >>> render_support(world, "support-k5", 5)  # doctest: +SKIP
    """
    if k < 1:
        raise InputError(f"k={k}: expected at least 1 image per class")
    names = list(world.unseen_classes if classes is None else classes)
    by_name = {a.name: a for a in all_attributes(world.vocabulary)}
    strangers = [n for n in names if n not in world.classes]
    if strangers:
        raise InputError(f"classes={strangers!r}: not classes of the world in {world.root}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty; give render_support a new folder")
    for name in names:
        attrs = by_name[name]
        folder = out / attrs.folder
        folder.mkdir(parents=True, exist_ok=True)
        ci = world.classes.index(name)
        for i in range(k):
            rng = image_rng(world.seed, STREAM_SUPPORT, draw, ci, i)
            with atomic_path(folder / f"{i:04d}.png") as tmp:
                render(attrs, rng, world.image_size, world.nuisance).save(tmp)
    return out
