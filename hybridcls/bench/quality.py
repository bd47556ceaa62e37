"""``hybridcls bench quality``: every branch, gate and mode on the same synthetic world.

In one run, on the same data: the supervised branch alone, the zero-shot
branch alone, every gate score with every decision mode (each calibrated by
leave-classes-out without unseen images, thresholded on the real held-out
seen images), the calibrated default, and the oracle router that knows which
test images are unseen. Both towers run once over the test set; every row
is then a :meth:`~hybridcls.hybrid.HybridClassifier.predict_features` (or a
:meth:`~hybridcls.gate.Gate.candidate`'s ``predict``) away, through public calls only.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.cache import atomic_write_json, atomic_write_text
from hybridcls.data import expand_inputs
from hybridcls.errors import CheckpointError, DatasetError, InputError
from hybridcls.eval import join_labels
from hybridcls.gate import GATE_FILENAME, SCORES, BranchOutputs, gate_detection
from hybridcls.gate.metrics import as_class_indices, ausuc, seen_unseen_accuracy
from hybridcls.hybrid import HybridClassifier
from hybridcls.zeroshot.prompts import normalize_label

__all__ = [
    "QualityReport",
    "QualityRow",
    "best_routing_threshold",
    "check_world",
    "default_world_backbone",
    "labelled_test_set",
    "load_or_make_world",
    "prepare_world_run",
    "reference_rows",
    "run_quality",
    "world_run_test_features",
]


@dataclass
class QualityRow:
    """One method's figures on the test set (fractions in [0, 1])."""

    method: str
    seen: float
    unseen: float
    harmonic: float
    accuracy: float
    gate_auroc: float | None = None
    note: str = ""


