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

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.bench.quality import labelled_test_set, prepare_world_run
from hybridcls.cache import atomic_write_json, atomic_write_text
from hybridcls.errors import InputError, ParameterError
from hybridcls.hierarchy import (
    Hierarchy,
    RollupFigures,
    calibrate_threshold,
    correct_at_rank,
    rollup,
    rollup_figures,
)
from hybridcls.synth import write_hierarchy_prompts
from hybridcls.zeroshot.prompts import align_classes, read_prompts

__all__ = ["DEFAULT_PRECISIONS", "MIN_LEAF_SHARE", "RollupBenchRow", "RollupReport", "RollupZooReport",
           "best_test_threshold", "rollup_report", "rollup_rows", "rollup_zoo", "run_rollup", "world_hierarchy"]

#: The target precisions the bench chooses thresholds at (one that no threshold reaches on the
#: held-out images is listed in ``info["unreachable"]``, with the best reachable).
DEFAULT_PRECISIONS = (0.9, 0.95, 0.98, 0.99)


#: The share of images answered with a class that the best threshold on the test images
#: (:func:`best_test_threshold`) must keep: the issue's bar for roll-up (at least 90%).
MIN_LEAF_SHARE = 0.9


@dataclass
class RollupBenchRow:
    """One line of the table: no roll-up (``target`` None), roll-up at a target precision, or
    (``oracle``) the threshold that removes the most wrong answers on the test images while
    :data:`MIN_LEAF_SHARE` of them keep a class answer: read off the test labels, a bound on
    what any threshold can do with this tree, not a method."""

    target: float | None
    threshold: float | None
    held_out_precision: float | None
    figures: RollupFigures
    unseen_wrong: float
    seen_wrong: float
    oracle: bool = False

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
            what = ("off" if r.threshold is None else
                    f"best on the test images, >= {100 * MIN_LEAF_SHARE:.0f}% with a class (bound)" if r.oracle
                    else f"precision {r.target:g} (held-out {100 * r.held_out_precision:.1f})")
            thr = "" if r.threshold is None else f"{r.threshold:.3f}"
            cut = "" if r.threshold is None else f"{100 * (1 - r.wrong / base):.0f}%" if base else ""
            accs = " | ".join(f"{100 * a:.1f}" for a in r.figures.accuracy_at_rank)
            lines.append(f"| {what} | {thr} | {100 * r.wrong:.1f}% | {cut} | "
                         f"{100 * r.figures.leaf_share:.1f}% | {accs} | "
                         f"{100 * r.seen_wrong:.1f}% / {100 * r.unseen_wrong:.1f}% |")
        for target, reason in self.info.get("unreachable", {}).items():
            lines.append(f"\nprecision {target}: {reason}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": [{"target": r.target, "threshold": r.threshold,
                          "held_out_precision": r.held_out_precision, "oracle": r.oracle, "wrong": r.wrong,
                          "seen_wrong": r.seen_wrong, "unseen_wrong": r.unseen_wrong,
                          **r.figures.as_dict()} for r in self.rows],
                "seconds": self.seconds, "info": self.info}


def rollup_rows(probs: Any, y: Any, val_probs: Any, y_val: Any, hierarchy: Hierarchy, n_seen: int,
                precisions: tuple[float, ...] = DEFAULT_PRECISIONS,
                ) -> tuple[list[RollupBenchRow], dict[str, str]]:
    """The table's rows from a hybrid's probabilities on the test and held-out images.

    Args:
        probs: ``[N, C]`` fused probabilities of the test images (classes in the tree's order).
        y: ``[N]`` their true classes (``>= n_seen``: unseen).
        val_probs: ``[M, C]`` those of the held-out seen images (thresholds are chosen on them).
        y_val: ``[M]`` their true classes.
        hierarchy: The classes' tree.
        n_seen: Number of seen classes.
        precisions: Target precisions on the held-out images.

    Returns:
        ``(rows, unreachable)``: no roll-up, each target a threshold reaches, the bound
        (:func:`best_test_threshold`); and ``{target: why}`` for the targets none reaches.
    """
    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    unseen = y >= n_seen

    def row(target: float | None, threshold: float | None, held_out: float | None,
            leaf: np.ndarray, rank: np.ndarray, oracle: bool = False) -> RollupBenchRow:
        wrong = [rollup_figures(y[m], leaf[m], rank[m], hierarchy) for m in (~unseen, unseen)]
        return RollupBenchRow(target, threshold, held_out, rollup_figures(y, leaf, rank, hierarchy),
                              *(w.n_wrong / max(w.n_images, 1) for w in reversed(wrong)), oracle=oracle)

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
    best = best_test_threshold(probs, y, hierarchy)
    res = rollup(probs, hierarchy, best)
    rows.append(row(None, best, None, res.leaf, res.rank, oracle=True))
    return rows, unreachable


