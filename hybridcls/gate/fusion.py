"""Fusion: turn both branches' logits and a gate score into one distribution per image.

Three decision modes, all producing ``probs [N, C]`` over every class in the
``classes_`` order (the S seen classes first, then the unseen ones):

- ``hard``: an image whose gate score is above the threshold goes to the
  zero-shot branch (softmax over the unseen columns, or over all columns);
  every other image gets the supervised softmax on the seen columns. The
  zero-shot logits of images kept in the supervised branch are never read,
  so the zero-shot model may run on the routed images only.
- ``soft``: a gate weight ``g = sigmoid((score - threshold) / scale)`` mixes
  ``(1 - g) * [p_sup, 0] + g * [0, p_clip_unseen]``.
- ``stacking``: calibrated stacking (Chao et al. 2016): the zero-shot softmax
  over all classes after subtracting a penalty from the seen classes' logits.

Optionally an image for which no branch's top probability reaches
``unknown_threshold`` is marked ``"unknown"`` (a top probability equal to it
is not unknown).

The gate's rules are written once, in :func:`route_mask` (hard) and
:func:`soft_weight` (soft), and calibration's search scores its candidates
with the same functions, so the gate calibration scores is the gate that runs.
A NaN gate score (nothing measured) stays in the supervised branch in every
mode. Logits may hold ``-inf`` (a masked class) and ``+inf``: probabilities
come from :func:`hybridcls.gate.scores.softmax_rows`, never NaN for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from hybridcls.errors import InputError
from hybridcls.gate.config import MODES, GateCalibration
from hybridcls.gate.scores import as_array, clip_margin_score, softmax_rows

__all__ = [
    "BRANCHES",
    "FusionResult",
    "fuse",
    "fuse_zeroshot",
    "hard_probs",
    "route",
    "route_mask",
    "soft_decision_score",
    "soft_probs",
    "soft_weight",
    "stacking_probs",
    "topk",
]

BRANCHES = ("supervised", "zeroshot", "mixed", "unknown")


@dataclass
class FusionResult:
    """Fused predictions for N images.

    Attributes:
        probs: ``[N, C]`` probabilities over all classes (seen columns first); rows sum to 1.
        branch: ``[N]`` strings from :data:`BRANCHES`: who decided each image.
        gate_weight: ``[N]`` weight of the zero-shot branch in the row (0 or 1 when
            hard, ``g`` when soft, 1 for stacking).
        gate_score: ``[N]`` the gate score used (for stacking: the ``clip_margin``).
        sup_probs: ``[N, S]`` supervised softmax over the seen classes, or ``None``.
        clip_probs: ``[N, C]`` zero-shot softmax over all classes; NaN rows where the
            zero-shot branch did not run; ``None`` when it ran on no image.
    """

    probs: np.ndarray
    branch: np.ndarray
    gate_weight: np.ndarray
    gate_score: np.ndarray
    sup_probs: np.ndarray | None
    clip_probs: np.ndarray | None

    @property
    def pred(self) -> np.ndarray:
        """``[N]`` column index of the predicted class; -1 where the branch is ``unknown``."""
        return np.where(self.branch == "unknown", -1, self.probs.argmax(axis=1))


def topk(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest probabilities per row, best first, NaN rows giving NaN values.

    Args:
        probs: ``[N, C]`` probabilities (a branch's, or the fused ones).
        k: How many (clipped to C).

    Returns:
        ``(indices [N, k], values [N, k])``; indices of NaN rows are -1.

    Example:
        >>> topk(np.array([[0.1, 0.7, 0.2]]), 2)[0].tolist()
        [[1, 2]]
    """
    k = min(k, probs.shape[1])
    nan_rows = np.isnan(probs).any(axis=1)
    safe = np.where(nan_rows[:, None], 0.0, probs)
    idx = np.argsort(-safe, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(safe, idx, axis=1)
    idx[nan_rows] = -1
    vals[nan_rows] = np.nan
    return idx, vals


def route_mask(gate_score: np.ndarray, threshold: float) -> np.ndarray:
    """The hard gate's rule: ``[N]`` True (to the zero-shot branch) where ``score > threshold``.

    A score equal to the threshold stays in the supervised branch, as does a NaN
    score: the threshold is the largest score kept (:func:`hybridcls.gate.threshold_at_tpr`).
    Calibration's search and :func:`route` both decide through it.

    Example:
        >>> route_mask(np.array([-1.0, 0.0, np.nan, np.inf]), 0.0).tolist()
        [False, False, False, True]
    """
    with np.errstate(invalid="ignore"):  # NaN compares False: kept
        return np.asarray(gate_score) > threshold


def soft_weight(gate_score: np.ndarray, threshold: float, scale: float) -> np.ndarray:
    """The soft gate's weight of the zero-shot branch, ``sigmoid((score - threshold) / scale)``.

    0.5 at the threshold, 1 at ``+inf``, 0 at ``-inf`` and for a NaN score (kept in
    the supervised branch, as in hard routing). Calibration's search and
    :func:`fuse` both weigh through it.

    Example:
        >>> soft_weight(np.array([0.0, np.inf, np.nan]), 0.0, 1.0).tolist()
        [0.5, 1.0, 0.0]
    """
    s = np.asarray(gate_score, dtype=np.float64)
    return np.where(np.isnan(s), 0.0, expit((s - threshold) / scale))


def soft_decision_score(gate_score: Any, sup_probs: Any, unseen_probs: Any,
                        scale: float) -> np.ndarray:
    """``[N]`` the score whose hard routing at the soft gate's threshold gives soft mode's answers.

    Soft mode answers an unseen class exactly when ``g max(p_unseen) > (1 - g) max(p_sup)``
    (on a tie the seen column comes first), with ``g = sigmoid((s - threshold) / scale)``:
    that is, when ``s - scale * log(max p_sup / max p_unseen) > threshold``. So soft mode's
    answers are hard routing on this score, at the same threshold, with the same two
    answers; what the bench's threshold bounds read (``hybridcls.bench.zoo``).

    Args:
        gate_score: ``[N]`` gate scores (NaN: kept in the supervised branch, as there).
        sup_probs: ``[N, S]`` the supervised softmax soft mode mixes (at the fusion temperature).
        unseen_probs: ``[N, U]`` the zero-shot softmax over the unseen classes.
        scale: The soft gate's scale (``soft_scale``), in score units.

    Returns:
        ``[N]`` scores, in the gate score's units.

    Example:
        >>> soft_decision_score(np.array([0.0, 0.0]), np.array([[0.9, 0.1], [0.5, 0.5]]),
        ...                     np.array([[0.9, 0.1], [1.0, 0.0]]), 1.0).round(3).tolist()
        [0.0, 0.693]
    """
    s = as_array(gate_score, "gate_score", ndim=1)
    sup = as_array(sup_probs, "sup_probs").max(axis=1)
    unseen = as_array(unseen_probs, "unseen_probs").max(axis=1)
    with np.errstate(divide="ignore"):
        return s - scale * (np.log(sup) - np.log(unseen))


def route(gate_score: Any, calibration: GateCalibration) -> np.ndarray:
    """Which images a hard gate sends to the zero-shot branch.

    Args:
        gate_score: ``[N]`` gate scores (higher = less like the seen classes).
        calibration: A finalised calibration (its ``threshold`` is set).

    Returns:
        ``[N]`` boolean ``to_zeroshot``: score strictly above the threshold
        (:func:`route_mask`). A score equal to it, or NaN, stays in the supervised branch.

    Example:
        >>> cal = GateCalibration(score="energy", threshold=0.0)
        >>> route(np.array([-1.0, 0.0, 2.0]), cal).tolist()
        [False, False, True]
    """
    return route_mask(as_array(gate_score, "gate_score", ndim=1), _threshold(calibration))


def hard_probs(
    sup_logits: np.ndarray,
    clip_routed: np.ndarray,
    to_zeroshot: np.ndarray,
    *,
    temperature: float = 1.0,
    unseen_only: bool = True,
) -> np.ndarray:
    """Hard routing's distribution.

    Args:
        sup_logits: ``[N, S]`` supervised logits.
        clip_routed: ``[n_routed, C]`` zero-shot logits of the routed images only, in order.
        to_zeroshot: ``[N]`` boolean routing mask.
        temperature: Supervised softmax temperature.
        unseen_only: Routed images are classified over the unseen columns only.

    Returns:
        ``[N, C]`` probabilities.
    """
    n, s = sup_logits.shape
    c = clip_routed.shape[1]
    probs = np.zeros((n, c))
    keep = ~to_zeroshot
    probs[keep, :s] = softmax_rows(sup_logits[keep] / temperature)
    if unseen_only:
        probs[to_zeroshot, s:] = softmax_rows(clip_routed[:, s:])
    else:
        probs[to_zeroshot] = softmax_rows(clip_routed)
    return probs


def soft_probs(
    sup_logits: np.ndarray,
    clip_logits: np.ndarray,
    gate_weight: np.ndarray,
    *,
    temperature: float = 1.0,
) -> np.ndarray:
    """Soft mixture ``(1 - g) * [p_sup, 0] + g * [0, p_clip_unseen]``.

    Args:
        sup_logits: ``[N, S]`` supervised logits.
        clip_logits: ``[N, C]`` zero-shot logits, seen columns first.
        gate_weight: ``[N]`` weight ``g`` of the zero-shot branch.
        temperature: Supervised softmax temperature.

    Returns:
        ``[N, C]`` probabilities.
    """
    s = sup_logits.shape[1]
    g = gate_weight[:, None]
    # a row of weight 0 takes nothing from the zero-shot branch, even a NaN row (not run there)
    zeroshot = np.where(g > 0, g * softmax_rows(clip_logits[:, s:]), 0.0)
    return np.concatenate([(1.0 - g) * softmax_rows(sup_logits / temperature), zeroshot], axis=1)


def stacking_probs(clip_logits: np.ndarray, penalty: float, n_seen: int) -> np.ndarray:
    """Calibrated stacking (Chao et al. 2016): softmax after ``seen logits - penalty``.

    Args:
        clip_logits: ``[N, C]`` zero-shot logits, seen columns first.
        penalty: Subtracted from the first ``n_seen`` columns.
        n_seen: Number of seen classes.

    Returns:
        ``[N, C]`` probabilities.
    """
    adjusted = clip_logits.copy()
    adjusted[:, :n_seen] -= penalty
    return softmax_rows(adjusted)


def fuse(
    mode: str | None,
    *,
    sup_logits: Any = None,
    clip_logits: Any = None,
    gate_score: Any = None,
    calibration: GateCalibration,
    n_seen: int | None = None,
) -> FusionResult:
    """Combine both branches into one distribution per image.

    Args:
        mode: ``"hard"``, ``"soft"``, ``"stacking"``, or ``None`` for ``calibration.mode``.
        sup_logits: ``[N, S]`` supervised logits (needed by hard and soft; optional for stacking).
        clip_logits: Zero-shot logits over all C classes. Hard mode reads only the
            routed rows: pass ``[N, C]`` (other rows may be NaN) or just the routed
            rows ``[n_routed, C]`` in order (``[0, C]`` when none is routed).
        gate_score: ``[N]`` calibrated gate scores (hard, soft); stacking uses the
            ``clip_margin`` and computes it when this is ``None``.
        calibration: A finalised :class:`GateCalibration`.
        n_seen: Number of seen classes; defaults to ``sup_logits``' width.

    Returns:
        A :class:`FusionResult`.

    Raises:
        InputError: On missing inputs, mismatched shapes or an unfinalised calibration.

    Example:
        >>> cal = GateCalibration(score="energy", threshold=0.0)
        >>> r = fuse("hard", sup_logits=np.array([[3.0, 0.0], [3.0, 0.0]]),
        ...          clip_logits=np.array([[np.nan] * 3, [0.0, 0.0, 5.0]]),
        ...          gate_score=np.array([-1.0, 1.0]), calibration=cal)
        >>> r.branch.tolist(), r.pred.tolist()
        (['supervised', 'zeroshot'], [0, 2])
    """
    mode = calibration.mode if mode is None else mode
    if mode not in MODES:
        raise InputError(f"gate mode {mode!r}: choose from {', '.join(MODES)}")
    sup = None if sup_logits is None else as_array(sup_logits, "sup_logits")
    clip = None if clip_logits is None else as_array(clip_logits, "clip_logits")
    if n_seen is None:
        if sup is None:
            raise InputError("n_seen is needed when sup_logits is not given")
        n_seen = sup.shape[1]
    if clip is None:
        raise InputError(f"{mode} fusion needs clip_logits ([0, C] when no image is routed)")
    if not 0 < n_seen < clip.shape[1]:
        raise InputError(
            f"n_seen={n_seen} but clip_logits has {clip.shape[1]} classes: no unseen class"
        )
    if sup is not None and sup.shape[1] != n_seen:
        raise InputError(f"sup_logits has {sup.shape[1]} columns for {n_seen} seen classes")
    t = calibration.fusion_temperature

    if mode == "stacking":
        penalty = calibration.stacking_penalty
        if penalty is None:
            penalty = -_threshold(calibration)
        probs = stacking_probs(clip, penalty, n_seen)
        score = (
            clip_margin_score(clip, n_seen)
            if gate_score is None
            else as_array(gate_score, "gate_score", 1)
        )
        n = probs.shape[0]
        branch = np.full(n, "zeroshot", dtype=object)
        weight = np.ones(n)
        clip_probs = softmax_rows(clip)
        clip_conf = probs.max(axis=1)  # the stacked distribution is the zero-shot branch's answer
    else:
        if sup is None or gate_score is None:
            raise InputError(f"{mode} fusion needs sup_logits and gate_score")
        score = as_array(gate_score, "gate_score", ndim=1)
        n = sup.shape[0]
        if score.shape[0] != n:
            raise InputError(f"{score.shape[0]} gate scores for {n} images")
        if mode == "hard":
            to_zs = route(score, calibration)
            clip_routed = _routed_rows(clip, to_zs)
            probs = hard_probs(
                sup, clip_routed, to_zs, temperature=t, unseen_only=calibration.unseen_only
            )
            branch = np.where(to_zs, "zeroshot", "supervised").astype(object)
            weight = to_zs.astype(np.float64)
            clip_probs = np.full((n, clip.shape[1]), np.nan)
            clip_probs[to_zs] = softmax_rows(clip_routed)
            cols = slice(n_seen, None) if calibration.unseen_only else slice(None)
            clip_conf = np.full(n, np.nan)
            clip_conf[to_zs] = softmax_rows(clip_routed[:, cols]).max(axis=1)
        else:  # soft
            if clip.shape[0] != n:
                raise InputError(f"soft fusion needs clip_logits for all {n} images")
            if calibration.soft_scale is None or calibration.soft_scale <= 0:
                raise InputError(
                    "soft fusion needs a positive soft_scale: finalize the calibration"
                )
            weight = soft_weight(score, _threshold(calibration), calibration.soft_scale)
            probs = soft_probs(sup, clip, weight, temperature=t)
            branch = np.full(n, "mixed", dtype=object)
            clip_probs = softmax_rows(clip)
            clip_conf = softmax_rows(clip[:, n_seen:]).max(axis=1)

    sup_probs = None if sup is None else softmax_rows(sup / t)
    if calibration.unknown_threshold is not None:
        # stacking's answer is the zero-shot one alone
        sup_conf = np.full(n, np.nan)
        if sup_probs is not None and mode != "stacking":
            sup_conf = sup_probs.max(axis=1)
        _mark_unknown(branch, np.fmax(sup_conf, clip_conf), calibration.unknown_threshold)
    return FusionResult(
        probs=probs,
        branch=branch,
        gate_weight=weight,
        gate_score=score,
        sup_probs=sup_probs,
        clip_probs=clip_probs,
    )


def fuse_zeroshot(clip_logits: Any, *, unknown_threshold: float | None = None) -> FusionResult:
    """The zero-shot branch alone: a gate with no seen classes (zero-shot-only prediction).

    Args:
        clip_logits: ``[N, C]`` zero-shot logits over every class.
        unknown_threshold: Answer ``unknown`` where the top probability is below it
            (the same rule as :func:`fuse`'s).

    Returns:
        A :class:`FusionResult` whose probabilities are CLIP's softmax over every class.

    Example:
        >>> r = fuse_zeroshot(np.array([[0.0, 3.0], [0.0, 0.0]]), unknown_threshold=0.6)
        >>> r.pred.tolist(), r.branch.tolist()
        ([1, -1], ['zeroshot', 'unknown'])
    """
    clip = as_array(clip_logits, "clip_logits")
    probs = softmax_rows(clip)
    n = probs.shape[0]
    branch = np.full(n, "zeroshot", dtype=object)
    if unknown_threshold is not None:
        _mark_unknown(branch, probs.max(axis=1), unknown_threshold)
    return FusionResult(probs=probs, branch=branch, gate_weight=np.ones(n),
                        gate_score=np.full(n, np.nan), sup_probs=None, clip_probs=probs)


def _mark_unknown(branch: np.ndarray, best: np.ndarray, threshold: float) -> None:
    """Mark ``unknown`` the rows whose most confident branch's top probability is below ``threshold``.

    One equal to it is confident enough; a branch that did not run on a row (NaN)
    counts as not confident.
    """
    with np.errstate(invalid="ignore"):
        branch[~(best >= threshold)] = "unknown"


def _threshold(calibration: GateCalibration) -> float:
    if not calibration.is_final:
        raise InputError(
            "the gate has no threshold yet: finalize the calibration on held-out seen images"
        )
    assert calibration.threshold is not None
    return calibration.threshold


def _routed_rows(clip: np.ndarray, to_zeroshot: np.ndarray) -> np.ndarray:
    """The zero-shot logits of the routed images, from full rows or routed rows only."""
    n, n_routed = to_zeroshot.shape[0], int(to_zeroshot.sum())
    if clip.shape[0] == n:
        rows = clip[to_zeroshot]
    elif clip.shape[0] == n_routed:
        rows = clip
    else:
        raise InputError(
            f"clip_logits has {clip.shape[0]} rows: "
            f"expected {n} (all images) or {n_routed} (routed ones)"
        )
    if np.isnan(rows).any():
        # NaN = the zero-shot branch did not run there; +-inf logits are values (softmax_rows)
        raise InputError("clip_logits of a routed image is NaN (the zero-shot branch did not run on it)")
    return rows