@dataclass
class QualityReport:
    rows: list[QualityRow]
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str) -> QualityRow:
        return next(r for r in self.rows if r.method == method)

    def markdown(self) -> str:
        lines = ["| method | S | U | H | accuracy | gate AUROC |", "|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            auroc = "" if r.gate_auroc is None else f"{r.gate_auroc:.3f}"
            lines.append(f"| {r.method} | {100 * r.seen:.1f} | {100 * r.unseen:.1f} | "
                         f"{100 * r.harmonic:.1f} | {100 * r.accuracy:.1f} | {auroc} |")
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> None:
        atomic_write_json(path, {
            "rows": [vars(r) for r in self.rows], "seconds": self.seconds, "info": self.info,
        })


def _figures(method: str, y: np.ndarray, pred: np.ndarray, n_seen: int, note: str = "",
             auroc: float | None = None) -> QualityRow:
    s, u, h = seen_unseen_accuracy(y, pred, n_seen)
    return QualityRow(method, s, u, h, float(np.mean(pred == y)), auroc, note)


def reference_rows(feats: BranchOutputs, y: np.ndarray, n_seen: int,
                   seen_logits: np.ndarray | None = None) -> list[QualityRow]:
    """Supervised only, zero-shot only, and the oracle router that knows which images are unseen.

    ``seen_logits`` (default: the plain supervised logits) are what the oracle's
    supervised side reads, e.g. with the cache branch applied.
    """
    sup = feats.sup_logits.argmax(axis=1)
    sup_oracle = sup if seen_logits is None else seen_logits.argmax(axis=1)
    zs = feats.clip_logits.argmax(axis=1)
    zs_unseen = n_seen + feats.clip_logits[:, n_seen:].argmax(axis=1)
    oracle = np.where(y >= n_seen, zs_unseen, sup_oracle)
    return [
        _figures("supervised only", y, sup, n_seen, "never predicts an unseen class"),
        _figures("zero-shot only", y, zs, n_seen, "CLIP over all classes"),
        _figures("oracle router", y, oracle, n_seen, "knows which images are unseen"),
    ]


def best_routing_threshold(scores: Any, y: Any, sup_pred: Any, zs_pred: Any,
                           n_seen: int) -> tuple[float, float]:
    """The hard-routing threshold with the highest H on labelled images, and that H.

    An image goes to the zero-shot branch (answer ``zs_pred``) when its score is above the
    threshold and stays with the supervised one (``sup_pred``) otherwise, as
    :func:`hybridcls.gate.fusion.route_mask` routes it (a NaN score stays). Read off the test
    labels, so a bound for the bench (what any threshold on this score can do with these two
    answers), as the oracle router is for the gate; never a method. Exact: every distinct
    score is a candidate, and each image's answer changes once, where the threshold crosses
    its own score, so the per-class hits at every candidate are a cumulative sum. It holds
    ``[N, C]`` floats a few times over (C classes): about 640 MB for 20,000 images of 1,000
    classes.

    Args:
        scores: ``[N]`` gate scores (higher = less like the seen classes).
        y: ``[N]`` true class indices (``>= n_seen``: unseen).
        sup_pred: ``[N]`` the supervised branch's answers (seen class indices).
        zs_pred: ``[N]`` the zero-shot branch's answers (e.g. CLIP over the unseen classes).
        n_seen: Number of seen classes.

    Returns:
        ``(threshold, H)``: the smallest threshold reaching the best H (``-inf``: route every
        image with a finite score), and that H in [0, 1] (GZSL H of per-class accuracies,
        :func:`hybridcls.gate.metrics.seen_unseen_accuracy`).

    Raises:
        InputError: Arrays of different lengths, class indices that are not whole numbers, a
            negative true class, ``n_seen`` not a whole number >= 1, or labels without a seen
            or an unseen image.

    Example:
        >>> best_routing_threshold([0.1, 0.9, 0.5], [0, 2, 1], [0, 0, 1], [2, 2, 2], n_seen=2)
        (0.5, 1.0)
    """
    s = np.asarray(scores, dtype=np.float64)
    y, sp, zp = (as_class_indices(a, name) for a, name in
                 ((y, "y"), (sup_pred, "sup_pred"), (zs_pred, "zs_pred")))
    if not s.ndim == 1 or not s.shape == y.shape == sp.shape == zp.shape:
        raise InputError(f"scores {s.shape}, y {y.shape}, sup_pred {sp.shape} and zs_pred "
                         f"{zp.shape}: expected four [N] arrays")
    if isinstance(n_seen, bool) or not isinstance(n_seen, (int, np.integer)) or n_seen < 1:
        raise InputError(f"n_seen={n_seen!r}: expected a whole number, 1 or more")
    if y.size and y.min() < 0:
        raise InputError(f"y contains {int((y < 0).sum())} negative class indices")
    if not (y < n_seen).any() or (y < n_seen).all():
        raise InputError(f"y has {int((y < n_seen).sum())} seen and {int((y >= n_seen).sum())} "
                         "unseen images: H needs both")
    key = np.where(np.isnan(s), -np.inf, s)  # NaN: never routed, like a score at -inf
    order = np.argsort(key, kind="stable")
    n_classes = int(max(y.max(initial=-1), n_seen)) + 1
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    # all routed (the threshold below every score), then each image kept in turn, by score
    hits0 = np.bincount(y, weights=(zp == y).astype(np.float64), minlength=n_classes)
    delta = np.zeros((len(s), n_classes))
    delta[np.arange(len(s)), y[order]] = (sp == y)[order].astype(np.float64) - (zp == y)[order]
    hits = np.vstack([hits0, hits0 + np.cumsum(delta, axis=0)])
    ends = np.flatnonzero(np.r_[key[order][1:] != key[order][:-1], True]) + 1  # last of each tie
    states = np.r_[0, ends] if key[order][0] > -np.inf else ends
    thresholds = np.r_[-np.inf, key[order]][states]
    present = counts > 0
    acc = np.divide(hits[states], counts, out=np.zeros((len(states), n_classes)), where=present)
    seen = present & (np.arange(n_classes) < n_seen)
    unseen = present & ~(np.arange(n_classes) < n_seen)
    S, U = acc[:, seen].mean(axis=1), acc[:, unseen].mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        H = np.where(S + U > 0, 2 * S * U / (S + U), 0.0)  # harmonic_mean, over every candidate
    best = int(np.argmax(H))
    return float(thresholds[best]), float(H[best])


def load_or_make_world(root: Path, *, seed: int = 0) -> Any:
    """The world in ``root`` when one with this seed is already there, else a new one.

    Raises:
        InputError: A world of another seed.
        DatasetError: A world with files missing (:func:`check_world`).
    """
    from hybridcls.synth import World, make_world

    if (root / "world.json").is_file():
        world = World.load(root)
        if world.seed != seed:
            raise InputError(f"{root} holds the world of seed {world.seed}, not seed={seed}; use "
                             f"seed={world.seed}, or another folder (out=DIR)")
        check_world(world)
        return world
    return make_world(root, seed=seed)


def check_world(world: Any) -> None:
    """That a world the benches reuse is still whole, before anything trains on it or reads it.

    Raises:
        DatasetError: It lost files since :func:`~hybridcls.synth.make_world` wrote it (a
            seen class's training images, the test labels or test images): named by its folder
            and the bench's ``out``, since the bench made the folders, not the user.
    """
    damage = _world_damage(world)
    if damage is not None:
        raise DatasetError(f"{world.root} holds the world of seed {world.seed}, but {damage}; "
                           f"delete {world.root} to make it again, or use another folder (out=DIR)")


def _world_damage(world: Any) -> str | None:
    """What a world has lost since it was written whole: a seen class's training images, the
    test labels or test images; None when nothing is missing."""
    from hybridcls.synth.render import Attributes

    for name in world.seen_classes:
        folder = world.train_dir / Attributes(*name.split(" ")).folder
        if not folder.is_dir() or next(folder.iterdir(), None) is None:
            return f"the training images of {name!r} are missing ({folder})"
    try:
        labels = world.read_labels()
    except (OSError, KeyError, UnicodeDecodeError, csv.Error) as exc:
        return f"its test labels cannot be read ({world.labels_csv}: {exc})"
    missing = [image_id for image_id in labels if not (world.test_dir / image_id).is_file()]
    if missing:
        return (f"{len(missing)} of its {len(labels)} test images are missing "
                f"({world.test_dir / missing[0]}{', ...' if len(missing) > 1 else ''})")
    return None


def default_world_backbone(cache_dir: Path | None = None) -> dict[str, Any]:
    """Training options for the world's supervised branch, offline.

    Real ImageNet weights when the ``[dev]`` extra's EfficientNet-Lite0 package
    is installed (a realistic fine-tuned branch: about 99% on the seen classes
    in 8 epochs); otherwise ``test_convnext`` from scratch, which is far
    weaker and makes the comparison less telling.
    """
    from hybridcls.supervised.packaged import LITE0_MODEL, packaged_lite0_weights

    weights = packaged_lite0_weights(cache_dir)
    if weights is not None:
        # Every stage trains: flat coloured shapes are far from ImageNet, and with
        # the first two stages frozen the branch confused complementary colours
        # (green/purple, yellow/blue): seen accuracy 91.9% after 5 epochs against
        # 98.8% fully fine-tuned for 8 (docs/gate.md), 98.1% for the demo's 4.
        return {"model": LITE0_MODEL, "weights": str(weights), "freeze": None}
    return {"model": "test_convnext", "pretrained": False, "freeze": None}


def train_once(data_dir: Path, run_dir: Path, **options: Any) -> bool:
    """Train ``run_dir`` on ``data_dir`` unless it holds a finished run; finish an interrupted one.

    The benches reuse what they built. A run that stopped mid-training (the machine went
    down, the bench was interrupted) has a ``model.safetensors`` of its best epoch so far,
    which is not the run the bench reports: it is resumed (``train(resume=)``, with the
    ``device``, ``workers`` and ``progress`` of ``options``), never reused as it is. A run
    whose training diverged is neither: resumed, it would diverge again.

    Args:
        data_dir: The training folder.
        run_dir: The run directory.
        **options: :func:`hybridcls.train.train`'s options for a new run.

    Returns:
        Whether the weights changed (trained or resumed): a gate saved before is stale.

    Raises:
        CheckpointError: ``run_dir`` holds a run whose training diverged.
    """
    from hybridcls.train import train
    from hybridcls.train.state import diverged_training, holds_training_run, unfinished_training

    if not holds_training_run(run_dir):
        train(data_dir, run_dir, **options)
    elif (diverged := diverged_training(run_dir)) is not None:
        raise CheckpointError(
            f"{run_dir}: its training diverged in {diverged.describe()}; a bench neither reports "
            f"nor resumes such a run (resumed, it would diverge again): {diverged.new_run()}, or "
            f"delete the folder and let the bench train it again"
        )
    elif unfinished_training(run_dir) is not None:
        train(data_dir, resume=run_dir, **{k: options[k] for k in ("device", "workers", "progress")
                                            if k in options})
    else:
        return False
    return True


def prepare_world_run(out: Path, *, seed: int = 0, epochs: int = 4, model: str | None = None,
                      image_size: int = 64, workers: int = 0, progress: bool = False,
                      freeze: int | None | str = "default",
                      ) -> tuple[Any, HybridClassifier, dict[str, float]]:
    """Make the world, train the supervised branch on it, load and calibrate the hybrid.

    Args:
        out: Working folder (world, run, cache); an existing world and run are reused (an
            interrupted run is resumed), and a ``gate.json`` already in the run is left as it
            is unless the run was trained or resumed here: the classifier returned is
            calibrated with the defaults in memory.
        seed: World seed.
        epochs: Training epochs.
        model: A timm model trained from scratch, or None for :func:`default_world_backbone`.
        image_size: Supervised input size (the world's images are 64 px).
        workers: Decoding processes.
        progress: Progress bars.
        freeze: Stages kept frozen (``"default"``: :func:`default_world_backbone`'s choice).
    """
    from hybridcls.synth import TINY_CLIP_MODEL_ID

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    world = load_or_make_world(out / "world", seed=seed)
    seconds["world"] = time.perf_counter() - t
    t = time.perf_counter()
    run_dir = out / "run"
    backbone = (default_world_backbone(out / "cache") if model is None
                else {"model": model, "pretrained": False, "freeze": None})
    if freeze != "default":
        backbone["freeze"] = freeze
    trained = train_once(world.train_dir, run_dir, **backbone, image_size=image_size, epochs=epochs,
                         seed=seed, device="cpu", workers=workers, progress=progress)
    seconds["train"] = time.perf_counter() - t
    clf = HybridClassifier(
        clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None, templates=world.templates_file,
        seed=seed, device="cpu", workers=workers, cache_dir=out / "cache", progress=progress,
    ).load_run(run_dir, world.prompts_file)
    t = time.perf_counter()
    # A gate already there is the user's (a run reused from `hybridcls demo`, calibrated since
    # with other settings): the bench calibrates the default in memory and leaves it, unless the
    # weights changed here and it is stale.
    clf.calibrate(world.train_dir, save=trained or not (run_dir / GATE_FILENAME).is_file())
    seconds["calibrate"] = time.perf_counter() - t
    return world, clf, seconds


def labelled_test_set(world: Any, clf: HybridClassifier) -> tuple[list, np.ndarray]:
    """The world's test sources and their true class indices in ``clf.classes_`` order."""
    sources = expand_inputs([world.test_dir])
    labels = join_labels([s.path for s in sources], world.labels_csv).labels
    index = {normalize_label(c): i for i, c in enumerate(clf.classes_)}
    y = np.array([index[normalize_label(label)] for label in labels])
    return sources, y


def world_run_test_features(out: Path, *, seed: int, epochs: int, model: str | None,
                            image_size: int, workers: int, progress: bool
                            ) -> tuple[Any, HybridClassifier, dict[str, float], list[Any], BranchOutputs, np.ndarray]:
    """:func:`prepare_world_run`, then both branches' outputs on the world's test images.

    Returns:
        ``(world, calibrated classifier, seconds per stage, the N test sources, their outputs,
        [N] class indices)``; ``seconds`` gains ``"test features"``.
    """
    world, clf, seconds = prepare_world_run(out, seed=seed, epochs=epochs, model=model,
                                            image_size=image_size, workers=workers, progress=progress)
    sources, y = labelled_test_set(world, clf)
    t = time.perf_counter()
    feats = clf.extract_features(sources)
    seconds["test features"] = time.perf_counter() - t
    return world, clf, seconds, sources, feats, y


def run_quality(out_dir: str | Path, *, seed: int = 0, epochs: int = 8, model: str | None = None,
                image_size: int = 64, workers: int = 0, progress: bool = False) -> QualityReport:
    """The full comparison on the synthetic world (see the module docstring).

    Example:
        >>> report = run_quality("bench-out")  # doctest: +SKIP
        >>> print(report.markdown())  # doctest: +SKIP
    """
    out = Path(out_dir)
    world, clf, seconds, _, feats, y = world_run_test_features(
        out, seed=seed, epochs=epochs, model=model, image_size=image_size, workers=workers,
        progress=progress)
    S = clf.n_seen_
    is_unseen = y >= S
    # every gate below reads the seen-class logits predictions read: with the cache branch when on
    seen_test = clf.seen_logits(feats)
    rows = reference_rows(feats, y, S, seen_logits=seen_test)
    cache = clf.gate_.calibration_.cache_branch
    if cache is not None:
        rows.insert(1, _figures(
            "supervised + cache branch", y, seen_test.argmax(axis=1), S,
            f"alpha {cache['alpha']:.3g} ({cache['alpha_rel']:g} sd), beta {cache['beta']:g}, "
            f"{'on' if cache['enabled'] else 'off'}: held-out {100 * cache['val_accuracy_plain']:.1f} -> "
            f"{100 * cache['val_accuracy']:.1f}"))

    default = clf.predict_features(feats)
    gate = clf.gate_
    g = gate.calibration_
    rows.append(_figures(
        "hybrid, calibrated default", y, default.pred, S,
        f"{g.score} / {g.mode} (tpr {g.tpr:.2f})", gate_detection(default.gate_score, is_unseen).auroc))

    if g.cascade_msp is not None:
        # The cascade's own code path, with CLIP's outputs blanked where it would not run.
        keep = clf.cascade_skips_clip(feats)
        cascade = clf.predict_features(feats.without_clip(keep))
        rows.append(_figures(
            "hybrid, calibrated default, cascade", y, cascade.pred, S,
            f"CLIP on {100 * (1 - keep.mean()):.0f}% of images (supervised MSP <= {g.cascade_msp:.3f}"
            + ("" if g.cascade_distance is None else f" or feature distance > {g.cascade_distance:.3f}") + ")"))

    # every (score, mode) leave-classes-out tried, thresholded on the same held-out seen images
    val, _ = clf.held_out_outputs(world.train_dir)
    seen_pairs = set()
    for cand in g.candidates:
        key = (cand["score"], cand["mode"])
        if key in seen_pairs:
            continue
        seen_pairs.add(key)
        other = gate.candidate(cand, val)
        res = other.predict(feats)
        rows.append(_figures(f"{cand['score']} / {cand['mode']}", y, res.pred, S,
                             f"leave-classes-out H {100 * cand['mean_h']:.1f}, tpr {cand['tpr']:.2f}",
                             gate_detection(res.gate_score, is_unseen).auroc))
    curve = ausuc(feats.clip_logits, y, S)
    info = {"world_seed": seed, "epochs": epochs,
            "model": clf.checkpoint_config_["model"]["name"], "image_size": image_size,
            "n_test": len(y), "n_unseen_test": int(is_unseen.sum()), "n_seen_classes": S,
            "n_classes": len(clf.classes_), "ausuc_stacking": curve.area,
            "scores": list(SCORES), "calibrated": {k: v for k, v in vars(g).items() if k != "candidates"}}
    report = QualityReport(rows, seconds, info)
    report.to_json(out / "quality.json")
    atomic_write_text(out / "quality.md", report.markdown() + "\n")
    return report
