"""The evaluation as one self-contained HTML page: headline figures, plots, per-class table.

:func:`write_report` writes what :meth:`~hybridcls.eval.report.Evaluation.save`
writes (``metrics.json``, ``per_class.csv``, the PNGs) and an ``index.html``
that shows them, all in one folder with relative links only. Every headline
figure sits in a cell with ``data-figure`` (its name) and ``data-value`` (the
unrounded value) so that tools and tests read the page's numbers exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from hybridcls.eval.plots import require_pyplot
from hybridcls.eval.report import Evaluation
from hybridcls.htmlpage import esc, figure, rel_link, table, write_page

__all__ = ["REPORT_PAGE", "headline_figures", "write_report"]

REPORT_PAGE = "index.html"

# (PNG written by Evaluation.save, caption) in page order.
_FIGURES = (
    ("confusion_matrix.png", "Confusion matrix: rows are the true classes, columns the predictions."),
    ("per_class_accuracy.png", "Accuracy of each true class, worst first."),
    ("gate_histogram.png", ("Gate scores of seen-class and unseen-class images "
                            "(higher = less like the seen classes); the less they overlap, the "
                            "better the gate separates them.")),
    ("reliability.png", ("Reliability diagram: accuracy against the confidence of the predicted "
                         "label, in 15 equal-width bins; bars on the diagonal are calibrated.")),
)


def headline_figures(ev: Evaluation) -> list[tuple[str, str, float]]:
    """``(key, label, value)`` of the page's headline figures (NaN where not defined)."""
    s = ev.scores
    rel = ev.reliability
    nan = float("nan")
    return [
        ("accuracy", "accuracy", s.accuracy),
        ("seen", "S: mean per-class accuracy, seen classes", s.seen),
        ("unseen", "U: mean per-class accuracy, unseen classes", s.unseen),
        ("harmonic", "H: harmonic mean of S and U", s.harmonic),
        ("gate_auroc", "gate AUROC (unseen vs seen images)", ev.gate["auroc"] if ev.gate else nan),
        ("gate_fpr_at_tpr_unseen_positive",
         ("gate FPR at 95% TPR, unseen images positive (seen images flagged unseen when 95% of "
          "unseen images are)"), ev.gate["fpr_at_tpr_unseen_positive"] if ev.gate else nan),
        ("ece", "expected calibration error (ECE)", rel.ece if rel is not None else nan),
    ]


def _figure_cell(key: str, value: float) -> tuple[str, str]:
    if math.isnan(value):
        return ("raw", f'<span data-figure="{esc(key)}" data-value="nan">&mdash;</span>')
    value = float(value)
    shown = f"{value:.4f}" if key == "gate_auroc" else f"{100 * value:.2f}%"
    return ("raw", f'<span data-figure="{esc(key)}" data-value="{value!r}">{esc(shown)}</span>')


def _made_by(record: dict[str, Any] | None) -> str:
    """What made the predictions, from their run record (metrics.json holds all of it)."""
    if not record:
        return ('<p class="note">The predictions have no manifest beside them: the run that made '
                "them is not recorded.</p>")
    models = record.get("models") or {}
    runtime = record.get("runtime") or {}
    call = record.get("call") or {}
    rows: list[tuple[str, Any]] = [
        ("made by", " ".join(record["argv"]) if record.get("argv") else call.get("function", "")),
        ("hybridcls", (record.get("versions") or {}).get("hybridcls")),
        ("model_version", models.get("model_version")),
    ]
    for tower in ("supervised", "clip"):
        if models.get(tower):
            t = models[tower]
            rows.append((f"{tower} model", f"{t['model_id']} (weights {str(t['fingerprint'])[:16]})"))
    rows += [("device, precision", f"{runtime.get('device')}, {runtime.get('precision')}"),
             ("started", record.get("started")), ("finished", record.get("finished")),
             *((str(k), v) for k, v in (record.get("counts") or {}).items())]
    return "<h2>Predictions made by</h2>\n" + table(["item", "value"], rows)


def _counts(ev: Evaluation) -> list[tuple[str, Any]]:
    s = ev.scores
    rows: list[tuple[str, Any]] = [
        ("images", s.n_images), ("images of seen classes", s.n_seen_images),
        ("images of unseen classes", s.n_unseen_images), ("unreadable images (counted wrong)", ev.n_errors),
    ]
    if ev.n_errors_unlabelled:
        rows.append(("unreadable images without a label (not scored)", ev.n_errors_unlabelled))
    if ev.routing:
        rows += [("seen-class images sent to zero-shot", ev.routing["seen_to_zeroshot"]),
                 ("unseen-class images kept by the supervised branch",
                  ev.routing["unseen_to_supervised"])]
    return rows


def write_report(ev: Evaluation, out_dir: str | os.PathLike[str], *, title: str = "hybridcls report",
                 sources: dict[str, str] | None = None) -> Path:
    """Write the evaluation's files and an ``index.html`` showing them into ``out_dir``.

    Args:
        ev: From :func:`~hybridcls.eval.report.evaluate_predictions`.
        out_dir: The folder to write (created if needed); the page links only inside it.
        title: The page's title.
        sources: Named inputs to list on the page (``{"predictions": path, ...}``);
            shown as text, never linked.

    Returns:
        The page's path.

    Raises:
        MissingExtraError: matplotlib (the ``[plots]`` extra) is not installed.

    Example:
        >>> ev = evaluate_predictions("pred.csv", "labels.csv", ["fox", "wolf"])  # doctest: +SKIP
        >>> write_report(ev, "report")  # doctest: +SKIP
        PosixPath('report/index.html')
    """
    require_pyplot("hybridcls report")
    out = Path(out_dir)
    written = {p.name: p for p in ev.save(out)}
    parts = []
    if sources:
        parts.append(table(["input", "file"], sources.items()))
    parts.append(_made_by(ev.predictions_record))
    parts.append("<h2>Headline figures</h2>")
    parts.append(table(["figure", "value"],
                       [(label, _figure_cell(key, value)) for key, label, value in headline_figures(ev)],
                       numeric=[1]))
    if math.isnan(ev.scores.unseen):
        parts.append('<p class="note">No unseen-class images (pass --seen-classes to split the '
                     "classes): U and H are not defined.</p>")
    parts.append(table(["count", "images"], _counts(ev), numeric=[1]))
    parts.append("<h2>Figures</h2>")
    for name, caption in _FIGURES:
        if name in written:
            parts.append(figure(rel_link(written[name], out), caption))
    parts.append("<h2>Per-class accuracy</h2>")
    parts.append(table(
        ["class", "group", "images", "accuracy"],
        [(r["class"], r["group"], r["n_images"], f"{100 * r['accuracy']:.2f}%") for r in ev.per_class],
        numeric=[2, 3]))
    links = [f'<a href="{rel_link(written[n], out)}">{esc(n)}</a>'
             for n in ("metrics.json", "per_class.csv") if n in written]
    parts.append(f"<p class=\"note\">Data: {', '.join(links)}.</p>")
    return write_page(out / REPORT_PAGE, title, "\n".join(parts))
