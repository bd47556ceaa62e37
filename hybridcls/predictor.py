"""Prediction shared by both classifiers: inputs -> engine -> gate -> probabilities and rows.

:class:`Predictor` is the one inference policy of the package. A classifier
that has a fitted :class:`~hybridcls.engine.InferenceEngine` (``engine_``), a
fitted :class:`~hybridcls.gate.Gate` and its classes gets from it every way
to predict: the scikit-learn methods (``predict``, ``predict_proba``,
``decision_function``), raw branch outputs and the gate over them
(``extract_features`` / ``predict_features``), and the streaming form that the
command line writes out (``iter_predictions`` / ``rows``), where a bad image
is an error row and never an exception. A zero-shot-only classifier is the
same with no supervised tower and a gate that routes every image to CLIP.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from hybridcls.cache import json_text, stable_hash
from hybridcls.data import Source, as_sources
from hybridcls.engine import ClipPolicy, EngineBatch, InferenceEngine
from hybridcls.errors import HybridclsWarning, ImageDecodeError, InputError, ParameterError
from hybridcls.gate import BranchOutputs, FusionResult, Gate
from hybridcls.hierarchy import Hierarchy, Rollup, RollupCalibration, check_threshold
from hybridcls.outputs import PredictionRow, batch_rows, check_topk
from hybridcls.provenance import model_version
from hybridcls.runtime import RUNTIME_FIELDS
from hybridcls.sites import SiteClasses, allowed_columns, allowed_masks, read_site_classes
from hybridcls.support import add_support

__all__ = ["Predictor"]

# Names of failed inputs quoted in one ImageDecodeError before "...".
_MAX_LISTED_FAILURES = 10


class Predictor:
    """The prediction methods of :class:`~hybridcls.HybridClassifier` and
    :class:`~hybridcls.ZeroShotClassifier`.

    A subclass sets ``engine_`` and ``classes_`` when fitted, and implements
    :meth:`_prediction_gate` (its fitted gate with the prediction-time parameters
    applied); ``n_seen_`` is 0 for zero-shot only. Inputs everywhere may be paths,
    folders, globs, list files, PIL images, ``[H, W, 3]`` ``uint8`` arrays or
    ``[3, H, W]`` / ``[N, 3, H, W]`` tensors (see :func:`hybridcls.data.as_sources`);
    outputs have one row per input, in order.
    """

    engine_: InferenceEngine
    classes_: np.ndarray
    n_seen_: int = 0
    #: Columns the rows add beyond path, label, score, branch and top-k.
    EXTRA_COLUMNS: tuple[str, ...] = ()
    #: Parameters the towers are built from, and the method that reads them (a subclass sets
    #: both): changed on a fitted classifier, they wait for that method.
    LOAD_PARAMETERS: tuple[str, ...] = ("clip_model", "clip_pretrained", "prompts", "templates",
                                        "truncate_prompts", *RUNTIME_FIELDS)
    LOAD_METHOD = "fit()"

    def set_params(self, **params: Any) -> Predictor:
        """scikit-learn's ``set_params``, saying when a parameter will not act at once.

        Prediction-time parameters (``mode``, ``unknown_threshold``, roll-up, class lists...)
        act at the next prediction, a hybrid's calibration parameters at the next
        ``calibrate()``. On a fitted classifier, those the towers are built from
        (:attr:`LOAD_PARAMETERS`) act only at the next load: a
        :class:`~hybridcls.errors.HybridclsWarning` names them, so that no change is silently
        without effect.
        """
        if hasattr(self, "engine_"):
            late = [k for k in params
                    if k in self.LOAD_PARAMETERS and not _same(params[k], getattr(self, k, None))]
            if late:
                warnings.warn(f"set_params({', '.join(f'{k}=...' for k in late)}): the fitted "
                              "classifier keeps the towers and runtime it was built with; this "
                              f"acts at the next {self.LOAD_METHOD}", HybridclsWarning, stacklevel=2)
            if "support" in params and not _same(params["support"], getattr(self, "support", None)):
                warnings.warn("set_params(support=...): the fitted classifier keeps its support "
                              "images; add_support(..., replace=True) replaces them now",
                              HybridclsWarning, stacklevel=2)
        return super().set_params(**params)  # type: ignore[misc,no-any-return]

    # ------------------------------------------------------------------ to override

    def _prediction_gate(self) -> Gate:  # pragma: no cover - abstract
        raise NotImplementedError

    def _clip_policy(self, gate: Gate) -> ClipPolicy:
        return gate.clip_policy()

    def _rollup_calibration(self, precision: float) -> RollupCalibration:
        """The roll-up threshold chosen at a target precision; a classifier without labelled
        held-out images has none to choose it on."""
        raise ParameterError("rollup_precision", precision,
                             "choosing the roll-up threshold needs labelled held-out images, which "
                             "only a calibrated hybrid has; set rollup_threshold=T instead")

    def _supervised_identity(self) -> dict[str, Any] | None:
        """The supervised tower's :func:`~hybridcls.provenance.tower_identity` (None: zero-shot only)."""
        return None

    # ------------------------------------------------------------------ provenance

    def model_identity(self) -> dict[str, Any]:
        """Which models predict: each tower's id and weights' fingerprint, and the short id of all.

        Returns:
            ``{"supervised": {"model_id", "fingerprint", ...} or None, "clip": {"model_id",
            "fingerprint", "pretrained"}, "prompts_sha256": ..., "n_seen": S, "n_classes": C,
            "model_version": ...}``: the fingerprints are SHA-256 of the weights files (a
            random-init CLIP's is ``random:<config hash>``); ``prompts_sha256`` hashes the
            class texts and templates; ``model_version`` is
            :func:`~hybridcls.provenance.model_version` of them and the calibrated gate.
        """
        check_is_fitted(self, "engine_")
        tower = self.engine_.clip
        bundle = tower.bundle
        clip = bundle.identity()
        supervised = self._supervised_identity()
        prompts = stable_hash({"prompts": tower.prompts.to_text(), "templates": list(tower.templates)})
        cal = self.gate_.calibration_ if getattr(self, "gate_", None) is not None else None
        # the gate as gate.json holds it: the same id before and after a save and a load
        gate = None if cal is None else json.loads(json_text(cal.to_dict()))
        if cal is None and getattr(self.gate_, "support_", None) is not None:  # zero-shot + support
            gate = json.loads(json_text({"support": self.gate_.support_.to_dict()}))
        return {
            "supervised": supervised, "clip": clip, "prompts_sha256": prompts,
            "n_seen": int(self.n_seen_), "n_classes": len(self.classes_),
            "model_version": model_version(None if supervised is None else supervised["fingerprint"],
                                           bundle.fingerprint, gate, prompts),
        }

    @property
    def model_version_(self) -> str:
        """The short id of the model (:func:`~hybridcls.provenance.model_version`), as rows write it."""
        return self.model_identity()["model_version"]

    def gate_summary(self) -> dict[str, Any] | None:
        """The gate's settings as predictions use them (:meth:`hybridcls.gate.Gate.summary`), with
        the class lists (``restriction``) and the roll-up (``rollup``:
        :meth:`hybridcls.hierarchy.Rollup.summary`, the threshold a target precision chose
        included) when set; ``None`` before a hybrid is calibrated."""
        check_is_fitted(self, "engine_")
        gate = getattr(self, "gate_", None)
        if gate is None:
            return None
        summary = self._prediction_gate().summary()
        if self._restricted():  # the class lists change the routing and the fusion
            site = getattr(self, "site_classes", None)
            summary["restriction"] = {
                "allowed_classes": getattr(self, "allowed_classes", None),
                "site_classes": None if site is None else
                site.source if isinstance(site, SiteClasses) else str(site)}
        rollup = self.prediction_rollup()  # a threshold chosen at a precision is calibrated once
        if rollup is not None:
            summary["rollup"] = rollup.summary()
        return summary

    # ------------------------------------------------------------------ class lists

    def _restricted(self) -> bool:
        return getattr(self, "allowed_classes", None) is not None or \
            getattr(self, "site_classes", None) is not None

    def _restriction(self, sources: Sequence[Source], inputs: Any = None
                     ) -> tuple[np.ndarray | None, dict[int, str]]:
        """``([n, C] allowed mask or None, {index: reason})`` from ``allowed_classes`` and
        ``site_classes``; the reasons are the inputs that allow no class.

        Args:
            sources: The inputs, expanded.
            inputs: As given, to read the ``site`` column of ``.csv`` list files among them.

        Raises:
            ParameterError: A name of ``allowed_classes`` that is no class; a class list
                with ``cascade=True``.
            PromptFileError: A site file problem (names the file and line).

        Warns:
            SiteFileWarning: A site file row that reaches none of ``sources`` (once per row),
                unless the site file says its rows were checked on every input.
        """
        if not self._restricted():
            return None, {}
        if getattr(self, "cascade", False):
            raise ParameterError("cascade", True, "the cascade decides from the confidence over "
                                 "every seen class before a class list could apply; predict "
                                 "without allowed_classes / site_classes, or without the cascade")
        prompts = self.engine_.clip.prompts
        names = getattr(self, "allowed_classes", None)
        base = None if names is None else allowed_columns(_names(names), prompts)
        site = getattr(self, "site_classes", None)
        resolved = None
        if site is not None:
            table = (site if isinstance(site, SiteClasses)
                     else read_site_classes(site, parameter="site_classes"))
            table = table if inputs is None else table.for_inputs(inputs)
            if not table.reach_checked:
                table.check_reach(sources)
            resolved = table.resolve(prompts)
        return allowed_masks(sources, len(self.classes_), base, resolved)

    def allowed_mask(self, inputs: Any) -> np.ndarray | None:
        """``[n, C]`` booleans, one row per input: the classes ``allowed_classes`` and
        ``site_classes`` let it be (an input that allows none: a row of False, which
        predictions turn into an error row); ``None`` without class lists.

        Args:
            inputs: What :meth:`predict` takes (paths, folders, list files, images); a list
                file's ``site`` column counts.

        Raises:
            ParameterError: A name of ``allowed_classes`` that is no class.
            PromptFileError: A site file problem (names the file and line).
        """
        return self._restriction(self._sources(inputs), inputs)[0]

    # ------------------------------------------------------------------ roll-up

    @property
    def hierarchy_(self) -> Hierarchy:
        """The classes' tree from the prompts file's ancestors (:mod:`hybridcls.hierarchy`)."""
        check_is_fitted(self, "engine_")
        return Hierarchy.from_prompts(self.engine_.clip.prompts)

    def prediction_rollup(self) -> Rollup | None:
        """The roll-up predictions apply (``rollup_threshold`` or ``rollup_precision``), or None.

        Raises:
            ParameterError: Both parameters, a value outside (0, 1], or a prompts file whose
                classes name no ancestors (there is nothing to roll up to).
        """
        threshold = getattr(self, "rollup_threshold", None)
        precision = getattr(self, "rollup_precision", None)
        if threshold is None and precision is None:
            return None
        if threshold is not None and precision is not None:
            raise ParameterError("rollup_threshold", threshold, "give it or rollup_precision="
                                 f"{precision!r}, not both: the precision chooses the threshold")
        name, value = ("rollup_threshold", threshold) if precision is None else ("rollup_precision", precision)
        check_threshold(value, name)
        hierarchy = self.hierarchy_
        if not hierarchy.nodes:
            raise ParameterError(name, value, "the prompts file names no ancestors (a class line "
                                 "ending '> PARENT > ...'): there is nothing to roll up to")
        calibration = None
        if precision is not None:
            calibration = self._rollup_calibration(float(precision))
            threshold = calibration.threshold
        return Rollup(hierarchy, float(threshold), calibration)

    # ------------------------------------------------------------------ few-shot support

    def add_support(self, support: Any, *, replace: bool = False) -> Predictor:
        """Join a few labelled images per class to the zero-shot scores, without retraining.

        The images' CLIP embeddings become a Tip-Adapter cache on the zero-shot logits whose
        ``alpha`` and ``beta`` are fitted by leave-one-out; a hybrid's gate also reads support
        images of unseen classes as real unseen images to set its threshold (see
        :mod:`hybridcls.support` and :meth:`hybridcls.gate.Gate.with_support`). Images given
        before stay; the towers run only on images not in the cache folder.

        Args:
            support: An ImageFolder-style folder (one subfolder per class, named like
                training folders: any class of the prompts file, seen or unseen),
                ``(path, class name)`` pairs, or ``{class name: [paths]}``.
            replace: Drop the support images given before instead of adding to them.

        Returns:
            ``self``; ``gate_summary()["support"]`` says how many images per class.

        Raises:
            DatasetError: A missing or empty class folder, or an image that does not decode.
            PromptFileError: A class that matches no line of the prompts file.
            ParameterError: A class given with an empty list of images, or an image (by path
                or by content) given for two classes; an image given twice for one class is
                used once, with a warning naming it.
            CheckpointError: A hybrid whose run is not calibrated yet.

        Example:
            >>> clf.add_support("support/")  # doctest: +SKIP
            >>> clf.gate_summary()["support"]["counts"]  # doctest: +SKIP
            {'okapi': 5, 'zebra': 5}
        """
        check_is_fitted(self, "engine_")
        with self.engine_.uncounted():  # the count is of the images predicted, not these
            return add_support(self, support, replace=replace)

    # ------------------------------------------------------------------ streaming

    def _sources(self, inputs: Any) -> list[Source]:
        check_is_fitted(self, "engine_")
        return as_sources(inputs)

    def iter_predictions(self, inputs: Any, *, progress: bool | None = None,
                         clip: ClipPolicy | None = None
                         ) -> Iterator[tuple[EngineBatch, FusionResult | None]]:
        """Stream ``(engine batch, fusion result)`` per batch, in input order; bad images are errors.

        Args:
            inputs: What :func:`~hybridcls.data.as_sources` accepts, or its result.
            progress: Show a progress bar (default: the ``progress`` parameter).
            clip: Which images the CLIP tower encodes: ``None`` = the gate's own policy
                (lazy zero-shot, the cascade), ``"all"`` = every image, so that both
                branches' outputs exist for every row. It changes what is computed, not the
                answers: the images the gate's own policy skips are decided as a run that
                skipped them decides them (by the supervised branch), the outputs kept.

        Yields:
            One pair per batch; the result is ``None`` when no image of the batch decoded.
        """
        sources = self._sources(inputs)
        yield from self._iter_predictions(sources, inputs, progress=progress, clip=clip)

    def _iter_predictions(self, sources: list[Source], inputs: Any, *, progress: bool | None,
                          clip: ClipPolicy | None
                          ) -> Iterator[tuple[EngineBatch, FusionResult | None]]:
        gate = self._prediction_gate()
        allowed, empty = self._restriction(sources, inputs)
        # an input that allows no class is an error row; the others may need CLIP wherever
        # the restricted gate routes them, so the CLIP tower runs on every image
        sources = [Source(s.path, error=empty[i]) if i in empty and s.ok else s
                   for i, s in enumerate(sources)]
        own = self._clip_policy(gate) if allowed is None else "all"
        policy = own if clip is None else clip
        for batch in self.engine_.iter_batches(sources, clip=policy, progress=progress):
            outputs = batch.outputs
            if outputs is not None and callable(own) and policy is not own:
                # CLIP ran where the gate's own policy (the cascade) skips it: those rows get
                # the answer the policy gives them, so that asking for more outputs (explain's
                # maps) never changes a prediction
                outputs = outputs.without_clip(~np.asarray(own(outputs), dtype=bool))
            yield batch, None if outputs is None else gate.predict(
                outputs, allowed=None if allowed is None else allowed[batch.ok])

    def rows(self, inputs: Any, *, topk: int | None = None, progress: bool | None = None,
             model_version: bool = False, all_scores: bool = False
             ) -> Iterator[list[PredictionRow]]:
        """Output rows per batch (label, branch, top-k; a hybrid's gate columns), one per input.

        Args:
            inputs: What :func:`~hybridcls.data.as_sources` accepts.
            topk: Top-k pairs per row: 1 to ``len(classes_)``; None:
                :data:`~hybridcls.outputs.DEFAULT_TOPK`, or every class when there are fewer.
            progress: Show a progress bar (default: the ``progress`` parameter).
            model_version: Add the ``model_version`` column (:attr:`model_version_`) to every row.
            all_scores: Add every class's probability to every row
                (:data:`~hybridcls.outputs.SCORES_COLUMN`, in ``classes_`` order).

        Raises:
            ParameterError: ``topk`` out of range (before any image is read).
        """
        sources = self._sources(inputs)
        topk = check_topk(topk, len(self.classes_))
        paths = [s.path for s in sources]
        version = self.model_version_ if model_version else None
        rollup = self.prediction_rollup()  # before the first batch: a threshold to calibrate runs once
        for batch, res in self._iter_predictions(sources, inputs, progress=progress, clip=None):
            yield self.batch_rows(paths, batch, res, topk=topk, model_version=version,
                                  all_scores=all_scores, rollup=rollup)

    def batch_rows(self, paths: Sequence[str], batch: EngineBatch, res: FusionResult | None, *,
                   topk: int | None = None, model_version: str | None = None,
                   all_scores: bool = False, rollup: Rollup | None = None) -> list[PredictionRow]:
        """One engine batch and its fusion result as output rows, one per index, in order."""
        return batch_rows(paths, batch.indices, batch.ok, batch.errors, res, list(self.classes_),
                          n_seen=self.n_seen_, topk=topk, branch_columns=bool(self.EXTRA_COLUMNS),
                          model_version=model_version, all_scores=all_scores, rollup=rollup)

    # ------------------------------------------------------------------ arrays

    def extract_features(self, inputs: Any, *, clip: ClipPolicy = "all") -> BranchOutputs:
        """Run the towers and keep their raw outputs, one row per input (see :meth:`predict_features`).

        Raises:
            ImageDecodeError: An input that cannot be decoded (names it, and counts the others).

        Example:
            >>> feats = clf.extract_features(["val/"])  # doctest: +SKIP
            >>> clf.predict_features(feats).probs.shape  # doctest: +SKIP
        """
        sources = self._sources(inputs)
        outputs, errors = self.engine_.extract(sources, clip=clip)
        _raise_failures(sources, errors)
        assert outputs is not None or not sources
        return outputs if outputs is not None else _empty_outputs(self)

    def predict_features(self, features: BranchOutputs, *, allowed: Any = None) -> FusionResult:
        """The gate and the fusion over branch outputs already computed, without running a model.

        Args:
            features: From :meth:`extract_features`.
            allowed: ``[N, C]`` booleans, the classes each row may be (``[C]``: every row;
                see :meth:`hybridcls.gate.Gate.predict`); ``None``: ``allowed_classes``, or
                every class. A site file needs the inputs' paths: with ``site_classes`` set,
                pass ``allowed``.

        Raises:
            ParameterError: ``features`` that are no :class:`~hybridcls.gate.BranchOutputs`
                (``None``, paths or images: those go to :meth:`predict_proba`);
                ``site_classes`` set and ``allowed`` not given; an ``allowed`` row with no class.

        Example:
            >>> feats = clf.extract_features(["test/"])  # doctest: +SKIP
            >>> clf.set_params(mode="soft").predict_features(feats).probs.shape  # doctest: +SKIP
        """
        BranchOutputs.check(features, "features")
        if allowed is None and self._restricted():
            site = getattr(self, "site_classes", None)
            if site is not None:
                raise ParameterError("site_classes", str(getattr(site, "source", site)),
                                     "predict_features has no paths to match against the site "
                                     "file: pass allowed= (an [N, C] mask) instead")
            check_is_fitted(self, "engine_")
            allowed = allowed_columns(_names(self.allowed_classes), self.engine_.clip.prompts)
        return self._prediction_gate().predict(features, allowed=allowed)

    def _fused(self, inputs: Any) -> FusionResult:
        sources = self._sources(inputs)
        gate = self._prediction_gate()
        allowed, empty = self._restriction(sources, inputs)
        if empty:
            path, reason = describe_failures(sources, empty)
            raise InputError(f"{path}: {reason}")
        policy = self._clip_policy(gate) if allowed is None else "all"
        outputs, errors = self.engine_.extract(sources, clip=policy)
        _raise_failures(sources, errors)
        if allowed is not None:
            allowed = allowed[[i for i in range(len(sources)) if i not in errors]]
        return gate.predict(outputs if outputs is not None else _empty_outputs(self), allowed=allowed)

    def predict_proba(self, inputs: Any) -> np.ndarray:
        """``[n, C]`` probabilities over ``classes_`` (seen first, then unseen), one row per input.

        Raises:
            ImageDecodeError: An input that cannot be decoded (names it).
        """
        return self._fused(inputs).probs

    def decision_function(self, inputs: Any) -> np.ndarray:
        """``[n]`` gate scores (higher = less like the seen classes); NaN for zero-shot only."""
        return self._fused(inputs).gate_score

    def predict(self, inputs: Any) -> np.ndarray:
        """Class names, one per input (``"unknown"`` where the unknown option answers; an ancestor
        where roll-up answers one, see :meth:`prediction_rollup`).

        Raises:
            ImageDecodeError: An input that cannot be decoded (names it).
        """
        rollup = self.prediction_rollup()
        res = self._fused(inputs)
        labels = np.asarray(self.classes_, dtype=object)[res.probs.argmax(axis=1)] if len(res.probs) \
            else np.empty(0, dtype=object)
        if rollup is not None:
            labels = rollup.apply(res.probs).answer
        labels[res.branch == "unknown"] = "unknown"
        return labels


