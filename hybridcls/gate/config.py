"""The calibrated gate's settings, and their JSON file in the run directory.

:class:`GateCalibration` is what calibration produces and fusion reads: which
score, which decision mode, and that mode's parameters. It is stored as plain
JSON (``gate.json`` by convention), written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.cache import atomic_write_json
from hybridcls.errors import CheckpointError, InputError
from hybridcls.gate.cascade import CASCADE_KNN_K
from hybridcls.gate.scores import DEFAULT_KNN_K, SCORES, CombinedScore, compute_scores, needs_of

__all__ = ["FIT_METHODS", "GATE_FILENAME", "METHODS", "MODES", "STACKING_SCORE", "GateCalibration"]

MODES = ("hard", "soft", "stacking")
#: The one gate score ``stacking`` mode works on: it thresholds exactly this margin.
STACKING_SCORE = "clip_margin"
METHODS = ("tpr", "leave-classes-out", "transductive", "manual")
#: The methods :meth:`hybridcls.gate.Gate.fit` calibrates with (``transductive`` refines either).
FIT_METHODS = ("leave-classes-out", "tpr")
#: The file name the lead's run directory uses for the gate.
GATE_FILENAME = "gate.json"
_FORMAT_VERSION = 1


@dataclass
class GateCalibration:
    """A gate's settings.

    Attributes:
        score: The gate score: a key of :data:`hybridcls.gate.scores.SCORES` or ``"combined"``.
        mode: ``"hard"`` (route), ``"soft"`` (mix) or ``"stacking"`` (penalise seen classes).
        threshold: The score above which an image counts as unseen, on the real
            model's scale; ``None`` until :func:`hybridcls.gate.calibration.finalize`.
        tpr: Fraction of held-out seen images the threshold keeps at or below it.
        temperature: Temperature of the score (``msp``, ``energy``), and of the
            supervised softmax in fusion when ``sup_temperature`` is unset.
        clip_temperature: Temperature of the CLIP-side softmax scores (``mcm``,
            ``unseen_mass``) on the cosine similarities, as their papers define it
            (MCM: 1); ``None`` = the logits as they are, CLIP's own scale (files
            written before it read as this).
        clip_logit_scale: CLIP's logit scale (``logit_scale.exp()``), recorded at
            calibration: it turns the zero-shot logits back into cosine similarities
            for ``clip_temperature``.
        sup_temperature: The supervised softmax's temperature in fusion, fitted on
            the held-out seen images by temperature scaling (Guo et al. 2017), so
            that ``soft`` mixes a calibrated distribution whatever the head's
            training (label smoothing leaves it underconfident). ``None`` = use
            ``temperature`` (files written before it read as this).
        soft_scale: ``soft`` mode's sigmoid scale, in score units (set with the threshold).
        soft_scale_std: The same scale in standard deviations of the seen images'
            scores: the form that transfers from calibration to the real model.
        stacking_penalty: Subtracted from the seen classes' zero-shot logits in
            ``stacking`` mode; ``-threshold`` of the ``clip_margin`` score.
        unseen_only: ``hard`` mode: routed images are classified over the unseen
            classes only (``True``) or over all classes.
        combined: :meth:`CombinedScore.to_dict` when ``score == "combined"``.
        unknown_threshold: Answer "unknown" when no branch's top probability reaches
            it (every one strictly below it; one equal to it is not unknown); ``None`` = never.
        knn_k: The neighbour the ``knn`` score measures.
        method: How the threshold was set: ``tpr``, ``leave-classes-out``,
            ``transductive`` or ``manual``.
        candidates: Leave-classes-out figures, one dict per candidate setting
            (score, mode, parameters, mean and spread of H over the rounds), best first.
        cascade_msp: The cascade's threshold on the supervised branch's maximum
            softmax probability: above it the image is decided by the supervised
            branch without running CLIP (see :func:`hybridcls.gate.fit_cascade`);
            ``None`` = not fitted (files written before the cascade read as this).
        cascade_distance: The cascade's threshold on the distance from an image's
            backbone features to its ``cascade_k``-th nearest training image
            (the run's ``index/backbone.*``): above it the image goes to CLIP
            whatever its MSP. ``None`` = not fitted (the MSP alone decides;
            files written before it read as this).
        cascade_k: The neighbour ``cascade_distance`` measures.
        cascade_seen_share: From leave-classes-out: the share of held-out seen
            images whose MSP must stay at or below the cascade threshold so that
            stand-in unseen images reach CLIP (see
            :func:`hybridcls.gate.cascade_seen_share`); ``None`` = not measured.
        cache_branch: :meth:`hybridcls.gate.CacheBranch.to_dict` of the nearest-neighbour
            cache branch fitted at calibration (applied only when its ``enabled`` is true);
            ``None`` = not fitted.
        rounds: Leave-classes-out: the stand-in problems it ran (fewer than asked when
            the seen classes allow fewer distinct ones); ``None`` for other methods.
        hidden_classes: Leave-classes-out: the seen classes each problem hid.
        standin: Leave-classes-out: how its stand-in unseen classes were made
            (:data:`hybridcls.gate.calibration.STANDINS`); ``None`` for other methods
            and for files written before it (which used ``"plain"``).
        adapted: What calibration changed because the data was small, one sentence
            each (the setting, asked -> used, and why), e.g. ``"the knn score's k 10 -> 3: the
            smallest seen class ('cat') has 3 training images"``. The values used are
            in their own fields (``knn_k``, ``cascade_k``...), which prediction reads.
        support: Few-shot support images (:meth:`hybridcls.gate.Gate.with_support`): the
            adapter's record (``alpha``, ``beta``, images per class...), how the threshold
            was chosen with them and the fields it changed (``plain``); ``None`` = none.
        clip: The CLIP the gate was calibrated with, as
            :meth:`hybridcls.zeroshot.loading.ClipBundle.identity` gives it (``model_id``,
            ``fingerprint`` of the weights, ``pretrained`` tag or file): its thresholds,
            standardisation and indexes hold for that model's scores only
            (:mod:`hybridcls.zeroshot.gate_clip` checks a run's CLIP against it). ``None`` = not
            recorded (files written before it).
        data_dir: The training folder whose held-out images set the thresholds, when it is
            not the one the run records (given to
            :meth:`HybridClassifier.calibrate <hybridcls.hybrid.HybridClassifier.calibrate>`
            after the folder moved), absolute: later fits that read the held-out images
            (support images, the roll-up threshold) read them there. ``None`` = the run's own.
        n_seen: The number of seen classes (the supervised head's outputs) of the run it was
            calibrated for: the first ``n_seen`` columns of the logits are the seen classes.
            ``None`` = not recorded (files written before it).
    """

    score: str = "energy"
    mode: str = "hard"
    threshold: float | None = None
    tpr: float = 0.95
    temperature: float = 1.0
    clip_temperature: float | None = None
    clip_logit_scale: float | None = None
    soft_scale: float | None = None
    soft_scale_std: float = 0.5
    stacking_penalty: float | None = None
    unseen_only: bool = True
    combined: dict[str, Any] | None = None
    unknown_threshold: float | None = None
    knn_k: int = DEFAULT_KNN_K
    method: str = "tpr"
    candidates: list[dict[str, Any]] = field(default_factory=list)
    cascade_msp: float | None = None
    cascade_seen_share: float | None = None
    cascade_distance: float | None = None
    cascade_k: int = CASCADE_KNN_K
    sup_temperature: float | None = None
    cache_branch: dict[str, Any] | None = None
    rounds: int | None = None
    hidden_classes: int | None = None
    standin: str | None = None
    adapted: list[str] = field(default_factory=list)
    support: dict[str, Any] | None = None
    clip: dict[str, Any] | None = None
    data_dir: str | None = None
    n_seen: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"gate mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.method not in METHODS:
            raise InputError(
                f"calibration method {self.method!r}: choose from {', '.join(METHODS)}"
            )
        if self.score != "combined" and self.score not in SCORES:
            raise InputError(
                f"unknown gate score {self.score!r}; choose from {', '.join(SCORES)}, combined"
            )
        if self.score == "combined" and self.combined is None:
            raise InputError("gate score 'combined' needs its fitted model (combined=...)")
        if self.mode == "stacking" and self.score != STACKING_SCORE:
            # stacking thresholds exactly this score: seen wins iff max_seen - penalty >= max_unseen
            raise InputError(f"stacking mode works on the {STACKING_SCORE!r} score")
        if not 0.0 < self.tpr <= 1.0:
            raise InputError(f"tpr must be in (0, 1], got {self.tpr}")
        if self.temperature <= 0:
            raise InputError(f"temperature must be positive, got {self.temperature}")
        for name in ("clip_temperature", "clip_logit_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"{name} must be positive or None, got {value}")
        if self.sup_temperature is not None and self.sup_temperature <= 0:
            raise InputError(f"sup_temperature must be positive, got {self.sup_temperature}")
        for name in ("knn_k", "cascade_k"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_seen is not None and self.n_seen < 0:
            raise InputError(f"n_seen must be at least 0 or None, got {self.n_seen}")

    @property
    def base_scores(self) -> list[str]:
        """The registered scores the gate score is computed from."""
        if self.score == "combined":
            assert self.combined is not None
            return list(self.combined["names"])
        return [self.score]

    @property
    def fusion_temperature(self) -> float:
        """The supervised softmax temperature fusion uses."""
        return self.temperature if self.sup_temperature is None else self.sup_temperature

    @property
    def needs(self) -> set[str]:
        """Inputs the gate score reads (see :data:`hybridcls.gate.scores.INPUTS`).

        A ``hard`` gate that needs no ``clip_*`` input lets the zero-shot branch
        run only on the images it routes there.
        """
        return needs_of(self.base_scores)

    @property
    def is_final(self) -> bool:
        """Whether the threshold is set on the real model's scale."""
        return self.threshold is not None and math.isfinite(self.threshold)

    def combined_score(self) -> CombinedScore | None:
        """The fitted :class:`CombinedScore`, or ``None`` for a single score.

        ``combined`` may be kept beside another winning score (leave-classes-out
        stores it for every candidate); only ``score == "combined"`` uses it.
        """
        if self.score != "combined" or self.combined is None:
            return None
        return CombinedScore.from_dict(self.combined)

    def compute_base_scores(self, **inputs: Any) -> dict[str, np.ndarray]:
        """The base scores at this gate's temperatures and ``knn_k``.

        Args:
            **inputs: Keyword arguments of :func:`hybridcls.gate.scores.compute_scores`
                (``sup_logits``, ``sup_features``, ``clip_logits``, ``n_seen``, ``clip_emb``,
                ``knn_index``, ``backbone_index``).

        Returns:
            ``{name: [N] scores}`` for :attr:`base_scores`: what :func:`finalize` takes.
        """
        return compute_scores(
            self.base_scores, temperature=self.temperature,
            clip_temperature=self.clip_temperature, clip_logit_scale=self.clip_logit_scale,
            knn_k=self.knn_k, **inputs
        )

    def compute_score(self, **inputs: Any) -> np.ndarray:
        """The gate score of each image (a combined score's logit, or the single score).

        Args:
            **inputs: As for :meth:`compute_base_scores`.

        Returns:
            ``[N]`` float64 scores, higher = less like the seen classes.

        Example:
            >>> cal = GateCalibration(score="energy", temperature=2.0)
            >>> cal.compute_score(sup_logits=[[0.0, 0.0]]).round(4).tolist()
            [-1.3863]
        """
        return self.score_from(self.compute_base_scores(**inputs))

    def score_from(self, base_scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """The gate score from base scores already computed (:meth:`compute_base_scores`)."""
        model = self.combined_score()
        return base_scores[self.score] if model is None else model.score(model.matrix_from(base_scores))

    def replace(self, **changes: Any) -> GateCalibration:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields, plus a format version.

        ``n_seen`` is left out while unknown: a ``gate.json`` written before it was recorded
        reads back to the dict it holds, so its ``model_version`` (a hash of it) is unchanged.
        """
        fields_ = asdict(self)
        if fields_["n_seen"] is None:
            del fields_["n_seen"]
        return {"format_version": _FORMAT_VERSION, **fields_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateCalibration:
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error."""
        d = dict(d)
        version = d.pop("format_version", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
            raise CheckpointError(
                f"gate calibration format {version}, this version reads {_FORMAT_VERSION}"
            )
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise CheckpointError(f"gate calibration has unknown field(s): {', '.join(extra)}")
        return cls(**d)

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` (a file, or a run directory to put ``gate.json`` in), atomically.

        Returns:
            The file written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / GATE_FILENAME
        atomic_write_json(path, self.to_dict())  # strict JSON: a threshold not set is null
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> GateCalibration:
        """Read a file written by :meth:`to_json` (or the ``gate.json`` of a run directory).

        Raises:
            CheckpointError: When the file is missing, not JSON, or not a gate calibration.
        """
        path = Path(path)
        if path.is_dir():
            path = path / GATE_FILENAME
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: gate calibration not found") from e
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: not a gate calibration")
        try:
            return cls.from_dict(d)
        except (InputError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from e
