"""The evaluation figures as PNG files, drawn with matplotlib (the ``[plots]`` extra).

One function per figure, each taking the numbers it draws and a destination
path: the confusion matrix (scikit-learn's ``ConfusionMatrixDisplay``),
per-class accuracy bars, the gate-score histograms of seen and unseen
images, and the reliability diagram. ``hybridcls evaluate`` draws them when
matplotlib is there; ``hybridcls report`` needs them and says which extra to
install when it is not (:func:`require_pyplot`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.cache import atomic_path
from hybridcls.errors import MissingExtraError

__all__ = [
    "plot_confusion",
    "plot_gate_histogram",
    "plot_per_class",
    "plot_reliability",
    "require_pyplot",
]


def require_pyplot(feature: str) -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Raises:
        MissingExtraError: matplotlib is not installed (names ``feature`` and ``[plots]``).
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(feature, "matplotlib", "plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str], plt: Any) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        # The temporary name has no .png suffix, so the format is given.
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_confusion(y_true: Sequence[str], y_pred: Sequence[str], path: str | os.PathLike[str]
                   ) -> Path:
    """Confusion matrix, rows = true class (values printed up to 15 classes)."""
    plt = require_pyplot("the confusion-matrix plot")
    from sklearn.metrics import ConfusionMatrixDisplay

    labels = sorted(set(y_true) | {p for p in y_pred if p})
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.22), max(5, len(labels) * 0.2)))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=labels, ax=ax,
                                            include_values=len(labels) <= 15, colorbar=False,
                                            xticks_rotation="vertical")
    ax.set_title("confusion matrix (rows: true class)")
    return _save(fig, path, plt)


def plot_gate_histogram(scores: np.ndarray, is_unseen: np.ndarray, path: str | os.PathLike[str]
                        ) -> Path:
    """Gate-score histograms of seen-class and unseen-class images on shared bins."""
    plt = require_pyplot("the gate-score histogram")
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(scores, bins=40)
    for mask, name in ((~is_unseen, "seen-class images"), (is_unseen, "unseen-class images")):
        if mask.any():
            ax.hist(scores[mask], bins=bins, alpha=0.6, label=f"{name} ({int(mask.sum())})")
    ax.set_xlabel("gate score (higher = less like the seen classes)")
    ax.set_ylabel("images")
    ax.legend()
    return _save(fig, path, plt)


def plot_per_class(per_class: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Horizontal accuracy bars per true class, worst first, coloured by seen / unseen."""
    plt = require_pyplot("the per-class accuracy plot")
    rows = sorted(per_class, key=lambda r: (r["accuracy"], r["class"]))
    fig, ax = plt.subplots(figsize=(7, max(3, 0.22 * len(rows) + 1)))
    colours = ["tab:blue" if r["group"] == "seen" else "tab:orange" for r in rows]
    ax.barh(range(len(rows)), [100 * r["accuracy"] for r in rows], color=colours)
    ax.set_yticks(range(len(rows)), [f"{r['class']} ({r['n_images']})" for r in rows], fontsize=7)
    ax.invert_yaxis()  # worst class on top
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)  -  blue: seen class, orange: unseen class")
    ax.set_title("per-class accuracy (images per class in brackets)")
    return _save(fig, path, plt)


def plot_reliability(rel: Any, path: str | os.PathLike[str]) -> Path:
    """Reliability diagram of a :class:`~hybridcls.eval.metrics.Reliability`, with its ECE."""
    plt = require_pyplot("the reliability diagram")
    fig, ax = plt.subplots(figsize=(5, 5))
    width = np.diff(rel.edges)
    filled = rel.counts > 0
    ax.bar(rel.edges[:-1][filled], rel.accuracy[filled], width=width[filled], align="edge",
           edgecolor="black", label="accuracy")
    # Hatched, unfilled: the gap reads the same above (over-confident) or inside (under-) a bar.
    ax.bar(rel.edges[:-1][filled], (rel.confidence - rel.accuracy)[filled],
           bottom=rel.accuracy[filled], width=width[filled], align="edge", fill=False,
           edgecolor="tab:red", hatch="//", linewidth=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted label)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: ECE {100 * rel.ece:.2f}% ({rel.n_images} images)")
    ax.legend(loc="upper left")
    return _save(fig, path, plt)
