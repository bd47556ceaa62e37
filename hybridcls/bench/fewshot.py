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
from hybridcls.gate.metrics import seen_unseen_accuracy
from hybridcls.support import support_samples

__all__ = ["FewShotReport", "FewShotRow", "linear_probe", "run_fewshot"]

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
