"""Evaluate a predictions file against a labels file: accuracy, S / U / H, the gate, plots.

The join is on the image's file name (what the labels CSV's ``image_id``
holds). Labels and predictions are compared after label normalisation (case,
``_``, ``+``, ``-``), so ``grizzly+bear`` in a dataset's labels matches
``grizzly bear`` in predictions. Error rows count as wrong predictions.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.cache import atomic_write_text
from hybridcls.errors import InputError, MissingExtraError
from hybridcls.eval.labels import read_labels
from hybridcls.eval.metrics import (
    OpenSetScores,
    Reliability,
    open_set_scores,
    per_class_accuracy,
    reliability,
)
from hybridcls.eval.plots import (
    plot_confusion,
    plot_gate_histogram,
    plot_per_class,
    plot_reliability,
    require_pyplot,
)
from hybridcls.gate.metrics import gate_detection, routing_matrix
from hybridcls.outputs import read_predictions
from hybridcls.zeroshot.prompts import normalize_label

__all__ = ["Evaluation", "evaluate_predictions", "read_class_list"]


@dataclass
class Evaluation:
    """Everything ``hybridcls evaluate`` reports."""

    scores: OpenSetScores
    per_class: list[dict[str, Any]]
    gate: dict[str, float] | None = None
    routing: dict[str, int] | None = None
    n_errors: int = 0
    y_true: list[str] = field(default_factory=list)
    y_pred: list[str] = field(default_factory=list)
    gate_scores: np.ndarray | None = None
    is_unseen: np.ndarray | None = None
    confidence: np.ndarray | None = None

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
        return {"scores": self.scores.as_dict(), "gate": self.gate, "routing": self.routing,
                "n_errors": self.n_errors, "ece": None if rel is None else rel.ece,
                "per_class": self.per_class}

    def summary(self) -> str:
        s = self.scores
        lines = [
            f"accuracy {100 * s.accuracy:.2f}%  ({s.n_images} images, {self.n_errors} errors)",
            f"seen S {100 * s.seen:.2f}   unseen U {100 * s.unseen:.2f}   harmonic H {100 * s.harmonic:.2f}",
        ]
        if self.gate:
            lines.append(f"gate AUROC {self.gate['auroc']:.4f}  AUPR-in {self.gate['aupr_in']:.4f}  "
                         f"FPR@95%TPR {self.gate['fpr_at_tpr']:.4f}")
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
        atomic_write_text(written[0], json.dumps(self.as_dict(), indent=2))
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
            raise InputError(f"--seen-classes {p}: a folder without config.json")
        return list(json.loads(cfg.read_text(encoding="utf-8"))["classes"])
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"--seen-classes {p}: cannot read ({exc.strerror or exc})") from exc
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def evaluate_predictions(
    predictions: str | os.PathLike,
    labels: str | os.PathLike,
    seen_classes: Iterable[str],
    *,
    classes: Sequence[str] | None = None,
) -> Evaluation:
    """Join a predictions file to a labels file and compute every figure.

    Args:
        predictions: CSV or JSON Lines from ``hybridcls predict``.
        labels: CSV with ``image_id`` (file name) and ``label`` columns.
        seen_classes: Classes that had training images (any spelling).
        classes: All known classes (e.g. the prompts file's); labels outside
            it are an error. Default: the seen classes plus every predicted label.

    Raises:
        InputError: Images without a label, or labels of unknown classes
            (names the file and the classes).

    Example:
        >>> ev = evaluate_predictions("pred.csv", "labels.csv", ["fox", "wolf"])  # doctest: +SKIP
        >>> print(ev.summary())  # doctest: +SKIP
    """
    rows = read_predictions(predictions)
    truth = read_labels(labels)
    names = [Path(r["path"]).name for r in rows]
    missing = [n for n in names if n not in truth]
    if missing:
        raise InputError(
            f"{labels}: {len(missing)} predicted image(s) have no label, e.g. "
            + ", ".join(repr(m) for m in missing[:5]))
    seen = {normalize_label(c) for c in seen_classes}
    known = {normalize_label(c) for c in classes} if classes is not None else None
    if known is None:
        known = seen | {normalize_label(r["label"]) for r in rows if r.get("label")}
    unknown_classes = sorted({truth[n] for n in names if normalize_label(truth[n]) not in known})
    if unknown_classes:
        raise InputError(
            f"{labels}: label(s) of classes that are neither seen nor predictable: "
            + ", ".join(repr(c) for c in unknown_classes[:10]))
    y_true = [normalize_label(truth[n]) for n in names]
    y_pred = [normalize_label(r.get("label") or "") if r.get("status") == "ok" else "" for r in rows]
    scores = open_set_scores(y_true, y_pred, seen)
    acc = per_class_accuracy(y_true, y_pred)
    counts: dict[str, int] = {}
    for t in y_true:
        counts[t] = counts.get(t, 0) + 1
    per_class = [{"class": c, "group": "seen" if c in seen else "unseen", "n_images": counts[c],
                  "accuracy": round(acc[c], 6)} for c in sorted(acc)]
    ok = np.array([r.get("status") == "ok" for r in rows])
    confidence = np.array([_number(r.get("score")) if k else np.nan for r, k in zip(rows, ok)])
    ev = Evaluation(scores, per_class, n_errors=int((~ok).sum()), y_true=y_true, y_pred=y_pred,
                    confidence=confidence)
    is_unseen = np.array([t not in seen for t in y_true])
    gate_col = [r.get("gate_score") for r in rows]
    if ok.any() and all(g not in (None, "") for g, k in zip(gate_col, ok) if k):
        g = np.array([float(x) if k else np.nan for x, k in zip(gate_col, ok)])
        if is_unseen[ok].any() and (~is_unseen[ok]).any():
            ev.gate = gate_detection(g[ok], is_unseen[ok]).as_dict()
        ev.gate_scores, ev.is_unseen = g[ok], is_unseen[ok]
    branches = np.array([r.get("branch") or "" for r in rows])
    if ok.any() and np.isin(branches[ok], ["supervised", "zeroshot", "mixed", "unknown"]).all() \
            and (branches[ok] == "supervised").any():
        ev.routing = routing_matrix(branches[ok] != "supervised", is_unseen[ok]).as_dict()
    return ev


def _number(value: Any) -> float:
    """A score cell as a float; empty (CSV) or null (JSON Lines) is NaN."""
    return float("nan") if value in (None, "") else float(value)


def _plots(ev: Evaluation, out: Path) -> list[Path]:
    """Every figure :attr:`Evaluation.figures` lists, or none without matplotlib."""
    try:
        require_pyplot("plots")
    except MissingExtraError:
        return []
    return [draw(out / name) for name, draw in ev.figures().items()]
