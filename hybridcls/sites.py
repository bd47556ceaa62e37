"""Class lists per site: which classes each input may be, from a site file and the inputs' paths.

A site file is a CSV with a header row and these columns (any order, names in
any case):

* ``classes`` (required): the allowed classes, separated by ``;``, each named
  as in the prompts file (a class name or a synonym, compared as training
  folders are: case, ``_``, ``+``, ``-``, spaces);
* ``prefix``: a folder or file path; an input whose path is that path or lies
  under it gets the row's classes. A relative prefix is read from the site
  file's folder (as a list file's entries are), and when several prefixes
  hold an input the longest wins;
* ``site``: a name for the row, which a ``.csv`` list file given as input can
  name in its own ``site`` column, image by image (that wins over any prefix).

At least one of ``prefix`` and ``site`` must be there. An input that no row
reaches (and any image given in memory) may be every class. A row that reaches
none of the inputs (a prefix that holds none of them, a site without a prefix that
no list file names) is most likely misspelt: :meth:`SiteClasses.check_reach` warns
(:class:`~hybridcls.errors.SiteFileWarning`, naming the file, line and prefix or
site) once per such row and prediction. ``allowed_classes``
(one list for every input) is intersected with the site's list. Example::

    prefix,site,classes
    traps/kenya,kenya,zebra;lion;elephant;hyena
    traps/alaska,alaska,moose;grizzly bear;polar bear

:class:`SiteClasses` reads the file (its syntax: the file and line of a
malformed row); :meth:`SiteClasses.resolve` checks its names against the
prompts (a name that is no class is an error naming the file and line) and
:func:`allowed_masks` turns inputs into the ``[N, C]`` mask that
:meth:`hybridcls.gate.Gate.predict` applies (:mod:`hybridcls.gate.restriction`).
Torch-free.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hybridcls.data.sources import LIST_EXTENSIONS, Source, csv_list_rows
from hybridcls.errors import ParameterError, PromptFileError, SiteFileWarning
from hybridcls.zeroshot.prompts import PromptSet, _read_text, normalize_label

__all__ = [
    "CLASS_SEPARATOR",
    "LIST_SITE_COLUMN",
    "ResolvedSites",
    "SiteClasses",
    "SiteRow",
    "allowed_columns",
    "allowed_masks",
    "read_site_classes",
]

#: Separates the class names of one ``classes`` cell.
CLASS_SEPARATOR = ";"

#: The column of a ``.csv`` list file (an input) that names a site of the site file, per image.
LIST_SITE_COLUMN = "site"

_COLUMNS = ("prefix", "site", "classes")


@dataclass(frozen=True)
class SiteRow:
    """One row of a site file.

    Attributes:
        line: Its line in the file (where the row starts).
        prefix: The absolute, normalised path it holds, or ``None``.
        site: Its name, or ``None``.
        classes: The class names as written, in order.
    """

    line: int
    prefix: str | None
    site: str | None
    classes: tuple[str, ...]


@dataclass(frozen=True)
class SiteClasses:
    """A parsed site file, and the per-image site names of the list files it was bound to.

    Attributes:
        source: The site file (messages name it).
        rows: Its rows, in file order.
        listed: ``{normalised input path: (list file, line, site name)}`` from the
            ``site`` column of ``.csv`` list files (:meth:`for_inputs`).
        reach_checked: Whether :meth:`check_reach` has run on every input (the command
            line checks them all before a shard or a resume predicts a share of them);
            a prediction checks its own inputs when not.
    """

    source: str
    rows: tuple[SiteRow, ...]
    listed: Mapping[str, tuple[str, int, str]] = field(default_factory=dict)
    reach_checked: bool = False

    def for_inputs(self, inputs: Any) -> SiteClasses:
        """A copy that also knows the ``site`` column of every ``.csv`` list file among ``inputs``.

        Args:
            inputs: What :func:`hybridcls.data.as_sources` accepts; list files are found
                among the paths (other inputs are left alone).

        Raises:
            PromptFileError: A list file's site that the site file does not name, or an
                image listed twice with two sites (names the list file and line).
        """
        names = {r.site: r for r in self.rows if r.site is not None}
        listed = dict(self.listed)
        for item in _path_inputs(inputs):
            if not (os.path.isfile(item) and os.path.splitext(item)[1].lower() == ".csv"):
                continue
            for line, path, cells in csv_list_rows(item):
                site = cells.get(LIST_SITE_COLUMN, "")
                if not site:
                    continue
                if site not in names:
                    known = ", ".join(repr(n) for n in names) or "none: it has no site column"
                    raise PromptFileError(item, line, f"site {site!r} is not in {self.source} "
                                          f"(its sites: {known})")
                first = listed.setdefault(_key(path), (item, line, site))
                if first[2] != site:
                    # the image is predicted once: one of the two sites would be dropped unsaid
                    raise PromptFileError(item, line, f"{path} is listed again with site {site!r}; "
                                          f"{first[0]} line {first[1]} gives it site {first[2]!r} "
                                          "(one image, one site)")
        return replace(self, listed=listed)

    def unreached(self, sources: Sequence[Source]) -> list[tuple[SiteRow, str]]:
        """The rows that reach none of ``sources``, each with the reason, in file order.

        A row with a prefix reaches an input that is that path or lies under it; a row
        with a site name only, an input whose list file names that site (:meth:`for_inputs`).
        Images given in memory have no path and reach no row.

        Args:
            sources: Every input, expanded.

        Returns:
            ``[(row, reason)]``: ``prefix P holds none of the N inputs`` or ``site S is named
            by no 'site' cell of a .csv list file among the N inputs``.
        """
        keys = {_key(s.path) for s in sources if s.image is None}
        prefixes = {r.prefix for r in self.rows if r.prefix is not None}
        held: set[str] = set()
        for key in keys:  # each input's folders, up to the root: N x depth, not N x rows
            path = key
            while True:
                if path in prefixes:
                    held.add(path)
                parent = os.path.dirname(path)
                if parent == path:
                    break
                path = parent
        named = {site for key, (_, _, site) in self.listed.items() if key in keys}
        n = f"{len(sources)} input{'s' if len(sources) != 1 else ''}"
        out = []
        for row in self.rows:
            if row.prefix is not None and row.prefix not in held:
                out.append((row, f"prefix {row.prefix} holds none of the {n}"))
            elif row.prefix is None and row.site not in named:
                out.append((row, (f"site {row.site!r} is named by no {LIST_SITE_COLUMN!r} cell "
                                  f"of a .csv list file among the {n}")))
        return out

    def check_reach(self, sources: Sequence[Source]) -> SiteClasses:
        """Warn once per row that reaches none of ``sources`` (:meth:`unreached`).

        Args:
            sources: Every input, expanded (bind the list files first: :meth:`for_inputs`).

        Returns:
            A copy with ``reach_checked`` set, so that predicting a share of ``sources``
            (a shard, a resume) does not warn again about the rest.

        Warns:
            SiteFileWarning: ``FILE:LINE: prefix ... holds none of the N inputs ...``.
        """
        for row, reason in self.unreached(sources):
            typo = " (a misspelt folder?)" if row.prefix is not None else ""
            warnings.warn(f"{self.source}:{row.line}: {reason}: its classes limit no image{typo}",
                          SiteFileWarning, stacklevel=2)
        return replace(self, reach_checked=True)

    def resolve(self, prompts: PromptSet) -> ResolvedSites:
        """Each row's classes as ``prompts`` columns.

        Args:
            prompts: The classifier's classes in column order (``classes_``: its
                aligned prompt set, e.g. ``ClipTower.prompts``).

        Raises:
            PromptFileError: A name that matches no class (names the site file and line),
                or one that matches two lines of the prompts file.
        """
        columns = []
        for row in self.rows:
            cols = []
            for name in row.classes:
                i = prompts.match(name)
                if i is None:
                    raise PromptFileError(self.source, row.line, f"class {name!r} is not in the "
                                          f"prompts file {prompts.source}")
                cols.append(i)
            columns.append(np.array(sorted(set(cols)), dtype=np.int64))
        return ResolvedSites(self, len(prompts), tuple(columns))


@dataclass(frozen=True)
class ResolvedSites:
    """A site file whose names are columns of one classifier's classes."""

    sites: SiteClasses
    n_classes: int
    columns: tuple[np.ndarray, ...]

    def row_for(self, path: str) -> tuple[int, str] | None:
        """``(row index, where)`` of the site file row that holds ``path``, or ``None``.

        A list file's ``site`` cell wins; else the longest prefix that is the path or
        one of its folders. ``where`` names the line that decided, for messages.
        """
        key = _key(path)
        rows = self.sites.rows
        if key in self.sites.listed:
            list_file, line, site = self.sites.listed[key]
            i = next(j for j, r in enumerate(rows) if r.site == site)
            return i, f"site {site!r} ({list_file} line {line}, {self.sites.source} line {rows[i].line})"
        best = None
        for j, r in enumerate(rows):
            if r.prefix is not None and _under(key, r.prefix) and (
                    best is None or len(r.prefix) > len(rows[best].prefix or "")):
                best = j
        if best is None:
            return None
        return best, f"{self.sites.source} line {rows[best].line}"