def best_test_threshold(probs: Any, y: Any, hierarchy: Hierarchy,
                        min_leaf_share: float = MIN_LEAF_SHARE) -> float:
    """The threshold with the fewest wrong answers on labelled images among those that keep at
    least ``min_leaf_share`` of them answered with a class (on a tie, the one that keeps the
    most class answers, then the smallest).

    Read off the test labels, so a bound for the bench (what any threshold can do with this
    tree and these probabilities), as the oracle router is for the gate; never a method.
    Exact: a row's answer changes only where the threshold crosses one of its own values
    (its best class's probability, an ancestor's mass), so each row is answered once at each
    of them and the counts at every candidate are summed from those changes (no thinning,
    unlike :func:`~hybridcls.hierarchy.threshold_candidates`).

    Example:
        >>> from hybridcls.zeroshot.prompts import parse_prompts
        >>> h = Hierarchy.from_prompts(parse_prompts("fox > canid\\nwolf > canid\\ncod"))
        >>> probs = [[0.5, 0.4, 0.1], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]]
        >>> y = [1, 0, 2, 2]  # the first is a wolf taken for a fox; the last, a cod
        >>> best_test_threshold(probs, y, h, 0.5)  # 'canid' for the first: 1 wrong, 3 of 4 classes
        0.6
        >>> best_test_threshold(probs, y, h, 0.8)  # no roll-up keeps 4 of 4
        0.2
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(y, np.int64)
    n = len(p)
    # each row's own values, ascending: its answer is constant on (v[k-1], v[k]]
    values = np.sort(np.column_stack([p.max(axis=1), p @ hierarchy.membership, np.ones(n)]), axis=1)
    values = np.clip(values, np.finfo(np.float64).tiny, 1.0)  # a mass of 0 reads as the smallest threshold
    rows = np.repeat(np.arange(n), values.shape[1])
    res = rollup(p[rows], hierarchy, values.ravel())
    wrong = (~correct_at_rank(res, y[rows], hierarchy.membership)).reshape(values.shape).astype(np.int64)
    leaf = (res.rank == 0).reshape(values.shape).astype(np.int64)
    # past v[k] a row goes from its answer at v[k] to its answer at v[k + 1]
    events = values[:, :-1].ravel()
    order = np.argsort(events, kind="stable")
    steps = {name: np.concatenate([[0], np.cumsum(np.diff(a, axis=1).ravel()[order])])
             for name, a in (("wrong", wrong), ("leaf", leaf))}
    candidates = np.unique(values)
    passed = np.searchsorted(events[order], candidates, side="left")  # events below each candidate
    n_wrong = wrong[:, 0].sum() + steps["wrong"][passed]
    n_leaf = leaf[:, 0].sum() + steps["leaf"][passed]
    ok = n_leaf >= min_leaf_share * n - 1e-9
    # the smallest candidate rolls nothing up, so one is always kept
    best = min(zip(n_wrong[ok], -n_leaf[ok], candidates[ok]))
    return float(best[2])


def world_hierarchy(world: Any, seen_folders: Any) -> Hierarchy:
    """The world's natural tree (:func:`hybridcls.synth.write_hierarchy_prompts`, written into
    the world's folder) over its classes in a classifier's order: ``seen_folders``, then the rest."""
    return Hierarchy.from_prompts(align_classes(seen_folders, read_prompts(write_hierarchy_prompts(world))))


def _check_columns(hierarchy: Hierarchy, classes: Any, whose: str) -> None:
    """The tree's classes must be the probabilities' columns, in their order, or every figure
    would read the wrong columns."""
    if list(hierarchy.classes) != [str(c) for c in classes]:
        raise InputError(f"{whose} order the classes otherwise than the world's tree "
                         f"({list(classes)[:3]}... against {list(hierarchy.classes)[:3]}...)")


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
    hierarchy = world_hierarchy(world, clf.seen_folders_)
    _check_columns(hierarchy, clf.classes_, "the classifier")
    t = time.perf_counter()
    sources, y = labelled_test_set(world, clf)
    probs = clf.predict_features(clf.extract_features(sources)).probs
    val, y_val = clf.held_out_outputs(world.train_dir)
    val_probs = clf.predict_features(val).probs
    seconds["features"] = time.perf_counter() - t
    rows, unreachable = rollup_rows(probs, y, val_probs, y_val, hierarchy, clf.n_seen_, precisions)
    info = {"unreachable": unreachable, "n_test": len(y), "n_unseen_test": int(np.sum(y >= clf.n_seen_)),
            "n_held_out": len(y_val), "n_classes": len(clf.classes_), "n_seen_classes": clf.n_seen_,
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


@dataclass
class RollupZooReport:
    """:func:`rollup_zoo`'s figures: one :class:`RollupReport` per world, and their summary.

    Attributes:
        worlds: ``{world name: its report}``, in the zoo's order.
        summary: ``{column: {"median", "worst", "worst_world", "met"}}`` over the worlds for
            each target precision (``"precision 0.98"``) and for the bound (``"bound"``):
            the share of wrong answers cut, and how many worlds meet the bar (cut at least
            half, at least :data:`MIN_LEAF_SHARE` answered with a class). A target no
            threshold reaches on a world's held-out images leaves roll-up off there: a cut of 0.
    """

    worlds: dict[str, RollupReport]
    summary: dict[str, dict[str, Any]]

    def markdown(self) -> str:
        columns = list(self.summary)
        lines = ["| world | wrong, no roll-up | " + " | ".join(f"{c}: cut / with a class" for c in columns)
                 + " |", "|---|---:|" + "---:|" * len(columns)]
        for name, report in self.worlds.items():
            cells = []
            for column in columns:
                row = _column_row(report, column)
                cells.append("unreachable" if row is None else
                             f"{100 * _cut(report, row):.0f}% / {100 * row.figures.leaf_share:.1f}%")
            lines.append(f"| {name} | {100 * report.rows[0].wrong:.1f}% | " + " | ".join(cells) + " |")
        lines.append("")
        for column, s in self.summary.items():
            off = sum(_column_row(r, column) is None for r in self.worlds.values())
            lines.append(f"{column}: cut median {100 * s['median']:.0f}%, worst {100 * s['worst']:.0f}% "
                         f"({s['worst_world']}"
                         + (f"; unreachable, so roll-up off, on {off} of {len(self.worlds)}" if off else "")
                         + f"); {s['met']} of {len(self.worlds)} worlds cut at least half with at least "
                         f"{100 * MIN_LEAF_SHARE:.0f}% answered with a class")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"worlds": {n: r.as_dict() for n, r in self.worlds.items()}, "summary": self.summary}


def _column_row(report: RollupReport, column: str) -> RollupBenchRow | None:
    if column == "bound":
        return next(r for r in report.rows if r.oracle)
    return next((r for r in report.rows if r.target is not None and f"precision {r.target:g}" == column), None)


def _cut(report: RollupReport, row: RollupBenchRow | None) -> float:
    """The share of the no-roll-up wrong answers that ``row`` removes (0 for no row)."""
    base = report.rows[0].wrong
    return 0.0 if row is None or base == 0 else 1.0 - row.wrong / base


def rollup_zoo(out_dir: str | Path, n: int | str | None = None, *,
               precisions: tuple[float, ...] = DEFAULT_PRECISIONS, cache_dir: str | Path | None = None,
               workers: int = 0, progress: bool = False) -> RollupZooReport:
    """Roll-up on every world of the zoo (:mod:`hybridcls.bench.zoo`), from the cached towers'
    outputs: each world's natural tree, the default gate fitted as ``calibrate`` fits it, the
    thresholds chosen on its held-out seen images, and the bound (:func:`best_test_threshold`).

    Writes ``rollup.md`` and ``rollup.json`` into ``out_dir``.

    Args:
        out_dir: The zoo's folder (:func:`hybridcls.bench.zoo.run_zoo`).
        n: Build (or reuse) the first ``n`` worlds of the zoo, or ``"ci"``, first; ``None``:
            the worlds already built there (:func:`hybridcls.bench.zoo.cached_worlds`).
        precisions: Target precisions on the held-out seen images.
        cache_dir: As :func:`hybridcls.bench.zoo.build_world`'s, for worlds still to build.
        workers: Decoding processes, likewise.
        progress: Progress bars, likewise.

    Raises:
        InputError: No world built there (and ``n`` not given).

    Example:
        >>> report = rollup_zoo("hybridcls-bench-zoo", 8)  # doctest: +SKIP
        >>> report.summary["bound"]["median"]  # doctest: +SKIP
    """
    from hybridcls.bench.zoo import built_worlds, load_features
    from hybridcls.gate import Gate
    from hybridcls.synth import World

    out = Path(out_dir)
    worlds: dict[str, RollupReport] = {}
    for name in built_worlds(out, n, cache_dir=cache_dir, workers=workers, progress=progress):
        t = time.perf_counter()
        f = load_features(out / name)
        hierarchy = world_hierarchy(World.load(out / name / "world"), f.class_names)
        _check_columns(hierarchy, f.classes, f"{out / name}: its cached outputs")
        gate = f.fit(Gate())
        rows, unreachable = rollup_rows(gate.predict(f.test).probs, f.y_test, gate.predict(f.val).probs,
                                        f.y_val, hierarchy, f.n_seen, precisions)
        worlds[name] = RollupReport(rows, {"rollup": time.perf_counter() - t},
                                    {"unreachable": unreachable, "n_test": len(f.y_test),
                                     "n_held_out": len(f.y_val), "nodes": len(hierarchy.nodes)})
    summary = {}
    for column in [f"precision {p:g}" for p in precisions] + ["bound"]:
        cuts = {name: _cut(r, _column_row(r, column)) for name, r in worlds.items()}
        met = sum(1 for name, r in worlds.items() if (row := _column_row(r, column)) is not None
                  and cuts[name] >= 0.5 and row.figures.leaf_share >= MIN_LEAF_SHARE)
        worst = min(cuts, key=cuts.__getitem__)
        summary[column] = {"median": statistics.median(cuts.values()), "worst": cuts[worst],
                           "worst_world": worst, "met": met}
    report = RollupZooReport(worlds, summary)
    atomic_write_json(out / "rollup.json", report.as_dict())
    atomic_write_text(out / "rollup.md", report.markdown() + "\n")
    return report
