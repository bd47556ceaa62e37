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
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hybridcls.cache import atomic_path, atomic_write_json, atomic_write_text
from hybridcls.errors import DatasetError, InputError
from hybridcls.synth.render import (
    FAMILIES,
    VOCABULARY,
    Attributes,
    all_attributes,
    check_nuisance,
    render,
    vocabulary,
)

__all__ = [
    "CAPTION_TEMPLATES",
    "PLACEMENTS",
    "World",
    "attribute_distance",
    "image_rng",
    "make_world",
    "select_classes",
]

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
# Where the unseen classes lie relative to the seen ones (see select_classes).
PLACEMENTS: tuple[str, ...] = ("random", "close", "far")
_DRAWS = 1000


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
        vocabulary: The values each attribute family takes (``{family: values}``).
        placement: How the unseen classes were placed (one of :data:`PLACEMENTS`).
        nuisance: The renderer's nuisance factor (1: the default ranges).
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
    vocabulary: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(VOCABULARY),
                                                      hash=False)
    placement: str = "random"
    nuisance: float = 1.0

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
            # Written only when they differ from the defaults (the default world's file
            # stays as it always was).
            vocabulary=vocabulary(meta.get("vocabulary")),
            placement=str(meta.get("placement", "random")),
            nuisance=float(meta.get("nuisance", 1.0)),
        )

    def read_labels(self) -> dict[str, str]:
        """Map each test image file name to its readable class name, from :attr:`labels_csv`."""
        with open(self.labels_csv, newline="", encoding="utf-8") as f:
            return {row["image_id"]: row["label"] for row in csv.DictReader(f)}


def attribute_distance(a: Attributes, b: Attributes) -> int:
    """How many attribute families two compositions differ in (0 to 3; Hamming distance).

    Example:
        >>> attribute_distance(Attributes("red", "plain", "star"), Attributes("red", "dotted", "heart"))
        2
    """
    return sum(x != y for x, y in zip(a, b))


def _new_only_as_combination(seen: Sequence[Attributes], unseen: Sequence[Attributes]) -> bool:
    """Whether every single attribute of every unseen class occurs among the seen classes."""
    known = [set(values) for values in zip(*seen)]
    return all(a in known[k] for u in unseen for k, a in enumerate(u))


def _split(seen: list[Attributes], unseen: list[Attributes]) -> tuple[list[Attributes], list[Attributes]]:
    # Seen classes in ImageFolder order (sorted folder names).
    return sorted(seen, key=lambda a: a.folder), sorted(unseen, key=lambda a: a.name)


def _far_block_shapes(vocab: Mapping[str, tuple[str, ...]], n_seen: int, n_unseen: int
                      ) -> list[tuple[int, ...]]:
    """Sub-grid sizes (values per family) that hold ``n_unseen`` classes and leave ``n_seen`` far ones.

    A composition with at most one attribute inside the sub-grid differs from
    every composition of the sub-grid in at least two; these are counted per
    shape, family by family (in / out of the sub-grid).
    """
    sizes = [len(vocab[f]) for f in FAMILIES]
    shapes = []
    for shape in itertools.product(*(range(1, n) for n in sizes)):
        if math.prod(shape) < n_unseen:
            continue
        far = sum(math.prod(k if inside else n - k for k, n, inside in zip(shape, sizes, pattern))
                  for pattern in itertools.product((False, True), repeat=len(sizes))
                  if sum(pattern) <= 1)
        if far >= n_seen:
            shapes.append(shape)
    return shapes


def _far_split(rng: np.random.Generator, pool: list[Attributes], vocab: Mapping[str, tuple[str, ...]],
               n_classes: int, n_unseen: int) -> tuple[list[Attributes], list[Attributes]]:
    """``placement="far"``: unseen classes in a sub-grid, seen ones at least two attributes away."""
    n_seen = n_classes - n_unseen
    held = [f for f in FAMILIES if len(vocab[f]) < 2]
    if held:
        # With two varying families, a seen class sharing an unseen class's colour
        # differs from it in the shape alone.
        raise InputError(
            f"placement='far' needs every attribute family to vary; vocabulary holds "
            f"{', '.join(held)} at one value")
    shapes = _far_block_shapes(vocab, n_seen, n_unseen)
    if not shapes:
        raise InputError(
            f"placement='far' cannot place {n_unseen} unseen classes at least two attributes "
            f"from {n_seen} seen ones in this vocabulary; use fewer classes")
    # Compact sub-grids (the unseen classes fill at least half of it) first: a group of
    # related classes, as unseen animals often are.
    compact = [b for b in shapes if math.prod(b) < 2 * n_unseen] or shapes
    for _ in range(_DRAWS):
        shape = compact[int(rng.integers(len(compact)))]
        block = [set(rng.permutation(list(vocab[f]))[:k].tolist()) for f, k in zip(FAMILIES, shape)]
        inside = [a for a in pool if all(v in b for v, b in zip(a, block))]
        unseen = [inside[i] for i in rng.permutation(len(inside))[:n_unseen]]
        allowed = [pool[i] for i in rng.permutation(len(pool))
                   if sum(v in b for v, b in zip(pool[i], block)) <= 1]
        # Every unseen value needs a seen class showing it: take those first.
        needed = {(k, v) for u in unseen for k, v in enumerate(u)}
        first = []
        for a in allowed:
            if any((k, v) in needed for k, v in enumerate(a)):
                first.append(a)
                needed -= set(enumerate(a))
        rest = [a for a in allowed if a not in first]
        seen = (first + rest)[:n_seen]
        if len(seen) == n_seen and _new_only_as_combination(seen, unseen):
            return _split(seen, unseen)
    raise InputError(
        f"placement='far': no split of {n_classes} classes with {n_unseen} unseen found in "
        f"{_DRAWS} draws; use fewer classes")


