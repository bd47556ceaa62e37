"""Index an ImageFolder-style training folder and split it for validation.

The layout is torchvision's: ``ROOT/<class name>/**/<image>``. The scan is our
own rather than ``torchvision.datasets.folder.make_dataset`` because that one
follows symbolic links (a link loop explodes the walk), treats hidden folders
such as ``.ipynb_checkpoints`` as classes and reports problems as bare
``FileNotFoundError``; here the files of a class are found by the same walk as
prediction inputs (:func:`~hybridcls.data.sources.walk_images`) and every
problem is a :class:`~hybridcls.errors.DatasetError` naming the folder.
Nothing is decoded: a bad image is the training loop's to skip.
"""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sklearn.model_selection import train_test_split

from hybridcls.data.sources import walk_images
from hybridcls.errors import DatasetError

__all__ = ["ImageFolderIndex", "scan_image_folder", "stratified_split"]

Samples = list[tuple[str, int]]


@dataclass(frozen=True)
class ImageFolderIndex:
    """The classes and image files of a training folder.

    Attributes:
        root: The folder as given.
        classes: Class names, the subfolder names in code-point order; a
            sample's label is its class's position here.
        samples: ``(path, label)`` pairs, by class, then in walk order.
    """

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]


def scan_image_folder(root: str | os.PathLike[str]) -> ImageFolderIndex:
    """List the classes (subfolders) and their image files under ``root``.

    Each subfolder of ``root`` is a class, its name the label; images are
    found recursively inside it (hidden files and folders skipped, symbolic
    links to folders not followed below the class level). Files directly in
    ``root`` are ignored.

    Args:
        root: The training folder.

    Returns:
        The index; images are not opened.

    Raises:
        DatasetError: ``root`` is missing or not a folder, has no class
            subfolders or fewer than 2, a class folder has no image, or a
            folder name cannot be a label (empty, surrounding whitespace,
            leading dot, control characters such as a newline).

    Example:
        >>> index = scan_image_folder("data/train")  # doctest: +SKIP
        >>> index.classes[:3], len(index.samples)  # doctest: +SKIP
        (['antelope', 'bat', 'beaver'], 24322)
    """
    root_str = os.fspath(root)
    if not os.path.exists(root_str):
        raise DatasetError(f"training folder not found: {root_str}")
    if not os.path.isdir(root_str):
        raise DatasetError(f"not a folder: {root_str} (expected the training folder)")
    try:
        entries = sorted(e.name for e in os.scandir(root_str) if e.is_dir())
    except OSError as err:
        raise DatasetError(f"cannot read training folder {root_str}: {err.strerror}") from err
    if not entries:
        raise DatasetError(
            f"no class subfolders in {root_str}: expected one folder per class, "
            f"e.g. {os.path.join(root_str, 'cat', '001.jpg')}"
        )
    for name in entries:
        problem = _label_problem(name)
        if problem:
            path = os.path.join(root_str, name)
            raise DatasetError(f"class folder {path!r} is not a valid label: {problem}")
    if len(entries) < 2:
        raise DatasetError(f"needs at least 2 classes, found {len(entries)} in {root_str}")
    samples: Samples = []
    for label, name in enumerate(entries):
        folder = os.path.join(root_str, name)
        sources = walk_images(folder)
        for source in sources:
            # Broken links stay in as samples (training skips undecodable
            # files); an unreadable folder would silently drop a whole subtree.
            if source.error is not None and os.path.isdir(source.path):
                raise DatasetError(f"{source.path}: {source.error}")
        paths = [source.path for source in sources]
        if not paths:
            raise DatasetError(f"empty class folder: {folder}")
        samples.extend((path, label) for path in paths)
    return ImageFolderIndex(root=root_str, classes=entries, samples=samples)


def stratified_split(
    samples: Sequence[tuple[str, int]],
    val_fraction: float,
    seed: int,
    *,
    classes: Sequence[str] | None = None,
) -> tuple[Samples, Samples]:
    """Split samples into training and validation sets with the same class mix.

    Uses scikit-learn's ``train_test_split(stratify=...)``; each part keeps
    the input order, so the split depends only on ``seed``.

    Args:
        samples: ``(path, label)`` pairs, e.g. ``ImageFolderIndex.samples``.
        val_fraction: Share of each class held out, strictly between 0 and 1
            (the ``--val-split`` flag).
        seed: Random seed of the split.
        classes: Class names by label, to name a class in errors.

    Returns:
        ``(train, val)`` lists of ``(path, label)``.

    Raises:
        DatasetError: ``val_fraction`` is out of range, or some class would
            end up with no training or no validation image.

    Example:
        >>> train, val = stratified_split(index.samples, 0.2, seed=0,  # doctest: +SKIP
        ...                               classes=index.classes)
    """
    if not 0 < val_fraction < 1:
        raise DatasetError(f"--val-split must be between 0 and 1 (exclusive), got {val_fraction}")
    labels = [label for _, label in samples]

    def name(label: int) -> str:
        return repr(classes[label]) if classes is not None else f"with label {label}"

    counts = Counter(labels)
    single = sorted(label for label, n in counts.items() if n < 2)
    if single:
        raise DatasetError(
            f"class {name(single[0])} has only 1 image, so it cannot have both a training "
            f"and a validation image (--val-split {val_fraction}); add images"
            + (f" ({len(single)} such classes)" if len(single) > 1 else "")
        )
    try:
        train_idx, val_idx = train_test_split(
            list(range(len(samples))),
            test_size=val_fraction,
            random_state=seed,
            stratify=labels,
        )
    except ValueError as err:
        raise DatasetError(f"cannot split with --val-split {val_fraction}: {err}") from err
    for part, indices, other in (
        ("validation", val_idx, "raise"),
        ("training", train_idx, "lower"),
    ):
        present = Counter(labels[i] for i in indices)
        missing = sorted(label for label in counts if label not in present)
        if missing:
            raise DatasetError(
                f"class {name(missing[0])} would have no {part} image with "
                f"--val-split {val_fraction}; {other} --val-split or add images"
            )
    return [samples[i] for i in sorted(train_idx)], [samples[i] for i in sorted(val_idx)]


def _label_problem(name: str) -> str | None:
    """Why a folder name cannot be a class label, or None."""
    if not name.strip():
        return "empty or only whitespace"
    if name != name.strip():
        return "leading or trailing whitespace"
    if name.startswith("."):
        return "starts with a dot (hidden folder); rename or remove it"
    # Cc: control characters (newline, tab...); Cs: bytes that are not valid
    # in the file-system encoding, which no output file could hold.
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        return f"contains the control character {bad!r}"
    return None
