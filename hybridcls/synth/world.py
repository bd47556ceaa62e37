"""The synthetic open-set world: class selection, split and files on disk.

:func:`make_world` writes a small, deterministic open-set problem shaped like
the animal challenge: by default 50 classes composed of visual attributes,
40 of them seen (imbalanced labelled training images) and 10 unseen, where
every single attribute of an unseen class occurs among the seen classes, so
only the *composition* is new. The layout on disk::

    <root>/
      train/<colour>_<texture>_<shape>/<nnnn>.png   ImageFolder, seen classes only
      test/<nnnn>.png                               all classes, shuffled, unlabeled
      labels.csv                                    image_id,label (readable names)
      prompts.txt                                   one class per line, all classes
      templates.txt                                 caption templates with a {} slot
      world.json                                    everything World.load needs

Example:
    >>> from hybridcls.synth import make_world
    >>> world = make_world("synthetic-world", seed=0)  # doctest: +SKIP
    >>> len(world.classes), len(world.seen_classes), len(world.unseen_classes)  # doctest: +SKIP
    (50, 40, 10)
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybridcls.cache import atomic_path, atomic_write_json, atomic_write_text
from hybridcls.errors import DatasetError, InputError
from hybridcls.synth.render import Attributes, all_attributes, render

__all__ = ["CAPTION_TEMPLATES", "World", "image_rng", "make_world", "select_classes"]

# The tiny CLIP is trained on captions made from these templates, so they are
# also the templates that suit it for zero-shot scoring. "the" rather than
# "a" keeps every colour word grammatical ("the orange ...").
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of the {}.",
    "a picture of the {}.",
    "a drawing of the {}.",
    "an image of the {}.",
    "the {}.",
)

_WORLD_FORMAT = "hybridcls-synth-world"
_WORLD_VERSION = 1
# Separate seed streams: the same world seed must never give the CLIP's
# pretraining images the same pixels as a world's train or test images.
STREAM_TRAIN, STREAM_TEST, STREAM_SPLIT = 1, 2, 3


def image_rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    """Generator for one image, independent of how many images came before it.

    Keyed by (seed, stream, index...) through ``numpy.random.SeedSequence`` so
    that changing one count in a world does not move every other image.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *index]))


@dataclass(frozen=True)
class World:
    """A synthetic open-set world written on disk by :func:`make_world`.

    Attributes:
        root: The world's directory.
        train_dir: ImageFolder of the seen classes (folder names with underscores).
        test_dir: Unlabeled test images of all classes, shuffled.
        labels_csv: ``image_id,label`` for every test image; labels in readable spelling.
        prompts_file: All class names, one per line, in :attr:`classes` order.
        templates_file: Caption templates with a ``{}`` placeholder.
        classes: Readable names of all classes, in prompts-file order.
        seen_classes: Readable names of the classes with training images, sorted
            (the order of ImageFolder's folders).
        unseen_classes: Readable names of the classes without training images, sorted.
        seed: The seed the world was generated from.
        image_size: Side of every image, in pixels.
    """

    root: Path
    train_dir: Path
    test_dir: Path
    labels_csv: Path
    prompts_file: Path
    templates_file: Path
    classes: tuple[str, ...]
    seen_classes: tuple[str, ...]
    unseen_classes: tuple[str, ...]
    seed: int = 0
    image_size: int = 64

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> World:
        """Read a world written by :func:`make_world` from its ``world.json``.

        Raises:
            DatasetError: ``world.json`` is missing or is not a hybridcls world.

        Example:
            >>> world = World.load("synthetic-world")  # doctest: +SKIP
        """
        root = Path(root)
        meta_path = root / "world.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(
                f"{meta_path}: not found; is {root} a world made by make_world?"
            ) from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{meta_path}: not valid JSON ({exc})") from None
        if meta.get("format") != _WORLD_FORMAT or meta.get("version") != _WORLD_VERSION:
            raise DatasetError(
                f"{meta_path}: expected format {_WORLD_FORMAT!r} version {_WORLD_VERSION}, "
                f"found {meta.get('format')!r} version {meta.get('version')!r}"
            )
        return cls(
            root=root,
            train_dir=root / meta["train_dir"],
            test_dir=root / meta["test_dir"],
            labels_csv=root / meta["labels_csv"],
            prompts_file=root / meta["prompts_file"],
            templates_file=root / meta["templates_file"],
            classes=tuple(meta["classes"]),
            seen_classes=tuple(meta["seen_classes"]),
            unseen_classes=tuple(meta["unseen_classes"]),
            seed=int(meta["seed"]),
            image_size=int(meta["image_size"]),
        )

    def read_labels(self) -> dict[str, str]:
        """Map each test image file name to its readable class name, from :attr:`labels_csv`."""
        with open(self.labels_csv, newline="", encoding="utf-8") as f:
            return {row["image_id"]: row["label"] for row in csv.DictReader(f)}


