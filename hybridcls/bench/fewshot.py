"""``hybridcls bench fewshot``: k support images per unseen class, against collecting and retraining.

On the synthetic world of ``bench quality`` (the same trained and calibrated
hybrid), k = 0, 1, 2, 5, 10 support images of each unseen class are rendered by
the world's own renderer from a stream of their own (never test images,
:func:`hybridcls.synth.support.render_support`), several draws each, and joined
with :meth:`~hybridcls.predictor.Predictor.add_support`; the test set's tower
outputs are computed once, so each row is an ``add_support`` and a
``predict_features`` away. Beside it, the "collect and retrain" route: the
supervised branch trained again, same recipe, on the seen classes' training
images plus the same k images of each unseen class (every class seen), with
its wall time; and between the two, "refit the head": a linear probe
(scikit-learn's ``LogisticRegression``, classes balanced) on the trained
backbone's pooled features (L2-normalised) of the run's training split plus the
same k images of each unseen class, every class seen, no CLIP (the backbone is
not trained again: seconds, not minutes). Figures: S / U / H / accuracy on the world's seen / unseen split,
and the share of the oracle router's H (:func:`hybridcls.bench.quality.reference_rows`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.bench.quality import (
    QualityReport,
    default_world_backbone,
    reference_rows,
    train_once,
    world_run_test_features,
)
from hybridcls.cache import atomic_write_text
from hybridcls.errors import DataTooSmallError
from hybridcls.gate.metrics import seen_unseen_accuracy
from hybridcls.support import support_samples

__all__ = ["FewShotReport", "FewShotRow", "FewShotZooReport", "draw_support", "fewshot_zoo", "linear_probe",
           "run_fewshot"]

#: The draw of the retrain route's validation images (every class, 2 each): apart from the
#: support draws.
_VAL_DRAW = 100


@dataclass
class FewShotRow:
    """One route at one k, averaged over its draws (fractions in [0, 1])."""

    route: str
    k: int
    draws: int
    seen: float
    unseen: float
    harmonic: float
    accuracy: float
    harmonic_std: float
    oracle_share: float
    seconds: float
    note: str = ""


@dataclass
class FewShotReport(QualityReport):
    """The rows, the preparation's times and the run's settings; written as ``bench quality``'s."""

    rows: list[FewShotRow]  # type: ignore[assignment]

    def markdown(self) -> str:
        lines = ["| route | k | draws | S | U | H (sd) | accuracy | share of oracle H | seconds |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            sd = f"{100 * r.harmonic_std:.1f}" if r.draws > 1 else "-"  # one draw has no spread
            lines.append(f"| {r.route} | {r.k} | {r.draws} | {100 * r.seen:.1f} | {100 * r.unseen:.1f} | "
                         f"{100 * r.harmonic:.1f} ({sd}) | {100 * r.accuracy:.1f} | "
                         f"{100 * r.oracle_share:.1f}% | {r.seconds:.1f} |")
        return "\n".join(lines)



def _row(route: str, k: int, figures: Sequence[tuple[float, float, float, float]], oracle_h: float,
         seconds: float, note: str = "") -> FewShotRow:
    f = np.asarray(figures, dtype=np.float64)
    mean = f.mean(axis=0)
    return FewShotRow(route, k, len(f), *map(float, mean), float(f[:, 2].std()),
                      float(mean[2] / oracle_h), seconds, note)


def _figures(y: np.ndarray, pred: np.ndarray, n_seen: int) -> tuple[float, float, float, float]:
    s, u, h = seen_unseen_accuracy(y, pred, n_seen)
    return s, u, h, float(np.mean(pred == y))


def run_fewshot(out_dir: str | os.PathLike[str], *, seed: int = 0, epochs: int = 8,
                ks: Sequence[int] = (0, 1, 2, 5, 10), draws: int = 3,
                retrain_ks: Sequence[int] = (1, 5), retrain_draws: int = 1, model: str | None = None,
                image_size: int = 64, workers: int = 0, progress: bool = False) -> FewShotReport:
    """The comparison (see the module docstring); writes ``fewshot.md`` and ``fewshot.json``.

    Args:
        out_dir: Working folder (world, run, cache, support draws, retrained runs); reused.
        seed: World seed.
        epochs: Supervised training epochs (the hybrid's and the retrain route's).
        ks: Support images per unseen class (0: the calibrated hybrid alone).
        draws: Draws of support images per k (fixed seeds: draw 0, 1, ...).
        retrain_ks: The k of the retrain route (each trains a model: minutes on a CPU).
        retrain_draws: Its draws per k.
        model: A timm model from scratch, or None for :func:`default_world_backbone`.
        image_size: Supervised input size.
        workers: Decoding processes.
        progress: Progress bars.

    Example:
        >>> print(run_fewshot("bench-fewshot").markdown())  # doctest: +SKIP
    """
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.synth.support import render_support

    out = Path(out_dir)
    world, clf, seconds, sources, feats, y = world_run_test_features(
        out, seed=seed, epochs=epochs, model=model, image_size=image_size, workers=workers,
        progress=progress)
    S = clf.n_seen_
    oracle_h = next(r for r in reference_rows(feats, y, S, clf.seen_logits(feats))
                    if r.method == "oracle router").harmonic
    rows: list[FewShotRow] = []
    # k = 0 first: it is the calibrated gate before any support image joins it
    for k in sorted(set(ks)):
        figures, spent, note = [], 0.0, "calibrated hybrid"
        for draw in range(draws if k else 1):
            if k:
                folder = out / "support" / f"k{k}-draw{draw}"
                if not folder.is_dir():
                    render_support(world, folder, k, draw=draw)
                t = time.perf_counter()
                clf.add_support(folder, replace=True)
                spent += time.perf_counter() - t
                if draw == 0:
                    rec = clf.gate_summary()["support"]
                    note = f"draw 0: alpha {rec['alpha_rel']:g} sd, beta {rec['beta']:g}, tpr {clf.gate_.calibration_.tpr:g}"
            figures.append(_figures(y, clf.predict_features(feats).pred, S))
        rows.append(_row("hybrid + support", k, figures, oracle_h, spent / max(len(figures), 1), note))
    names = {str(c): i for i, c in enumerate(clf.classes_)}
    rows += _probe_rows(clf, out, ks, draws, y, feats.sup_features, oracle_h)
    backbone = (default_world_backbone(out / "cache") if model is None
                else {"model": model, "pretrained": False, "freeze": None})
    val_dir = out / "retrain" / "val"
    if retrain_ks and not val_dir.is_dir():
        render_support(world, val_dir, 2, draw=_VAL_DRAW, classes=world.classes)
    for k in retrain_ks:
        figures, spent = [], 0.0
        for draw in range(retrain_draws):
            data = out / "retrain" / f"k{k}-draw{draw}" / "train"
            _training_folder(world.train_dir, out / "support" / f"k{k}-draw{draw}", data, world, k, draw)
            run_dir = data.parent / "run"
            t = time.perf_counter()
            train_once(data, run_dir, **backbone, image_size=image_size, epochs=epochs, seed=seed,
                       device="cpu", workers=workers, progress=progress, val_dir=str(val_dir))
            spent += time.perf_counter() - t
            # every class is seen now: the supervised branch alone answers
            retrained = HybridClassifier(clip_model=clf.clip_model, clip_pretrained=None,
                                         templates=world.templates_file, device="cpu",
                                         workers=workers, cache_dir=out / "cache",
                                         progress=progress).load_run(run_dir, world.prompts_file)
            logits = retrained.extract_features(sources, clip="none").sup_logits
            pred = np.array([names[str(retrained.classes_[i])] for i in logits.argmax(axis=1)])
            figures.append(_figures(y, pred, S))
        rows.append(_row("collect and retrain", k, figures, oracle_h, spent / len(figures),
                         f"{epochs} epochs, all {len(clf.classes_)} classes"))
    info = {"world_seed": seed, "epochs": epochs, "ks": list(ks), "draws": draws,
            "retrain_ks": list(retrain_ks), "retrain_draws": retrain_draws, "oracle_h": oracle_h,
            "n_test": len(y), "n_seen_classes": S, "n_classes": len(clf.classes_),
            "model": clf.checkpoint_config_["model"]["name"]}
    report = FewShotReport(rows, seconds, info)
    report.to_json(out / "fewshot.json")
    atomic_write_text(out / "fewshot.md", report.markdown() + "\n")
    return report


def linear_probe(features: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Class indices of ``queries`` from a linear probe fitted on ``features`` / ``labels``.

    scikit-learn's ``LogisticRegression`` (L2, ``C=1``, ``class_weight="balanced"``: a class of
    five support images weighs as much as one of a hundred training images) on L2-normalised
    features, the linear-probe protocol of CLIP (Radford et al. 2021) with balanced classes.

    Args:
        features: ``[N, D]`` training features.
        labels: ``[N]`` their class indices (at least two classes).
        queries: ``[M, D]`` features to classify.

    Returns:
        ``[M]`` class indices (those of ``labels``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    probe = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    probe.fit(normalize(features), labels)
    return probe.predict(normalize(queries))


def _probe_rows(clf: Any, out: Path, ks: Sequence[int], draws: int, y: np.ndarray,
                test_features: np.ndarray, oracle_h: float) -> list[FewShotRow]:
    """The "refit the head" route at every k > 0, on the support draws the hybrid rows used."""
    ks = sorted(k for k in set(ks) if k)
    if not ks:
        return []
    t = time.perf_counter()
    train = clf._training_data(None).train  # the split that trained the backbone
    train_x = clf.extract_features([p for p, _ in train], clip="none").sup_features
    train_y = np.array([c for _, c in train], dtype=np.int64)
    train_seconds = time.perf_counter() - t
    rows = []
    for k in ks:
        figures, spent = [], 0.0
        for draw in range(draws):
            t = time.perf_counter()
            samples = support_samples(out / "support" / f"k{k}-draw{draw}", clf.tower_.prompts)
            x = clf.extract_features([p for p, _ in samples], clip="none").sup_features
            labels = [c for _, c in samples]
            pred = linear_probe(np.concatenate([train_x, x]), np.concatenate([train_y, labels]),
                                test_features)
            spent += time.perf_counter() - t
            figures.append(_figures(y, pred, clf.n_seen_))
        rows.append(_row("refit the head", k, figures, oracle_h, spent / len(figures),
                         f"linear probe on backbone features; the {len(train)} training images' "
                         f"features once: {train_seconds:.1f} s"))
    return rows


def _training_folder(train_dir: Path, support: Path, dest: Path, world: Any, k: int, draw: int) -> None:
    """``dest``: the seen classes' training folders and the k support images of each unseen class
    (symbolic links: nothing is copied)."""
    from hybridcls.synth.support import render_support

    if dest.is_dir():
        return
    if not support.is_dir():
        render_support(world, support, k, draw=draw)
    dest.mkdir(parents=True)
    for root in (train_dir, support):
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            (dest / sub.name).symlink_to(sub.resolve(), target_is_directory=True)


@dataclass
class FewShotZooReport:
    """:func:`fewshot_zoo`'s figures: the hybrid + support rows of every world, and the summary.

    Attributes:
        worlds: ``{world name: [one row per k]}`` (``oracle_share`` averaged over the draws,
            each draw's share on its own evaluation images).
        summary: ``{k: {"median", "worst", "worst_world"}}`` of the share of the oracle's H.
    """

    worlds: dict[str, list[FewShotRow]]
    summary: dict[int, dict[str, Any]]

    def markdown(self) -> str:
        ks = list(self.summary)
        lines = ["| world | " + " | ".join(f"k = {k}: H / share of oracle" for k in ks) + " |",
                 "|---|" + "---:|" * len(ks)]
        for name, rows in self.worlds.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * r.harmonic:.1f} / {100 * r.oracle_share:.1f}%"
                                                     for r in rows) + " |")
        lines.append("")
        lines += [f"k = {k}: share of the oracle's H median {100 * s['median']:.1f}%, worst "
                  f"{100 * s['worst']:.1f}% ({s['worst_world']})" for k, s in self.summary.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"worlds": {n: [vars(r) for r in rows] for n, rows in self.worlds.items()},
                "summary": {str(k): v for k, v in self.summary.items()}}


