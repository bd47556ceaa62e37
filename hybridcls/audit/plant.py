"""Plant known problems in a synthetic world, to measure what the audit finds.

:func:`plant_problems` edits a world made by :func:`hybridcls.synth.make_world`
in place: near-duplicate copies of training images (re-encoded, resized,
cropped, brightness or contrast shifted), training images moved to a wrong
class folder, test images copied into the training set, and files that do not
decode. It returns the ground truth, which tests and ``examples/audit_world.py``
score the audit against.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from hybridcls.cache import atomic_copy, atomic_path, atomic_write_bytes
from hybridcls.synth import World

__all__ = ["PERTURBATIONS", "PlantedProblems", "perturb", "plant_problems"]

#: The edits a planted duplicate gets, used in turn.
PERTURBATIONS = ("jpeg70", "resize0.8", "crop5", "brightness1.2", "contrast0.8")


def perturb(image: Image.Image, kind: str) -> tuple[Image.Image, str]:
    """A near-duplicate of ``image`` and the file extension to save it with.

    Args:
        image: An RGB image.
        kind: One of :data:`PERTURBATIONS`: JPEG at quality 70, resized to 80 %,
            a centred crop of 5 % per side, brightness x 1.2, contrast x 0.8.

    Example:
        >>> im, ext = perturb(Image.new("RGB", (64, 64)), "resize0.8")
        >>> im.size, ext
        ((51, 51), '.png')
    """
    w, h = image.size
    if kind == "jpeg70":
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=70)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), ".jpg"
    if kind == "resize0.8":
        return image.resize((int(w * 0.8), int(h * 0.8)), Image.Resampling.BILINEAR), ".png"
    if kind == "crop5":
        dx, dy = round(w * 0.05), round(h * 0.05)
        return image.crop((dx, dy, w - dx, h - dy)), ".png"
    if kind == "brightness1.2":
        return ImageEnhance.Brightness(image).enhance(1.2), ".png"
    if kind == "contrast0.8":
        return ImageEnhance.Contrast(image).enhance(0.8), ".png"
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {', '.join(PERTURBATIONS)}")


@dataclass
class PlantedProblems:
    """What :func:`plant_problems` did (paths as strings, as the audit reports them).

    Attributes:
        duplicates: ``(original, copy)`` pairs inside the training folder.
        mislabels: Moved file -> its true class folder name.
        leaks: Test image -> its copy in the training folder.
        unreadable: Files that do not decode.
    """

    duplicates: list[tuple[str, str]] = field(default_factory=list)
    mislabels: dict[str, str] = field(default_factory=dict)
    leaks: dict[str, str] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)


def plant_problems(
    world: World,
    *,
    seed: int = 0,
    n_duplicates: int = 10,
    n_mislabels: int = 10,
    n_leaks: int = 10,
) -> PlantedProblems:
    """Plant duplicates, mislabels, leaked test images and two unreadable files in ``world``.

    Every planted problem touches different images: duplicates copy some
    training images, mislabels move others, leaks copy test images of seen
    classes into their class folder (half as exact copies, half re-encoded
    as JPEG at quality 90).

    Args:
        world: A world from :func:`~hybridcls.synth.make_world` (edited in place).
        seed: Seed of every choice.
        n_duplicates: Near-duplicate copies to add.
        n_mislabels: Training images to move to another class's folder.
        n_leaks: Test images to copy into the training folder.

    Returns:
        The ground truth.

    Example:
        >>> truth = plant_problems(make_world("w", n_classes=8, n_unseen=2))  # doctest: +SKIP
        >>> len(truth.duplicates), len(truth.unreadable)  # doctest: +SKIP
        (10, 2)
    """
    rng = np.random.default_rng(seed)
    train = Path(world.train_dir)
    folders = sorted(p.name for p in train.iterdir() if p.is_dir())
    files = sorted(str(p) for d in folders for p in (train / d).iterdir() if p.is_file())
    chosen = rng.choice(len(files), n_duplicates + n_mislabels, replace=False)
    with open(files[0], "rb") as f:
        png_head = f.read(100)  # read now: the file may be moved below
    truth = PlantedProblems()
    for j, i in enumerate(chosen[:n_duplicates]):
        src = Path(files[i])
        kind = PERTURBATIONS[j % len(PERTURBATIONS)]
        with Image.open(src) as im:
            copy, ext = perturb(im.convert("RGB"), kind)
        dest = src.with_name(f"{src.stem}_dup_{kind}{ext}")
        with atomic_path(dest) as tmp:
            copy.save(tmp)
        truth.duplicates.append((str(src), str(dest)))
    for i in chosen[n_duplicates:]:
        src = Path(files[i])
        wrong = folders[(folders.index(src.parent.name) + 1 + int(rng.integers(len(folders) - 1)))
                        % len(folders)]
        dest = train / wrong / f"moved_from_{src.parent.name}_{src.name}"
        shutil.move(src, dest)
        truth.mislabels[str(dest)] = src.parent.name
    folder_of = {name: name.replace(" ", "_") for name in world.seen_classes}
    labels = world.read_labels()
    seen_tests = sorted(f for f, lab in labels.items() if lab in folder_of)
    for j, i in enumerate(rng.choice(len(seen_tests), n_leaks, replace=False)):
        name = seen_tests[int(i)]
        src = Path(world.test_dir) / name
        dest = train / folder_of[labels[name]] / f"leaked_{Path(name).stem}"
        if j % 2:
            dest = dest.with_suffix(".jpg")
            with Image.open(src) as im, atomic_path(dest) as tmp:
                im.convert("RGB").save(tmp, quality=90)
        else:
            dest = dest.with_suffix(src.suffix)
            atomic_copy(src, dest)
        truth.leaks[str(src)] = str(dest)
    broken = train / folders[0] / "broken.png"
    atomic_write_bytes(broken, png_head)  # a PNG cut short
    empty = train / folders[-1] / "empty.jpg"
    atomic_write_bytes(empty, b"")
    truth.unreadable = [str(broken), str(empty)]
    return truth

