"""``HybridClassifier``: the supervised branch, the zero-shot branch and the gate, together.

scikit-learn shaped: ``__init__`` stores parameters; :meth:`fit` trains the
supervised branch (through :func:`hybridcls.train.train`) and loads both
branches; :meth:`calibrate` fits the gate on seen-class images only;
:meth:`predict`, :meth:`predict_proba` and :meth:`decision_function` run both
towers through one :class:`~hybridcls.engine.InferenceEngine`;
:meth:`predict_features` re-runs only the gate and the fusion on cached
branch outputs.

Class order (``classes_``): the seen classes in training order, spelled as
in the prompts file, then the unseen classes in prompts-file order.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from hybridcls.cache import atomic_write_json, atomic_write_text
from hybridcls.data import Source, as_sources
from hybridcls.device import resolve_device
from hybridcls.engine import EngineBatch, InferenceEngine
from hybridcls.errors import CheckpointError, ImageDecodeError, InputError, PromptFileError
from hybridcls.gate import (
    CACHE_MODES,
    GATE_FILENAME,
    CacheBranch,
    FusionResult,
    GateCalibration,
    apply_transductive,
    cascade_keep,
    finalize,
    fit_cache_branch,
    fit_cascade,
    fit_temperature,
    fuse,
    leave_classes_out,
    max_softmax,
    route,
    threshold_at_tpr,
    threshold_from_seen_share,
)
from hybridcls.gate.calibration import bounded_neighbour_k
from hybridcls.gate.cascade import CASCADE_KNN_K, DEFAULT_DISTANCE_TPR, MIN_SEEN_SHARE
from hybridcls.gate.scores import DEFAULT_KNN_K
from hybridcls.index import RUN_INDEX_DIR, EmbeddingIndex, index_meta, load_run_index
from hybridcls.outputs import PredictionRow, topk_pairs
from hybridcls.supervised import build_eval_transform, load_checkpoint
from hybridcls.zeroshot import ZeroShotClassifier
from hybridcls.zeroshot.loading import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from hybridcls.zeroshot.prompts import PromptSet, as_prompt_set

__all__ = [
    "GATE_FILE",
    "HYBRID_FILE",
    "INDEX_DIR",
    "HybridClassifier",
    "HybridFeatures",
    "align_classes",
]

GATE_FILE = GATE_FILENAME
#: The run's embedding indexes (``index/clip.faiss`` + ``index/clip.json``, see
#: :mod:`hybridcls.index`). Runs calibrated before it kept an unlabelled ``clip_knn.faiss``,
#: which is ignored: they have no kNN index until ``calibrate`` runs again.
INDEX_DIR = RUN_INDEX_DIR
HYBRID_FILE = "hybrid.json"
_PROMPTS_FILE = "prompts.txt"
_TEMPLATES_FILE = "templates.txt"
_TEXT_FILE = "text_classifier.safetensors"


def align_classes(seen: Sequence[str], prompts: PromptSet) -> PromptSet:
    """Reorder a prompt set: the seen classes first (in ``seen`` order), then the rest.

    A training folder name matches its prompts line after normalisation
    (case, ``_``, ``+``, ``-``, repeated spaces) or through a synonym.

    Raises:
        PromptFileError: A seen class matches no line, or two seen classes
            match the same line (names both sides).

    Example:
        >>> from hybridcls.zeroshot.prompts import parse_prompts
        >>> ps = parse_prompts("fox\\ngrizzly bear\\nmoose | elk", source="p.txt")
        >>> align_classes(["Grizzly+Bear", "elk"], ps).names
        ['grizzly bear', 'moose', 'fox']
    """
    taken: dict[int, str] = {}
    order: list[int] = []
    missing: list[str] = []
    for name in seen:
        i = prompts.match(name)
        if i is None:
            missing.append(name)
            continue
        if i in taken:
            raise PromptFileError(
                prompts.source, prompts[i].line,
                f"training classes {taken[i]!r} and {name!r} both match the line {prompts[i].name!r}",
            )
        taken[i] = name
        order.append(i)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise PromptFileError(
            prompts.source, None,
            f"{len(missing)} training class(es) match no line of the prompts file: {shown}; add "
            "them (or a synonym after '|') to the prompts file",
        )
    rest = [i for i in range(len(prompts)) if i not in taken]
    return PromptSet(tuple(prompts[i] for i in order + rest), prompts.source)


@dataclass
class HybridFeatures:
    """Both branches' outputs for a set of images; the input of :meth:`HybridClassifier.predict_features`.

    Rows of ``clip_logits`` / ``clip_embeddings`` are NaN where the CLIP tower did not run.
    """

    sup_logits: np.ndarray
    sup_features: np.ndarray
    clip_logits: np.ndarray
    clip_embeddings: np.ndarray

    @classmethod
    def concat(cls, batches: Sequence[EngineBatch]) -> HybridFeatures:
        """Stack the decoded images' rows of several engine batches (both towers must have run)."""
        full = [b for b in batches if b.ok]

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(b, name) for b in full]).astype(np.float32)

        if not full:
            raise InputError("no image could be decoded")
        return cls(cat("sup_logits"), cat("sup_features"), cat("clip_logits"), cat("clip_embeddings"))

    def save(self, path: str | os.PathLike) -> None:
        save_numpy({k: np.ascontiguousarray(v) for k, v in vars(self).items()}, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> HybridFeatures:
        return cls(**load_numpy(str(path)))


class HybridClassifier(ClassifierMixin, BaseEstimator):
    """Open-set classifier: supervised for the seen classes, CLIP for the rest, a gate between.

    Args:
        model: timm architecture of the supervised branch (used by :meth:`fit`).
        clip_model: open_clip model id (built-in name, ``hf-hub:``, ``local-dir:``).
        clip_pretrained: Pretrained tag or weights file for a built-in name.
        prompts: Prompts file (or lines) naming every class, seen and unseen.
        templates: Templates file or list; None = the bundled default.
        mode: ``"hard"``, ``"soft"``, ``"stacking"`` or None to use the calibrated mode.
        unseen_only: Hard routing: zero-shot over the unseen classes only (None = calibrated).
        unknown_threshold: Answer ``unknown`` when neither branch's top
            probability reaches it (None = calibrated, off by default).
        cascade: For gates that read CLIP's outputs: run CLIP only on images whose
            supervised confidence is at or below the calibrated ``cascade_msp``,
            or whose backbone features lie farther than ``cascade_distance`` from
            the training images' (the run's ``index/backbone.*``); the others are
            decided by the supervised branch alone.
        cache_branch: The nearest-neighbour cache branch (Tip-Adapter style, see
            :mod:`hybridcls.gate.cache_branch`) added to the supervised logits, decided
            at :meth:`calibrate`: ``"auto"`` fits it and enables it only when it raises
            held-out seen-class accuracy, ``"on"`` fits and enables it, ``"off"`` does
            not fit it. The decision is stored in ``gate.json`` and predictions follow
            it (the gate's threshold was set on those logits), whatever this parameter
            says later. An enabled cache needs every image's CLIP embedding, so it
            turns lazy zero-shot off (the cascade still skips CLIP, and the cache, on
            the images it keeps).
        truncate_prompts: Accept class texts longer than the CLIP's context, cut by
            its tokenizer with one warning, instead of refusing them (see
            :class:`~hybridcls.zeroshot.ZeroShotClassifier`).
        compile: ``torch.compile`` both towers (fixed batch shapes).
        decode: ``"cpu"`` or ``"device"`` (JPEG decoded on the GPU, CPU fallback).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        batch_size: Images per batch.
        workers: Decoding processes.
        cache_dir: Weights and text-classifier cache.
        train_options: Options for :func:`hybridcls.train.train` (``epochs``...).
        progress: Show progress bars.

    Attributes:
        classes_: Seen classes (training order), then unseen ones (prompts order).
        n_seen_: Number of seen classes.
        run_dir_: The supervised run directory.
        gate_: The :class:`~hybridcls.gate.GateCalibration` (after :meth:`calibrate`).

    Example:
        >>> from hybridcls import HybridClassifier
        >>> clf = HybridClassifier(prompts="prompts/animals.txt")  # doctest: +SKIP
        >>> clf.fit("data/train", output="runs/seen40").calibrate()  # doctest: +SKIP
        >>> clf.predict(["data/test/"])  # doctest: +SKIP
        array(['zebra', 'moose', ...], dtype=object)
    """

    def __init__(
        self,
        model: str = "convnext_tiny",
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        prompts: Any = None,
        templates: Any = None,
        *,
        mode: str | None = None,
        unseen_only: bool | None = None,
        unknown_threshold: float | None = None,
        cascade: bool = False,
        cache_branch: str = "auto",
        truncate_prompts: bool = False,
        compile: bool = False,
        decode: str = "cpu",
        device: str = "auto",
        batch_size: int = 64,
        workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        train_options: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained
        self.prompts = prompts
        self.templates = templates
        self.mode = mode
        self.unseen_only = unseen_only
        self.unknown_threshold = unknown_threshold
        self.cascade = cascade
        self.cache_branch = cache_branch
        self.truncate_prompts = truncate_prompts
        self.compile = compile
        self.decode = decode
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.cache_dir = cache_dir
        self.train_options = train_options
        self.progress = progress

    # ------------------------------------------------------------------ building

    def fit(self, train_dir: str | os.PathLike, prompts: Any = None, *, output: str | os.PathLike,
            **train_overrides: Any) -> HybridClassifier:
        """Train the supervised branch on ``train_dir`` and load both branches.

        Args:
            train_dir: ImageFolder-style folder of the seen classes.
            prompts: Overrides the ``prompts`` given at construction.
            output: The run directory to create.
            **train_overrides: Options for :func:`hybridcls.train.train` (``epochs=3``...).

        Returns:
            ``self`` (uncalibrated: call :meth:`calibrate` next).
        """
        from hybridcls.train import train

        options = {"model": self.model, "device": self.device, "workers": self.workers,
                   "progress": self.progress, **(self.train_options or {}), **train_overrides}
        result = train(train_dir, output, **options)
        return self.load_run(result.run_dir, prompts)

    def load_run(self, run_dir: str | os.PathLike, prompts: Any = None) -> HybridClassifier:
        """Load a trained run directory (and its gate, when calibrated) as the supervised branch."""
        run_dir = Path(run_dir)
        source = prompts if prompts is not None else self.prompts
        if source is None:
            raise InputError("no prompts: pass prompts=FILE naming every class, seen and unseen")
        device = resolve_device(self.device)
        model, config = load_checkpoint(run_dir, device)
        seen = list(config["classes"])
        prompt_set = align_classes(seen, as_prompt_set(source))
        zs = ZeroShotClassifier(
            clip_model=self.clip_model, clip_pretrained=self.clip_pretrained, prompts=prompt_set,
            templates=self.templates, device=str(device), batch_size=self.batch_size,
            workers=self.workers, cache_dir=self.cache_dir, truncate_prompts=self.truncate_prompts,
        ).fit()
        self._set_branches(run_dir, model, config, zs, device)
        return self

    def _set_branches(self, run_dir: Path, model, config, zs: ZeroShotClassifier, device) -> None:
        self.run_dir_ = run_dir
        self.supervised_ = model
        self.checkpoint_config_ = config
        self.zeroshot_ = zs
        self.device_ = device
        self.n_seen_ = len(config["classes"])
        self.seen_folders_ = list(config["classes"])
        self.classes_ = np.array(zs.classes_, dtype=object)
        self.engine_ = InferenceEngine(
            supervised=model, sup_transform=build_eval_transform(config), clip=zs, device=device,
            batch_size=self.batch_size, workers=self.workers, compile=self.compile, decode=self.decode,
        )
        gate_path = run_dir / GATE_FILE
        self.gate_ = GateCalibration.from_json(gate_path) if gate_path.is_file() else None
        # A stale index (another CLIP model or class list) must not stop `calibrate` from
        # loading the run to rebuild it: the refusal is raised where the index is used.
        self.index_error_: CheckpointError | None = None
        # loaded on the cascade's first use: hashing the weights costs time a plain predict need not spend
        self.backbone_index_: EmbeddingIndex | None = None
        try:
            expect = self._index_meta("clip")
            if expect.get("fingerprint"):
                # the weights' hash identifies the model; its id may spell a moved local-dir: path
                expect.pop("model_id")
            self.knn_ = load_run_index(run_dir, "clip", expect=expect)
        except CheckpointError as e:
            self.knn_, self.index_error_ = None, e

    def _index_meta(self, embedding: str) -> dict[str, Any]:
        """The provenance this run's ``embedding`` index must carry (see :func:`hybridcls.index.index_meta`)."""
        if embedding == "clip":
            bundle = self.zeroshot_.bundle_
            return index_meta("clip", bundle.model_id, bundle.fingerprint, self.seen_folders_)
        from hybridcls.cache import file_fingerprint

        return index_meta("backbone", self.checkpoint_config_["model"]["name"],
                          file_fingerprint(self.run_dir_ / "model.safetensors"), self.seen_folders_)

    # ------------------------------------------------------------------ calibration

    def _features(self, sources: Sequence[Source], desc: str, clip: Any = "all") -> tuple[HybridFeatures, dict[int, str]]:
        batches = list(self.engine_.iter_batches(sources, clip=clip, progress=self.progress, desc=desc))
        errors = {i: r for b in batches for i, r in b.errors.items()}
        return HybridFeatures.concat(batches), errors

    def calibrate(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        method: str = "leave-classes-out",
        tpr: float = 0.95,
        score: str = "clip_margin",
        rounds: int = 5,
        test_inputs: Any = None,
        seed: int = 0,
        save: bool = True,
    ) -> HybridClassifier:
        """Fit the gate with no unseen images, and save it in the run directory.

        Args:
            data_dir: The training folder (default: the one the run was trained on).
            method: ``"leave-classes-out"`` (search scores, modes and
                parameters on stand-in unseen classes) or ``"tpr"`` (``score``
                in hard mode, threshold at ``tpr`` on held-out seen images).
            tpr: Target true-positive rate for ``method="tpr"``.
            score: The gate score for ``method="tpr"``.
            rounds: Leave-classes-out repetitions.
            test_inputs: Unlabelled test images: refit the threshold on their
                own score distribution (transductive, a two-component mixture;
                at least 4 images).
            seed: Seeds the hidden-class draws.
            save: Write ``gate.json``, ``index/clip.*`` (the training images' CLIP
                embeddings, labels and paths) and ``index/backbone.*`` (their
                supervised backbone features, which the cascade searches) into the run directory.

        Returns:
            ``self`` with ``gate_`` set. Settings that depend on the data's size adapt
            to it and say so in ``gate_.adapted`` (docs/gate.md, "Small data").

        Raises:
            DataTooSmallError: The data cannot support the method (e.g. fewer than 4
                ``test_inputs``, held-out images of fewer than 2 seen classes for
                leave-classes-out); the message says what to do.
        """
        check_is_fitted(self, "engine_")
        from hybridcls.train import TrainConfig
        from hybridcls.train.data import resolve_training_data

        train_cfg = TrainConfig.from_dict(self.checkpoint_config_.get("train", {}))
        data_dir = data_dir or self.checkpoint_config_.get("data_dir")
        if data_dir is None:
            raise CheckpointError(f"{self.run_dir_}: the run does not record its training folder; pass data_dir")
        data = resolve_training_data(data_dir, train_cfg)
        if [str(c) for c in data.classes] != self.seen_folders_:
            raise CheckpointError(
                f"{data_dir}: its classes differ from the run's ({self.run_dir_}); calibrate on the "
                "folder the run was trained on")
        S = self.n_seen_
        tr_src = [Source(p) for p, _ in data.train]
        va_src = [Source(p) for p, _ in data.val]
        f_tr, e_tr = self._features(tr_src, "calibrate: train")
        f_va, e_va = self._features(va_src, "calibrate: held-out")
        y_tr = np.array([y for i, (_, y) in enumerate(data.train) if i not in e_tr])
        y_va = np.array([y for i, (_, y) in enumerate(data.val) if i not in e_va])
        tr_paths = [str(p) for i, (p, _) in enumerate(data.train) if i not in e_tr]
        knn = EmbeddingIndex(meta=self._index_meta("clip"))
        knn.add(f_tr.clip_embeddings, labels=y_tr, paths=tr_paths)
        # The cache holds the training split only: the held-out images it is fitted on
        # would otherwise find themselves at affinity 1.
        branch = self._fit_cache(f_va, y_va, knn)
        # neighbour counts bounded by the smallest class (hybridcls.index.class_bounded_k)
        knn_k, knn_note = bounded_neighbour_k("knn_k", DEFAULT_KNN_K, y_tr, self.seen_folders_)
        cascade_k, cascade_note = bounded_neighbour_k(
            "cascade_k", CASCADE_KNN_K, y_tr, self.seen_folders_)
        if method == "leave-classes-out":
            cal = leave_classes_out(
                sup_feat_train=f_tr.sup_features, y_train=y_tr, sup_feat_val=f_va.sup_features,
                y_val=y_va, clip_logits_val_seen=f_va.clip_logits[:, :S],
                clip_emb_train=f_tr.clip_embeddings, clip_emb_val=f_va.clip_embeddings,
                rounds=rounds, seed=seed, knn_k=knn_k, class_names=self.seen_folders_,
            )
        elif method == "tpr":
            cal = GateCalibration(score=score, mode="hard", tpr=tpr, method="tpr", knn_k=knn_k)
        else:
            raise InputError(f"method={method!r}: expected 'leave-classes-out' or 'tpr'")
        notes = (knn_note if "knn" in cal.base_scores or method == "leave-classes-out" else [])
        cal = cal.replace(cache_branch=None if branch is None else branch.to_dict(),
                          cascade_k=cascade_k, adapted=[*notes, *cal.adapted, *cascade_note])
        # The gate is thresholded on the seen-class logits predictions will read: with the cache.
        in_use = _cache_in_use(cal)
        seen_va = _with_cache(in_use, f_va, knn)
        # temperature scaling of the logits fusion will read (with the cache when it is on)
        cal = cal.replace(sup_temperature=round(fit_temperature(seen_va, y_va), 4))
        inputs = {"sup_logits": seen_va, "clip_logits": f_va.clip_logits, "n_seen": S,
                  "clip_emb": f_va.clip_embeddings, "knn_index": knn}
        base_va = cal.compute_base_scores(**inputs)
        cal = finalize(cal, base_va)
        if test_inputs is not None:
            f_te, _ = self._features(as_sources(test_inputs), "calibrate: test")
            test_scores = cal.compute_score(sup_logits=_with_cache(in_use, f_te, knn),
                                            clip_logits=f_te.clip_logits,
                                            n_seen=S, clip_emb=f_te.clip_embeddings, knn_index=knn)
            cal = apply_transductive(cal, test_scores, seed=seed)
        full = fuse(None, sup_logits=seen_va, clip_logits=f_va.clip_logits,
                    gate_score=cal.score_from(base_va), calibration=cal, n_seen=S)
        # The cascade threshold must keep the full hybrid's decisions on seen images
        # and, through the stand-ins' share, let unseen images reach CLIP.
        cascade_msp = max(fit_cascade(f_va.sup_logits, full.pred), threshold_from_seen_share(
            max_softmax(f_va.sup_logits), max(cal.cascade_seen_share or 0.0, MIN_SEEN_SHARE)))
        # ... and send to CLIP what lies away from every training image in feature space,
        # however confident the head: the held-out seen images are not in the index.
        backbone = EmbeddingIndex(meta=self._index_meta("backbone")).add(
            f_tr.sup_features, labels=y_tr, paths=tr_paths)
        cascade_distance = threshold_at_tpr(
            backbone.kth_distance(f_va.sup_features, cal.cascade_k), DEFAULT_DISTANCE_TPR)
        cal = cal.replace(cascade_msp=cascade_msp, cascade_distance=cascade_distance)
        self.gate_ = cal
        self.knn_ = knn
        self.backbone_index_ = backbone
        # Kept so that benchmarks can refit other gates on the same held-out outputs.
        self.calibration_data_ = {"train": f_tr, "y_train": y_tr, "val": f_va, "y_val": y_va}
        if save:
            cal.to_json(self.run_dir_ / GATE_FILE)
            knn.save(self.run_dir_ / INDEX_DIR)
            backbone.save(self.run_dir_ / INDEX_DIR)
        self.index_error_ = None
        return self

    # ------------------------------------------------------------------ inference

    def _gate(self) -> GateCalibration:
        check_is_fitted(self, "engine_")
        if self.gate_ is None:
            raise CheckpointError(
                f"{self.run_dir_}: the run has no {GATE_FILE}; run `hybridcls calibrate "
                f"{self.run_dir_} --prompts FILE` (or HybridClassifier.calibrate()) first")
        overrides = {k: v for k, v in (("mode", self.mode), ("unseen_only", self.unseen_only),
                                        ("unknown_threshold", self.unknown_threshold)) if v is not None}
        gate = self.gate_.replace(**overrides) if overrides else self.gate_
        if self.knn_ is None and ("knn" in gate.base_scores or _cache_in_use(gate)):
            raise self.index_error_ or CheckpointError(
                f"{self.run_dir_}: its gate reads the kNN score or the cache branch but the run has "
                f"no {INDEX_DIR}/clip.faiss; run `hybridcls calibrate {self.run_dir_}` again")
        return gate

    def _fit_cache(self, f_va: HybridFeatures, y_va: np.ndarray, knn: EmbeddingIndex) -> CacheBranch | None:
        if self.cache_branch not in CACHE_MODES:
            raise InputError(f"cache_branch={self.cache_branch!r}: choose from {', '.join(CACHE_MODES)}")
        if self.cache_branch == "off":
            return None
        return fit_cache_branch(f_va.sup_logits, y_va, f_va.clip_embeddings, knn, mode=self.cache_branch)

    def seen_logits(self, features: HybridFeatures) -> np.ndarray:
        """The seen-class logits the gate and the fusion read: supervised, plus the cache branch when on.

        Example:
            >>> feats = clf.extract_features(["val/"])  # doctest: +SKIP
            >>> clf.seen_logits(feats).argmax(axis=1)  # doctest: +SKIP
        """
        return _with_cache(_cache_in_use(self._gate()), features, self.knn_)

    def _cascade_rule(self, gate: GateCalibration) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """``(sup_logits, sup_features) -> [N] bool``: where the cascade skips CLIP (see :mod:`hybridcls.gate.cascade`).

        Checks the run's files now, so that a missing threshold or index fails
        before the first batch rather than in the middle of the output.
        """
        if gate.cascade_msp is None:
            raise CheckpointError(
                f"{self.run_dir_}: its {GATE_FILE} has no cascade threshold; run `hybridcls "
                "calibrate` again to use --cascade")
        if gate.cascade_distance is None:  # calibrated before the distance condition
            return lambda sup_logits, _features: cascade_keep(sup_logits, gate.cascade_msp)
        if self.backbone_index_ is None:
            index = load_run_index(self.run_dir_, "backbone", expect=self._index_meta("backbone"))
            if index is None:
                raise CheckpointError(
                    f"{self.run_dir_}: its {GATE_FILE} has a cascade distance but the run has no "
                    f"{INDEX_DIR}/backbone.faiss; run `hybridcls calibrate` again to use --cascade")
            self.backbone_index_ = index
        index = self.backbone_index_

        def keep(sup_logits: np.ndarray, sup_features: np.ndarray) -> np.ndarray:
            return cascade_keep(
                sup_logits, gate.cascade_msp, distance_threshold=gate.cascade_distance,
                distance=lambda rows: index.kth_distance(sup_features[rows], gate.cascade_k))
        return keep

    def cascade_skips_clip(self, features: HybridFeatures) -> np.ndarray:
        """``[N]`` True where the cascade (``cascade=True``) decides without running CLIP.

        Example:
            >>> feats = clf.extract_features(["test/"])  # doctest: +SKIP
            >>> f"CLIP on {100 * (1 - clf.cascade_skips_clip(feats).mean()):.0f}% of images"  # doctest: +SKIP
        """
        return self._cascade_rule(self._gate())(features.sup_logits, features.sup_features)

    def _clip_policy(self, gate: GateCalibration):
        """Which images CLIP encodes: lazy zero-shot, the cascade, or all.

        Lazy: a hard gate on supervised scores runs CLIP only on routed images.
        Cascade (``cascade=True``, a gate that reads CLIP): CLIP runs only where
        the supervised confidence is at or below ``gate.cascade_msp`` or the
        backbone features lie beyond ``gate.cascade_distance`` of the training images'.
        """
        if (gate.mode == "hard" and not any(n.startswith("clip") for n in gate.needs)
                and _cache_in_use(gate) is None):
            def policy(sup_logits: np.ndarray, _features: np.ndarray) -> np.ndarray:
                return route(gate.compute_score(sup_logits=sup_logits, n_seen=self.n_seen_), gate)
            return policy
        if self.cascade:
            keep = self._cascade_rule(gate)

            def cascade(sup_logits: np.ndarray, sup_features: np.ndarray) -> np.ndarray:
                return ~keep(sup_logits, sup_features)
            return cascade
        return "all"

    def predict_features(self, features: HybridFeatures) -> FusionResult:
        """Gate and fuse cached branch outputs, without running either model.

        Example:
            >>> feats = clf.extract_features(["test/"])  # doctest: +SKIP
            >>> clf.set_params(mode="soft").predict_features(feats).probs.shape  # doctest: +SKIP
        """
        return self._fuse_features(features, self._gate())

    def _fuse_features(self, features: HybridFeatures, gate: GateCalibration) -> FusionResult:
        sup = _with_cache(_cache_in_use(gate), features, self.knn_)
        score = gate.compute_score(
            sup_logits=sup, clip_logits=features.clip_logits, n_seen=self.n_seen_,
            clip_emb=features.clip_embeddings, knn_index=self.knn_,
        )
        skipped = np.isnan(features.clip_logits).all(axis=1)
        if not skipped.any():
            return fuse(None, sup_logits=sup, clip_logits=features.clip_logits,
                        gate_score=score, calibration=gate, n_seen=self.n_seen_)
        # Rows CLIP did not run on (lazy zero-shot, the cascade) are decided by the
        # supervised branch: a NaN routing score keeps them there in a hard fusion,
        # whatever a supervised-only score says; soft and stacking take them from it.
        routing = np.where(skipped, np.nan, score)
        kept = fuse("hard", sup_logits=sup, clip_logits=features.clip_logits,
                    gate_score=routing, calibration=gate, n_seen=self.n_seen_)
        res = kept if gate.mode == "hard" else fuse(
            None, sup_logits=sup, clip_logits=features.clip_logits,
            gate_score=routing, calibration=gate, n_seen=self.n_seen_)
        for name in ("probs", "branch", "gate_weight"):
            getattr(res, name)[skipped] = getattr(kept, name)[skipped]
        res.gate_score[:] = score  # the rows report the score itself
        return res

    def extract_features(self, inputs: Any, *, clip: Any = "all") -> HybridFeatures:
        """Run both towers over path inputs and keep their raw outputs (see :meth:`predict_features`)."""
        sources = self._sources(inputs)
        feats, errors = self._features(sources, "features", clip=clip)
        _raise_failures(sources, errors)
        return feats

    def iter_predictions(self, sources: Sequence[Source], *, progress: bool | None = None,
                         clip: Any = None) -> Iterator[tuple[EngineBatch, FusionResult | None]]:
        """Stream ``(engine batch, fusion result)`` per batch, in input order; bad images are errors.

        Args:
            sources: The inputs, expanded.
            progress: Show a progress bar (default: the ``progress`` parameter).
            clip: Which images the CLIP tower encodes: None = the gate's own
                policy (lazy zero-shot, the cascade), ``"all"`` = every image,
                so that both branches' outputs exist for every row. Lazy
                zero-shot decisions do not change (its gate reads no CLIP
                output); with ``cascade=True`` every row is fused as without it.
        """
        gate = self._gate()
        show = self.progress if progress is None else progress
        policy = self._clip_policy(gate) if clip is None else clip
        for batch in self.engine_.iter_batches(sources, clip=policy, progress=show):
            if not batch.ok:
                yield batch, None
                continue
            feats = HybridFeatures(batch.sup_logits, batch.sup_features, batch.clip_logits,
                                   batch.clip_embeddings)
            yield batch, self._fuse_features(feats, gate)

    def rows(self, sources: Sequence[Source], *, topk: int = 5, progress: bool | None = None
             ) -> Iterator[list[PredictionRow]]:
        """Output rows per batch: label, branch, gate score and both branches' top-k."""
        for batch, res in self.iter_predictions(sources, progress=progress):
            yield self.batch_rows(sources, batch, res, topk=topk)

    def batch_rows(self, sources: Sequence[Source], batch: EngineBatch, res: FusionResult | None,
                   *, topk: int = 5) -> list[PredictionRow]:
        """One engine batch and its fusion result as output rows, one per index, in order."""
        classes = self.classes_
        pos = {idx: j for j, idx in enumerate(batch.ok)}
        out = []
        for idx in batch.indices:
            path = sources[idx].path
            if idx not in pos or res is None:
                out.append(PredictionRow.failed(path, batch.errors.get(idx, "not predicted")))
                continue
            j = pos[idx]
            p = res.probs[j]
            order = np.argsort(-p, kind="stable")[:topk]
            label = "unknown" if res.branch[j] == "unknown" else str(classes[order[0]])
            out.append(PredictionRow(
                path=path, label=label, score=float(p[order[0]]), branch=str(res.branch[j]),
                topk=[(str(classes[k]), float(p[k])) for k in order],
                extra={
                    "gate_score": float(res.gate_score[j]),
                    "gate_weight": float(res.gate_weight[j]),
                    "supervised_topk": topk_pairs(res.sup_probs[j], classes[: self.n_seen_], topk),
                    "zeroshot_topk": topk_pairs(res.clip_probs[j], classes, topk),
                },
            ))
        return out

    EXTRA_COLUMNS = ("gate_score", "gate_weight", "supervised_topk", "zeroshot_topk")

    def _sources(self, inputs: Any) -> list[Source]:
        check_is_fitted(self, "engine_")
        return as_sources(inputs)

    def predict_proba(self, inputs: Any) -> np.ndarray:
        """Probabilities over ``classes_`` (seen first, then unseen), one row per expanded input.

        Raises:
            ImageDecodeError: An input that cannot be decoded (names it).
        """
        return self._fused(inputs).probs

    def decision_function(self, inputs: Any) -> np.ndarray:
        """The gate score of each input: higher = less like the seen classes."""
        return self._fused(inputs).gate_score

    def predict(self, inputs: Any) -> np.ndarray:
        """Class names (``"unknown"`` where the unknown option answers), one per expanded input."""
        res = self._fused(inputs)
        labels = self.classes_[res.probs.argmax(axis=1)].astype(object)
        labels[res.branch == "unknown"] = "unknown"
        return labels

    def _fused(self, inputs: Any) -> FusionResult:
        sources = self._sources(inputs)
        gate = self._gate()
        feats, errors = self._features(sources, "predict", clip=self._clip_policy(gate))
        _raise_failures(sources, errors)
        return self._fuse_features(feats, gate)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write a self-contained folder: checkpoint, gate, embedding indexes, prompts, templates, text classifier.

        ``from_pretrained`` on it needs no prompts file; the saved text classifier replaces
        the one built at load (a warm text cache makes that build free).
        """
        check_is_fitted(self, "engine_")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", GATE_FILE):
            src = self.run_dir_ / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copy2(src, out / name)
        src = self.run_dir_ / INDEX_DIR
        if src.is_dir() and src.resolve() != (out / INDEX_DIR).resolve():
            shutil.copytree(src, out / INDEX_DIR, dirs_exist_ok=True)
        prompts = self.zeroshot_.prompts_
        atomic_write_text(out / _PROMPTS_FILE, "\n".join(_prompt_line(c) for c in prompts) + "\n")
        atomic_write_text(out / _TEMPLATES_FILE, "\n".join(self.zeroshot_.templates_) + "\n")
        save_numpy({"text_features": self.zeroshot_.text_features_.cpu().numpy()}, str(out / _TEXT_FILE))
        meta = {"format": "hybridcls-hybrid", "format_version": 1, "clip_model": self.clip_model,
                "clip_pretrained": self.clip_pretrained,
                "clip_fingerprint": self.zeroshot_.bundle_.fingerprint,
                "classes": [str(c) for c in self.classes_], "n_seen": self.n_seen_}
        atomic_write_json(out / HYBRID_FILE, meta)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **params: Any) -> HybridClassifier:
        """Load a folder written by :meth:`save_pretrained` (``params`` override, e.g. ``device``)."""
        directory = Path(directory)
        meta_path = directory / HYBRID_FILE
        if not meta_path.is_file():
            raise CheckpointError(f"{directory}: not a saved HybridClassifier (no {HYBRID_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        clf = cls(clip_model=meta["clip_model"], clip_pretrained=meta["clip_pretrained"],
                  prompts=str(directory / _PROMPTS_FILE), templates=str(directory / _TEMPLATES_FILE),
                  **params)
        clf.load_run(directory)
        stored = load_numpy(str(directory / _TEXT_FILE))["text_features"]
        if list(clf.classes_) != meta["classes"]:
            raise CheckpointError(f"{directory}: classes in {HYBRID_FILE} differ from its prompts")
        clf.zeroshot_.text_features_ = torch.from_numpy(stored).to(clf.device_)
        return clf


def _cache_in_use(gate: GateCalibration) -> CacheBranch | None:
    """The gate's cache branch when it is enabled: the gate's threshold was set on its logits."""
    if gate.cache_branch is None:
        return None
    branch = CacheBranch.from_dict(gate.cache_branch)
    return branch if branch.enabled else None


def _with_cache(branch: CacheBranch | None, features: HybridFeatures,
                index: EmbeddingIndex | None) -> np.ndarray:
    if branch is None:
        return features.sup_logits
    assert index is not None  # HybridClassifier._gate refuses a cache without its index
    return branch.apply(features.sup_logits, features.clip_embeddings, index)


def _raise_failures(sources: Sequence[Source], errors: dict[int, str]) -> None:
    if errors:
        i = min(errors)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ImageDecodeError(sources[i].path, errors[i] + more)


def _prompt_line(c) -> str:
    line = c.name
    if c.description:
        line += f": {c.description}"
    if c.synonyms:
        line += " | " + " | ".join(c.synonyms)
    return line

