"""Evaluate a predictions file against a labels file: accuracy, S / U / H, the gate, plots.

Labels join predictions on the path as the labels CSV's ``image_id`` writes
it (a file name, a relative or an absolute path), matched to the end of each
predicted path on whole components; a file name only joins when it is
unique (:func:`hybridcls.eval.labels.join_labels`). Labels and predictions
are compared after label normalisation (case, ``_``, ``+``, ``-``), so
``grizzly+bear`` in a dataset's labels matches ``grizzly bear`` in
predictions. Labelled error rows count as wrong predictions; an error row
with no label (an unreadable input the labels file leaves out) is no
prediction: counted, not scored. Labelled images with no row at all are
refused unless ``allow_missing`` (then counted, not scored).
With a class tree (a prompts file with ancestors), roll-up answers are also
scored at every rank (:func:`hybridcls.hierarchy.rollup_figures`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.cache import atomic_write_json, atomic_write_text, file_fingerprint
from hybridcls.errors import InputError, MissingExtraError, ParameterError
from hybridcls.eval.labels import join_labels
from hybridcls.eval.metrics import (
    PROBABILITY_TOLERANCE,
    OpenSetScores,
    Reliability,
    open_set_scores,
    per_class_accuracy,
    reliability,
    top_k_accuracy,
)
from hybridcls.eval.plots import (
    plot_confusion,
    plot_gate_histogram,
    plot_per_class,
    plot_reliability,
    require_pyplot,
)
from hybridcls.gate.metrics import gate_detection, open_set_classification, routing_matrix
from hybridcls.hierarchy import Hierarchy, RollupFigures, rollup_figures
from hybridcls.outputs import read_prediction_lines
from hybridcls.provenance import RunRecord
from hybridcls.sharding import read_record
from hybridcls.zeroshot.prompts import normalize_label

__all__ = ["Evaluation", "MissingPredictionsError", "evaluate_predictions", "read_class_list"]

#: How many examples an error message lists.
_SHOW = 5
#: The k of the top-k accuracy reported (ImageNet's top-5).
TOP_K = 5


class MissingPredictionsError(InputError):
    """Labelled images that the predictions file has no row for.

    Attributes:
        predictions: The predictions file.
        missing: The labels file's ids of those images, in its order.
        n_labelled: How many images the labels file lists.
    """

    def __init__(self, predictions: str | os.PathLike, missing: Sequence[str], n_labelled: int,
                 allow: str = "allow_missing=True") -> None:
        self.predictions, self.missing, self.n_labelled = predictions, list(missing), n_labelled
        super().__init__(
            f"{predictions}: {len(missing)} of {n_labelled} labelled images have no prediction, "
            f"e.g. {', '.join(repr(m) for m in missing[:_SHOW])}; {allow} scores the predicted "
            "ones only (and counts the others)")

    def allowed_by(self, allow: str) -> MissingPredictionsError:
        """The same error, naming another way to allow it (a command-line flag)."""
        return MissingPredictionsError(self.predictions, self.missing, self.n_labelled, allow)


@dataclass
class Evaluation:
    """Everything ``hybridcls evaluate`` reports."""

    scores: OpenSetScores
    per_class: list[dict[str, Any]]
    gate: dict[str, float] | None = None
    open_set: dict[str, Any] | None = None
    routing: dict[str, int] | None = None
    top5_accuracy: float | None = None
    ranked_per_row: int | None = None
    n_errors: int = 0
    n_missing: int = 0
    #: Error rows without a label: no prediction and nothing to score them against.
    n_errors_unlabelled: int = 0
    y_true: list[str] = field(default_factory=list)
    y_pred: list[str] = field(default_factory=list)
    gate_scores: np.ndarray | None = None
    is_unseen: np.ndarray | None = None
    confidence: np.ndarray | None = None
    #: Roll-up figures (accuracy at every rank, answers rolled up and right), with a class tree.
    rollup: RollupFigures | None = None
    #: This evaluation's run record (:mod:`hybridcls.provenance`); its ``inputs`` hold the
    #: record of the predictions it read (see :attr:`predictions_record`).
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def predictions_record(self) -> dict[str, Any] | None:
        """The record of the run that made the predictions (from their manifest; None without one)."""
        return ((self.provenance.get("inputs") or {}).get("predictions") or {}).get("record")

    @property
    def reliability(self) -> Reliability | None:
        """Top-1 confidence against accuracy (rows with a score), or None without scores."""
        if self.confidence is None or np.isnan(self.confidence).all():
            return None
        return reliability(self.confidence, np.asarray(self.y_true) == np.asarray(self.y_pred))

    def figures(self) -> dict[str, Any]:
        """PNG file name -> a function drawing it to a path, for the figures this evaluation has."""
        figs: dict[str, Any] = {
            "confusion_matrix.png": lambda p: plot_confusion(self.y_true, self.y_pred, p),
            "per_class_accuracy.png": lambda p: plot_per_class(self.per_class, p),
        }
        if self.gate_scores is not None:
            figs["gate_histogram.png"] = lambda p: plot_gate_histogram(self.gate_scores,
                                                                        self.is_unseen, p)
        rel = self.reliability
        if rel is not None:
            figs["reliability.png"] = lambda p: plot_reliability(rel, p)
        return figs

    def as_dict(self) -> dict[str, Any]:
        rel = self.reliability
        return {"scores": self.scores.as_dict(), "top5_accuracy": self.top5_accuracy,
                "gate": self.gate, "open_set": self.open_set, "routing": self.routing,
                "n_errors": self.n_errors, "n_errors_unlabelled": self.n_errors_unlabelled,
                "n_missing_predictions": self.n_missing,
                "ece": None if rel is None else rel.ece,
                "rollup": None if self.rollup is None else self.rollup.as_dict(),
                "per_class": self.per_class,
                "provenance": self.provenance}

    def summary(self) -> str:
        s = self.scores
        missing = (f", {self.n_missing} labelled images without a prediction (not scored)"
                   if self.n_missing else "")
        if self.n_errors_unlabelled:
            missing += f", {self.n_errors_unlabelled} error rows without a label (not scored)"
        lines = [
            f"accuracy {100 * s.accuracy:.2f}%  ({s.n_images} images, {self.n_errors} errors{missing})",
            (f"seen S {_percent(s.seen)}   unseen U {_percent(s.unseen)}   "
             f"harmonic H {_percent(s.harmonic)}"),
        ]
        if self.top5_accuracy is not None:
            lines.append(f"top-{TOP_K} accuracy {_percent(self.top5_accuracy)}%")
        elif self.ranked_per_row is not None:
            lines.append(f"top-{TOP_K} accuracy n/a: the predictions rank {self.ranked_per_row} "
                         f"classes per row (predict --topk {TOP_K})")
        if self.gate:
            g = self.gate
            lines.append(f"gate AUROC {g['auroc']:.4f}  AUPR-In {g['aupr_in_trapezoid']:.4f}  "
                         f"AUPR-Out {g['aupr_out_trapezoid']:.4f} (trapezoid)  "
                         f"FPR@{100 * g['tpr']:g}%TPR {g['fpr_at_tpr_unseen_positive']:.4f} "
                         "(unseen images positive)")
        if self.open_set:
            o = self.open_set
            ccr = "  ".join(f"{f} {v:.4f}" for f, v in o["ccr_at_fpr"].items())
            lines.append(f"open set: OSCR {o['oscr']:.4f}  CCR at FPR {ccr}  (supervised top-1, "
                         f"closed-set accuracy {o['closed_set_accuracy']:.4f})")
        if self.rollup:
            u = self.rollup
            ranks = "  ".join(f"{r} {_percent(a)}" for r, a in enumerate(u.accuracy_at_rank))
            lines.append(f"roll-up: accuracy at rank {ranks}  (0 = class)   rolled up "
                         f"{u.n_rolled_up} of {u.n_images}, {u.n_rolled_up_correct} right at their "
                         f"rank   wrong {u.n_wrong}")
        if self.routing:
            r = self.routing
            lines.append(f"routing: seen->zero-shot {r['seen_to_zeroshot']}  "
                         f"unseen->supervised {r['unseen_to_supervised']}")
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``metrics.json``, ``per_class.csv`` and, with matplotlib, the PNGs."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "metrics.json", out / "per_class.csv"]
        atomic_write_json(written[0], self.as_dict())
        table = io.StringIO(newline="")
        w = csv.DictWriter(table, fieldnames=["class", "group", "n_images", "accuracy"],
                           lineterminator="\n")
        w.writeheader()
        w.writerows(self.per_class)
        atomic_write_text(written[1], table.getvalue())
        written += _plots(self, out)
        return written


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Seen classes from a text file (one per line) or a run directory's ``config.json``."""
    p = Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ParameterError("seen_classes", str(p), "a folder without config.json")
        return list(json.loads(cfg.read_text(encoding="utf-8"))["classes"])
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ParameterError("seen_classes", str(p), f"cannot read ({exc.strerror or exc})") from exc
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def evaluate_predictions(
    predictions: str | os.PathLike,
    labels: str | os.PathLike,
    seen_classes: Iterable[str],
    *,
    classes: Sequence[str] | None = None,
    allow_missing: bool = False,
    record: RunRecord | None = None,
    hierarchy: Hierarchy | None = None,
) -> Evaluation:
    """Join a predictions file to a labels file and compute every figure.

    Args:
        predictions: CSV, JSON Lines or Kaggle CSV from ``hybridcls predict``.
        labels: CSV with ``image_id`` (a file name, or a relative or absolute
            path: see :func:`~hybridcls.eval.labels.join_labels`) and ``label`` columns.
        seen_classes: Classes that had training images (any spelling).
        classes: All known classes (e.g. the prompts file's); labels outside
            it are an error. Default: the seen classes plus every predicted label.
        allow_missing: Score the predicted images when some labelled images
            have no row in ``predictions`` (counted in
            :attr:`Evaluation.n_missing`); by default that is an error.
        record: This run's record (the command line's); by default one of this call, with
            its parameters. It gets the inputs (each file's path and SHA-256, and the
            predictions' own record, from the manifest beside them) and the counts, and
            goes into :attr:`Evaluation.provenance` with the predictions' record.
        hierarchy: The classes' tree (:meth:`~hybridcls.hierarchy.Hierarchy.from_prompts` of a
            prompts file with ancestors): scores every answer at its rank, read from the rows'
            ``rank`` and ``leaf`` (a row without them is a class's answer, rank 0), into
            :attr:`Evaluation.rollup`.

    Raises:
        InputError: Predicted images (``status=ok`` rows) without a label, no row to
            score (every row an error row without a label), an ambiguous join (an id naming
            two images, or an image named twice), labels of unknown classes,
            or a value of the predictions file that is not what predict writes
            (a ``status`` other than ok / error, a ``score`` that is not a
            probability, a ``gate_score`` that is not a finite number, a ``rank`` that
            is not a rank of ``hierarchy`` or rows with ranks and no ``hierarchy``); each
            names the file, the line and the column or class.
        MissingPredictionsError: Labelled images without a prediction, and
            not ``allow_missing``.

    Example:
        >>> ev = evaluate_predictions("pred.csv", "labels.csv", ["fox", "wolf"])  # doctest: +SKIP
        >>> print(ev.summary())  # doctest: +SKIP
    """
    seen_classes = list(seen_classes)
    if record is None:
        record = RunRecord.for_call(
            "hybridcls.eval.report.evaluate_predictions", predictions=predictions, labels=labels,
            seen_classes=list(seen_classes), classes=classes, allow_missing=allow_missing)
    made_by = read_record(predictions)  # before the rows: a manifest that cannot be read says so
    lines, rows = _prediction_rows(predictions)
    predicted = [_status(r, predictions, line) == "ok" for line, r in zip(lines, rows)]
    join = join_labels([r["path"] for r in rows], labels, required=predicted)
    # an error row without a label is no prediction: counted, left out of every figure
    scored = [i for i, t in enumerate(join.labels) if t is not None]
    n_errors_unlabelled = len(rows) - len(scored)
    if join.missing and not allow_missing:
        raise MissingPredictionsError(predictions, join.missing, len(scored) + len(join.missing))
    if not scored:
        raise InputError(f"{predictions}: no row to score: its {len(rows)} row(s) are error rows "
                         f"without a label in {labels}")
    lines, rows = [lines[i] for i in scored], [rows[i] for i in scored]
    true_labels = [str(join.labels[i]) for i in scored]
    label_lines = [join.lines[i] for i in scored]
    seen = {normalize_label(c) for c in seen_classes}
    known = {normalize_label(c) for c in classes} if classes is not None else None
    if known is None:
        known = seen | {normalize_label(r["label"]) for r in rows if r.get("label")}
    unknown = [(line, t) for line, t in zip(label_lines, true_labels) if normalize_label(t) not in known]
    if unknown:
        names = sorted({t for _, t in unknown})
        raise InputError(
            f"{labels}:{unknown[0][0]}: label {unknown[0][1]!r} is of a class that is neither seen "
            f"nor predictable; {len(names)} such class(es): " + ", ".join(map(repr, names[:10])))
    y_true = [normalize_label(t) for t in true_labels]
    ok = np.array([_status(r, predictions, line) == "ok" for line, r in zip(lines, rows)])
    y_pred = [normalize_label(r.get("label") or "") if k else "" for r, k in zip(rows, ok)]
    scores = open_set_scores(y_true, y_pred, seen)
    acc = per_class_accuracy(y_true, y_pred)
    counts: dict[str, int] = {}
    for t in y_true:
        counts[t] = counts.get(t, 0) + 1
    per_class = [{"class": c, "group": "seen" if c in seen else "unseen", "n_images": counts[c],
                  "accuracy": round(acc[c], 6)} for c in sorted(acc)]
    confidence = np.array([
        _number(r.get("score"), predictions, line, "score", probability=True) if k else np.nan
        for line, r, k in zip(lines, rows, ok)])
    ev = Evaluation(scores, per_class, n_errors=int((~ok).sum()), n_missing=len(join.missing),
                    n_errors_unlabelled=n_errors_unlabelled, y_true=y_true, y_pred=y_pred,
                    confidence=confidence)
    ranked = [[normalize_label(c) for c in _ranking(r, predictions, line)] if k else None
              for line, r, k in zip(lines, rows, ok)]
    lengths = [len(r) for r in ranked if r is not None]
    if lengths and min(lengths) > 0:  # a Kaggle file ranks nothing
        ev.ranked_per_row = min(lengths)
        if ev.ranked_per_row >= TOP_K:
            ev.top5_accuracy = top_k_accuracy(y_true, ranked, TOP_K)
    ev.rollup = _rollup_figures(rows, lines, ok, y_true, predictions, hierarchy)
    is_unseen = np.array([t not in seen for t in y_true])
    gate_col = [r.get("gate_score") for r in rows]
    if ok.any() and all(g not in (None, "") for g, k in zip(gate_col, ok) if k):
        g = np.array([_number(x, predictions, line, "gate_score") if k else np.nan
                      for line, x, k in zip(lines, gate_col, ok)])
        if is_unseen[ok].any() and (~is_unseen[ok]).any():
            ev.gate = gate_detection(g[ok], is_unseen[ok]).as_dict()
            closed = [_supervised_top1(r, predictions, line)
                      for line, r, k in zip(lines, rows, ok) if k]
            if all(c is not None for c in closed):
                correct = np.array([normalize_label(c) for c in closed]) == np.array(y_true)[ok]
                ev.open_set = open_set_classification(g[ok], correct, is_unseen[ok]).as_dict()
        ev.gate_scores, ev.is_unseen = g[ok], is_unseen[ok]
    branches = np.array([r.get("branch") or "" for r in rows])
    if ok.any() and np.isin(branches[ok], ["supervised", "zeroshot", "mixed", "unknown"]).all() \
            and (branches[ok] == "supervised").any():
        ev.routing = routing_matrix(branches[ok] != "supervised", is_unseen[ok]).as_dict()
    record.inputs = {
        "predictions": {"path": os.fspath(predictions), "sha256": file_fingerprint(predictions),
                        "record": made_by},
        "labels": {"path": os.fspath(labels), "sha256": file_fingerprint(labels)},
    }
    record.finish(images=ev.scores.n_images, errors=ev.n_errors,
                  errors_unlabelled=ev.n_errors_unlabelled, missing=ev.n_missing)
    ev.provenance = record.as_dict()
    return ev