def allowed_masks(sources: Sequence[Source], n_classes: int, base: np.ndarray | None,
                  sites: ResolvedSites | None) -> tuple[np.ndarray, dict[int, str]]:
    """Each input's allowed classes, and the inputs that allow none.

    Args:
        sources: The inputs, in order (images given in memory match no site row).
        n_classes: ``C``.
        base: ``[C]`` the classes allowed everywhere (:func:`allowed_columns`), or ``None``.
        sites: The resolved site file, or ``None``.

    Returns:
        ``([N, C] mask, {input index: reason})``, the reason naming the site file line.
    """
    everywhere = np.ones(n_classes, dtype=bool) if base is None else base
    mask = np.tile(everywhere, (len(sources), 1))
    empty: dict[int, str] = {}
    for i, source in enumerate(sources):
        hit = None if sites is None or source.image is not None else sites.row_for(source.path)
        if hit is not None:
            row, where = hit
            site = np.zeros(n_classes, dtype=bool)
            site[sites.columns[row]] = True
            mask[i] &= site
        if not mask[i].any():
            # worded for rows, which both the library and the command line write
            empty[i] = ("no class is allowed: none of the classes of " + where + " is among the "
                        "classes allowed everywhere" if hit is not None
                        else "no class is allowed: the classes allowed everywhere are none")
    return mask, empty


