"""Prediction rows and the writers that stream them to CSV, JSON Lines or a Kaggle CSV.

Every input becomes exactly one row, either a prediction (``status="ok"``)
or an error (``status="error"`` with the reason), in input order. Writers
to a file flush and ``fsync`` after every batch, so a crash loses at most the
batch being written; :mod:`hybridcls.sharding` resumes such a file
(``open_writer(..., append=True)`` continues it without a second header).

A CSV row's columns, in order (:func:`output_columns`): ``path, label, score, branch,
status, error``, ``top1, top1_score`` ... ``topK, topK_score``, then the optional ones in
:func:`extra_columns`' order: a hybrid's :data:`BRANCH_COLUMNS`, ``model_version``
(``predict --model-version``), :data:`ROLLUP_COLUMNS` (``predict --rollup-threshold`` or
``--rollup-precision``), one ``score:<class>`` per class in ``classes_`` order
(``predict --all-scores``). A JSON Lines record has the same fields in the same order,
``topk`` as a list and the class scores as one ``scores`` object. A Kaggle file is
``image_id, class``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

from hybridcls.cache import json_text
from hybridcls.errors import InputError, ParameterError

__all__ = [
    "BRANCH_COLUMNS",
    "DEFAULT_TOPK",
    "FORMATS",
    "MODEL_VERSION_COLUMN",
    "ROLLUP_COLUMNS",
    "SCORES_COLUMN",
    "SCORE_PREFIX",
    "PredictionRow",
    "PredictionWriter",
    "batch_rows",
    "check_topk",
    "check_unique_keys",
    "extra_columns",
    "infer_format",
    "is_unknown",
    "open_writer",
    "output_columns",
    "output_key",
    "read_prediction_lines",
    "read_predictions",
    "score_columns",
    "topk_pairs",
]

FORMATS = ("csv", "jsonl", "kaggle")

#: Top-k pairs per row when none is asked for; every class when there are fewer (:func:`check_topk`).
DEFAULT_TOPK = 5

#: The columns a hybrid's rows add: the gate's score and weight, and each branch's own top-k.
BRANCH_COLUMNS = ("gate_score", "gate_weight", "supervised_topk", "zeroshot_topk")
#: The column of the short model id (:func:`hybridcls.provenance.model_version`), when asked for.
MODEL_VERSION_COLUMN = "model_version"
#: The columns of roll-up (:mod:`hybridcls.hierarchy`): the answer's rank (0 = the class, 1 = its
#: parent, ...) and the class it came from; ``label`` and ``score`` are then the answer's.
ROLLUP_COLUMNS = ("rank", "leaf")
#: The JSON Lines field of every class's probability (``predict --all-scores``): ``{class: p}``.
SCORES_COLUMN = "scores"
#: A CSV file spreads that object over one column per class, named this prefix + the class name
#: as the prompts file spells it (``score:polar bear``); no built-in column has a ``:``.
SCORE_PREFIX = "score:"
#: The ``branch`` (and, in a Kaggle file, the ``class``) of an image no branch was sure of.
UNKNOWN = "unknown"


def extra_columns(fmt: str = "csv", *, branch_columns: bool, model_version: bool = False,
                  score_classes: Sequence[str] | None = None, rollup: bool = False) -> list[str]:
    """The columns rows carry beyond path, label, score, branch, status, error and top-k.

    The one home of their order: a hybrid's :data:`BRANCH_COLUMNS`, then
    :data:`MODEL_VERSION_COLUMN`, then :data:`ROLLUP_COLUMNS`, then every class's probability
    (:func:`score_columns`: last, as their number varies with the classes).

    Args:
        fmt: The output format (:data:`FORMATS`).
        branch_columns: A hybrid's :data:`BRANCH_COLUMNS`.
        model_version: :data:`MODEL_VERSION_COLUMN`.
        score_classes: The classes in ``classes_`` order, for every class's probability
            (``predict --all-scores``); ``None`` for none.
        rollup: :data:`ROLLUP_COLUMNS` (roll-up is on).

    Raises:
        InputError: ``score_classes`` with ``fmt="kaggle"`` (see :func:`score_columns`).

    Example:
        >>> extra_columns(branch_columns=False, model_version=True)
        ['model_version']
        >>> extra_columns("csv", branch_columns=False, model_version=True, score_classes=["fox", "elk"])
        ['model_version', 'score:fox', 'score:elk']
        >>> extra_columns("jsonl", branch_columns=False, model_version=True, score_classes=["fox", "elk"])
        ['model_version', 'scores']
    """
    return [*(BRANCH_COLUMNS if branch_columns else ()),
            *([MODEL_VERSION_COLUMN] if model_version else []),
            *(ROLLUP_COLUMNS if rollup else ()),
            *(score_columns(fmt, score_classes) if score_classes is not None else [])]


def is_unknown(branch: str | None, label: str | None = None) -> bool:
    """Whether a row answers "unknown": its branch says so (a Kaggle row, without a branch, by
    its class)."""
    return branch == UNKNOWN if branch is not None else label == UNKNOWN


@dataclass
class PredictionRow:
    """One output row.

    Attributes:
        path: The input as enumerated (file path, or the listed entry).
        status: ``"ok"`` or ``"error"``.
        label: Predicted class in the prompts file's spelling (``""`` on error).
        score: Probability of ``label`` (NaN on error).
        branch: Which branch decided: ``"zeroshot"``, ``"supervised"``, ...
        error: The reason when ``status == "error"``.
        topk: ``(label, probability)`` pairs, best first.
        extra: Further named columns (gate score, per-branch top-k, ...).
    """

    path: str
    status: str = "ok"
    label: str = ""
    score: float = math.nan
    branch: str = ""
    error: str = ""
    topk: list[tuple[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, path: str, reason: str) -> PredictionRow:
        return cls(path=path, status="error", error=reason)


def infer_format(output: str | os.PathLike | None, fmt: str | None) -> str:
    """The output format: ``fmt`` when given, else from the file extension (CSV by default)."""
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    if output and str(output).lower().endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "csv"


def output_columns(fmt: str, topk: int, extra_columns: Sequence[str] = ()) -> list[str]:
    """The CSV header of a format (JSON Lines records carry the same fields, ``topk`` as a list)."""
    if fmt == "kaggle":
        return ["image_id", "class"]
    cols = ["path", "label", "score", "branch", "status", "error"]
    for i in range(1, topk + 1):
        cols += [f"top{i}", f"top{i}_score"]
    return cols + list(extra_columns)


def score_columns(fmt: str, classes: Sequence[str]) -> list[str]:
    """The extra columns of every class's probability: one ``score:<class>`` per class in CSV,
    one ``scores`` object in JSON Lines.

    Raises:
        InputError: ``fmt="kaggle"`` (a submission is ``image_id,class`` only).

    Example:
        >>> score_columns("csv", ["fox", "polar bear"])
        ['score:fox', 'score:polar bear']
        >>> score_columns("jsonl", ["fox", "polar bear"])
        ['scores']
    """
    if fmt == "kaggle":
        raise InputError("a Kaggle submission holds image_id and class only: it has no room for "
                         "every class's probability; write CSV or JSON Lines")
    if fmt == "jsonl":
        return [SCORES_COLUMN]
    return [SCORE_PREFIX + str(c) for c in classes]


def output_key(path: str, fmt: str) -> str:
    """How an input's path reads back from a file of format ``fmt`` (its first field).

    Kaggle files keep only the file name; CSV files hold the undecodable bytes
    of a file name (surrogate escapes) as backslash escapes, while JSON Lines
    escapes them the JSON way, so they read back unchanged.

    Example:
        >>> output_key("photos/cat 1.jpg", "kaggle")
        'cat 1.jpg'
    """
    if fmt == "kaggle":
        path = Path(path).name
    if fmt == "jsonl":
        return path
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def check_unique_keys(paths: Iterable[str], fmt: str) -> None:
    """Refuse inputs that a file of format ``fmt`` could not tell apart.

    A Kaggle file keeps only the file name (:func:`output_key`), so
    ``site1/IMG_0001.png`` and ``site2/IMG_0001.png`` would both become the
    ``image_id`` ``IMG_0001.png``: a submission scored against the wrong
    image. Call this on every input before anything is written; the same
    path listed twice is one input, not a collision.

    Args:
        paths: Every input path, in order.
        fmt: The output format.

    Raises:
        InputError: Two inputs with one key; names the key and both paths.

    Example:
        >>> check_unique_keys(["a/x.png", "b/x.png"], "csv")
        >>> check_unique_keys(["a/x.png", "b/x.png"], "kaggle")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hybridcls.errors.InputError: ... 'x.png' would stand for both 'a/x.png' and 'b/x.png'; ...
    """
    first: dict[str, str] = {}
    for path in paths:
        key = output_key(path, fmt)
        other = first.setdefault(key, path)
        if other != path:
            raise InputError(_duplicate_key_message(fmt, key, other, path))


def _duplicate_key_message(fmt: str, key: str, a: str, b: str) -> str:
    # Neutral wording (no parameter, no flag): the library and the command line both raise it.
    if fmt == "kaggle":
        return (f"a Kaggle image_id is the file name: {key!r} would stand for both {a!r} and {b!r}; "
                "rename one of them, or write CSV or JSON Lines, which keep the whole path")
    return f"{a!r} and {b!r} would both read back as {key!r} from a {fmt} file; rename one of them"


def _fmt_score(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


class PredictionWriter:
    """Writes rows in one format to an open text stream; use :func:`open_writer`."""

    def __init__(
        self,
        stream: IO[str],
        fmt: str,
        *,
        topk: int,
        extra_columns: Sequence[str] = (),
        close: bool = False,
        header: bool = True,
    ) -> None:
        self.stream = stream
        self.format = fmt
        self.topk = topk
        self.extra_columns = list(extra_columns)
        self._close = close
        self.n_ok = 0
        self.n_error = 0
        self.n_unknown = 0
        self._ids: dict[str, str] = {}  # Kaggle image_id -> the path it was written for
        self._csv = None
        if fmt in ("csv", "kaggle"):
            # newline="" semantics: the csv module quotes embedded newlines itself.
            self._csv = csv.writer(stream, lineterminator="\n")
            if header:
                self._csv.writerow(self.columns)
                self._sync()

    @property
    def columns(self) -> list[str]:
        return output_columns(self.format, self.topk, self.extra_columns)

    def write(self, row: PredictionRow) -> None:
        """Write one row.

        Raises:
            InputError: (Kaggle) a second input with an ``image_id`` already
                written; nothing of the row is written. Check the inputs up
                front with :func:`check_unique_keys` to leave no partial file.
        """
        if self.format == "kaggle":
            image_id = output_key(row.path, "kaggle")
            other = self._ids.setdefault(image_id, row.path)
            if other != row.path:
                raise InputError(_duplicate_key_message("kaggle", image_id, other, row.path))
        if row.status == "ok":
            self.n_ok += 1
            self.n_unknown += is_unknown(row.branch)
        else:
            self.n_error += 1
        if self.format == "kaggle":
            self._csv.writerow([image_id, row.label])
        elif self.format == "csv":
            values: list[Any] = [
                row.path, row.label, _fmt_score(row.score), row.branch, row.status, row.error,
            ]
            for i in range(self.topk):
                if i < len(row.topk):
                    values += [row.topk[i][0], _fmt_score(row.topk[i][1])]
                else:
                    values += ["", ""]
            values += [_csv_value(_extra_value(row, c)) for c in self.extra_columns]
            self._csv.writerow(values)
        else:
            record: dict[str, Any] = {
                "path": row.path,
                "label": row.label if row.status == "ok" else None,
                "score": None if math.isnan(row.score) else round(float(row.score), 6),
                "branch": row.branch or None,
                "status": row.status,
                "error": row.error or None,
                "topk": [{"label": lab, "score": round(float(s), 6)} for lab, s in row.topk],
            }
            # JSON has no NaN: a value that was not computed (a gate score the cascade skipped) is null.
            record.update({c: row.extra.get(c) for c in self.extra_columns})
            self.stream.write(json_text(record, ensure_ascii=False) + "\n")

    def write_many(self, rows: Iterable[PredictionRow]) -> None:
        """Write rows and make them durable: a crash afterwards keeps them (see ``--resume``)."""
        for row in rows:
            self.write(row)
        self._sync()

    def _sync(self) -> None:
        self.stream.flush()
        if self._close:
            # A flush reaches the OS only; fsync also survives a machine crash. One call per
            # batch costs far less than the batch itself.
            os.fsync(self.stream.fileno())

    def close(self) -> None:
        self.stream.flush()
        if self._close:
            self.stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _extra_value(row: PredictionRow, column: str) -> Any:
    """A CSV extra column's value: ``score:<class>`` reads that class in the row's ``scores``."""
    if column.startswith(SCORE_PREFIX) and column not in row.extra:
        scores = row.extra.get(SCORES_COLUMN)
        return None if scores is None else scores.get(column[len(SCORE_PREFIX):])
    return row.extra.get(column)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return _fmt_score(value)
    if isinstance(value, (list, dict)):
        return json_text(value, ensure_ascii=False)
    return "" if value is None else value


def open_writer(
    output: str | os.PathLike | None,
    fmt: str | None = None,
    *,
    topk: int,
    extra_columns: Sequence[str] = (),
    append: bool = False,
) -> PredictionWriter:
    """Open a writer on a file path, or on standard output for ``None`` / ``"-"``.

    ``topk`` is the rows' own (no default: a writer does not know the classes, and one that
    guessed would leave empty columns where the rows rank fewer): pass the number given to
    ``rows`` / ``batch_rows``, or :func:`check_topk` of None and the classifier's class count
    for their default.

    ``append=True`` continues an existing file of the same format and columns
    (no second header); :mod:`hybridcls.sharding` checks that it is one.

    Example:
        >>> import io
        >>> w = PredictionWriter(io.StringIO(), "csv", topk=1)
        >>> w.write(PredictionRow("a.jpg", label="fox", score=0.9, branch="zeroshot",
        ...                       topk=[("fox", 0.9)]))
        >>> w.stream.getvalue().splitlines()[1]
        'a.jpg,fox,0.900000,zeroshot,ok,,fox,0.900000'
    """
    fmt = infer_format(output, fmt)
    if output is None or str(output) == "-":
        return PredictionWriter(sys.stdout, fmt, topk=topk, extra_columns=extra_columns)
    path = Path(output)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    # Undecodable file names arrive surrogate-escaped; keep them visible rather than crash.
    # the writer owns the stream (close=True) and closes it when it is closed itself
    stream = open(path, "a" if append else "w", encoding="utf-8", newline="",  # noqa: SIM115
                  errors="backslashreplace")
    return PredictionWriter(stream, fmt, topk=topk, extra_columns=extra_columns, close=True,
                            header=not append)


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a CSV or JSON Lines predictions file back into a list of dicts (one per row).

    Raises:
        InputError: The file cannot be read, is not UTF-8, or (JSON Lines) has
            a line that is not a JSON object (names the line).
    """
    return [row for _, row in read_prediction_lines(path)]


