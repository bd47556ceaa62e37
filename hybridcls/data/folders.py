"""Index an ImageFolder-style training folder and split it for validation.

The layout is torchvision's: ``ROOT/<class name>/**/<image>``. The scan is our
own rather than ``torchvision.datasets.folder.make_dataset`` because that one
follows symbolic links (a link loop explodes the walk), treats hidden folders
such as ``.ipynb_checkpoints`` as classes and reports problems as bare
``FileNotFoundError``; here the files of a class are found by the same walk as
prediction inputs (:func:`~hybridcls.data.sources.walk_images`) and every
problem is a :class:`~hybridcls.errors.DatasetError` naming the folder.

The scan decodes nothing. :func:`find_unreadable` decodes every file once
(in DataLoader workers, at reduced scale) and :func:`drop_unreadable` takes the
files that failed out of the index, refusing a class folder left with no
readable image as an empty one is refused: no image shows that class, and
training would otherwise "succeed" with it.
"""

from __future__ import annotations

import math
import os
import sys
import unicodedata
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hybridcls.data.images import DEFAULT_MAX_PIXELS, load_image
from hybridcls.data.sources import IMAGE_EXTENSIONS, walk_images
from hybridcls.errors import (
    DatasetError,
    DataTooSmallError,
    HybridclsWarning,
    ImageDecodeError,
    name_some,
    named_path,
)

__all__ = [
    "ImageFolderIndex",
    "check_folder",
    "class_size_error",
    "drop_unreadable",
    "find_unreadable",
    "scan_image_folder",
    "stratified_split",
    "val_split_range",
]

Samples = list[tuple[str, int]]
#: ``(path, label, reason)`` of each file that failed to decode.
Unreadable = Sequence[tuple[str, int, str]]

#: Files per batch of the decode check: enough that handing results back from the
#: worker processes costs little next to decoding them.
_CHECK_BATCH = 32
#: Unreadable files listed per class in an error; the rest are counted.
_MAX_LISTED = 20


@dataclass(frozen=True)
class ImageFolderIndex:
    """The classes and image files of a training folder.

    Attributes:
        root: The folder as given.
        classes: Class names, the subfolder names in code-point order; a
            sample's label is its class's position here.
        samples: ``(path, label)`` pairs, by class, then in walk order.
        unreadable: ``(path, label, reason)`` of the files
            :func:`drop_unreadable` took out of ``samples`` because they failed
            to decode; empty for an index fresh from :func:`scan_image_folder`.
        role: What the folder is, in messages (``"training folder"``, ``"support folder"``...).
        parameter: The parameter that gave the folder (``"support"``), or None for a
            positional one; later errors about the folder name it as the scan's do.
    """

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    unreadable: list[tuple[str, int, str]] = field(default_factory=list)
    role: str = "training folder"
    parameter: str | None = None

    @property
    def at(self) -> str:
        """The start of an error about this folder: ``parameter='root': `` or nothing."""
        return _folder_parameter(self.parameter, self.root)


def _folder_parameter(parameter: str | None, root: str | os.PathLike[str]) -> str:
    """``parameter='root': ``, the start of an error about a folder a parameter gave; ``""``
    without one (a positional folder).

    The command line turns it into the flag (:func:`hybridcls.cli.common.flag_message`).

    Example:
        >>> _folder_parameter("support", "data/support")
        "support='data/support': "
        >>> _folder_parameter(None, "data/train")
        ''
    """
    return named_path(root, parameter) + ": " if parameter else ""


def check_folder(root: str | os.PathLike[str], *, role: str = "training folder",
                 parameter: str | None = None) -> None:
    """That ``root`` is a folder: :func:`scan_image_folder`'s first check, which reads nothing,
    for a command to make before it loads any model.

    Raises:
        DatasetError: ``root`` is missing or not a folder (``parameter='root': `` first, as
            :func:`scan_image_folder`'s errors).
    """
    root_str = os.fspath(root)
    at = _folder_parameter(parameter, root_str)
    if not os.path.exists(root_str):
        raise DatasetError(at + f"{role} not found: {root_str}")
    if not os.path.isdir(root_str):
        raise DatasetError(at + f"not a folder: {root_str} (expected the {role})")