def _rollup_figures(rows: Sequence[dict[str, Any]], lines: Sequence[int], ok: np.ndarray,
                    y_true: Sequence[str], predictions: str | os.PathLike,
                    hierarchy: Hierarchy | None) -> RollupFigures | None:
    """Roll-up figures of the rows (rank and leaf, or the label at rank 0), or None without a tree.

    Raises:
        InputError: Rows with a rank but no tree, or a rank or leaf the tree does not have.
    """
    ranked = [(line, r) for line, r, k in zip(lines, rows, ok) if k and r.get("rank") not in (None, "")]
    if hierarchy is None or not hierarchy.nodes:
        if ranked:
            raise InputError(f"{predictions}:{ranked[0][0]}: rows answer at a rank (predict's roll-up); "
                             "scoring them needs the prompts file with the ancestors")
        return None
    leaf, rank = [], []
    for line, r, k in zip(lines, rows, ok):
        has_rank = r.get("rank") not in (None, "")
        name = (r.get("leaf") if has_rank else r.get("label")) or ""
        value = int(_number(r["rank"], predictions, line, "rank")) if k and has_rank else 0
        index = hierarchy.class_index(name) if k else None
        if k and has_rank and (index is None or not 0 <= value <= len(hierarchy.chains[index])):
            raise InputError(f"{predictions}:{line}: rank {r['rank']!r} of leaf {name!r} is not a rank "
                             "of the prompts file's classes and ancestors")
        leaf.append(-1 if index is None else index)
        rank.append(value)
    truth = [hierarchy.class_index(t) for t in y_true]
    return rollup_figures([-1 if t is None else t for t in truth], leaf, rank, hierarchy)


