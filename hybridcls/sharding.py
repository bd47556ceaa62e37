"""Prediction files that survive crashes and split across jobs: shards, manifests, resume, merge.

One prediction run covers a contiguous range ``[start, stop)`` of the
expanded inputs (all of them, a ``--shard I/N``, or one torchrun rank's
share of either) and writes it into one file, in input order, flushed and
fsynced per batch (:mod:`hybridcls.outputs`). Beside the file lies a small
JSON manifest (``<output>.manifest.json``) saying what the file is meant to
hold: the format and columns, the settings that change the rows, a hash of
the whole input list and of this range's keys (the paths as the file
writes them). With it:

* ``--resume`` reads the file back, drops a record cut short by a crash,
  checks that the complete rows are exactly the first inputs of the range
  (same paths, same order) and appends the rest: the finished file is the
  one an uninterrupted run writes, in input order;
* :func:`merge_parts` checks that the parts of one run cover every input
  exactly once and concatenates them in input order (contiguous ranges
  make that a byte copy; no row is re-formatted);
* under ``torchrun`` (:func:`predict_to_output`) every rank writes its part,
  then rank 0 merges them.

Written here, not taken from a library: nothing in torch / timm covers
resumable, mergeable prediction files. ``torch.distributed`` provides the
process group and the barriers.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridcls.cache import atomic_path, atomic_write_json
from hybridcls.errors import InputError, ParameterError, name_some
from hybridcls.outputs import (
    PredictionRow,
    check_unique_keys,
    is_unknown,
    open_writer,
    output_columns,
    output_key,
)
from hybridcls.provenance import RunRecord
from hybridcls.torchrun import local_gpu, torchrun_group, torchrun_world

if TYPE_CHECKING:  # typing only: `hybridcls merge` must not pay for importing torch
    from hybridcls.data.sources import Source

__all__ = [
    "MANIFEST_SUFFIX",
    "Manifest",
    "MergeResult",
    "OutputScan",
    "PredictSummary",
    "Record",
    "ResumePoint",
    "ShardSpec",
    "keys_digest",
    "manifest_path",
    "merge_parts",
    "part_paths",
    "predict_to_output",
    "read_record",
    "resume_point",
]

MANIFEST_SUFFIX = ".manifest.json"
_MANIFEST_KIND = "hybridcls-predictions"
_MANIFEST_VERSION = 1
#: How many problems a merge error lists before "and N more".
_SHOW = 5

RowsFn = Callable[[Sequence["Source"]], Iterable[Sequence[PredictionRow]]]


def manifest_path(output: str | os.PathLike[str]) -> Path:
    """The manifest beside an output file: ``pred.csv`` -> ``pred.csv.manifest.json``."""
    return Path(os.fspath(output) + MANIFEST_SUFFIX)


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``count`` (counting from 0): a contiguous share of a range.

    Example:
        >>> s = ShardSpec.parse("1/3")
        >>> s.range(0, 10), str(s)
        ((3, 6), '1/3')
    """

    index: int
    count: int

    @classmethod
    def parse(cls, text: str, parameter: str = "shard") -> ShardSpec:
        """``"I/N"`` -> ShardSpec; errors name ``parameter`` (``shard='3/3': ...``).

        Raises:
            ParameterError: not two integers ``I/N`` with ``0 <= I < N``.
        """
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if m is None:
            raise ParameterError(parameter, text, "expected I/N, e.g. 0/8 (shard I of N, counting from 0)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1:
            raise ParameterError(parameter, text, "N must be at least 1")
        if index >= count:
            raise ParameterError(parameter, text, f"I must be between 0 and {count - 1} (shards count from 0)")
        return cls(index, count)

    def range(self, start: int, stop: int) -> tuple[int, int]:
        """This shard's ``[start, stop)`` within ``[start, stop)``; shard sizes differ by at most 1."""
        size = stop - start
        return start + size * self.index // self.count, start + size * (self.index + 1) // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-256 of a sequence of strings (length-prefixed, so no separator can collide).

    Example:
        >>> keys_digest(["a", "b"]) == keys_digest(["a", "b"]) != keys_digest(["ab"])
        True
    """
    h = _KeyHasher()
    for key in keys:
        h.add(key)
    return h.hexdigest()


class _KeyHasher:
    """Incremental :func:`keys_digest`."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, key: str) -> None:
        b = key.encode("utf-8", "surrogatepass")  # lone surrogates: undecodable file-name bytes
        self._h.update(len(b).to_bytes(8, "little"))
        self._h.update(b)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@dataclass
class Manifest:
    """What an output file is meant to hold; written beside it before its first row.

    Attributes:
        format: ``csv``, ``jsonl`` or ``kaggle`` (``npz`` or ``parquet`` beside an
            embedding file, whose manifest stays for its record: :mod:`hybridcls.embeddings`).
        columns: The CSV header (for JSON Lines: the same fields).
        settings: Everything that changes the rows (models and content
            fingerprints of the files they come from, prompts, mode, top-k, ...).
        inputs_total: Number of expanded inputs of the whole run.
        inputs_sha256: :func:`keys_digest` of all expanded input paths, in order.
        start: First input index this file holds.
        stop: One past the last.
        keys_sha256: :func:`keys_digest` of this range's keys as the file
            writes them (:func:`~hybridcls.outputs.output_key`).
        label: For messages: ``"shard 3/8"``, ``"rank 1/2"``, ``""`` for a whole run.
        record: The :class:`~hybridcls.provenance.RunRecord` of the run that wrote the file
            (versions, models, gate, command line, what the engine applied, times, counts),
            written before the first row and again, complete, after the last; a merged file's
            also holds its parts' (``parts``). Kept for the record, not compared on resume
            or merge.
    """

    format: str
    columns: list[str]
    settings: dict[str, Any]
    inputs_total: int
    inputs_sha256: str
    start: int
    stop: int
    keys_sha256: str
    label: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default=_MANIFEST_KIND)
    version: int = field(default=_MANIFEST_VERSION)

    def write(self, output: str | os.PathLike[str]) -> None:
        atomic_write_json(manifest_path(output), asdict(self), indent=1)

    @classmethod
    def read(cls, output: str | os.PathLike[str]) -> Manifest:
        """The manifest of ``output``.

        Raises:
            InputError: missing, not JSON, or not a manifest of this version (names the file).
        """
        path = manifest_path(output)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(
                f"{output}: no manifest {path.name} beside it; only files written by "
                "predict_to_output (`hybridcls predict` with output=FILE) can be resumed or merged") from None
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: unreadable manifest ({err})") from err
        if not isinstance(data, dict) or data.get("kind") != _MANIFEST_KIND:
            raise InputError(f"{path}: not a hybridcls predictions manifest")
        if data.get("version") != _MANIFEST_VERSION:
            raise InputError(f"{path}: manifest version {data.get('version')!r}, this hybridcls reads "
                             f"{_MANIFEST_VERSION}")
        try:
            return cls(**data)
        except TypeError as err:
            raise InputError(f"{path}: malformed manifest ({err})") from err

    def mismatches(self, other: Manifest, *, ranges: bool = True) -> list[str]:
        """How ``other`` differs in what it means (settings, inputs, and with ``ranges`` the range)."""
        out = []
        if self.format != other.format:
            out.append(f"format {self.format} vs {other.format}")
        elif self.columns != other.columns:
            out.append(f"columns {','.join(self.columns)} vs {','.join(other.columns)}")
        for key in sorted(set(self.settings) | set(other.settings)):
            a, b = self.settings.get(key), other.settings.get(key)
            if a != b:
                out.append(_difference(key, a, b))
        if self.inputs_total != other.inputs_total:
            out.append(f"inputs: {self.inputs_total} vs {other.inputs_total}")
        elif self.inputs_sha256 != other.inputs_sha256:
            out.append(f"inputs: the same number ({self.inputs_total}) but other paths or order")
        if ranges and (self.start, self.stop) != (other.start, other.stop):
            out.append(f"range #{self.start}-#{self.stop - 1} vs #{other.start}-#{other.stop - 1}")
        return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 48 else text[:45] + "..."


