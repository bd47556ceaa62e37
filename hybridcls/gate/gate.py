"""The gate as one object: fitted on held-out seen images, predicting from branch outputs.

In the manner of pytorch-ood's detectors, :class:`Gate` is built with its
hyperparameters, :meth:`Gate.fit` on the two towers' outputs for the run's
training and held-out seen images (never an unseen one), and
:meth:`Gate.predict` / :meth:`Gate.predict_proba` /
:meth:`Gate.decision_function` on the outputs of new images. It owns every
fitted part of the gate:

* the calibration (:class:`~hybridcls.gate.config.GateCalibration`: score,
  mode, threshold and their parameters, chosen by leave-classes-out or set
  at a TPR; :mod:`hybridcls.gate.calibration`);
* the training images' CLIP embedding index (the ``knn`` score, the cache
  branch, ``hybridcls explain``'s neighbours) and their backbone feature index
  (the cascade's distance; :mod:`hybridcls.index`);
* the nearest-neighbour cache branch (:mod:`hybridcls.gate.cache_branch`);
* the cascade's thresholds (:mod:`hybridcls.gate.cascade`);
* few-shot support images, a cache on the zero-shot logits
  (:mod:`hybridcls.gate.support`, :meth:`Gate.with_support`).

It is saved and loaded as one thing: ``gate.json`` and ``index/`` in a
folder. A gate with no seen classes (:meth:`Gate.zero_shot`) sends every
image to CLIP: zero-shot-only prediction is the same path.

Works on arrays only: it loads no model and no image.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.errors import CheckpointError, HybridclsWarning, InputError, ParameterError
from hybridcls.gate.branches import BranchOutputs
from hybridcls.gate.cache_branch import CACHE_MODES, CacheBranch, fit_cache_branch
from hybridcls.gate.calibration import (
    CASCADE_K_SETTING,
    KNN_K_SETTING,
    MIN_TAIL_IMAGES,
    STANDINS,
    apply_transductive,
    bounded_neighbour_k,
    can_set_threshold,
    finalize,
    fit_temperature,
    from_candidate,
    leave_classes_out,
    threshold_at_tpr,
)
from hybridcls.gate.cascade import (
    CASCADE_KNN_K,
    DEFAULT_DISTANCE_TPR,
    MIN_SEEN_SHARE,
    cascade_keep,
    fit_cascade,
    max_softmax,
    threshold_from_seen_share,
)
from hybridcls.gate.config import FIT_METHODS, GATE_FILENAME, MODES, STACKING_SCORE, GateCalibration
from hybridcls.gate.fusion import FusionResult, fuse, fuse_zeroshot, route
from hybridcls.gate.metrics import seen_unseen_accuracy
from hybridcls.gate.restriction import check_allowed, forced_routing, mask_logits, restrict_outputs
from hybridcls.gate.scores import DEFAULT_KNN_K, INDEX_OF, SCORES, softmax_rows
from hybridcls.gate.support import SUPPORT_FILE, SupportAdapter, fit_support_adapter, unit_rows
from hybridcls.index import RUN_INDEX_DIR, EmbeddingIndex, load_run_index

__all__ = ["INDEX_DIR", "ClipPolicy", "Gate", "n_seen_mismatch"]

#: The folder of a gate's embedding indexes (``clip.*``, ``backbone.*``), beside ``gate.json``.
INDEX_DIR = RUN_INDEX_DIR


def n_seen_mismatch(path: Path, recorded: int | None, n_seen: int | None, *, of: str,
                    advice: str) -> CheckpointError | None:
    """Why a ``gate.json`` calibrated for ``recorded`` seen classes cannot serve a run of
    ``n_seen``: it belongs to another run (its thresholds, index and columns are another
    class list's). None when it can, or when either number is unknown (a file written
    before ``gate.json`` recorded it).

    Args:
        path: The ``gate.json``, as the message names it.
        recorded: The number of seen classes it records.
        n_seen: The run's.
        of: Where ``n_seen`` comes from, as the message names it (a parameter, a run).
        advice: What to do, at the end of the message.
    """
    if recorded is None or n_seen is None or recorded == n_seen:
        return None
    return CheckpointError(f"{path}: calibrated for {recorded} seen classes, not the {n_seen} of "
                           f"{of}: it belongs to another run; {advice}")

#: Which images the CLIP tower must encode, given the supervised outputs of a batch:
#: ``"all"``, ``"none"``, or a function of the batch's :class:`BranchOutputs` (supervised
#: side only) returning a ``[N]`` boolean mask.
ClipPolicy = str | Callable[[BranchOutputs], np.ndarray]

MetaSource = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None

#: The TPR levels :meth:`Gate.with_support` tries when support images of unseen classes
#: let it measure H (the calibrated level is tried too).
SUPPORT_TPR_GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99)
# The calibration fields finalize() sets: what with_support changes and can put back.
_FINALIZED = ("threshold", "tpr", "soft_scale", "stacking_penalty", "combined")


@dataclass(frozen=True)
class _Options:
    """Prediction-time settings that override the calibrated ones (``None`` keeps them)."""

    mode: str | None = None
    unseen_only: bool | None = None
    unknown_threshold: float | None = None


class Gate:
    """Scores, calibration, indexes, cache branch, cascade and fusion between the two branches.

    Args:
        method: ``"leave-classes-out"`` (search every registered score, mode and parameter on
            stand-in open-set problems made of the seen classes) or ``"tpr"`` (``score`` in
            hard mode, thresholded at ``tpr``).
        score: The gate score for ``method="tpr"`` (a key of :data:`~hybridcls.gate.SCORES`).
        tpr: Share of held-out seen images kept in the supervised branch (``method="tpr"``).
        rounds: Leave-classes-out's stand-in problems (at least 2).
        seed: Seeds the hidden-class draws.
        cache_branch: ``"auto"`` (fit the nearest-neighbour cache branch, keep it when it
            raises held-out seen-class accuracy), ``"on"`` or ``"off"``.
        standin: Leave-classes-out's stand-in unseen classes: ``"project"`` (the hidden
            classes' own directions projected out of the backbone features, see
            :func:`~hybridcls.gate.leave_classes_out`) or ``"plain"`` (the features as
            they are: how calibrations before it were made).

    Attributes:
        calibration_: The fitted :class:`~hybridcls.gate.GateCalibration` (``None`` for a
            zero-shot gate).
        n_seen_: Number of seen classes (0 for a zero-shot gate).
        seen_classes_: Their names, in column order.
        clip_index_: The training images' CLIP embeddings (:class:`~hybridcls.index.EmbeddingIndex`),
            or ``None``.
        cache_: The enabled :class:`~hybridcls.gate.CacheBranch`, or ``None``.
        support_: The fitted :class:`~hybridcls.gate.support.SupportAdapter` of few-shot
            support images (:meth:`with_support`), or ``None``.
        index_error_: Why a saved CLIP index was not loaded (another model or class list),
            or ``None``; raised when a prediction needs the index.

    Example:
        >>> import numpy as np
        >>> gate = Gate.zero_shot()
        >>> gate.predict(BranchOutputs(clip_logits=np.array([[0.0, 2.0]]))).pred.tolist()
        [1]
    """

    def __init__(self, *, method: str = "leave-classes-out", score: str = "clip_margin",
                 tpr: float = 0.95, rounds: int = 5, seed: int = 0,
                 cache_branch: str = "auto", standin: str = "project") -> None:
        self.method = method
        self.score = score
        self.tpr = tpr
        self.rounds = rounds
        self.seed = seed
        self.cache_branch = cache_branch
        self.standin = standin
        self.calibration_: GateCalibration | None = None
        self.n_seen_ = 0
        self.seen_classes_: list[str] = []
        self.clip_index_: EmbeddingIndex | None = None
        self.cache_: CacheBranch | None = None
        self.support_: SupportAdapter | None = None
        self._backbone_index: EmbeddingIndex | None = None
        self._backbone_loader: Callable[[], EmbeddingIndex | None] | None = None
        self.index_error_: CheckpointError | None = None
        self._options = _Options()
        self._zero_shot = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def zero_shot(cls, *, unknown_threshold: float | None = None) -> Gate:
        """A gate with no seen classes: every image is decided by the zero-shot branch."""
        gate = cls()
        gate._zero_shot = True
        return gate.with_options(unknown_threshold=unknown_threshold)

    @classmethod
    def from_calibration(cls, calibration: GateCalibration, *, n_seen: int,
                         clip_index: EmbeddingIndex | None = None,
                         backbone_index: EmbeddingIndex | None = None) -> Gate:
        """A gate set by hand (``method="manual"``): a finalised calibration and the indexes it reads.

        Example:
            >>> cal = GateCalibration(score="clip_margin", mode="hard", threshold=0.0, method="manual")
            >>> out = BranchOutputs(np.array([[2.0, 0.0]]), None, np.array([[0.0, 0.0, 3.0]]))
            >>> Gate.from_calibration(cal, n_seen=2).predict(out).branch.tolist()
            ['zeroshot']
        """
        if not calibration.is_final:
            raise InputError("a gate set by hand needs a finalised calibration (its threshold set)")
        gate = cls()
        if calibration.n_seen is not None and calibration.n_seen != n_seen:
            raise ParameterError("n_seen", n_seen, f"the calibration records "
                                                   f"{calibration.n_seen} seen classes")
        # recorded, so that the gate.json it saves says it
        gate.calibration_, gate.n_seen_ = calibration.replace(n_seen=n_seen), n_seen
        gate.clip_index_, gate._backbone_index = clip_index, backbone_index
        gate.cache_ = _enabled(calibration)
        return gate

    def with_options(self, *, mode: str | None = None, unseen_only: bool | None = None,
                     unknown_threshold: float | None = None) -> Gate:
        """A view of this gate with prediction-time settings overriding the calibrated ones.

        Args:
            mode: ``"hard"``, ``"soft"`` or ``"stacking"``; ``None`` keeps the calibrated mode.
            unseen_only: Hard routing over the unseen classes only; ``None`` keeps it.
            unknown_threshold: Answer ``unknown`` when no branch's top probability reaches
                it (a top probability equal to it is not unknown); ``None`` keeps the
                calibrated value (off unless set).

        Raises:
            ParameterError: An unknown mode, a threshold outside ``[0, 1]``, or a mode or
                ``unseen_only`` given to a zero-shot gate (nothing to mix or route).
        """
        if mode is not None and mode not in MODES:
            raise ParameterError("mode", mode, f"expected one of {', '.join(MODES)}")
        if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
            raise ParameterError("unknown_threshold", unknown_threshold,
                                 "expected a probability in [0, 1]")
        if self.calibration_ is None and self.n_seen_ == 0:
            for name, value in (("mode", mode), ("unseen_only", unseen_only)):
                if value is not None:
                    raise ParameterError(name, value, "a zero-shot-only classifier has no "
                                         "supervised branch to route to or mix with")
        cal = self.calibration_
        if mode == "stacking" and cal is not None and cal.score != STACKING_SCORE:
            # GateCalibration refuses it too, in its own terms; this names the option that asked
            raise ParameterError(
                "mode", mode, f"stacking mode works on the {STACKING_SCORE!r} score, and this "
                f"gate was calibrated on {cal.score!r}; leave out mode={mode!r} to use its "
                f"{cal.mode!r} mode, or calibrate(method='tpr', score={STACKING_SCORE!r}) first")
        view = object.__new__(Gate)
        view.__dict__.update(self.__dict__)
        view._options = _Options(mode, unseen_only, unknown_threshold)
        return view

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        train: BranchOutputs,
        y_train: Any,
        val: BranchOutputs,
        y_val: Any,
        *,
        class_names: Sequence[str],
        train_paths: Sequence[str] | None = None,
        index_meta: Mapping[str, Mapping[str, Any]] | None = None,
        test: BranchOutputs | None = None,
        clip_logit_scale: float | None = None,
        clip: Mapping[str, Any] | None = None,
    ) -> Gate:
        """Fit the gate on seen images only: the run's training split and its held-out split.

        Args:
            train: Both towers' outputs for the training images (every image's CLIP
                outputs: they become the kNN index and the cache).
            y_train: ``[Ntr]`` their seen-class indices.
            val: The same for the held-out seen images, on which thresholds are set.
            y_val: ``[Nval]`` their seen-class indices.
            class_names: The seen classes, in column order (messages name classes by these).
            train_paths: The training images' paths, stored in the indexes.
            index_meta: Provenance of the indexes: ``{"clip": ..., "backbone": ...}`` as from
                :func:`hybridcls.index.index_meta`.
            test: Unlabelled test images' outputs: refit the threshold on their own score
                distribution (transductive, a two-component mixture; at least 4 images).
            clip_logit_scale: The CLIP tower's logit scale (``ClipTower.logit_scale``): with
                it the CLIP-side softmax scores are read at their papers' temperatures on
                the cosine similarities; without it, at CLIP's own scale only.
            clip: The CLIP the outputs come from
                (:meth:`hybridcls.zeroshot.loading.ClipBundle.identity`), recorded in
                ``calibration_.clip`` (:mod:`hybridcls.zeroshot.gate_clip` checks it at load).

        Returns:
            ``self``, fitted. Settings that depend on the data's size adapt to it and say
            so in ``calibration_.adapted`` (docs/gate.md, "Small data").

        Raises:
            ParameterError: A hyperparameter out of its range.
            DataTooSmallError: The data cannot support the method; the message says what to do.
        """
        self.check_params()
        S = len(class_names)
        if train.sup_logits is None or val.sup_logits is None:
            raise InputError("Gate.fit needs the supervised branch's outputs (train, val)")
        if train.clip_embeddings is None or val.clip_logits is None:
            raise InputError("Gate.fit needs the CLIP branch's outputs of every image (train, val)")
        y_tr = np.asarray(y_train, dtype=np.int64)
        y_va = np.asarray(y_val, dtype=np.int64)
        meta = dict(index_meta or {})
        # named by role, so that save() writes clip.* and backbone.* whatever the metadata
        knn = EmbeddingIndex(name="clip", meta=meta.get("clip"))
        knn.add(train.clip_embeddings, labels=y_tr, paths=train_paths)
        # The cache holds the training split only: the held-out images it is fitted on
        # would otherwise find themselves at affinity 1.
        branch = None
        if self.cache_branch != "off":
            branch = fit_cache_branch(val.sup_logits, y_va, val.clip_embeddings, knn,
                                      mode=self.cache_branch)
        # neighbour counts bounded by the smallest class (hybridcls.index.class_bounded_k)
        knn_k, knn_note = bounded_neighbour_k(KNN_K_SETTING, DEFAULT_KNN_K, y_tr, class_names)
        cascade_k, cascade_note = bounded_neighbour_k(CASCADE_K_SETTING, CASCADE_KNN_K, y_tr,
                                                      class_names)
        if self.method == "leave-classes-out":
            cal = leave_classes_out(
                sup_feat_train=train.sup_features, y_train=y_tr, sup_feat_val=val.sup_features,
                y_val=y_va, clip_logits_val_seen=val.clip_logits[:, :S],
                clip_emb_train=train.clip_embeddings, clip_emb_val=val.clip_embeddings,
                rounds=self.rounds, seed=self.seed, knn_k=knn_k, class_names=class_names,
                clip_logit_scale=clip_logit_scale, standin=self.standin,
            )
        else:
            cal = GateCalibration(score=self.score, mode="hard", tpr=self.tpr, method="tpr",
                                  knn_k=knn_k, clip_logit_scale=clip_logit_scale,
                                  clip_temperature=None if clip_logit_scale is None else 1.0)
        uses_knn = any(name in INDEX_OF for name in cal.base_scores)
        notes = knn_note if uses_knn or self.method == "leave-classes-out" else []
        cal = cal.replace(cache_branch=None if branch is None else branch.to_dict(),
                          cascade_k=cascade_k, adapted=[*notes, *cal.adapted, *cascade_note],
                          clip=None if clip is None else dict(clip), n_seen=S)
        self.calibration_, self.n_seen_, self.seen_classes_ = cal, S, list(class_names)
        self.clip_index_, self.cache_ = knn, _enabled(cal)
        self.index_error_ = None
        # the backbone_knn score and the cascade's distance read the training features
        backbone = EmbeddingIndex(name="backbone", meta=meta.get("backbone")).add(
            train.sup_features, labels=y_tr, paths=train_paths)
        self._backbone_index, self._backbone_loader = backbone, None
        # The gate is thresholded on the seen-class logits predictions will read: with the cache;
        # fusion mixes temperature-scaled probabilities of those same logits.
        seen_va = self.seen_logits(val)
        cal = cal.replace(sup_temperature=round(fit_temperature(seen_va, y_va), 4))
        base_va = cal.compute_base_scores(**self._score_inputs(val, seen_va, cal))
        cal = finalize(cal, base_va)
        if test is not None:
            cal = apply_transductive(cal, self._gate_score(test, cal), seed=self.seed)
        full = fuse(None, sup_logits=seen_va, clip_logits=val.clip_logits,
                    gate_score=cal.score_from(base_va), calibration=cal, n_seen=S)
        # The cascade threshold must keep the full hybrid's decisions on seen images
        # and, through the stand-ins' share, let unseen images reach CLIP ...
        cascade_msp = max(fit_cascade(val.sup_logits, full.pred), threshold_from_seen_share(
            max_softmax(val.sup_logits), max(cal.cascade_seen_share or 0.0, MIN_SEEN_SHARE)))
        # ... and send to CLIP what lies away from every training image in feature space,
        # however confident the head: the held-out seen images are not in the index.
        cascade_distance = threshold_at_tpr(
            backbone.kth_distance(val.sup_features, cal.cascade_k), DEFAULT_DISTANCE_TPR)
        self.calibration_ = cal.replace(cascade_msp=cascade_msp, cascade_distance=cascade_distance)
        return self

    def check_params(self) -> None:
        """Check the hyperparameters (before the long passes that make ``fit``'s inputs).

        Raises:
            ParameterError: One out of its range, naming it.
        """
        if self.method not in FIT_METHODS:
            raise ParameterError("method", self.method, f"expected one of {', '.join(FIT_METHODS)}")
        if self.method == "tpr" and self.score not in SCORES:
            raise ParameterError("score", self.score, f"expected one of {', '.join(SCORES)}")
        if not isinstance(self.tpr, (int, float)) or not 0.0 < self.tpr <= 1.0:
            raise ParameterError("tpr", self.tpr, "expected a rate in (0, 1]")
        if self.method == "leave-classes-out" and (not isinstance(self.rounds, int) or self.rounds < 2):
            raise ParameterError("rounds", self.rounds, "expected an integer >= 2")
        if self.cache_branch not in CACHE_MODES:
            raise ParameterError("cache_branch", self.cache_branch,
                                 f"expected one of {', '.join(CACHE_MODES)}")
        if self.standin not in STANDINS:
            raise ParameterError("standin", self.standin, f"expected one of {', '.join(STANDINS)}")

    def candidate(self, row: Mapping[str, Any], val: BranchOutputs) -> Gate:
        """The gate one row of ``calibration_.candidates`` would have made, thresholded on ``val``.

        For benchmarks that compare every score and mode leave-classes-out tried, on the
        same held-out seen images (``val``: their outputs, as from the run's held-out split).

        Example:
            >>> row = gate.calibration_.candidates[3]  # doctest: +SKIP
            >>> gate.candidate(row, val_outputs).predict(test_outputs).pred  # doctest: +SKIP
        """
        cal = self._fitted()
        cand = from_candidate(dict(row), combined=cal.combined, knn_k=cal.knn_k).replace(
            sup_temperature=cal.sup_temperature, cache_branch=cal.cache_branch,
            clip_logit_scale=cal.clip_logit_scale, n_seen=cal.n_seen)
        seen_va = self.seen_logits(val)
        cand = finalize(cand, cand.compute_base_scores(**self._score_inputs(val, seen_va, cand)))
        other = object.__new__(Gate)
        other.__dict__.update(self.__dict__)
        other.calibration_ = cand
        return other

    # ------------------------------------------------------------------ few-shot support

    def with_support(self, support: BranchOutputs, y_support: Any, *, class_names: Sequence[str],
                     held_out: BranchOutputs | None = None, y_held_out: Any = None) -> Gate:
        """A copy of this gate with few-shot support images joined to the zero-shot scores.

        The support images' CLIP embeddings become a cache on the zero-shot logits (a
        class-balanced Tip-Adapter: :mod:`hybridcls.gate.support` states the rule), which
        :meth:`predict` applies before the gate scores and the fusion. ``alpha`` and
        ``beta`` are fitted by leave-one-out over the support images and on the held-out
        images of the classes that have support images. A fitted (hybrid) gate also keys a
        second cache on the supervised backbone's features (``support_.backbone``), fitted
        the same way on the logits the first has adapted.

        The threshold is set again on the adapted scores of the seen images (held-out ones
        and support images of seen classes) only when they are enough to set one at the
        calibrated TPR (:func:`~hybridcls.gate.calibration.can_set_threshold`: at least
        :data:`~hybridcls.gate.calibration.MIN_TAIL_IMAGES` above it) and the threshold was
        not set by hand (``method="manual"``); otherwise the calibrated threshold is kept
        and a :class:`~hybridcls.errors.HybridclsWarning` says why. Support images of
        unseen classes are real unseen images: with them the TPR level is chosen again,
        among the levels of :data:`SUPPORT_TPR_GRID` the seen images can set and the
        calibrated one, by H (support images read with their own cache entry left out): of
        the levels within ``1 / n`` of the best H (``n`` unseen support images: one image's
        worth), the one nearest the calibrated level. Without them the calibrated level is
        kept. Without held-out images (``held_out=None``) a threshold set again from the
        seen-class support images alone is said in a warning too. Support given before is
        replaced, not added to.

        Args:
            support: Both towers' outputs of the support images (CLIP on every one; the
                supervised side too for a fitted gate).
            y_support: ``[n]`` their classes over every class (seen first).
            class_names: Every class's name, in column order.
            held_out: The held-out seen images' outputs (:meth:`fit`'s ``val``), or ``None``.
            y_held_out: ``[Nval]`` their seen-class indices.

        Returns:
            The new gate; ``calibration_.support`` records the adapter, the images per class
            and the choice of threshold (a zero-shot gate keeps the record in ``support_``).

        Raises:
            InputError: Support outputs without CLIP embeddings, labels that disagree with
                them, a class index out of range, or a transductive threshold (set on test
                images that support cannot re-read).

        Example:
            >>> gate = Gate.zero_shot()
            >>> sup = BranchOutputs(clip_logits=np.zeros((2, 2)), clip_embeddings=np.eye(2))
            >>> gate.with_support(sup, [0, 1], class_names=["a", "b"]).support_.counts.tolist()
            [1, 1]
        """
        if support.clip_embeddings is None or support.clip_logits is None:
            raise InputError("support images need the CLIP branch's outputs")
        y_s = np.asarray(y_support, dtype=np.int64).reshape(-1)
        n_classes = support.clip_logits.shape[1]
        if len(y_s) != len(support) or not len(y_s):
            raise InputError(f"{len(y_s)} labels for {len(support)} support images (need at least one)")
        if y_s.min() < 0 or y_s.max() >= n_classes or len(class_names) != n_classes:
            raise InputError(f"support labels must be class indices in 0..{n_classes - 1}, one "
                             f"name per class ({len(class_names)} names given)")
        base = self._without_support()
        own = np.arange(len(y_s))
        fit_out, fit_y, fit_own = support, y_s, own
        if held_out is not None:
            fit_out = BranchOutputs.concat([support, held_out])
            fit_y = np.concatenate([y_s, np.asarray(y_held_out, dtype=np.int64)])
            fit_own = np.concatenate([own, np.full(len(held_out), -1)])
        # alpha and beta are fitted where the cache has evidence: the support images and the
        # held-out images of classes with support images. Held-out images of the other seen
        # classes (hundreds, against a few support images) would only measure the harm done to
        # their zero-shot scores, which the gate mostly leaves unread, and keep alpha at 0;
        # the threshold below is set on all of them.
        fitting = np.isin(fit_y, y_s)
        adapter = fit_support_adapter(fit_out.clip_logits[fitting], fit_out.clip_embeddings[fitting],
                                      fit_y[fitting], support.clip_embeddings, y_s,
                                      leave_out=fit_own[fitting], class_names=class_names)
        if base.calibration_ is not None and fit_out.sup_features is not None:
            # the second cache, on the backbone's features, fitted on what the first one left
            adapted_clip = adapter.apply(fit_out.clip_logits[fitting], fit_out.clip_embeddings[fitting],
                                         leave_out=fit_own[fitting])
            adapter = dataclasses.replace(adapter, backbone=fit_support_adapter(
                adapted_clip, unit_rows(fit_out.sup_features[fitting]), fit_y[fitting],
                unit_rows(support.sup_features), y_s, leave_out=fit_own[fitting]))
        other = object.__new__(Gate)
        other.__dict__.update(base.__dict__)
        other.support_ = adapter
        cal = base.calibration_
        if cal is None:
            return other
        if cal.method == "transductive":
            # support sets the threshold again from labelled images; the test set's own
            # score distribution, which set this one, is not at hand here
            raise InputError("support images cannot join a gate whose threshold is transductive "
                             "(set on the test images' scores): calibrate without the test "
                             "images, then add the support images")
        # every labelled image, its zero-shot logits adapted as predictions will read them
        # (leave-one-out for the support images)
        adapted = BranchOutputs(fit_out.sup_logits, fit_out.sup_features,
                                adapter.apply(fit_out.clip_logits, fit_out.clip_embeddings,
                                              features=fit_out.sup_features,
                                              leave_out=fit_own).astype(np.float32),
                                fit_out.clip_embeddings)
        S = self.n_seen_
        seen, unseen = fit_y < S, fit_y >= S
        n_seen = int(seen.sum())
        record = {**adapter.to_dict(), "plain": {k: getattr(cal, k) for k in _FINALIZED},
                  "n_seen_images": n_seen, "n_unseen_images": int(unseen.sum())}
        kept = _kept_threshold(cal, n_seen)
        if kept is not None:
            record["threshold_from"] = f"calibration, kept: {kept}"
            warnings.warn(f"support images: the gate keeps its threshold {cal.threshold:.4g} "
                          f"(score {cal.score}): {kept}", HybridclsWarning, stacklevel=2)
            other.calibration_ = cal.replace(support=record)
            return other
        seen_out = adapted.rows(seen)
        base_seen = cal.compute_base_scores(**base._score_inputs(seen_out, base.seen_logits(seen_out), cal))
        # only levels the seen images can set (the calibrated one can: checked above)
        levels = (sorted({*(t for t in SUPPORT_TPR_GRID if can_set_threshold(t, n_seen)), cal.tpr})
                  if unseen.any() else [cal.tpr])
        tried: list[tuple[float, float, GateCalibration]] = []  # (H, tpr, calibration)
        for tpr in levels:
            cand = finalize(cal.replace(tpr=tpr), base_seen)
            h = float("nan")
            if unseen.any():
                probe = object.__new__(Gate)
                probe.__dict__.update(base.__dict__)
                probe.calibration_ = cand
                _, _, h = seen_unseen_accuracy(fit_y, probe.predict(adapted).pred, S)
            tried.append((-1.0 if np.isnan(h) else h, tpr, cand))
        # A few unseen images measure U coarsely: levels within one unseen image's worth of the
        # best H are as good, and the one nearest the calibrated level is kept (with ten
        # support images, a level that happens to route all ten right is no evidence).
        tolerance = 1.0 / max(int(unseen.sum()), 1)
        top = max(h for h, _, _ in tried)
        best = min((t for t in tried if t[0] >= top - tolerance), key=lambda t: abs(t[1] - cal.tpr))
        record["threshold_from"] = ("H on the seen images and the unseen classes' support images"
                                    if unseen.any() else "the seen images' adapted scores at the "
                                    "calibrated tpr (no support image of an unseen class)")
        if unseen.any():
            record.update(h=best[0], h_tolerance=tolerance)
        if held_out is None:
            # the calibrated TPR level, not a parameter: a command-line user set none here
            warnings.warn(f"support images: the gate's threshold is set again (at TPR {best[1]:g}) "
                          f"on the {n_seen} seen-class support images alone, without held-out seen "
                          "images", HybridclsWarning, stacklevel=2)
        other.calibration_ = best[2].replace(support=record)
        return other

    def _without_support(self) -> Gate:
        """This gate as calibrated, before any support images."""
        if self.support_ is None and (self.calibration_ is None or self.calibration_.support is None):
            return self
        plain = object.__new__(Gate)
        plain.__dict__.update(self.__dict__)
        plain.support_ = None
        cal = self.calibration_
        if cal is not None and cal.support is not None:
            plain.calibration_ = cal.replace(**cal.support["plain"], support=None)
        return plain

    # ------------------------------------------------------------------ prediction

    def _check_zero_shot(self) -> None:
        """An unfitted gate is an error, unless made by :meth:`zero_shot` (nothing to fit)."""
        if not self._zero_shot:
            self._fitted()

    def _fitted(self) -> GateCalibration:
        if self.calibration_ is None:
            raise InputError("the gate is not fitted: call Gate.fit(...) or Gate.load(folder) first")
        return self.calibration_

    @property
    def calibration(self) -> GateCalibration | None:
        """The calibration predictions use: the fitted one with the prediction-time options."""
        if self.calibration_ is None:
            return None
        o = self._options
        changes = {k: v for k, v in (("mode", o.mode), ("unseen_only", o.unseen_only),
                                      ("unknown_threshold", o.unknown_threshold)) if v is not None}
        return self.calibration_.replace(**changes) if changes else self.calibration_

    def summary(self) -> dict[str, Any]:
        """The settings predictions use, in brief, and the held-out figures calibration measured.

        For run records (:mod:`hybridcls.provenance`) and model cards; ``gate.json`` holds
        everything.

        Returns:
            ``zero_shot`` (True: every image goes to CLIP; then only ``unknown_threshold``
            follows), ``method``, ``score``, ``mode``, ``threshold``, ``tpr`` (share of
            held-out seen images the threshold keeps), ``unseen_only``, ``unknown_threshold``,
            ``cache_branch`` (on / off / None: not fitted), ``cascade_msp``,
            ``cascade_distance``, ``support`` (only with support images: images per
            class, ``alpha``, ``beta``, how the threshold was set), and ``held_out``: leave-classes-out's figures of the chosen
            setting on its stand-in problems (``rounds``, ``mean_h``, ``std_h``,
            ``mean_seen``, ``mean_unseen``) and the cache branch's held-out seen-class
            accuracy without and with it (``n_val`` images).

        Example:
            >>> Gate.zero_shot(unknown_threshold=0.2).summary()
            {'zero_shot': True, 'unknown_threshold': 0.2}
        """
        cal = self.calibration
        if cal is None:
            out = {"zero_shot": True, "unknown_threshold": self._options.unknown_threshold}
            if self.support_ is not None:
                out["support"] = _support_summary(self.support_.to_dict())
            return out
        held_out: dict[str, Any] = {}
        if cal.candidates:  # leave-classes-out: the chosen setting comes first
            best = cal.candidates[0]
            figures = ("mean_h", "std_h", "mean_seen", "mean_unseen")
            held_out.update(rounds=cal.rounds, hidden_classes=cal.hidden_classes,
                            standin=cal.standin,
                            **{k: best.get(k) for k in figures})
        cache = cal.cache_branch
        if cache is not None:
            held_out.update(n_val=cache.get("n_val"),
                            accuracy_without_cache=cache.get("val_accuracy_plain"),
                            accuracy_with_cache=cache.get("val_accuracy"))
        return {
            "zero_shot": False, "method": cal.method, "score": cal.score, "mode": cal.mode,
            "threshold": cal.threshold, "tpr": cal.tpr, "unseen_only": cal.unseen_only,
            "unknown_threshold": cal.unknown_threshold,
            "cache_branch": None if cache is None else ("on" if cache.get("enabled") else "off"),
            "cascade_msp": cal.cascade_msp, "cascade_distance": cal.cascade_distance,
            "held_out": held_out,
            **({} if cal.support is None else {"support": _support_summary(cal.support)}),
        }

    def _index(self) -> EmbeddingIndex:
        if self.clip_index_ is None:
            raise self.index_error_ or CheckpointError(
                "the gate reads the kNN score or the cache branch but has no CLIP index "
                f"({INDEX_DIR}/clip.faiss); calibrate again")
        return self.clip_index_

    def seen_logits(self, outputs: BranchOutputs) -> np.ndarray:
        """``[N, S]`` the seen-class logits the gate and the fusion read: supervised, plus the cache.

        Rows whose CLIP embedding is NaN (CLIP skipped) keep the plain supervised logits.
        """
        if outputs.sup_logits is None:
            raise InputError("this gate needs the supervised branch's logits")
        if self.cache_ is None:
            return np.asarray(outputs.sup_logits, dtype=np.float64)
        return self.cache_.apply(outputs.sup_logits, outputs.clip_embeddings, self._index())

    def _score_inputs(self, outputs: BranchOutputs, seen: np.ndarray,
                      cal: GateCalibration) -> dict[str, Any]:
        names = cal.base_scores
        return {"sup_logits": seen, "sup_features": outputs.sup_features,
                "clip_logits": outputs.clip_logits, "n_seen": self.n_seen_,
                "clip_emb": outputs.clip_embeddings,
                "knn_index": self._index() if "knn" in names else self.clip_index_,
                "backbone_index": self._backbone() if "backbone_knn" in names else None}

    def _gate_score(self, outputs: BranchOutputs, cal: GateCalibration) -> np.ndarray:
        seen = self.seen_logits(outputs)
        return cal.compute_score(**self._score_inputs(outputs, seen, cal))

    def decision_function(self, outputs: BranchOutputs) -> np.ndarray:
        """``[N]`` gate scores: higher = less like the seen classes (NaN for a zero-shot gate)."""
        BranchOutputs.check(outputs, "outputs")
        cal = self.calibration
        if cal is None:
            self._check_zero_shot()
            return np.full(len(outputs), np.nan)
        return self._gate_score(self._supported(outputs), cal)

    def base_scores(self, outputs: BranchOutputs) -> dict[str, np.ndarray]:
        """The registered scores the gate score is made of, as it reads them.

        One score for a single-score gate; each of the combined score's inputs otherwise, at
        the gate's temperatures and ``knn_k``, on the seen-class logits with the cache branch
        and the zero-shot logits with the support cache, before standardisation (docs/gate.md,
        "Scores"). ``calibration_.score_from`` of them is :meth:`decision_function`.

        Args:
            outputs: Both towers' outputs for N images.

        Returns:
            ``{name: [N] float64}``, one entry per base score.

        Raises:
            InputError: An unfitted gate, or a zero-shot gate (no gate score: nothing to route).
            ParameterError: ``outputs`` that are no :class:`BranchOutputs`.

        Example:
            >>> scores = gate.base_scores(test_outputs)  # doctest: +SKIP
            >>> gate.calibration_.score_from(scores)  # == gate.decision_function(test_outputs)  # doctest: +SKIP
        """
        BranchOutputs.check(outputs, "outputs")
        if self.calibration_ is None and self._zero_shot:
            raise InputError("a zero-shot gate has no gate score: it has no seen classes to route")
        cal = self._fitted()
        outputs = self._supported(outputs)
        return cal.compute_base_scores(**self._score_inputs(outputs, self.seen_logits(outputs), cal))

    def predict(self, outputs: BranchOutputs, *, allowed: Any = None) -> FusionResult:
        """Route or mix the two branches for each image.

        Rows the CLIP tower did not run on (lazy zero-shot, the cascade) are decided by
        the supervised branch: a NaN routing score keeps them there, whatever a
        supervised-only score says.

        Args:
            outputs: Both towers' outputs (the CLIP rows may be NaN where CLIP was skipped).
            allowed: A class list per image: ``[N, C]`` booleans (or ``[C]`` for every row),
                True where the class may be predicted. Applied to the routing and the
                fusion (:mod:`hybridcls.gate.restriction`): disallowed classes get
                probability 0 and the rest renormalise; a row with no allowed seen class
                is decided by the zero-shot branch, one with no allowed unseen class by
                the supervised branch; the gate score is the calibrated one, on every
                class. ``None``: every class.

        Returns:
            A :class:`~hybridcls.gate.FusionResult` (probabilities over every class, seen first).

        Raises:
            ParameterError: ``allowed`` of another shape, or with a row that allows no class.
            InputError: A row that allows no seen class where CLIP did not run.
            ParameterError: ``outputs`` that are no :class:`BranchOutputs`.
        """
        cal = self.calibration
        outputs = self._supported(BranchOutputs.check(outputs, "outputs"))  # support images join the zero-shot logits first
        mask = None
        if allowed is not None:
            n_classes = (outputs.clip_logits.shape[1] if outputs.clip_logits is not None
                         else np.shape(allowed)[-1])
            mask = check_allowed(allowed, len(outputs), n_classes)
        if cal is None:
            self._check_zero_shot()
            if outputs.clip_logits is None:
                raise InputError("a zero-shot gate needs the CLIP branch's logits")
            clip = outputs.clip_logits if mask is None else mask_logits(outputs.clip_logits, mask)
            return fuse_zeroshot(clip, unknown_threshold=self._options.unknown_threshold)
        sup = self.seen_logits(outputs)
        # the score on every class: calibration set its threshold (and the combined score's
        # standardisation) on that distribution (docs/sites.md, "What the gate does with a list")
        score = cal.compute_score(**self._score_inputs(outputs, sup, cal))
        if mask is not None:
            outputs = restrict_outputs(outputs, mask, self.n_seen_)
            sup = mask_logits(sup, mask[:, :self.n_seen_])
        # rows decided as a hard gate decides them: to the supervised branch (CLIP skipped,
        # or no unseen class allowed), to the zero-shot branch (no seen class allowed)
        keep = ~outputs.clip_ran
        to_zs = np.zeros(len(outputs), dtype=bool)
        if mask is not None:
            to_zs, to_sup = forced_routing(mask, self.n_seen_)
            if (to_zs & keep).any():
                raise InputError(f"row {int(np.flatnonzero(to_zs & keep)[0])} allows no seen class "
                                 "but the CLIP tower did not run on it: nothing can answer it")
            keep |= to_sup
        forced = keep | to_zs
        if not forced.any():
            return fuse(None, sup_logits=sup, clip_logits=outputs.clip_logits,
                        gate_score=score, calibration=cal, n_seen=self.n_seen_)
        routing = np.where(keep, np.nan, np.where(to_zs, np.inf, score))
        hard = fuse("hard", sup_logits=sup, clip_logits=outputs.clip_logits,
                    gate_score=routing, calibration=cal, n_seen=self.n_seen_)
        res = hard if cal.mode == "hard" else fuse(
            None, sup_logits=sup, clip_logits=outputs.clip_logits,
            gate_score=routing, calibration=cal, n_seen=self.n_seen_)
        for name in ("probs", "branch", "gate_weight"):
            getattr(res, name)[forced] = getattr(hard, name)[forced]
        res.gate_score[:] = score  # the rows report the score itself
        if res.sup_probs is not None:
            res.sup_probs[to_zs] = np.nan  # no seen class allowed: the supervised branch has no answer
        return res

    def _supported(self, outputs: BranchOutputs) -> BranchOutputs:
        """``outputs`` with the support adapter applied to the zero-shot logits (if any)."""
        if self.support_ is None or outputs.clip_logits is None:
            return outputs
        if (self.support_.backbone is not None and outputs.sup_logits is not None
                and outputs.sup_features is None and len(outputs)):
            # the threshold was set with the backbone cache applied: without it the scores move
            raise InputError("this gate's support cache reads the supervised backbone's features "
                             "(sup_features), which these outputs lack")
        return BranchOutputs(outputs.sup_logits, outputs.sup_features,
                             self.support_.apply(outputs.clip_logits, outputs.clip_embeddings,
                                                 features=outputs.sup_features),
                             outputs.clip_embeddings)

    def predict_proba(self, outputs: BranchOutputs, *, allowed: Any = None) -> np.ndarray:
        """``[N, C]`` probabilities over every class (seen columns first); ``allowed`` as in
        :meth:`predict`."""
        return self.predict(outputs, allowed=allowed).probs

    # ------------------------------------------------------------------ which images need CLIP

    def zeroshot_probs(self, outputs: BranchOutputs, *, allowed: Any = None) -> np.ndarray:
        """``[N, C]`` the zero-shot branch's probabilities on every row, as :meth:`predict` reads
        them where it consults that branch: the support adapter applied, and with ``allowed``
        (as in :meth:`predict`) disallowed classes at 0 and the rest renormalised; NaN rows
        where CLIP did not run. A hard gate leaves them out of the rows it keeps with the
        supervised branch (``FusionResult.clip_probs`` is NaN there); an explanation shows them.

        Raises:
            InputError: Outputs without the CLIP branch's logits.
            ParameterError: ``allowed`` as :meth:`predict` refuses it.
        """
        outputs = self._supported(BranchOutputs.check(outputs, "outputs"))
        if outputs.clip_logits is None:
            raise InputError("the zero-shot probabilities need the CLIP branch's logits")
        clip = outputs.clip_logits
        if allowed is not None:
            clip = mask_logits(clip, check_allowed(allowed, len(outputs), clip.shape[1]))
        return softmax_rows(clip)

    def clip_policy(self, *, cascade: bool = False) -> ClipPolicy:
        """Which images the CLIP tower must encode, decided from the supervised outputs.

        * lazy zero-shot: a hard gate whose score reads no CLIP output (and no cache
          branch) needs CLIP only on the images it routes there;
        * the cascade (``cascade=True``, a gate that reads CLIP): CLIP runs only where
          the supervised confidence is at or below ``cascade_msp`` or the backbone
          features lie beyond ``cascade_distance`` of the training images';
        * otherwise every image (``"all"``), as for a zero-shot gate.

        Raises:
            CheckpointError: ``cascade=True`` on a gate calibrated without cascade
                thresholds, or without the backbone index its distance needs.
        """
        cal = self.calibration
        if cal is None:
            self._check_zero_shot()
            if cascade:
                raise ParameterError("cascade", True, "the cascade decides with the supervised "
                                     "branch; a zero-shot-only classifier has none")
            return "all"
        if cal.mode == "hard" and not any(n.startswith("clip") for n in cal.needs) \
                and self.cache_ is None:
            def lazy(outputs: BranchOutputs) -> np.ndarray:
                seen = np.asarray(outputs.sup_logits, dtype=np.float64)
                return route(cal.compute_score(**self._score_inputs(outputs, seen, cal)), cal)
            return lazy
        if cascade:
            keep = self._cascade_rule(cal)
            return lambda outputs: ~keep(outputs)
        return "all"

    def cascade_keep(self, outputs: BranchOutputs) -> np.ndarray:
        """``[N]`` True where the cascade decides without running CLIP."""
        return self._cascade_rule(self._fitted())(outputs)

    def _cascade_rule(self, cal: GateCalibration) -> Callable[[BranchOutputs], np.ndarray]:
        # Checked now, so that a missing threshold or index fails before the first batch.
        if cal.cascade_msp is None:
            raise CheckpointError(f"its {GATE_FILENAME} has no cascade threshold; calibrate again "
                                  "to use the cascade")
        if cal.cascade_distance is None:  # calibrated before the distance condition
            return lambda outputs: cascade_keep(outputs.sup_logits, cal.cascade_msp)
        index = self._backbone()

        def keep(outputs: BranchOutputs) -> np.ndarray:
            return cascade_keep(
                outputs.sup_logits, cal.cascade_msp, distance_threshold=cal.cascade_distance,
                distance=lambda rows: index.kth_distance(outputs.sup_features[rows], cal.cascade_k))
        return keep

    def _backbone(self) -> EmbeddingIndex:
        if self._backbone_index is None and self._backbone_loader is not None:
            self._backbone_index = self._backbone_loader()
        if self._backbone_index is None:
            raise CheckpointError(f"its {GATE_FILENAME} reads the training images' backbone features "
                                  f"(the backbone_knn score or the cascade's distance) but there "
                                  f"is no {INDEX_DIR}/backbone.faiss; calibrate again")
        return self._backbone_index

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``gate.json`` and ``index/clip.*`` + ``index/backbone.*`` into ``directory``
        (and ``support.safetensors`` with support images).

        Returns:
            The ``gate.json`` written.
        """
        cal = self._fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        path = cal.to_json(out / GATE_FILENAME)
        if self.clip_index_ is not None:
            self.clip_index_.save(out / INDEX_DIR)
        if self._backbone_index is not None:
            self._backbone_index.save(out / INDEX_DIR)
        if self.support_ is not None:
            self.support_.save(out / SUPPORT_FILE)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, n_seen: int | None = None,
             clip_meta: MetaSource = None, backbone_meta: MetaSource = None) -> Gate | None:
        """Read the gate saved in ``directory`` (``gate.json`` + ``index/``), or ``None`` if none.

        Args:
            directory: A calibrated run directory or a saved classifier's folder.
            n_seen: The number of seen classes of the run it belongs to, checked against
                the number ``gate.json`` records; ``None``: the recorded one (a ``gate.json``
                written before it recorded one needs it).
            clip_meta: Provenance the CLIP index must carry (see
                :meth:`hybridcls.index.EmbeddingIndex.load`). A stale index does not stop
                the loading (so that ``calibrate`` can rebuild it): the refusal comes
                where the index is used.
            backbone_meta: The same for the backbone index, or a function giving it: the
                backbone index is loaded on the cascade's first use.

        Raises:
            CheckpointError: A ``gate.json`` that is not valid, or that records another
                number of seen classes than ``n_seen``.
            ParameterError: ``n_seen=None`` with a ``gate.json`` that records none.
        """
        folder = Path(directory)
        if not (folder / GATE_FILENAME).is_file():
            return None
        gate = cls()
        path = folder / GATE_FILENAME
        cal = GateCalibration.from_json(path)
        if n_seen is None and cal.n_seen is None:
            raise ParameterError("n_seen", None, f"{path} does not record its number of seen "
                                                 f"classes (written before it did); pass the run's")
        mismatch = n_seen_mismatch(path, cal.n_seen, n_seen, of=f"n_seen={n_seen}",
                                   advice="calibrate this run again, which replaces it")
        if mismatch is not None:
            raise mismatch
        # the calibration as the file holds it (one without n_seen: its model_version unchanged,
        # GateCalibration.to_dict)
        gate.calibration_, gate.n_seen_ = cal, cal.n_seen if n_seen is None else n_seen
        gate.method = cal.method if cal.method in FIT_METHODS else gate.method
        try:
            gate.clip_index_ = load_run_index(folder, "clip", expect=_resolved(clip_meta))
        except CheckpointError as exc:
            gate.clip_index_, gate.index_error_ = None, exc
        gate.cache_ = _enabled(cal)
        if cal.support is not None:
            gate.support_ = SupportAdapter.load(folder / SUPPORT_FILE, cal.support)
        if gate.clip_index_ is None and ("knn" in cal.base_scores or gate.cache_ is not None):
            gate.index_error_ = gate.index_error_ or CheckpointError(
                f"{folder}: its gate reads the kNN score or the cache branch but there is no "
                f"{INDEX_DIR}/clip.faiss; calibrate again")

        def backbone() -> EmbeddingIndex | None:
            return load_run_index(folder, "backbone", expect=_resolved(backbone_meta))
        gate._backbone_loader = backbone
        return gate

    def check_ready(self) -> None:
        """Raise now what prediction would raise at the first batch (a missing or stale index)."""
        cal = self.calibration
        if cal is not None and self.clip_index_ is None and (
                "knn" in cal.base_scores or self.cache_ is not None):
            self._index()