def _empty_outputs(clf: Predictor) -> BranchOutputs:
    """Zero rows of what the engine would have made (no input at all)."""
    engine = clf.engine_
    sup = None
    if engine.supervised is not None:
        sup = np.zeros((0, clf.n_seen_), np.float32)
    clip = None if engine.clip is None else np.zeros((0, len(clf.classes_)), np.float32)
    emb = None if engine.clip is None else np.zeros((0, engine.clip.embed_dim), np.float32)
    # the features' true width: the gate's backbone scores check it against their index
    width = int(getattr(engine.supervised, "num_features", 0) or 0)
    return BranchOutputs(sup, None if sup is None else np.zeros((0, width), np.float32), clip, emb)


def _same(a: Any, b: Any) -> bool:
    """Whether a parameter keeps its value (``==`` where it answers a plain bool, else identity)."""
    if a is b:
        return True
    try:
        equal = a == b
        return equal if isinstance(equal, bool) else False
    except Exception:  # noqa: BLE001 - arrays, tensors: compared by identity only
        return False


def _raise_failures(sources: Sequence[Source], errors: dict[int, str]) -> None:
    if errors:
        raise ImageDecodeError(*describe_failures(sources, errors))


def _names(names: str | Sequence[str]) -> list[str]:
    """``allowed_classes`` as a list (one name alone is a list of one)."""
    return [names] if isinstance(names, str) else list(names)


def describe_failures(sources: Sequence[Source], errors: dict[int, str]) -> tuple[str, str]:
    """``(first failed path, its reason with the count and names of the others)``."""
    failed = [(sources[i].path, errors[i]) for i in sorted(errors)]
    path, reason = failed[0]
    if len(failed) > 1:
        more = "; ".join(f"{p}: {r}" for p, r in failed[1: 1 + _MAX_LISTED_FAILURES])
        tail = " ..." if len(failed) > 1 + _MAX_LISTED_FAILURES else ""
        reason = f"{reason}; {len(failed) - 1} more could not be read: {more}{tail}"
    return path, reason