def scan_image_folder(root: str | os.PathLike[str], *, role: str = "training folder",
                      min_classes: int = 2, parameter: str | None = None) -> ImageFolderIndex:
    """List the classes (subfolders) and their image files under ``root``.

    Each subfolder of ``root`` is a class, its name the label; images are
    found recursively inside it (hidden files and folders skipped, symbolic
    links to folders not followed below the class level). Files directly in
    ``root`` are ignored.

    Args:
        root: The training folder.
        role: What the folder is, in messages (``"support folder"``...).
        min_classes: Fewest class subfolders accepted (a support folder may hold one class).
        parameter: The parameter that gave ``root`` (``"support"``, ``"val_dir"``); errors then
            start ``parameter='root': `` so that the command line names its flag
            (:func:`hybridcls.cli.common.flag_message`). None for a positional folder.

    Returns:
        The index; images are not opened.

    Raises:
        DatasetError: ``root`` is missing or not a folder, has no class
            subfolders, a class folder has no image, or a folder name cannot
            be a label (empty, surrounding whitespace, leading dot, control
            characters such as a newline).
        DataTooSmallError: fewer than ``min_classes`` class subfolders (one).

    Example:
        >>> index = scan_image_folder("data/train")  # doctest: +SKIP
        >>> index.classes[:3], len(index.samples)  # doctest: +SKIP
        (['antelope', 'bat', 'beaver'], 24322)
    """
    root_str = os.fspath(root)
    at = _folder_parameter(parameter, root_str)  # in front of every error
    check_folder(root_str, role=role, parameter=parameter)
    try:
        listing = list(os.scandir(root_str))
        entries = sorted(e.name for e in listing if e.is_dir())
    except OSError as err:
        raise DatasetError(at + f"cannot read {role} {root_str}: {err.strerror}") from err
    if not entries:
        raise DatasetError(
            at + f"no class subfolders in {root_str} (the {role}): expected one folder per class, "
            f"e.g. {os.path.join(root_str, 'cat', '001.jpg')}"
        )
    loose = sorted(e.name for e in listing if not e.is_dir()
                   and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    if loose:
        # an image beside the class folders has no class: left out, but not without a word
        warnings.warn(f"{at or root_str + ': '}{len(loose)} image file(s) directly in the {role}, outside "
                      f"any class subfolder, are left out: {name_some(loose)}", HybridclsWarning,
                      stacklevel=2)
    for name in entries:
        problem = _label_problem(name)
        if problem:
            path = os.path.join(root_str, name)
            raise DatasetError(at + f"class folder {path!r} is not a valid label: {problem}")
    if len(entries) < min_classes:
        raise DataTooSmallError(
            at + f"needs at least 2 classes, found 1 in {root_str} ({entries[0]!r}): a classifier "
            "tells classes apart; add a subfolder of images for another class"
        )
    samples: Samples = []
    for label, name in enumerate(entries):
        folder = os.path.join(root_str, name)
        sources = walk_images(folder)
        for source in sources:
            # Broken links stay in as samples (training skips undecodable
            # files); an unreadable folder would silently drop a whole subtree.
            if source.error is not None and os.path.isdir(source.path):
                raise DatasetError(at + f"{source.path}: {source.error}")
        paths = [source.path for source in sources]
        if not paths:
            raise DatasetError(at + f"empty class folder: {folder} (in the {role})")
        samples.extend((path, label) for path in paths)
    return ImageFolderIndex(root=root_str, classes=entries, samples=samples, role=role,
                            parameter=parameter)


class _DecodeCheck(Dataset):
    """Index -> ``(index, reason or None)``: decodes a file and keeps nothing.

    Module level, so that DataLoader workers can pickle it under any start method.
    """

    def __init__(self, paths: Sequence[str], max_pixels: int | None) -> None:
        self.paths = list(paths)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, str | None]:
        try:
            load_image(self.paths[index], max_pixels=self.max_pixels, draft=True)
        except ImageDecodeError as err:
            return index, err.reason
        return index, None