def select_classes(
    seed: int, n_classes: int = 50, n_unseen: int = 10
) -> tuple[list[Attributes], list[Attributes]]:
    """Choose the seen and unseen compositions of a world, deterministically.

    Every single attribute (colour, texture, shape) of each unseen class occurs
    in at least one seen class: what is new about an unseen class is only the
    combination, as with the animal challenge's attribute-annotated classes.

    Args:
        seed: World seed.
        n_classes: Total number of classes, at most the number of compositions.
        n_unseen: How many of them get no training images.

    Returns:
        ``(seen, unseen)``, each sorted by readable name.

    Raises:
        InputError: The counts are out of range.
    """
    pool = all_attributes()
    if not 2 <= n_classes <= len(pool):
        raise InputError(f"n_classes must be between 2 and {len(pool)}, got {n_classes}")
    if not 1 <= n_unseen < n_classes:
        raise InputError(
            f"n_unseen must be between 1 and n_classes - 1 = {n_classes - 1}, got {n_unseen}"
        )
    rng = image_rng(seed, STREAM_SPLIT)
    # A random draw almost always qualifies; redraw (deterministically) when not.
    for _ in range(1000):
        chosen = [pool[i] for i in rng.permutation(len(pool))[:n_classes]]
        seen, unseen = chosen[n_unseen:], chosen[:n_unseen]
        known = [set(values) for values in zip(*seen)]
        if all(a in known[k] for u in unseen for k, a in enumerate(u)):
            # Seen classes in ImageFolder order (sorted folder names).
            return sorted(seen, key=lambda a: a.folder), sorted(unseen, key=lambda a: a.name)
    raise InputError(
        f"could not split {n_classes} classes so that every attribute of the {n_unseen} unseen "
        "ones occurs among the seen ones; use fewer unseen classes"
    )