def draw_support(y: np.ndarray, classes: Sequence[int], k: int, draw: int,
                 names: Sequence[str] | None = None) -> np.ndarray:
    """``[k * len(classes)]`` indices of ``y``: ``k`` images of each class, drawn without
    replacement (seeded by ``draw``), class by class.

    Args:
        y: ``[N]`` class indices.
        classes: The classes to draw from.
        k: Images per class.
        draw: The draw's seed.
        names: Class names by index, for the message.

    Raises:
        DataTooSmallError: A class with ``k`` images or fewer (none would be left to evaluate on).
    """
    rng = np.random.default_rng(draw)
    picked = []
    for c in classes:
        rows = np.flatnonzero(y == c)
        if len(rows) <= k:
            name = repr(names[c]) if names is not None else str(c)
            raise DataTooSmallError(f"class {name} has {len(rows)} test images: k={k} support "
                                    "images of it would leave none to evaluate on; ask for fewer")
        picked.append(rng.choice(rows, size=k, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def fewshot_zoo(out_dir: str | os.PathLike[str], n: int | str | None = None, *,
                ks: Sequence[int] = (0, 1, 2, 5, 10), draws: int = 3,
                cache_dir: str | os.PathLike[str] | None = None, workers: int = 0,
                progress: bool = False) -> FewShotZooReport:
    """The hybrid + support route on every world of the zoo, from the cached towers' outputs.

    The zoo caches no image apart from the test set, so each draw takes its ``k`` support
    images of every unseen class from the test set (:func:`draw_support`) and is scored on
    the test images left (the oracle router on the same ones, reading the plain supervised
    logits as the zoo's table does). The default gate is fitted
    as ``calibrate`` fits it and the support joins it as ``add_support`` joins it
    (:meth:`~hybridcls.gate.Gate.with_support`, with the held-out images). Writes
    ``fewshot.md`` and ``fewshot.json`` into ``out_dir``.

    Args:
        out_dir: The zoo's folder (:func:`hybridcls.bench.zoo.run_zoo`).
        n: Build (or reuse) the first ``n`` worlds, or ``"ci"``, first; ``None``: the worlds
            already built there (:func:`hybridcls.bench.zoo.cached_worlds`).
        ks: Support images per unseen class (0: the calibrated gate alone, on every test image).
        draws: Draws per k (seeds 0, 1, ...).
        cache_dir: As :func:`hybridcls.bench.zoo.build_world`'s, for worlds still to build.
        workers: Decoding processes, likewise.
        progress: Progress bars, likewise.

    Raises:
        DataTooSmallError: A k that leaves an unseen class no test image.
    """
    import statistics

    from hybridcls.bench.zoo import built_worlds, load_features, zoo_specs
    from hybridcls.cache import atomic_write_json
    from hybridcls.gate import Gate

    out = Path(out_dir)
    if n is not None and ks:  # a k the worlds' test sets cannot spare, before any world is built
        smallest = min(spec.test_per_class for spec in zoo_specs(n))
        if max(ks) >= smallest:
            raise DataTooSmallError(f"k={max(ks)}: the zoo's worlds hold {smallest} test images of "
                                    "a class, and the support images are drawn from them; ask for "
                                    f"at most {smallest - 1}")
    worlds: dict[str, list[FewShotRow]] = {}
    for name in built_worlds(out, n, cache_dir=cache_dir, workers=workers, progress=progress):
        f = load_features(out / name)
        S, y = f.n_seen, f.y_test
        gate = f.fit(Gate())
        rows = []
        for k in sorted(set(ks)):
            figures, shares, spent = [], [], 0.0
            for draw in range(draws if k else 1):
                support = draw_support(y, range(S, len(f.classes)), k, draw, names=f.classes)
                rest = np.setdiff1d(np.arange(len(y)), support)
                used = gate
                if k:
                    t = time.perf_counter()
                    used = gate.with_support(f.test.rows(support), y[support], class_names=f.classes,
                                             held_out=f.val, y_held_out=f.y_val)
                    spent += time.perf_counter() - t
                test = f.test.rows(rest)
                figures.append(_figures(y[rest], used.predict(test).pred, S))
                # the zoo's oracle (plain supervised logits), so that k = 0 is the zoo table's share
                oracle = next(r for r in reference_rows(test, y[rest], S)
                              if r.method == "oracle router").harmonic
                shares.append(figures[-1][2] / oracle if oracle > 0 else 0.0)
            row = _row("hybrid + support", k, figures, 1.0, spent / max(len(figures), 1),
                       "support drawn from the test set, scored on the rest")
            row.oracle_share = float(np.mean(shares))
            rows.append(row)
        worlds[name] = rows
    summary = {}
    for i, k in enumerate(sorted(set(ks))):
        shares = {name: rows[i].oracle_share for name, rows in worlds.items()}
        worst = min(shares, key=shares.__getitem__)
        summary[k] = {"median": statistics.median(shares.values()), "worst": shares[worst],
                      "worst_world": worst}
    report = FewShotZooReport(worlds, summary)
    atomic_write_json(out / "fewshot.json", report.as_dict())
    atomic_write_text(out / "fewshot.md", report.markdown() + "\n")
    return report