def _prediction_rows(predictions: str | os.PathLike) -> tuple[list[int], list[dict[str, Any]]]:
    """The rows of a predictions file and the line of each; a Kaggle file's ``image_id,class``
    read as ``path,label``.

    Raises:
        InputError: No rows, or not a file ``hybridcls predict`` writes (names its columns).
    """
    numbered = read_prediction_lines(predictions)
    if not numbered:
        raise InputError(f"{predictions}: no predictions in it")
    lines = [line for line, _ in numbered]
    rows = [row for _, row in numbered]
    columns = set(rows[0])
    if {"path", "label", "status"} <= columns:
        return lines, rows
    if {"image_id", "class"} <= columns:
        return lines, [{"path": r["image_id"], "label": r["class"],
                        "status": "ok" if r["class"] else "error"} for r in rows]
    raise InputError(f"{predictions}: columns {', '.join(sorted(columns))}; expected a file of "
                     "hybridcls predict (path, label, status, ... or Kaggle's image_id, class)")


def _ranking(row: dict[str, Any], predictions: str | os.PathLike, line: int) -> list[str]:
    """A row's top-k classes, best first: JSON Lines' ``topk`` list, CSV's ``top1``, ``top2``...

    Raises:
        InputError: A ``topk`` that is not a list of ``{"label": ..., "score": ...}``
            records (names the file and the line).
    """
    if "topk" in row:
        topk = row["topk"]
        if not isinstance(topk, list) or not all(isinstance(t, dict) and "label" in t for t in topk):
            raise InputError(f"{predictions}:{line}: column topk is {topk!r}; expected a list of "
                             '{"label": ..., "score": ...} records')
        return [str(t["label"]) for t in topk]
    ranked = []
    while row.get(f"top{len(ranked) + 1}"):
        ranked.append(str(row[f"top{len(ranked) + 1}"]))
    return ranked


