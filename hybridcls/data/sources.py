"""Turn command-line inputs into an ordered list of image sources.

An input is a file, a folder (walked recursively), a glob pattern or a list
file (``.txt`` / ``.lst`` with one path per line, ``.csv`` with a path
column). Every input that names something, good or bad, becomes exactly one
:class:`Source`; one that is known to be bad before decoding (missing, a
directory where a file was listed, a broken symbolic link) carries an
``error`` and still becomes one output row downstream.

Order rules, so the same command always gives the same rows:

* inputs are expanded in the order given;
* a folder is walked depth first; inside each folder, files and subfolders
  are visited together in code-point order of their names (``sorted()`` on
  the name strings), e.g. ``A.JPG``, ``a/x.jpg``, ``a-b.jpg``, ``b.jpg``;
* glob matches are sorted by path string; list-file entries keep the file's
  order;
* a file reached twice (the same path given twice, a folder and a file in it,
  two symbolic links to one file) appears once, at its first occurrence, and a
  :class:`~hybridcls.errors.HybridclsWarning` names the inputs left out and
  counts them.

Nothing here opens an image; :mod:`hybridcls.data.images` decides whether a
file decodes.
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hybridcls.errors import HybridclsWarning, InputError, ParameterError, name_some

__all__ = [
    "CSV_PATH_COLUMNS",
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "Source",
    "as_sources",
    "csv_list_rows",
    "expand_inputs",
    "walk_images",
]

#: Extensions (lower case) a folder walk keeps; compared case-insensitively.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)

#: Extensions that mark an existing file as a list of paths rather than an image.
LIST_EXTENSIONS: frozenset[str] = frozenset({".txt", ".lst", ".csv"})

#: Header names accepted for the path column of a CSV list, in order of preference.
CSV_PATH_COLUMNS: tuple[str, ...] = ("path", "filepath", "file", "image", "image_path")

_GLOB_CHARS = frozenset("*?[")

#: What an ``inputs`` parameter accepts, as its errors say it.
_ACCEPTED = ("paths, folders, globs, list files, PIL images, [H, W, 3] uint8 arrays or "
             "[3, H, W] / [N, 3, H, W] tensors")


@dataclass(frozen=True)
class Source:
    """One input image, as it will appear in the output.

    Attributes:
        path: The path as the user will recognise it (as given, or joined to
            the folder or list file it came from); not made absolute. An image
            given in memory is named ``<image N>`` (N: its position among the inputs).
        error: Why this input cannot be decoded, when that is known before
            opening it; ``None`` otherwise.
        image: An image given in memory instead of a file (a PIL image, an
            ``[H, W, 3]`` / ``[H, W]`` ``uint8`` array or a ``[3, H, W]`` tensor; see
            :func:`hybridcls.data.images.image_from_memory`); ``None`` for a file.
    """

    path: str
    error: str | None = None
    image: Any = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        """Whether the source is not already known to be bad."""
        return self.error is None


def as_sources(inputs: Any, *, parameter: str = "inputs") -> list[Source]:
    """Sources from anything the API accepts, in order, each input once.

    Accepted, alone or in a list (kinds may be mixed):

    * paths, folders, globs and list files, expanded by :func:`expand_inputs`;
    * :class:`Source` items, kept as they are (already expanded);
    * images in memory: a PIL image, a ``uint8`` array of shape ``[H, W, 3]``,
      ``[H, W, 4]`` or ``[H, W]`` (numpy's image layout), a tensor of shape
      ``[3, H, W]`` (torchvision's: ``uint8``, or floats in ``[0, 1]``), or a
      ``[N, 3, H, W]`` tensor of N images. Each becomes one source named
      ``<image K>``, K its row among the outputs (counting from 0).

    Args:
        inputs: One input or an iterable of them.
        parameter: The caller's name for ``inputs``, which errors name (``test_inputs``).

    Raises:
        ParameterError: ``None``, or another type that is neither an input nor an iterable of
            them (a number, bytes, a mapping); an input of another type, or an array or tensor
            whose shape or type is not an image's (names its position in ``inputs``).

    Example:
        >>> import numpy as np
        >>> [s.path for s in as_sources([Source("a.jpg"), np.zeros((4, 4, 3), np.uint8)])]
        ['a.jpg', '<image 1>']
    """
    if isinstance(inputs, (str, os.PathLike, Source)) or _image_kind(inputs) is not None:
        inputs = [inputs]
    items = _input_list(inputs, parameter)
    if items and all(isinstance(s, Source) for s in items):
        return items
    out: list[Source] = []
    kept: dict[tuple, str] = {}
    again: list[tuple[str, str]] = []
    for position, item in enumerate(items):
        if isinstance(item, Source) and item.image is None:
            _add_each_file_once(_expand_one(os.fspath(item.path)), kept, out, again)
        elif isinstance(item, (str, os.PathLike)):
            _add_each_file_once(_expand_one(os.fspath(item)), kept, out, again)
        else:  # an image in memory is its own row, whatever else is given
            out.extend(_memory_sources(item, position, len(out), parameter))
    if again:  # one row per file over the whole list, images in memory between copies or not
        warnings.warn(_repeated_message(again), HybridclsWarning, stacklevel=2)
    return out


def _image_kind(x: Any) -> str | None:
    """``"pil"``, ``"array"``, ``"tensor"`` for an image in memory; ``None`` otherwise.

    Duck-typed, so that this module imports neither torch nor numpy's image helpers.
    """
    if isinstance(x, Source):
        return "source" if x.image is not None else None
    module = type(x).__module__
    if module.startswith("PIL."):
        return "pil"
    if module.startswith("torch") and hasattr(x, "shape"):
        return "tensor"
    if module == "numpy" and hasattr(x, "shape"):
        return "array"
    return None


def _input_list(inputs: Any, parameter: str) -> list[Any]:
    """``inputs`` (already a collection) as a list; what cannot be one is refused by name."""
    # bytes iterate as numbers and a mapping as its keys: neither is a list of inputs
    if inputs is None or isinstance(inputs, (bytes, bytearray, Mapping)) or not isinstance(inputs, Iterable):
        shown = inputs if inputs is None or isinstance(inputs, (int, float)) else f"<{type(inputs).__name__}>"
        raise ParameterError(parameter, shown, f"expected {_ACCEPTED}, alone or in a list")
    return list(inputs)


def _memory_sources(item: Any, position: int, first: int, parameter: str = "inputs") -> list[Source]:
    kind = _image_kind(item)
    if kind == "source":
        return [item]
    if kind is None:
        raise ParameterError(parameter, f"<{type(item).__name__} at position {position}>",
                             f"expected {_ACCEPTED}")
    shape = tuple(int(d) for d in getattr(item, "shape", ()))
    if kind == "tensor" and len(shape) == 4:
        if shape[1] != 3:
            raise ParameterError(parameter, f"<tensor of shape {shape} at position {position}>",
                                 "a batch of images has shape [N, 3, H, W]")
        return [Source(f"<image {first + i}>", image=item[i]) for i in range(shape[0])]
    if kind == "tensor" and (len(shape) != 3 or shape[0] != 3):
        raise ParameterError(parameter, f"<tensor of shape {shape} at position {position}>",
                             "an image tensor has shape [3, H, W] (torchvision's layout)")
    if kind == "array" and not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4))):
        raise ParameterError(parameter, f"<array of shape {shape} at position {position}>",
                             "an image array has shape [H, W, 3], [H, W, 4] or [H, W]")
    return [Source(f"<image {first}>", image=item)]


def expand_inputs(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Source]:
    """Expand files, folders, globs and list files into image sources.

    Rules per input, checked in this order:

    * an existing folder: walked recursively (see :func:`walk_images`);
    * an existing file ending in ``.txt``, ``.lst`` or ``.csv``: a list file
      (text: one path per line, blank lines and lines starting with ``#``
      ignored; CSV: a header row naming a path column, see
      :data:`CSV_PATH_COLUMNS`, with names quoted as CSV quotes them, so they
      may hold commas, quotes and newlines);
      relative entries resolve against the list file's folder, surrounding
      whitespace is ignored, entries are not expanded further (a listed
      folder, glob or list file is not walked), entries that do not exist or
      are folders become error sources naming the list file and line;
    * any other existing file: an image input, whatever its extension;
    * a path that does not exist but contains ``*``, ``?`` or ``[``: a glob
      (``**`` recurses); matched files are image inputs, matched folders
      are skipped, matches are sorted by path string;
    * anything else: one error source, "no such file or directory".

    Args:
        inputs: Paths, folders, glob patterns or list files, in output order (one alone
            is one input, not a sequence of characters).

    Returns:
        The sources in a stable order, each file at most once (first
        occurrence wins; identity is the file itself, so symbolic links and
        different spellings of one file count as one). A file reached again
        is left out with a :class:`~hybridcls.errors.HybridclsWarning` that
        counts such inputs and names them.

    Raises:
        InputError: a glob that matches no file, a folder with no image file,
            a list file that cannot be read, is not UTF-8, lists nothing, or
            (CSV) has no recognised path column.
        ParameterError: ``inputs`` that is no path nor sequence of paths (``None``), or
            an item that is no path (names its position).

    Example:
        >>> from hybridcls.data import expand_inputs
        >>> sources = expand_inputs(["photos/", "extra/*.png", "list.csv"])  # doctest: +SKIP
        >>> [(s.path, s.error) for s in sources if s.error]  # doctest: +SKIP
        [('missing.jpg', 'no such file (listed in list.csv line 4)')]
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    items = _input_list(inputs, "inputs")
    for position, raw in enumerate(items):
        if not isinstance(raw, (str, os.PathLike)):
            raise ParameterError("inputs", f"<{type(raw).__name__} at position {position}>",
                                 "expected paths, folders, globs or list files")
    kept: dict[tuple, str] = {}
    out: list[Source] = []
    again: list[tuple[str, str]] = []
    for raw in items:
        _add_each_file_once(_expand_one(os.fspath(raw)), kept, out, again)
    if again:  # one row per image, but not without a word
        warnings.warn(_repeated_message(again), HybridclsWarning, stacklevel=2)
    return out


def _add_each_file_once(sources: Sequence[Source], kept: dict[tuple, str], out: list[Source],
                        again: list[tuple[str, str]]) -> None:
    """Append to ``out`` the ``sources`` whose file is not in ``kept`` (identity -> the path of its
    first occurrence); record each other one in ``again`` as ``(path left out, path kept)``."""
    for source in sources:
        key = _identity(source.path)
        if key in kept:
            again.append((source.path, kept[key]))
        else:
            kept[key] = source.path
            out.append(source)


def _repeated_message(again: Sequence[tuple[str, str]]) -> str:
    """The warning for inputs that name a file given before: counted, the first few named.

    Example:
        >>> print(_repeated_message([("a.png", "a.png"), ("./a.png", "a.png")]))
        2 inputs name a file given before and are left out (each file is one row): a.png (again), ./a.png (same file as a.png)
    """
    shown = [f"{path} (again)" if path == first else f"{path} (same file as {first})"
             for path, first in again]
    many = len(again) > 1
    return (f"{len(again)} input{'s' if many else ''} name{'' if many else 's'} a file given before "
            f"and {'are' if many else 'is'} left out (each file is one row): {name_some(shown)}")


def walk_images(folder: str | os.PathLike[str]) -> list[Source]:
    """List the image files under ``folder``, recursively, in walk order.

    Hidden files and folders (name starting with ``.``) are skipped, and so
    are files whose extension is not in :data:`IMAGE_EXTENSIONS`. Symbolic
    links to folders are not followed, so a link loop cannot hang the walk;
    links to files are kept. A folder named like an image (``x.jpg/``) is a
    folder: walked, not returned. A broken link or a subfolder that cannot be
    read becomes an error source, so nothing disappears silently.

    Args:
        folder: The folder to walk; it may itself be a symbolic link.

    Returns:
        Sources, depth first, names of each folder in code-point order.

    Example:
        >>> [s.path for s in walk_images("photos")]  # doctest: +SKIP
        ['photos/a.jpg', 'photos/b/c.png', 'photos/d.JPG']
    """
    root = os.fspath(folder)
    # (relative path components, source): sorting the components gives the
    # documented depth-first, per-folder name order in one place.
    found: list[tuple[tuple[str, ...], Source]] = []

    def unreadable(err: OSError) -> None:
        path = os.fspath(err.filename) if err.filename is not None else root
        rel = tuple(os.path.relpath(path, root).split(os.sep))
        found.append((rel, Source(path, error=f"cannot read folder: {_strerror(err)}")))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        prefix = () if rel_dir == os.curdir else tuple(rel_dir.split(os.sep))
        for name in filenames:
            if name.startswith(".") or not _has_image_extension(name):
                continue
            path = os.path.join(dirpath, name)
            found.append((prefix + (name,), _file_source(path)))
    found.sort(key=lambda item: item[0])
    return [source for _, source in found]


def _expand_one(raw: str) -> Iterator[Source]:
    """Sources for a single command-line input, in order, duplicates allowed."""
    if _is_dir(raw):
        sources = walk_images(raw)
        if not sources:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise InputError(f"{raw}: folder contains no image files ({exts})")
        yield from sources
    elif _is_file(raw) and _suffix(raw) in LIST_EXTENSIONS:
        yield from _read_list_file(raw)
    elif os.path.lexists(raw):
        yield _file_source(raw)
    elif _GLOB_CHARS.intersection(raw):
        yield from _expand_glob(raw)
    else:
        yield Source(raw, error="no such file or directory")


def _expand_glob(pattern: str) -> Iterator[Source]:
    matches = sorted(glob.glob(pattern, recursive=True))
    files = [m for m in matches if not _is_dir(m)]
    if not files:
        raise InputError(f"glob pattern {pattern!r} matched no files")
    for path in files:
        yield _file_source(path)


def _read_list_file(list_path: str) -> Iterator[Source]:
    """Entries of a ``.txt`` / ``.lst`` / ``.csv`` list file as sources."""
    text = _list_text(list_path)
    if _suffix(list_path) == ".csv":
        entries = [(line, entry) for line, entry, _ in _csv_entries(list_path, text)]
    else:
        entries = list(_text_entries(text))
    if not entries:
        raise InputError(f"{list_path}: list file lists no paths")
    base = os.path.dirname(list_path)
    for line, entry in entries:
        path = os.path.join(base, entry)  # an absolute entry replaces base
        where = f"(listed in {list_path} line {line})"
        source = _file_source(path)
        if source.error is not None:
            yield Source(path, error=f"{source.error} {where}")
        elif _is_dir(path):
            yield Source(path, error=f"is a directory {where}")
        else:
            yield source


def csv_list_rows(list_path: str | os.PathLike[str]) -> list[tuple[int, str, dict[str, str]]]:
    """The entries of a ``.csv`` list file with their other columns, as :func:`expand_inputs` reads it.

    Returns:
        ``(line, path, {column: value})`` per entry, in file order: ``path`` is the
        :class:`Source` path the entry becomes (joined to the list file's folder),
        columns are named by their header in lower case, values stripped.

    Raises:
        InputError: As :func:`expand_inputs` for the same file.
    """
    path = os.fspath(list_path)
    base = os.path.dirname(path)
    return [(line, os.path.join(base, entry), cells)
            for line, entry, cells in _csv_entries(path, _list_text(path))]


def _list_text(list_path: str) -> str:
    try:
        with open(list_path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise InputError(f"{list_path}: cannot read list file: {_strerror(err)}") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{list_path}: list file is not UTF-8 text "
            f"(byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from err


def _text_entries(text: str) -> Iterator[tuple[int, str]]:
    # Split on "\n" only: str.splitlines() would also split on characters
    # such as \x1c or \u2028 that are legal inside file names.
    for number, line in enumerate(text.split("\n"), start=1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield number, entry


def _csv_entries(list_path: str, text: str) -> Iterator[tuple[int, str, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        column = next((names.index(c) for c in CSV_PATH_COLUMNS if c in names), None)
        if column is None:
            raise InputError(
                f"{list_path}: CSV list file has no path column; expected one of "
                f"{', '.join(CSV_PATH_COLUMNS)}, found {', '.join(map(repr, header))}"
            )
        # A quoted field may span lines; report the line the row starts on.
        start = reader.line_num + 1
        for row in reader:
            entry = row[column].strip() if column < len(row) else ""
            if entry:
                yield start, entry, {n: v.strip() for n, v in zip(names, row)}
            start = reader.line_num + 1
    except csv.Error as err:
        raise InputError(f"{list_path} line {reader.line_num}: malformed CSV: {err}") from err


def _file_source(path: str) -> Source:
    """A source for a path expected to be a file; bad links and names get an error."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return Source(path, error="symbolic link loop")
        if os.path.islink(path):
            return Source(path, error="broken symbolic link")
        if err.errno == errno.ENOENT:
            return Source(path, error="no such file")
        return Source(path, error=f"cannot access file: {_strerror(err)}")
    except ValueError:  # e.g. an embedded NUL character from a list file
        return Source(path, error="invalid path")
    return Source(path)


def _identity(path: str) -> tuple:
    """What makes two paths the same input: the file itself when it exists."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        st = None
    if st is not None and st.st_ino:
        return ("file", st.st_dev, st.st_ino)
    try:
        return ("path", os.path.realpath(path))
    except (OSError, ValueError):
        return ("path", path)


def _is_dir(path: str) -> bool:
    return _mode_is(path, stat.S_ISDIR)


def _is_file(path: str) -> bool:
    return _mode_is(path, stat.S_ISREG)


def _mode_is(path: str, test: Callable[[int], bool]) -> bool:
    """``test`` on the mode of what ``path`` points to; False when it cannot be read."""
    try:
        return test(os.stat(path).st_mode)
    except (OSError, ValueError):  # ValueError: a NUL character in the path
        return False


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _has_image_extension(name: str) -> bool:
    return _suffix(name) in IMAGE_EXTENSIONS


def _strerror(err: OSError) -> str:
    return err.strerror or str(err)