def select_classes(
    seed: int,
    n_classes: int = 50,
    n_unseen: int = 10,
    *,
    vocab: Mapping[str, Sequence[str]] | None = None,
    placement: str = "random",
) -> tuple[list[Attributes], list[Attributes]]:
    """Choose the seen and unseen compositions of a world, deterministically.

    Every single attribute (colour, texture, shape) of each unseen class occurs
    in at least one seen class: what is new about an unseen class is only the
    combination, as with the animal challenge's attribute-annotated classes.

    Placements (distances are :func:`attribute_distance`, in attributes):

    - ``"random"``: a seeded draw among the compositions, redrawn until the
      rule above holds (the default world; at 40 seen / 10 unseen almost every
      unseen class is then one attribute from some seen class anyway);
    - ``"close"``: the same draw, redrawn until every unseen class is also one
      attribute away from some seen class;
    - ``"far"``: the unseen classes are drawn from a random sub-grid (a few values
      of each family) and the seen ones from the compositions with at most one
      attribute in it, so every unseen class is at least two attributes away
      from every seen class. Needs every family to vary; refused when the
      vocabulary is too small for the counts.

    Args:
        seed: World seed.
        n_classes: Total number of classes, at most the number of compositions.
        n_unseen: How many of them get no training images.
        vocab: ``{family: values}`` restricting the vocabulary
            (:func:`~hybridcls.synth.render.vocabulary`); ``None``: all of it.
        placement: One of :data:`PLACEMENTS`.

    Returns:
        ``(seen, unseen)``, each sorted by readable name.

    Raises:
        InputError: The counts are out of range, an unknown placement or
            vocabulary entry, or no split satisfies the placement.
    """
    v = vocabulary(vocab)
    pool = all_attributes(v)
    if not 2 <= n_classes <= len(pool):
        raise InputError(f"n_classes must be between 2 and {len(pool)}, got {n_classes}")
    if not 1 <= n_unseen < n_classes:
        raise InputError(
            f"n_unseen must be between 1 and n_classes - 1 = {n_classes - 1}, got {n_unseen}"
        )
    if placement not in PLACEMENTS:
        raise InputError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    rng = image_rng(seed, STREAM_SPLIT)
    if placement == "far":
        return _far_split(rng, pool, v, n_classes, n_unseen)
    # A random draw almost always qualifies; redraw (deterministically) when not.
    for _ in range(_DRAWS):
        chosen = [pool[i] for i in rng.permutation(len(pool))[:n_classes]]
        seen, unseen = chosen[n_unseen:], chosen[:n_unseen]
        if not _new_only_as_combination(seen, unseen):
            continue
        if placement == "close" and any(min(attribute_distance(u, a) for a in seen) > 1
                                        for u in unseen):
            continue
        return _split(seen, unseen)
    raise InputError(
        f"could not split {n_classes} classes so that every attribute of the {n_unseen} unseen "
        f"ones occurs among the seen ones (placement={placement!r}); use fewer unseen classes"
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
    vocab: Mapping[str, Sequence[str]] | None = None,
    placement: str = "random",
    nuisance: float = 1.0,
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
        vocab: ``{family: values}`` restricting which values each attribute family
            takes, e.g. ``{"texture": ["plain"]}`` (colour and shape alone tell the
            classes apart); ``None``: the whole vocabulary
            (:func:`~hybridcls.synth.render.vocabulary`).
        placement: Where the unseen classes lie relative to the seen ones:
            ``"random"``, ``"close"`` or ``"far"`` (see :func:`select_classes`).
        nuisance: The renderer's nuisance factor, 0 to 2 (1: the default ranges;
            see :func:`~hybridcls.synth.render.render`).

    The three knobs are recorded in ``world.json`` when they differ from their
    defaults (the default world's files do not change).

    Returns:
        The :class:`World`, also readable later with :meth:`World.load`.

    Raises:
        InputError: A count, size, vocabulary entry, placement or nuisance factor
            is out of range, or ``out_dir`` already holds a world.

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
    nuisance = check_nuisance(nuisance)
    v = vocabulary(vocab)
    root = Path(out_dir)
    for existing in ("train", "test", "world.json"):
        if (root / existing).exists():
            raise InputError(
                f"{root / existing} already exists; give make_world an empty directory"
            )

    seen, unseen = select_classes(seed, n_classes, n_unseen, vocab=v, placement=placement)
    classes = sorted(seen + unseen, key=lambda a: a.name)
    counts = _train_counts(image_rng(seed, STREAM_TRAIN), len(seen), lo, hi)

    train_dir = root / "train"
    for ci, (attrs, count) in enumerate(zip(seen, counts)):
        folder = train_dir / attrs.folder
        folder.mkdir(parents=True)
        for i in range(count):
            with atomic_path(folder / f"{i:04d}.png") as tmp:
                render(attrs, image_rng(seed, STREAM_TRAIN, ci, i), image_size, nuisance).save(tmp)

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
            render(attrs, rng, image_size, nuisance).save(tmp)
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
        vocabulary=v,
        placement=placement,
        nuisance=nuisance,
    )
    knobs = {"vocabulary": v, "placement": placement, "nuisance": nuisance}
    defaults = {"vocabulary": VOCABULARY, "placement": "random", "nuisance": 1.0}
    _write_meta(
        world,
        n_unseen=n_unseen,
        train_counts=dict(zip((a.name for a in seen), counts)),
        train_per_class=(lo, hi),
        test_per_class=test_per_class,
        **{k: value for k, value in knobs.items() if value != defaults[k]},
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