def read_prediction_lines(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """:func:`read_predictions`, each row with its line number in the file (for messages).

    A CSV row's line is the one its record ends on (a quoted field may span lines).

    Raises:
        InputError: as :func:`read_predictions`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read predictions ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: predictions file is not UTF-8 text") from exc
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(reader.line_num, row) for row in reader]
    records = []
    # split on "\n" only: str.splitlines also splits on U+2028 and U+0085, which a file name
    # may hold and JSON writes unescaped
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{line_no}: not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line_no}: a JSON value that is not a record")
        records.append((line_no, record))
    return records


def check_topk(topk: Any, n_classes: int, classes: str = "the classifier ranks") -> int:
    """``topk`` checked against the classes there are: 1 to ``n_classes`` pairs per row.

    A larger ``topk`` would write columns no class can fill in every row. A row limited to
    fewer classes (``allowed_classes``, ``site_classes``) still ranks every class: its allowed
    ones first, then the others at probability 0.

    Args:
        topk: Top-k pairs per row; None: :data:`DEFAULT_TOPK`, or ``n_classes`` when fewer.
        n_classes: The classes a row ranks.
        classes: Where they come from, for the message (``"that prompts.txt names"``).

    Returns:
        ``topk``, None resolved.

    Raises:
        ParameterError: Not a whole number from 1 to ``n_classes``.

    Example:
        >>> check_topk(None, 3), check_topk(None, 40)
        (3, 5)
        >>> check_topk(7, 6)
        Traceback (most recent call last):
        ...
        hybridcls.errors.ParameterError: topk=7: more than the 6 classes the classifier ranks; give 1 to 6
    """
    if topk is None:
        return min(DEFAULT_TOPK, n_classes)
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1:
        raise ParameterError("topk", topk, f"give a whole number from 1 to {n_classes}, the "
                             f"classes {classes}")
    if topk > n_classes:
        raise ParameterError("topk", topk, f"more than the {n_classes} classes {classes}; give 1 "
                             f"to {n_classes}")
    return int(topk)


def topk_pairs(probs: Any, names: Sequence[str], k: int) -> list[list[Any]]:
    """``[[class, probability], ...]``: the ``k`` most probable classes, as the rows write them.

    A branch that did not run (``None`` or NaN probabilities) gives ``[]``.

    Example:
        >>> topk_pairs([0.1, 0.7, 0.2], ["a", "b", "c"], 2)
        [['b', 0.7], ['c', 0.2]]
    """
    import numpy as np

    if probs is None:
        return []
    p = np.asarray(probs, dtype=np.float64)
    if np.isnan(p).any():
        return []
    order = np.argsort(-p, kind="stable")[:k]
    return [[str(names[i]), round(float(p[i]), 6)] for i in order]


def batch_rows(
    paths: Sequence[str],
    indices: Sequence[int],
    ok: Sequence[int],
    errors: dict[int, str],
    result: Any,
    classes: Sequence[str],
    *,
    n_seen: int,
    topk: int | None,
    branch_columns: bool,
    model_version: str | None = None,
    all_scores: bool = False,
    rollup: Any = None,
) -> list[PredictionRow]:
    """One batch's output rows, one per input index, in order: the one place rows are built.

    Args:
        paths: Every input's path (as enumerated), indexed by input index.
        indices: The batch's input indices, in order.
        ok: Those that were predicted; rows of ``result`` follow it.
        errors: Index -> reason for the inputs that could not be read.
        result: A :class:`~hybridcls.gate.FusionResult` for the ``ok`` rows (``None`` when
            none decoded): ``probs``, ``branch``, ``gate_score``, ``gate_weight``,
            ``sup_probs``, ``clip_probs``.
        classes: Class names, in the columns' order (seen first).
        n_seen: Number of seen classes (0 for zero-shot only).
        topk: Top-k pairs per row (:func:`check_topk`: at most ``len(classes)``; None: the
            default); a branch's own top-k lists at most the classes it knows (the supervised
            branch: the seen ones).
        branch_columns: Add :data:`BRANCH_COLUMNS` (a hybrid's rows).
        model_version: Write this short model id in every row's :data:`MODEL_VERSION_COLUMN`
            (error rows too: the model that could not read the image).
        all_scores: Add every class's probability, ``{class: p}`` under :data:`SCORES_COLUMN`
            (the row's ``probs``, which sum to 1; ``None`` on an error row).
        rollup: A :class:`~hybridcls.hierarchy.Rollup` (None: off): ``label`` and ``score`` are
            its answer and the answer's probability, and :data:`ROLLUP_COLUMNS` say its rank
            and the class it came from (``None`` on an error or ``unknown`` row, which it
            leaves as they are); ``topk`` stays the classes'.

    The optional columns are set in :func:`extra_columns`' order (the writer's columns).

    Returns:
        The rows; an input not predicted is an error row with its reason.

    Raises:
        ParameterError: ``topk`` out of range (:func:`check_topk`).
    """
    import numpy as np

    topk = check_topk(topk, len(classes))
    pos = {idx: j for j, idx in enumerate(ok)}
    out = []
    rolled = None if rollup is None or result is None else rollup.apply(result.probs)

    def add(row: PredictionRow, scores: dict[str, float] | None) -> None:
        if model_version is not None:
            row.extra[MODEL_VERSION_COLUMN] = model_version
        if rollup is not None:
            row.extra.setdefault("rank", None)
            row.extra.setdefault("leaf", None)
        if all_scores:
            row.extra[SCORES_COLUMN] = scores
        out.append(row)

    for idx in indices:
        path = paths[idx]
        if idx not in pos or result is None:
            add(PredictionRow.failed(path, errors.get(idx, "not predicted")), None)
            continue
        j = pos[idx]
        p = result.probs[j]
        order = np.argsort(-p, kind="stable")[:topk]
        unknown = is_unknown(str(result.branch[j]))
        row = PredictionRow(
            path=path, label=UNKNOWN if unknown else str(classes[order[0]]),
            score=float(p[order[0]]), branch=str(result.branch[j]),
            topk=[(str(classes[k]), float(p[k])) for k in order],
        )
        if branch_columns:
            row.extra = {
                "gate_score": float(result.gate_score[j]),
                "gate_weight": float(result.gate_weight[j]),
                "supervised_topk": topk_pairs(None if result.sup_probs is None else result.sup_probs[j],
                                              classes[:n_seen], topk),
                "zeroshot_topk": topk_pairs(None if result.clip_probs is None else result.clip_probs[j],
                                            classes, topk),
            }
        if rolled is not None and not unknown:
            row.label, row.score = str(rolled.answer[j]), float(rolled.score[j])
            row.extra.update(rank=int(rolled.rank[j]), leaf=str(classes[rolled.leaf[j]]))
        add(row, {str(c): round(float(v), 6) for c, v in zip(classes, p)} if all_scores else None)
    return out

