"""Reading a labels CSV (``image_id,label``) and joining it to predicted paths.

The join never collapses two images into one. A label's id is a path as
written in the labels file: a bare file name (``IMG_0001.png``), a path
relative to any folder (``site1/IMG_0001.png``) or an absolute path. It
names the predicted image whose path ends with the same whole components
(relative predicted paths are taken from the current folder), so
``site1/IMG_0001.png`` names ``photos/site1/IMG_0001.png`` but not
``photos/site2/IMG_0001.png`` nor ``photos/xsite1/IMG_0001.png``. A bare
file name therefore only joins when no other predicted image has that name.
An id that names two predicted images, or a predicted image named by two
ids, is an error naming both: nothing is guessed.

How an id is read:

* an id without ``/`` takes ``\\`` as the path separator, so a labels file
  written on Windows (``site1\\IMG_0001.png``) joins as ``site1/IMG_0001.png``
  does (a file name with a backslash in it needs a ``/`` somewhere in its id);
* ``./a//x.png`` is ``a/x.png``; an id that climbs out of its folder
  (``../case/site1/IMG_0001.png``) is taken from the labels file's folder, as
  a list file's relative entries are, and so names one absolute path.

When predicted images are left without a label, the error also lists the ids
that matched no predicted image, and says when the two sides could not meet:
absolute ids against relative predicted paths, which are taken from the
current folder.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from hybridcls.errors import InputError, ParameterError

__all__ = ["LabelJoin", "join_labels", "read_labels"]

_ID_COLUMNS = ("image_id", "path", "file", "filename", "image")
_LABEL_COLUMNS = ("label", "class", "class_name")
#: How many examples an error message lists.
_SHOW = 5


@dataclass(frozen=True)
class _Entry:
    """One labels-file row: the id (normalised, see the module docstring), its class, its line."""

    image_id: str
    label: str
    line: int

    @property
    def parts(self) -> tuple[str, ...]:
        return PurePath(self.image_id).parts


def _read_entries(labels: str | os.PathLike[str]) -> list[_Entry]:
    path = Path(labels)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            id_col = next((c for c in _ID_COLUMNS if c in header), None)
            label_col = next((c for c in _LABEL_COLUMNS if c in header), None)
            if id_col is None or label_col is None:
                raise InputError(
                    f"{path}: labels file needs an id column ({'/'.join(_ID_COLUMNS)}) and a label "
                    f"column ({'/'.join(_LABEL_COLUMNS)}); found {header}"
                )
            entries: list[_Entry] = []
            first_line: dict[str, int] = {}
            for row in reader:
                line_no = reader.line_num  # where the record ends: a quoted id may span lines
                raw_id = (row.get(id_col) or "").strip()
                label = (row.get(label_col) or "").strip()
                if not raw_id or not label:
                    raise InputError(f"{path}:{line_no}: empty {id_col if not raw_id else label_col}")
                image_id = _normalise_id(raw_id, path)
                if image_id in first_line:
                    raise InputError(f"{path}:{line_no}: image {image_id!r} is listed twice "
                                     f"(first on line {first_line[image_id]})")
                first_line[image_id] = line_no
                entries.append(_Entry(image_id, label, line_no))
    except OSError as exc:
        # named as the parameter that gave it (the command line: --labels)
        raise ParameterError("labels", os.fspath(labels),
                             f"cannot read labels file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: labels file is not UTF-8 text") from exc
    return entries


def _normalise_id(raw_id: str, labels_file: Path) -> str:
    """One spelling per image: separators, ``.`` and ``..`` resolved (see the module docstring)."""
    if "/" not in raw_id:
        raw_id = raw_id.replace("\\", "/")  # written on Windows
    # "./a/x.png" and "a//x.png" are "a/x.png": one image, however it is spelled
    image_id = os.path.normpath(raw_id)
    if PurePath(image_id).parts[:1] == ("..",):
        # normpath leaves ".." only in front: the id is relative to the labels file's folder
        image_id = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(labels_file)),
                                                 image_id))
    return image_id


def read_labels(labels: str | os.PathLike[str]) -> dict[str, str]:
    """Map each image id, as the labels file writes it, to its true class.

    Accepts a header with one of ``image_id/path/file/filename/image`` and one
    of ``label/class/class_name``. Ids are kept as written (a file name, a
    relative or an absolute path), only normalised (``./a//x.png`` is
    ``a/x.png``, ``site1\\x.png`` is ``site1/x.png``, ``../b/x.png`` is
    ``b/x.png`` beside the labels file's folder, as an absolute path);
    :func:`join_labels` matches them to predicted paths.

    Args:
        labels: The labels CSV.

    Raises:
        ParameterError: A file that cannot be read (``labels='x.csv': cannot read labels
            file (...)``).
        InputError: No such columns, an empty id or label, or one id listed
            twice (names the file and both lines).

    Example:
        >>> read_labels("labels.csv")  # doctest: +SKIP
        {'site1/IMG_0001.png': 'red circle', 'site2/IMG_0001.png': 'blue square'}
    """
    return {e.image_id: e.label for e in _read_entries(labels)}


@dataclass(frozen=True)
class LabelJoin:
    """Labels joined to predicted paths.

    Attributes:
        labels: The true class of each predicted path, in the paths' order; ``None`` for a
            path that needs no label (:func:`join_labels`' ``required``) and has none.
        missing: Ids of the labels file that no predicted path matches
            (labelled images without a prediction), in file order.
        lines: The labels file's line of each of ``labels`` (for messages; ``None`` with
            a ``None`` label).
    """

    labels: list[str | None]
    missing: list[str]
    lines: list[int | None] = field(default_factory=list)


def join_labels(paths: Sequence[str], labels: str | os.PathLike[str], *,
                required: Sequence[bool] | None = None) -> LabelJoin:
    """The true class of each predicted path, from a labels file (see the module docstring).

    Args:
        paths: Predicted image paths, as the predictions file writes them.
        labels: The labels CSV (:func:`read_labels`).
        required: For each path, whether it must have a label (default: every path). An
            error row (an unreadable input) need not: it is no prediction, and an
            unreadable file is often missing from the labels file.

    Returns:
        A :class:`LabelJoin`: one class per path, and the labelled ids left
        without a prediction.

    Raises:
        InputError: An id that names two predicted images, a predicted image
            named by two ids (both name the files and lines), or predicted
            images that require a label without one (counts them, names the first few).

    Example:
        >>> join_labels(["site1/IMG_0001.png", "site2/IMG_0001.png"],
        ...             "labels.csv").labels  # doctest: +SKIP
        ['red circle', 'blue square']
    """
    entries = _read_entries(labels)
    # Only suffixes as long as the longest id can match: index those, not every suffix.
    depth = max((len(e.parts) for e in entries), default=0)
    suffixes: dict[tuple[str, ...], list[int]] = {}
    for i, p in enumerate(paths):
        parts = PurePath(os.path.abspath(p)).parts
        for k in range(1, min(depth, len(parts)) + 1):
            suffixes.setdefault(parts[-k:], []).append(i)

    owner: dict[int, _Entry] = {}
    missing: list[str] = []
    for e in entries:
        rows = suffixes.get(e.parts, [])
        # the same path predicted twice is one image; two paths are two images
        images = list(dict.fromkeys(paths[i] for i in rows))
        if len(images) > 1:
            a, b = images[:2]
            raise InputError(
                f"{labels}:{e.line}: {e.image_id!r} matches {len(images)} predicted images, "
                f"{a!r} and {b!r}; key the labels file by a longer path (e.g. "
                f"{_telling_suffix(a, b)!r}) so that each id names one image")
        if not rows:
            missing.append(e.image_id)
        for i in rows:
            other = owner.setdefault(i, e)
            if other is not e:
                raise InputError(
                    f"{labels}: line {other.line} ({other.image_id!r}) and line {e.line} "
                    f"({e.image_id!r}) both name the predicted image {paths[i]!r}; keep one")
    unlabelled = [p for i, p in enumerate(paths)
                  if i not in owner and (required is None or required[i])]
    if unlabelled:
        matched = {e.image_id for e in owner.values()}
        unmatched = [e for e in entries if e.image_id not in matched]
        raise InputError(_no_label_message(labels, unlabelled, unmatched))
    joined = [owner.get(i) for i in range(len(paths))]
    return LabelJoin([None if e is None else e.label for e in joined], missing,
                     [None if e is None else e.line for e in joined])


def _no_label_message(labels: str | os.PathLike[str], unlabelled: Sequence[str],
                      unmatched: Sequence[_Entry]) -> str:
    """Both sides of a failed join: predicted images without a label, ids without an image."""
    text = (f"{labels}: {len(unlabelled)} predicted image(s) have no label, e.g. "
            + ", ".join(repr(p) for p in unlabelled[:_SHOW]))
    if not unmatched:
        return text
    text += (f"; {len(unmatched)} id(s) of the labels file match no predicted image, e.g. "
             + ", ".join(f"{e.image_id!r} (line {e.line})" for e in unmatched[:_SHOW]))
    absolute = next((e.image_id for e in unmatched if os.path.isabs(e.image_id)), None)
    if absolute is None:
        return text
    if any(not os.path.isabs(p) for p in unlabelled):
        return text + (
            f". Relative predicted paths are taken from the current folder ({os.getcwd()}), "
            f"and an absolute id such as {absolute!r} names one absolute path: run from the "
            "folder the predictions were made in, or key the labels file by relative paths "
            f"(e.g. {_tail(unlabelled[0])!r})")
    return text + (
        f". An absolute id such as {absolute!r} names that absolute path only: key the labels "
        f"file by relative paths (e.g. {_tail(unlabelled[0])!r}) to match the end of a "
        "predicted path")


def _tail(path: str, components: int = 2) -> str:
    """The last ``components`` parts of ``path``: a relative id that names it."""
    return str(PurePath(*PurePath(path).parts[-components:]))


def _telling_suffix(a: str, b: str) -> str:
    """The shortest end of path ``a`` that is not also the end of path ``b``."""
    pa, pb = PurePath(os.path.abspath(a)).parts, PurePath(os.path.abspath(b)).parts
    k = next((k for k in range(1, len(pa) + 1) if pa[-k:] != pb[-k:]), len(pa))
    return str(PurePath(*pa[-k:]))