def _enabled(cal: GateCalibration) -> CacheBranch | None:
    """The calibration's cache branch when it is enabled: the threshold was set on its logits."""
    if cal.cache_branch is None:
        return None
    branch = CacheBranch.from_dict(cal.cache_branch)
    return branch if branch.enabled else None


def _kept_threshold(cal: GateCalibration, n_seen: int) -> str | None:
    """Why :meth:`Gate.with_support` keeps the calibrated threshold, or ``None`` to set it again.

    A threshold set by hand is the user's, and ``n_seen`` seen images (held-out and seen-class
    support images) set one at the calibrated TPR only when :func:`can_set_threshold` says so
    (the rule calibration's own TPR levels follow).
    """
    if cal.method == "manual":
        return ("it was set by hand (calibration method 'manual') and is not fitted again, though the support "
                "cache moves the zero-shot scores it is compared with; set it again by hand if "
                "the routing shifts")
    if can_set_threshold(cal.tpr, n_seen):
        return None
    need = (f"at least {math.ceil(MIN_TAIL_IMAGES / (1.0 - cal.tpr) - 1e-9)} seen images"
            if cal.tpr < 1.0 else "more than any number of seen images")
    return (f"{n_seen} seen image(s) (held-out and seen-class support images) are too few to set "
            f"one at the calibrated TPR {cal.tpr:g}, which needs {need} ({MIN_TAIL_IMAGES} above "
            "the threshold); "
            "more seen images set it: held-out seen images (a hybrid reads them from its "
            "training folder's held-out split) or support images of seen classes")


def _support_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The support record in brief, for run records: images per class and the fitted settings."""
    keys = ("n_support", "counts", "alpha", "alpha_rel", "beta", "fit_accuracy_plain",
            "fit_accuracy", "backbone", "threshold_from", "h")
    return {k: record[k] for k in keys if k in record}


def _resolved(meta: MetaSource) -> Mapping[str, Any] | None:
    return meta() if callable(meta) else meta