def allowed_columns(names: Iterable[str], prompts: PromptSet) -> np.ndarray:
    """``[C]`` booleans: the classes named in ``allowed_classes``.

    Raises:
        ParameterError: A name that matches no class of ``prompts``, or no name.
    """
    names = list(names)
    if not names:
        raise ParameterError("allowed_classes", names, "expected at least one class name")
    mask = np.zeros(len(prompts), dtype=bool)
    for name in names:
        i = prompts.match(name)
        if i is None:
            raise ParameterError("allowed_classes", name, f"not a class of the prompts file "
                                 f"{prompts.source}")
        mask[i] = True
    return mask


def read_site_classes(path: str | os.PathLike[str], *, parameter: str | None = None) -> SiteClasses:
    """Read and check a site file's syntax (see the module's notes).

    ``parameter``: the one that gave the file (``"site_classes"``), named when it cannot be read.

    Raises:
        PromptFileError: The file cannot be read or is not UTF-8; no header row, no
            ``classes`` column or neither ``prefix`` nor ``site``; a row with another
            number of fields than the header, an empty ``classes`` cell or class name,
            a class named twice in a row, neither a prefix nor a site, or a prefix or
            site already given on another line; no row. Each names the file and line.
    """
    source = os.fspath(path)
    text = _read_text(source, parameter)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an open quote is an error
    try:
        header = next(reader, None)
        if header is None:
            raise PromptFileError(source, 1, "empty site file: expected a header row "
                                  "(prefix,site,classes)")
        names = [h.strip().lower() for h in header]
        unknown = [h for h in names if h not in _COLUMNS]
        if unknown or "classes" not in names or not {"prefix", "site"} & set(names):
            raise PromptFileError(source, 1, f"header {','.join(header)!r}: expected a 'classes' "
                                  "column and a 'prefix' or 'site' column (and no other)")
        repeated = sorted({h for h in names if names.count(h) > 1})
        if repeated:
            raise PromptFileError(source, 1, f"header {','.join(header)!r}: column "
                                  f"{repeated[0]!r} appears {names.count(repeated[0])} times "
                                  "(names are case-insensitive); keep one")
        base = os.path.dirname(os.path.abspath(source))
        rows: list[SiteRow] = []
        first: dict[tuple[str, str], int] = {}
        start = reader.line_num + 1
        for fields in reader:
            if any(f.strip() for f in fields):
                row = _parse_row(source, start, names, fields, base)
                for kind, value in (("prefix", row.prefix), ("site", row.site)):
                    if value is not None:
                        if (kind, value) in first:
                            raise PromptFileError(source, start, f"{kind} {value!r} is already "
                                                  f"on line {first[(kind, value)]}")
                        first[(kind, value)] = start
                rows.append(row)
            start = reader.line_num + 1
    except csv.Error as err:
        raise PromptFileError(source, reader.line_num, f"malformed CSV: {err}") from err
    if not rows:
        raise PromptFileError(source, None, "the site file has no row after its header")
    return SiteClasses(source, tuple(rows))


def _parse_row(source: str, line: int, names: list[str], fields: list[str], base: str) -> SiteRow:
    if len(fields) != len(names):
        raise PromptFileError(source, line, f"{len(fields)} fields, expected {len(names)} "
                              f"({','.join(names)})")
    cells = {n: f.strip() for n, f in zip(names, fields)}
    prefix = cells.get("prefix") or None
    site = cells.get("site") or None
    if prefix is None and site is None:
        raise PromptFileError(source, line, "the row has neither a prefix nor a site")
    if not cells["classes"]:
        raise PromptFileError(source, line, "empty classes: expected class names separated by "
                              f"{CLASS_SEPARATOR!r}")
    classes = [" ".join(c.split()) for c in cells["classes"].split(CLASS_SEPARATOR)]
    for k, name in enumerate(classes, start=1):
        if not name:
            raise PromptFileError(source, line, f"class {k} of {len(classes)} in "
                                  f"{cells['classes']!r} is empty")
    if len({normalize_label(c) for c in classes}) < len(classes):
        raise PromptFileError(source, line, f"a class is named twice in {cells['classes']!r}")
    return SiteRow(line, None if prefix is None else _key(os.path.join(base, prefix)), site,
                   tuple(classes))


def _key(path: str) -> str:
    """The form under which paths are compared: absolute and normalised (links not followed)."""
    return os.path.normpath(os.path.abspath(path))


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip(os.sep) + os.sep)


def _path_inputs(inputs: Any) -> list[str]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    try:
        items = list(inputs)
    except TypeError:
        return []
    return [os.fspath(x) for x in items if isinstance(x, (str, os.PathLike))
            and os.path.splitext(os.fspath(x))[1].lower() in LIST_EXTENSIONS]