def find_unreadable(
    paths: Sequence[str],
    *,
    workers: int = 0,
    progress: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    desc: str = "checking images",
) -> dict[str, str]:
    """Decode every file once and say which ones fail, and why.

    Each file goes through :func:`~hybridcls.data.images.load_image` (so a
    reason is the one an error row of ``predict`` gives for the same file) in
    its ``draft`` mode: JPEGs decode at 1/8 scale, which reads and checks every
    byte at about a third of the cost of a full decode.

    Args:
        paths: The files, e.g. the paths of ``ImageFolderIndex.samples``.
        workers: DataLoader worker processes decoding in parallel (0: in this process).
        progress: Show a progress bar on stderr.
        max_pixels: Passed to :func:`load_image`; training decodes with its default.
        desc: The progress bar's label.

    Returns:
        ``path -> reason`` for each file that failed, in the order of ``paths``.

    Example:
        >>> find_unreadable(["a.jpg", "empty.png"])  # doctest: +SKIP
        {'empty.png': 'empty file (0 bytes)'}
    """
    loader = DataLoader(
        _DecodeCheck(paths, max_pixels),
        batch_size=_CHECK_BATCH,
        num_workers=workers,
        collate_fn=list,
    )
    failed: dict[str, str] = {}
    with tqdm(
        total=len(paths),
        desc=desc,
        unit="img",
        leave=False,
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for batch in loader:
            failed.update((paths[i], reason) for i, reason in batch if reason is not None)
            bar.update(len(batch))
    return failed


def drop_unreadable(index: ImageFolderIndex, unreadable: Mapping[str, str]) -> ImageFolderIndex:
    """Take the files that failed to decode out of an index, refusing a class left with none.

    Args:
        index: A scanned folder.
        unreadable: ``path -> reason``, e.g. from :func:`find_unreadable`; paths
            of other folders are ignored.

    Returns:
        The index whose ``samples`` are the readable files and whose
        ``unreadable`` lists the others with their class and reason.

    Raises:
        DatasetError: a class folder none of whose files decodes; the message
            names every such folder, the folder's role and the parameter that gave
            it (``ImageFolderIndex.at``), and lists its files, each with its reason.

    Example:
        >>> index = scan_image_folder("data/train")  # doctest: +SKIP
        >>> failed = find_unreadable([p for p, _ in index.samples])  # doctest: +SKIP
        >>> index = drop_unreadable(index, failed)  # doctest: +SKIP
    """
    samples = [(path, label) for path, label in index.samples if path not in unreadable]
    bad = [(path, label, unreadable[path]) for path, label in index.samples if path in unreadable]
    readable = Counter(label for _, label in samples)
    dead = [label for label in range(len(index.classes)) if not readable[label]]
    if dead:
        blocks = []
        for label in dead:
            files = _files_of(bad, label)
            folder = os.path.join(index.root, index.classes[label])
            blocks.append(
                f"class folder {folder} has no readable image (in the {index.role}): none of "
                f"its {_plural(len(files), 'file')} decodes:{_listing(files)}"
            )
        advice = "replace or remove the unreadable files, or remove the class folder"
        raise DatasetError(index.at + "\n".join([*blocks, advice]))
    return replace(index, samples=samples, unreadable=[*index.unreadable, *bad])


def class_size_error(
    classes: Sequence[str], label: int, count: int, unreadable: Unreadable, problem: str
) -> DataTooSmallError:
    """The error for a class with too few (readable) images for what was asked.

    Args:
        classes: Class names by label.
        label: The class.
        count: Its (readable) images.
        unreadable: ``ImageFolderIndex.unreadable``: the class's files in it are
            counted and listed, each with its reason.
        problem: What the count cannot do and what to do instead, e.g.
            ``"fewer than the k=5 folds; lower it or add images"``.

    Returns:
        The error, for the caller to raise.

    Example:
        >>> print(class_size_error(["ant", "bat"], 1, 1, [("b/x.png", 1, "empty file (0 bytes)")],
        ...                        "too few; add images"))
        class 'bat' has 1 readable image and 1 unreadable file, too few; add images, or replace its unreadable file:
          b/x.png: empty file (0 bytes)
    """
    files = _files_of(unreadable, label)
    if not files:
        return DataTooSmallError(
            f"class {classes[label]!r} has {_plural(count, 'image')}, {problem}"
        )
    return DataTooSmallError(
        f"class {classes[label]!r} has {_plural(count, 'readable image')} and "
        f"{_plural(len(files), 'unreadable file')}, {problem}, or replace its unreadable "
        f"{'file' if len(files) == 1 else 'files'}:{_listing(files)}"
    )


def stratified_split(
    samples: Sequence[tuple[str, int]],
    val_fraction: float,
    seed: int,
    *,
    classes: Sequence[str],
    unreadable: Unreadable = (),
) -> tuple[Samples, Samples]:
    """Split samples into training and validation sets with the same class mix.

    Uses scikit-learn's ``train_test_split(stratify=...)``; each part keeps
    the input order, so the split depends only on ``seed`` (and the samples).

    Args:
        samples: ``(path, label)`` pairs, e.g. ``ImageFolderIndex.samples``;
            after :func:`drop_unreadable`, only readable files, so that every
            class gets readable images on both sides.
        val_fraction: Share of each class held out, strictly between 0 and 1
            (``TrainConfig.val_split``, the name errors give it).
        seed: Random seed of the split.
        classes: Class names by label, to name a class in errors.
        unreadable: ``ImageFolderIndex.unreadable``, to count and list a
            class's unreadable files in errors.

    Returns:
        ``(train, val)`` lists of ``(path, label)``.

    Raises:
        DatasetError: ``val_fraction`` is out of range.
        DataTooSmallError: some class would end up with no training or no
            validation image (the message names it and its counts), or either
            side would have fewer images than there are classes (the message
            gives the range of ``val_split`` that works, see :func:`val_split_range`).

    Example:
        >>> train, val = stratified_split(index.samples, 0.2, seed=0,  # doctest: +SKIP
        ...                               classes=index.classes, unreadable=index.unreadable)
    """
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val_split={val_fraction}: must be between 0 and 1 (exclusive)")
    labels = [label for _, label in samples]
    counts = Counter(labels)
    single = sorted(label for label, n in counts.items() if n < 2)
    if single:
        others = f" ({len(single)} such classes)" if len(single) > 1 else ""
        raise class_size_error(
            classes, single[0], 1, unreadable,
            f"so it cannot have both a training and a validation image "
            f"(val_split={val_fraction}){others}; add images",
        )
    too_small = _split_size_error(len(samples), len(counts), val_fraction)
    if too_small is not None:
        raise too_small
    try:
        train_idx, val_idx = train_test_split(
            list(range(len(samples))),
            test_size=val_fraction,
            random_state=seed,
            stratify=labels,
        )
    except ValueError as err:  # not expected after the checks above; scikit-learn's reason then
        raise DataTooSmallError(
            f"cannot split with val_split={val_fraction}: {err}; change val_split or add images"
        ) from err
    for part, indices, other in (
        ("validation", val_idx, "raise"),
        ("training", train_idx, "lower"),
    ):
        present = Counter(labels[i] for i in indices)
        missing = sorted(label for label in counts if label not in present)
        if missing:
            raise class_size_error(
                classes, missing[0], counts[missing[0]], unreadable,
                f"so it would have no {part} image with val_split={val_fraction}; "
                f"{other} it or add images",
            )
    return [samples[i] for i in sorted(train_idx)], [samples[i] for i in sorted(val_idx)]


def val_split_range(n_images: int, n_classes: int) -> tuple[float, float] | None:
    """The smallest and largest ``val_split`` whose two parts each hold an image per class.

    A stratified split (scikit-learn's ``train_test_split``) holds out
    ``ceil(val_split * n_images)`` images and needs at least ``n_classes`` on
    each side: so ``val_split`` must be above ``(n_classes - 1) / n_images``
    and at most ``(n_images - n_classes) / n_images``. The bounds returned are
    the shortest decimals (2 to 6 places) inside that range.

    Args:
        n_images: Images to split.
        n_classes: Classes among them.

    Returns:
        ``(smallest, largest)``, or ``None`` when no split works
        (``n_images < 2 * n_classes``).

    Example:
        >>> val_split_range(6, 2)  # 1 of 6 held out is too few for 2 classes, 5 too many
        (0.17, 0.66)
        >>> val_split_range(3, 2) is None
        True
    """
    if n_images < 2 * n_classes:
        return None

    def works(fraction: float) -> bool:
        return n_classes <= math.ceil(fraction * n_images) <= n_images - n_classes

    for digits in range(2, 7):
        scale = 10**digits
        # Integers first, then one step either way: the float product may round across.
        low = next((k / scale for k in (
            (n_classes - 1) * scale // n_images + j for j in (0, 1, 2)) if 0 < k < scale
            and works(k / scale)), None)
        high = next((k / scale for k in (
            (n_images - n_classes) * scale // n_images - j for j in (0, 1)) if 0 < k < scale
            and works(k / scale)), None)
        if low is not None and high is not None and low <= high:
            return low, high
    exact = n_classes / n_images
    return exact, exact


def _split_size_error(n_images: int, n_classes: int, val_fraction: float) -> DataTooSmallError | None:
    """The error for a split with fewer images than classes on one side, or None."""
    n_val = math.ceil(val_fraction * n_images)  # scikit-learn's rounding of test_size
    n_train = n_images - n_val
    if n_val >= n_classes and n_train >= n_classes:
        return None
    if n_val < n_classes:
        what = (f"holds out {n_val} of the {n_images} images, fewer than the {n_classes} "
                "classes: the validation part needs an image of each class")
    else:
        what = (f"leaves {n_train} of the {n_images} images for training, fewer than the "
                f"{n_classes} classes: the training part needs an image of each class")
    bounds = val_split_range(n_images, n_classes)
    if bounds is None:  # unreachable after the single-image check; kept for direct callers
        fix = f"add images (a split needs at least {2 * n_classes})"
    elif bounds[0] == bounds[1]:
        fix = f"pass val_split={bounds[0]} (the one split that works) or add images"
    elif n_val < n_classes:
        fix = f"pass val_split={bounds[0]} or more (up to {bounds[1]}), or add images"
    else:
        fix = f"pass val_split={bounds[1]} or less (down to {bounds[0]}), or add images"
    return DataTooSmallError(f"val_split={val_fraction} {what}; {fix}")


def _files_of(unreadable: Unreadable, label: int) -> list[tuple[str, str]]:
    return [(path, reason) for path, y, reason in unreadable if y == label]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _listing(files: Sequence[tuple[str, str]]) -> str:
    """One indented ``path: reason`` line per file for the first :data:`_MAX_LISTED`; the
    rest counted by reason."""
    lines = [f"\n  {path}: {reason}" for path, reason in files[:_MAX_LISTED]]
    rest = Counter(reason for _, reason in files[_MAX_LISTED:])
    if rest:
        tally = ", ".join(f"{n} x {reason}" for reason, n in rest.most_common())
        lines.append(f"\n  ... and {sum(rest.values())} more: {tally}")
    return "".join(lines)


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