def _train_counts(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    """Long-tailed counts from ``hi`` down to ``lo``, geometrically spaced, shuffled over classes."""
    counts = (
        np.rint(lo * (hi / lo) ** np.linspace(0.0, 1.0, n)).astype(int) if n > 1 else np.array([hi])
    )
    return rng.permutation(counts).tolist()


def make_world(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_classes: int = 50,
    n_unseen: int = 10,
    train_per_class: tuple[int, int] = (30, 120),
    test_per_class: int = 20,
    image_size: int = 64,
) -> World:
    """Generate a synthetic open-set world under ``out_dir`` and return its description.

    The same arguments always give byte-identical files. ``out_dir`` may exist
    but must not already hold a world's files.

    Args:
        out_dir: Directory to write into (created if needed).
        seed: Seed of the class split, the training counts and every image.
        n_classes: Number of classes, seen and unseen together.
        n_unseen: Number of classes with no training images.
        train_per_class: ``(lo, hi)``: seen classes get a long-tailed number of
            training images between these bounds (both bounds are used).
        test_per_class: Test images per class, for seen and unseen classes alike.
        image_size: Side of every image, in pixels.

    Returns:
        The :class:`World`, also readable later with :meth:`World.load`.

    Raises:
        InputError: A count or size is out of range, or ``out_dir`` already holds a world.

    Example:
        >>> world = make_world("synthetic-world", seed=0)  # doctest: +SKIP
        >>> world.unseen_classes[0]  # doctest: +SKIP
        'blue checkered circle'
    """
    lo, hi = train_per_class
    if not 1 <= lo <= hi:
        raise InputError(
            f"train_per_class must be (lo, hi) with 1 <= lo <= hi, got {train_per_class}"
        )
    if test_per_class < 1:
        raise InputError(f"test_per_class must be at least 1, got {test_per_class}")
    if image_size < 16:
        raise InputError(f"image_size must be at least 16 pixels, got {image_size}")
    root = Path(out_dir)
    for existing in ("train", "test", "world.json"):
        if (root / existing).exists():
            raise InputError(
                f"{root / existing} already exists; give make_world an empty directory"
            )

    seen, unseen = select_classes(seed, n_classes, n_unseen)
    classes = sorted(seen + unseen, key=lambda a: a.name)
    counts = _train_counts(image_rng(seed, STREAM_TRAIN), len(seen), lo, hi)

    train_dir = root / "train"
    for ci, (attrs, count) in enumerate(zip(seen, counts)):
        folder = train_dir / attrs.folder
        folder.mkdir(parents=True)
        for i in range(count):
            with atomic_path(folder / f"{i:04d}.png") as tmp:
                render(attrs, image_rng(seed, STREAM_TRAIN, ci, i), image_size).save(tmp)

    # Shuffle before naming so that neither names nor order reveal the class.
    test_items = [(a, i) for a in classes for i in range(test_per_class)]
    order = image_rng(seed, STREAM_TEST).permutation(len(test_items))
    test_dir = root / "test"
    test_dir.mkdir(parents=True)
    labels: list[tuple[str, str]] = []
    for k, j in enumerate(order.tolist()):
        attrs, i = test_items[j]
        image_id = f"{k:05d}.png"
        rng = image_rng(seed, STREAM_TEST, classes.index(attrs), i)
        with atomic_path(test_dir / image_id) as tmp:
            render(attrs, rng, image_size).save(tmp)
        labels.append((image_id, attrs.name))

    labels_csv = root / "labels.csv"
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["image_id", "label"])
    writer.writerows(labels)
    atomic_write_text(labels_csv, table.getvalue())

    prompts_file = root / "prompts.txt"
    atomic_write_text(
        prompts_file,
        f"# hybridcls synthetic world, seed {seed}: {len(classes)} classes "
        f"({len(seen)} with training images, {len(unseen)} without)\n"
        + "".join(f"{a.name}\n" for a in classes),
    )
    templates_file = root / "templates.txt"
    atomic_write_text(
        templates_file,
        "# caption templates of the tiny CLIP; {} is replaced by the class name\n"
        + "".join(f"{t}\n" for t in CAPTION_TEMPLATES),
    )

    world = World(
        root=root,
        train_dir=train_dir,
        test_dir=test_dir,
        labels_csv=labels_csv,
        prompts_file=prompts_file,
        templates_file=templates_file,
        classes=tuple(a.name for a in classes),
        seen_classes=tuple(a.name for a in seen),
        unseen_classes=tuple(a.name for a in unseen),
        seed=seed,
        image_size=image_size,
    )
    _write_meta(
        world,
        n_unseen=n_unseen,
        train_counts=dict(zip((a.name for a in seen), counts)),
        train_per_class=(lo, hi),
        test_per_class=test_per_class,
    )
    return world


def _write_meta(world: World, **extra: object) -> None:
    """Write ``world.json``: paths relative to the root, so a world can be moved."""
    meta = {
        "format": _WORLD_FORMAT,
        "version": _WORLD_VERSION,
        "seed": world.seed,
        "image_size": world.image_size,
        "train_dir": world.train_dir.name,
        "test_dir": world.test_dir.name,
        "labels_csv": world.labels_csv.name,
        "prompts_file": world.prompts_file.name,
        "templates_file": world.templates_file.name,
        "classes": list(world.classes),
        "seen_classes": list(world.seen_classes),
        "unseen_classes": list(world.unseen_classes),
        **extra,
    }
    atomic_write_json(world.root / "world.json", meta)