def _difference(key: str, a: Any, b: Any) -> str:
    """Setting ``key``, ``a`` against ``b``, in a line: two mappings (a folder's files and their
    hashes) by the keys that differ, since their cut texts would often read the same; anything
    else side by side."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return f"{key} {_short(a)} vs {_short(b)}"
    parts = []
    for what, keys in (("only in the first", [k for k in a if k not in b]),
                       ("only in the second", [k for k in b if k not in a]),
                       ("changed", [k for k in a if k in b and a[k] != b[k]])):
        if keys:
            parts.append(f"{len(keys)} {what} ({name_some(sorted(map(str, keys)), 3)})")
    return f"{key}: " + "; ".join(parts)


@dataclass(frozen=True)
class Record:
    """One complete row read back: its key (first field), status, where it ends, and whether it
    answers "unknown"."""

    key: str
    ok: bool
    end: int
    line: int
    unknown: bool = False


class OutputScan:
    """Read a predictions file back record by record, stopping before a record cut short.

    A crash can leave the last record unfinished: a line without its newline,
    or a quoted CSV field (a file name with a newline) that never closes.
    Such a tail is not a record; :attr:`end` is the byte offset just after
    the last complete one, where a resumed run truncates and appends.
    Anything else that does not parse is an error naming the line.

    Attributes:
        header_end: Byte offset after the CSV header (0 for JSON Lines);
            ``None`` when the file has no complete header (start it again).
        end: Offset after the last complete record seen so far.
        size: The file's size; ``end < size`` after a full scan means a cut tail.

    Example:
        >>> scan = OutputScan("pred.csv", "csv", columns)  # doctest: +SKIP
        >>> n = sum(1 for _ in scan.records()); scan.end < scan.size  # doctest: +SKIP
        False
    """

    def __init__(self, path: str | os.PathLike[str], fmt: str, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.format = fmt
        self.columns = list(columns)
        self.header_end: int | None = None
        self.end = 0
        self.size = self.path.stat().st_size

    def records(self) -> Iterator[Record]:
        with open(self.path, "rb") as fh:
            if self.format == "jsonl":
                yield from self._jsonl(fh)
            else:
                yield from self._csv(fh)

    def _lines(self, fh, state: dict[str, int]) -> Iterator[str]:
        """Complete lines (newline included) as text; stops at a line cut short."""
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            state["offset"] += len(raw)
            state["line"] += 1
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{self.path} line {state['line']}: not UTF-8 ({err})") from err
        state["eof"] = 1

    def _csv(self, fh) -> Iterator[Record]:
        state = {"offset": 0, "line": 0, "eof": 0}
        reader = csv.reader(self._lines(fh, state), strict=True)
        try:
            header = next(reader, None)
        except csv.Error:
            header = None  # a header cut short: nothing was written after it
        if header is None:
            return
        if header != self.columns:
            raise InputError(
                f"{self.path} line 1: columns {','.join(header)}; expected {','.join(self.columns)}")
        self.header_end = self.end = state["offset"]
        status = self.columns.index("status") if "status" in self.columns else None
        branch = self.columns.index("branch") if "branch" in self.columns else None
        first = state["line"] + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                if state["eof"]:
                    return  # a quoted field left open by a crash
                raise InputError(f"{self.path} line {state['line']}: malformed CSV ({err})") from err
            if len(row) != len(self.columns):
                raise InputError(f"{self.path} line {first}: {len(row)} fields, expected "
                                 f"{len(self.columns)}")
            ok = row[status] == "ok" if status is not None else row[1] != ""
            self.end = state["offset"]
            unknown = ok and is_unknown(None if branch is None else row[branch], row[1])
            yield Record(row[0], ok, self.end, first, unknown)
            first = state["line"] + 1

    def _jsonl(self, fh) -> Iterator[Record]:
        state = {"offset": 0, "line": 0, "eof": 0}
        self.header_end = 0
        for text in self._lines(fh, state):
            if not text.strip():
                self.end = state["offset"]
                continue
            try:
                record = json.loads(text)
            except ValueError as err:
                raise InputError(f"{self.path} line {state['line']}: not JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                raise InputError(f"{self.path} line {state['line']}: a JSON record without a path")
            self.end = state["offset"]
            ok = record.get("status") == "ok"
            yield Record(record["path"], ok, self.end, state["line"],
                         ok and is_unknown(record.get("branch"), record.get("label")))


@dataclass
class ResumePoint:
    """How far an existing output got: ``done`` rows, ending at byte ``end`` (None: start over)."""

    done: int
    n_ok: int
    n_error: int
    end: int | None
    n_unknown: int = 0


def resume_point(output: str | os.PathLike[str], manifest: Manifest,
                 key_at: Callable[[int], str]) -> ResumePoint:
    """Check that ``output`` is an earlier, possibly cut, run of ``manifest`` and how far it got.

    Args:
        output: The existing file.
        manifest: What this run would write (settings, inputs, range).
        key_at: Input index -> key as the file writes it.

    Raises:
        InputError: no manifest, other settings or inputs (lists the
            differences), or rows that are not the range's first inputs in
            order (names the line).
    """
    old = Manifest.read(output)
    diffs = old.mismatches(manifest)
    if diffs:
        raise InputError(
            f"resume=True: cannot continue {output}: it was written with other settings or inputs "
            f"({'; '.join(diffs)}); run without resume=True to start it again, or choose another "
            "output=FILE")
    scan = OutputScan(output, manifest.format, manifest.columns)
    point = ResumePoint(0, 0, 0, None)
    size = manifest.stop - manifest.start
    for rec in scan.records():
        i = manifest.start + point.done
        if point.done >= size:
            raise InputError(f"{output} line {rec.line}: more rows than the {size} inputs it is for")
        expected = key_at(i)
        if rec.key != expected:
            raise InputError(
                f"{output} line {rec.line}: a row for {rec.key!r} where input #{i} is {expected!r}; "
                "the file was changed after it was written (run without resume=True to start it again)")
        point.done += 1
        point.n_ok += rec.ok
        point.n_error += not rec.ok
        point.n_unknown += rec.unknown
    point.end = None if scan.header_end is None else scan.end
    return point


@dataclass
class MergeResult:
    """What :func:`merge_parts` wrote."""

    output: Path
    parts: int
    rows: int
    n_ok: int
    n_error: int
    n_unknown: int = 0


def merge_parts(parts: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], *,
                expect: tuple[int, int] | None = None, label: str = "",
                record: RunRecord | None = None) -> MergeResult:
    """Merge part files into ``output`` in input order, checking every input is there exactly once.

    Each part needs its manifest (``hybridcls predict --shard I/N --output PART``
    writes it). The parts must come from one run (same settings and inputs)
    and together cover ``expect`` (default: every input) with no gap and no
    overlap; each part must be complete and its rows must be its inputs.
    The merged file is written atomically, with its own manifest, and is
    byte for byte the concatenation of the parts' rows.

    Args:
        parts: Part files, in any order.
        output: The merged file (CSV, JSON Lines or Kaggle: the parts' format).
        expect: The input range to cover, ``(start, stop)``.
        label: The merged manifest's label.
        record: The merging run's record, finished here with the merged file's counts;
            the merged manifest's ``record`` is it (or nothing) plus, when the parts have
            records, ``parts``: each part's, in input order.

    Returns:
        Counts of rows, predictions, error rows and "unknown" answers.

    Raises:
        InputError: a part without a manifest, parts of different runs,
            inputs missing or present twice (lists the first few), a part
            cut short or edited.

    Example:
        >>> merge_parts(["p0.csv", "p1.csv"], "pred.csv").rows  # doctest: +SKIP
        1200
    """
    if not parts:
        raise InputError("nothing to merge: no part files given")
    out_real = os.path.realpath(output)
    infos: list[tuple[Path, Manifest]] = []
    for p in parts:
        if os.path.realpath(p) == out_real:
            raise InputError(f"{p}: the output cannot be one of the parts")
        infos.append((Path(p), Manifest.read(p)))
    ref_path, ref = infos[0]
    for p, m in infos[1:]:
        diffs = ref.mismatches(m, ranges=False)
        if diffs:
            raise InputError(f"{p} and {ref_path} come from different runs: {'; '.join(diffs)}")
    start, stop = expect if expect is not None else (0, ref.inputs_total)
    infos.sort(key=lambda pm: (pm[1].start, pm[1].stop))

    problems: list[str] = []
    pos, prev = start, None
    for p, m in infos:
        if m.start > pos:
            problems.append(f"{_span(pos, m.start)} missing: no part has them")
        elif m.start < pos and m.stop > m.start:
            problems.append(f"{_span(m.start, min(pos, m.stop))} twice: in {prev} and {p}")
        pos = max(pos, m.stop)
        prev = p
    if pos < stop:
        problems.append(f"{_span(pos, stop)} missing: no part has them")
    if infos[0][1].start < start or pos > stop:
        problems.append(f"parts hold inputs outside #{start}-#{stop - 1}")

    scans: list[OutputScan] = []
    n_ok = n_error = n_unknown = 0
    merged_keys = _KeyHasher()
    # A Kaggle id is a file name: parts written before predict refused duplicates may hold one twice.
    kaggle_ids: dict[str, str] | None = {} if ref.format == "kaggle" else None
    for p, m in infos:
        scan = OutputScan(p, m.format, m.columns)
        part_keys = _KeyHasher()
        rows = 0
        for rec in scan.records():
            if kaggle_ids is not None:
                where = f"{p} line {rec.line}"
                first = kaggle_ids.setdefault(rec.key, where)
                if first is not where:
                    problems.append(f"image_id {rec.key!r} twice: {first} and {where}")
            part_keys.add(rec.key)
            merged_keys.add(rec.key)
            rows += 1
            n_ok += rec.ok
            n_error += not rec.ok
            n_unknown += rec.unknown
        size = m.stop - m.start
        where = f"{p}{f' ({m.label})' if m.label else ''}"
        if scan.header_end is None or rows < size:
            problems.append(f"{_span(m.start + rows, m.stop)} missing: {where} stops after {rows} of "
                            f"{size} rows (rerun it with resume=True)")
        elif rows > size:
            problems.append(f"{where} has {rows} rows for {size} inputs: some are there twice")
        elif part_keys.hexdigest() != m.keys_sha256:
            problems.append(f"{where}: its rows are not the paths of its inputs #{m.start}-#{m.stop - 1} "
                            "(edited or mixed up after it was written)")
        elif scan.end < scan.size:
            problems.append(f"{where}: {scan.size - scan.end} bytes after its last row")
        scans.append(scan)
    if problems:
        more = f"; and {len(problems) - _SHOW} more" if len(problems) > _SHOW else ""
        raise InputError(f"cannot merge {len(infos)} part(s): " + "; ".join(problems[:_SHOW]) + more)

    merged_record = {} if record is None else record.finish(
        predicted=n_ok, failed=n_error, unknown=n_unknown).as_dict()
    if any(m.record for _, m in infos):
        merged_record["parts"] = [m.record for _, m in infos]
    merged = Manifest(ref.format, ref.columns, ref.settings, ref.inputs_total, ref.inputs_sha256,
                      start, stop, merged_keys.hexdigest(), label, record=merged_record)
    merged.write(output)
    with atomic_path(output) as tmp, open(tmp, "wb") as dst:
        with open(infos[0][0], "rb") as src:
            dst.write(src.read(scans[0].header_end or 0))
        for (p, _), scan in zip(infos, scans):
            with open(p, "rb") as src:
                src.seek(scan.header_end or 0)
                _copy_bytes(src, dst, scan.end - (scan.header_end or 0))
        dst.flush()
        os.fsync(dst.fileno())
    return MergeResult(Path(output), len(infos), stop - start, n_ok, n_error, n_unknown)


def _copy_bytes(src, dst, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            break
        dst.write(chunk)
        n -= len(chunk)


def _span(a: int, b: int) -> str:
    """Inputs ``[a, b)`` for a message: '#7', '#7-#9 (3 inputs)'."""
    return f"input #{a}" if b - a == 1 else f"inputs #{a}-#{b - 1} ({b - a})"


# ---------------------------------------------------------------------------- torchrun


def part_paths(output: str | os.PathLike[str], world: int) -> list[Path]:
    """Where the ranks of a torchrun run write their parts: ``<output>.parts/rank-R-of-W<suffix>``."""
    out = Path(output)
    folder = out.parent / f"{out.name}.parts"
    return [folder / f"rank-{r:05d}-of-{world:05d}{out.suffix}" for r in range(world)]


# ---------------------------------------------------------------------------- predict


@dataclass
class PredictSummary:
    """Counts over the file a run finished (for rank 0 under torchrun: the merged file)."""

    n_ok: int
    n_error: int
    resumed: int
    rank: int = 0
    n_unknown: int = 0


def predict_to_output(
    predict_rows: RowsFn,
    sources: Sequence[Source],
    output: str | os.PathLike[str],
    *,
    fmt: str,
    topk: int,
    extra_columns: Sequence[str] = (),
    settings: dict[str, Any],
    shard: ShardSpec | None = None,
    resume: bool = False,
    record: RunRecord | None = None,
) -> PredictSummary:
    """Predict ``sources`` (or a shard of them) into ``output``, resumably; merge torchrun parts.

    Args:
        predict_rows: Sources -> output rows per batch, in order; only
            called when there is something left to predict.
        sources: Every expanded input, in order (all jobs of an array job
            must expand the same list).
        output: The file to write (with its manifest beside it).
        fmt: Output format.
        topk: Top-k columns per row.
        extra_columns: Further columns the rows carry.
        settings: What changes the rows; a resumed or merged file must match.
        shard: Predict only this share of ``sources``.
        resume: Keep the complete rows of an earlier run of the same command
            and predict the rest (starts afresh when ``output`` does not exist).
        record: The run's :class:`~hybridcls.provenance.RunRecord`, written into the
            manifest once the first batch is predicted (``predict_rows`` has loaded the
            models and described them in it by then), and again, finished with the file's
            counts (``predicted``, ``failed``, ``unknown``, ``resumed``), after the last row.
            Under torchrun rank 0 finishes it with the merged file's counts.

    Returns:
        Counts of prediction and error rows; ``resumed`` rows were already there.

    Nothing is written until ``predict_rows`` has produced its first batch:
    a model or prompts file that fails to load leaves no file behind (and an
    existing file, resumed or not, as it was).

    Raises:
        InputError: ``--resume`` on a file of other settings, inputs or
            content; inputs that ``fmt`` cannot tell apart (Kaggle: two files
            of one name, :func:`~hybridcls.outputs.check_unique_keys`).

    Example:
        >>> predict_to_output(rows_fn, expand_inputs(["photos/"]), "pred.csv", fmt="csv",  # doctest: +SKIP
        ...                   topk=5, settings={"model": "..."}, shard=ShardSpec(0, 8), resume=True)
    """
    check_unique_keys((s.path for s in sources), fmt)  # before anything is read or written
    columns = output_columns(fmt, topk, extra_columns)
    inputs_sha = keys_digest(s.path for s in sources)

    def key_at(i: int) -> str:
        return output_key(sources[i].path, fmt)

    def manifest(a: int, b: int, label: str) -> Manifest:
        return Manifest(fmt, columns, settings, len(sources), inputs_sha, a, b,
                        keys_digest(key_at(i) for i in range(a, b)), label)

    start, stop = shard.range(0, len(sources)) if shard else (0, len(sources))
    label = f"shard {shard}" if shard else ""
    world = torchrun_world()

    def part(path: Path, m: Manifest) -> PredictSummary:
        return _predict_part(predict_rows, sources, path, m, key_at, topk=topk,
                             extra_columns=extra_columns, resume=resume, record=record)

    if world is None:
        return part(Path(output), manifest(start, stop, label))
    rank, size, local = world
    with torchrun_group(local_gpu(local), barriers_only=True) as dist:
        if resume and Path(output).exists():
            done = resume_point(output, manifest(start, stop, label), key_at)  # refuses other settings, like one process
            if done.end is not None and done.done == stop - start:  # an earlier run merged it all
                dist.barrier()
                return PredictSummary(done.n_ok, done.n_error, done.done, rank, done.n_unknown)
        paths = part_paths(output, size)
        a, b = ShardSpec(rank, size).range(start, stop)
        mine = part(paths[rank], manifest(a, b, f"{label + ', ' if label else ''}rank {rank}/{size}"))
        dist.barrier()  # every part is complete
        summary = PredictSummary(mine.n_ok, mine.n_error, mine.resumed, rank, mine.n_unknown)
        if rank == 0:
            merged = merge_parts(paths, output, expect=(start, stop), label=label, record=record)
            shutil.rmtree(paths[0].parent, ignore_errors=True)
            summary = PredictSummary(merged.n_ok, merged.n_error, summary.resumed, rank,
                                     merged.n_unknown)
        dist.barrier()  # no rank exits (and makes torchrun stop the others) before the merge
        return summary


def _predict_part(predict_rows: RowsFn, sources: Sequence[Source], output: Path, m: Manifest,
                  key_at: Callable[[int], str], *, topk: int, extra_columns: Sequence[str],
                  resume: bool, record: RunRecord | None = None) -> PredictSummary:
    point = ResumePoint(0, 0, 0, None)
    if resume and output.exists():
        point = resume_point(output, m, key_at)
    if point.end is None:
        point = ResumePoint(0, 0, 0, None)
    todo = sources[m.start + point.done: m.stop]
    # The first batch before the first byte: predict_rows loads its model on the way to it, so
    # a usage error (bad prompts file, bad checkpoint) leaves the output as it found it.
    batches = iter(predict_rows(todo) if todo else ())
    first = list(itertools.islice(batches, 1))
    if point.end is None:
        # The old rows go before the new manifest: a crash in between leaves no file that
        # the new manifest would wrongly vouch for.
        output.unlink(missing_ok=True)
        if record is not None and first:
            m = dataclasses.replace(m, record=record.as_dict())
        m.write(output)
    else:
        previous = Manifest.read(output).record  # checked by resume_point already
        os.truncate(output, point.end)  # drop a record cut short by a crash
    writer = open_writer(output, m.format, topk=topk, extra_columns=extra_columns,
                         append=point.end is not None)
    with writer:
        for rows in itertools.chain(first, batches):
            writer.write_many(rows)
    summary = PredictSummary(point.n_ok + writer.n_ok, point.n_error + writer.n_error, point.done,
                             n_unknown=point.n_unknown + writer.n_unknown)
    if record is not None:
        # The record, complete: a resumed file's counts are the whole file's, and a run that
        # had nothing left to predict (and loaded no model) takes the models, gate and runtime
        # from the record of the run that wrote the rows (its settings are this run's).
        if record.models is None and point.end is not None:
            for key in ("models", "gate", "runtime"):
                setattr(record, key, previous.get(key))
        record.finish(predicted=summary.n_ok, failed=summary.n_error, unknown=summary.n_unknown,
                      resumed=summary.resumed)
        dataclasses.replace(m, record=record.as_dict()).write(output)
    return summary


def read_record(output: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run record in the manifest beside ``output``, or ``None`` when there is no manifest.

    Raises:
        InputError: A manifest that is there but cannot be read (names it).
    """
    if not manifest_path(output).is_file():
        return None
    return Manifest.read(output).record or None