def _supervised_top1(row: dict[str, Any], predictions: str | os.PathLike, line: int) -> str | None:
    """The supervised branch's top class of a hybrid's row (``supervised_topk``), or None without it.

    Raises:
        InputError: A value that is not ``[[class, probability], ...]`` (JSON text in
            CSV); names the file, the line and the column.
    """
    value = row.get("supervised_topk")
    if value in (None, ""):
        return None
    where = f"{predictions}:{line}: column supervised_topk is {value!r}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InputError(f"{where}, not JSON") from None
    if not isinstance(value, list) or not all(isinstance(p, list) and p for p in value):
        raise InputError(f"{where}; expected [[class, probability], ...]")
    return str(value[0][0]) if value else None


def _status(row: dict[str, Any], predictions: str | os.PathLike, line: int) -> str:
    """A row's ``status``: ``ok`` or ``error``, as predict writes it; anything else refused."""
    status = row.get("status")
    if status not in ("ok", "error"):
        raise InputError(f"{predictions}:{line}: column status is {status!r}; expected ok or error")
    return status


def _percent(value: float) -> str:
    """A fraction as a percentage; ``n/a`` for a figure with no image behind it (NaN)."""
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def _number(value: Any, predictions: str | os.PathLike, line: int, column: str, *,
            probability: bool = False) -> float:
    """A number cell of a predictions file; empty (CSV) or null (JSON Lines) is NaN (no value).

    Raises:
        InputError: text that is not a number, NaN or infinite, or (``probability``) a
            value outside [0, 1]; names the file, the line and the column.
    """
    if value in (None, ""):
        return float("nan")
    where = f"{predictions}:{line}: column {column} is {value!r}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}, not a number") from None
    if not math.isfinite(number):
        raise InputError(f"{where}, not a finite number")
    if probability and not -PROBABILITY_TOLERANCE <= number <= 1 + PROBABILITY_TOLERANCE:
        raise InputError(f"{where}, outside [0, 1] (the probability of the predicted label)")
    return number


def _plots(ev: Evaluation, out: Path) -> list[Path]:
    """Every figure :attr:`Evaluation.figures` lists, or none without matplotlib."""
    try:
        require_pyplot("plots")
    except MissingExtraError:
        return []
    return [draw(out / name) for name, draw in ev.figures().items()]
