"""``hybridcls bench rollup``: wrong answers without and with roll-up on the synthetic world.

The world's classes get their natural tree (shape > colour and shape > class,
:func:`hybridcls.synth.write_hierarchy_prompts`). The calibrated hybrid of
``bench quality`` (the same folder's world and run are reused: nothing is
trained when they are there) predicts the test images once; the roll-up
threshold is chosen on the held-out seen images at each target precision
(:func:`hybridcls.hierarchy.calibrate_threshold`) and applied to the test
probabilities. Each row: the threshold, the share of wrong answers (wrong at
their own rank), how much of the no-roll-up share it removes, the share still
answered with a class, and the accuracy at every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.bench.quality import labelled_test_set, prepare_world_run
from hybridcls.cache import atomic_write_json, atomic_write_text
from hybridcls.errors import ParameterError
from hybridcls.hierarchy import (
    Hierarchy,
    RollupFigures,
    calibrate_threshold,
    rollup,
    rollup_figures,
)
from hybridcls.synth import write_hierarchy_prompts
from hybridcls.zeroshot.prompts import align_classes, read_prompts

__all__ = ["DEFAULT_PRECISIONS", "RollupBenchRow", "RollupReport", "rollup_report", "run_rollup"]

#: The target precisions the bench chooses thresholds at (one that no threshold reaches on the
#: held-out images is listed in ``info["unreachable"]``, with the best reachable).
DEFAULT_PRECISIONS = (0.9, 0.95, 0.98, 0.99)


@dataclass
class RollupBenchRow:
    """One line of the table: no roll-up (``target`` None) or roll-up at a target precision."""

    target: float | None
    threshold: float | None
    held_out_precision: float | None
    figures: RollupFigures
    unseen_wrong: float
    seen_wrong: float

    @property
    def wrong(self) -> float:
        return self.figures.n_wrong / self.figures.n_images


@dataclass
class RollupReport:
    rows: list[RollupBenchRow]
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        base = self.rows[0].wrong
        ranks = len(self.rows[0].figures.accuracy_at_rank)
        lines = ["| roll-up | threshold | wrong | wrong, cut | answered with a class | "
                 + " | ".join(f"accuracy at rank {r}" for r in range(ranks))
                 + " | wrong, seen / unseen images |",
                 "|---|---:|---:|---:|---:|" + "---:|" * ranks + "---:|"]
        for r in self.rows:
            what = "off" if r.target is None else f"precision {r.target:g} (held-out {100 * r.held_out_precision:.1f})"
            thr = "" if r.threshold is None else f"{r.threshold:.3f}"
            cut = "" if r.target is None else f"{100 * (1 - r.wrong / base):.0f}%" if base else ""
            accs = " | ".join(f"{100 * a:.1f}" for a in r.figures.accuracy_at_rank)
            lines.append(f"| {what} | {thr} | {100 * r.wrong:.1f}% | {cut} | "
                         f"{100 * r.figures.leaf_share:.1f}% | {accs} | "
                         f"{100 * r.seen_wrong:.1f}% / {100 * r.unseen_wrong:.1f}% |")
        for target, reason in self.info.get("unreachable", {}).items():
            lines.append(f"\nprecision {target}: {reason}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": [{"target": r.target, "threshold": r.threshold,
                          "held_out_precision": r.held_out_precision, "wrong": r.wrong,
                          "seen_wrong": r.seen_wrong, "unseen_wrong": r.unseen_wrong,
                          **r.figures.as_dict()} for r in self.rows],
                "seconds": self.seconds, "info": self.info}


def rollup_report(world: Any, clf: Any, precisions: tuple[float, ...] = DEFAULT_PRECISIONS
                  ) -> RollupReport:
    """The table's rows for a calibrated hybrid on ``world`` (its test and held-out images).

    Args:
        world: The synthetic world (:class:`hybridcls.synth.World`).
        clf: Its calibrated :class:`~hybridcls.HybridClassifier` (any prompts: the tree's
            classes are aligned to ``clf.classes_``).
        precisions: Target precisions on the held-out seen images.
    """
    seconds: dict[str, float] = {}
    tree = align_classes(clf.seen_folders_, read_prompts(write_hierarchy_prompts(world)))
    hierarchy = Hierarchy.from_prompts(tree)
    assert list(hierarchy.classes) == list(clf.classes_), "the tree's classes are the classifier's"
    t = time.perf_counter()
    sources, y = labelled_test_set(world, clf)
    probs = clf.predict_features(clf.extract_features(sources)).probs
    val, y_val = clf.held_out_outputs(world.train_dir)
    val_probs = clf.predict_features(val).probs
    seconds["features"] = time.perf_counter() - t
    unseen = y >= clf.n_seen_

    def row(target: float | None, threshold: float | None, held_out: float | None,
            leaf: np.ndarray, rank: np.ndarray) -> RollupBenchRow:
        wrong = [rollup_figures(y[m], leaf[m], rank[m], hierarchy) for m in (~unseen, unseen)]
        return RollupBenchRow(target, threshold, held_out, rollup_figures(y, leaf, rank, hierarchy),
                              *(w.n_wrong / max(w.n_images, 1) for w in reversed(wrong)))

    rows = [row(None, None, None, probs.argmax(axis=1), np.zeros(len(y), np.int64))]
    unreachable = {}
    for target in precisions:
        try:
            cal = calibrate_threshold(val_probs, y_val, hierarchy, target)
        except ParameterError as err:  # the world's shapes are separate roots: a wrong shape stays
            unreachable[str(target)] = err.reason
            continue
        res = rollup(probs, hierarchy, cal.threshold)
        rows.append(row(target, cal.threshold, cal.precision, res.leaf, res.rank))
    info = {"unreachable": unreachable, "n_test": len(y), "n_unseen_test": int(unseen.sum()), "n_held_out": len(y_val),
            "n_classes": len(clf.classes_), "n_seen_classes": clf.n_seen_,
            "nodes": len(hierarchy.nodes)}
    return RollupReport(rows, seconds, info)


def run_rollup(out_dir: str | Path, *, seed: int = 0, epochs: int = 8, model: str | None = None,
               image_size: int = 64, workers: int = 0, progress: bool = False,
               precisions: tuple[float, ...] = DEFAULT_PRECISIONS) -> RollupReport:
    """The bench: the world and calibrated run of ``out_dir`` (made when absent), then
    :func:`rollup_report`; writes ``rollup.md`` and ``rollup.json`` there."""
    out = Path(out_dir)
    world, clf, seconds = prepare_world_run(out, seed=seed, epochs=epochs, model=model,
                                            image_size=image_size, workers=workers, progress=progress)
    report = rollup_report(world, clf, precisions)
    report.seconds = {**seconds, **report.seconds}
    report.info.update(world_seed=seed, model=clf.checkpoint_config_["model"]["name"])
    atomic_write_json(out / "rollup.json", report.as_dict())
    atomic_write_text(out / "rollup.md", report.markdown() + "\n")
    return report
