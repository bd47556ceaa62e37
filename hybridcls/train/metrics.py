"""What a run reports: per-epoch records, ``metrics.csv`` / ``metrics.json``, the curves PNG.

One record per epoch::

    {"epoch": 3, "train_loss": 1.91, "train_acc": 0.52, "val_loss": 1.42, "val_acc": 0.71,
     "lr": 0.00095, "images_per_sec": 812.4, "time_s": 4.1, "best": true,
     "val_acc_per_class": {"blue_dotted_circle": 0.8, ...}}

``val_acc_per_class`` is ``null`` for a class with no validation image.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridcls.cache import atomic_write_bytes, atomic_write_json

__all__ = [
    "CURVES_PNG",
    "METRICS_CSV",
    "METRICS_JSON",
    "format_epoch",
    "per_class_from_counts",
    "plot_curves",
    "write_metrics",
]

METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
CURVES_PNG = "curves.png"

_SCALAR_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "images_per_sec",
    "time_s",
    "best",
)


def per_class_from_counts(
    hits: Sequence[int], totals: Sequence[int], classes: Sequence[str]
) -> dict[str, float | None]:
    """Validation accuracy of each class (its recall); ``None`` where it has no image.

    Counts, not predictions, because counts add up across the ranks of a distributed run.

    Example:
        >>> per_class_from_counts([1, 1, 0], [2, 1, 0], ["a", "b", "c"])
        {'a': 0.5, 'b': 1.0, 'c': None}
    """
    return {name: (h / t if t else None) for name, h, t in zip(classes, hits, totals)}


def format_epoch(record: dict[str, Any]) -> str:
    """One summary line for an epoch record (``"epochs"``, if present, is the run's maximum).

    Example:
        >>> format_epoch({"epoch": 2, "epochs": 20, "train_loss": 1.5, "train_acc": 0.5,
        ...               "val_loss": 1.2, "val_acc": 0.75, "lr": 1e-3, "images_per_sec": 100.0,
        ...               "time_s": 3.2, "best": True}).split("  ")
        ['epoch', '2/20', 'train loss 1.5000 acc 50.0%', 'val loss 1.2000 acc 75.0%', \
'lr 1.00e-03', '100 img/s', '3.2s', '*best']
    """
    total = f"/{record['epochs']}" if "epochs" in record else ""
    return (
        f"epoch {record['epoch']:2d}{total}  "
        f"train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.1f}%  "
        f"val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.1f}%  "
        f"lr {record['lr']:.2e}  {record['images_per_sec']:.0f} img/s  {record['time_s']:.1f}s"
        + ("  *best" if record.get("best") else "")
    )


def write_metrics(
    run_dir: str | Path, history: list[dict[str, Any]], classes: Sequence[str]
) -> None:
    """Write ``metrics.csv`` (one row per epoch, a ``val_acc/<class>`` column per class)
    and ``metrics.json`` (the records), both atomically."""
    run_dir = Path(run_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_SCALAR_COLUMNS, *(f"val_acc/{name}" for name in classes)])
    for record in history:
        per_class = record.get("val_acc_per_class", {})
        row = [record.get(col) for col in _SCALAR_COLUMNS]
        row += ["" if per_class.get(name) is None else f"{per_class[name]:.4f}" for name in classes]
        writer.writerow(row)
    atomic_write_bytes(run_dir / METRICS_CSV, buffer.getvalue().encode("utf-8"))
    atomic_write_json(run_dir / METRICS_JSON, {"classes": list(classes), "epochs": history})


def plot_curves(run_dir: str | Path, history: list[dict[str, Any]]) -> Path | None:
    """Draw loss and accuracy curves to ``curves.png``; ``None`` without matplotlib.

    Returns:
        The PNG's path, or ``None`` when matplotlib (extra ``[plots]``) is missing
        or there is nothing to draw.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not history:
        return None
    epochs = [r["epoch"] for r in history]
    # Figure() directly, not pyplot: no global backend or state, safe in any thread.
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    best = [r["epoch"] for r in history if r.get("best")]
    if best:
        for ax in (ax_loss, ax_acc):
            ax.axvline(best[-1], color="grey", linestyle="--", linewidth=1)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(run_dir) / CURVES_PNG
    atomic_write_bytes(path, buffer.getvalue())
    return path
