"""How well a gate separates seen from unseen images, and the stacking trade-off curve.

- Detection figures with the **seen images as positives** (the OpenOOD
  convention): AUROC, AUPR-In (seen positive), AUPR-Out (unseen positive)
  and the false-positive rate at 95% true-positive rate (the fraction of
  unseen images kept in the supervised branch when 95% of seen images are).
  Gate scores are higher = unseen, so the confidence handed to
  scikit-learn is their negation.
- The routing matrix of a hard gate.
- AUSUC (Chao et al. 2016): the area under the seen-accuracy vs
  unseen-accuracy curve traced by calibrated stacking's penalty.
- S / U / H on integer class indices, vectorised for the calibration grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from hybridcls.errors import InputError
from hybridcls.eval.metrics import harmonic_mean
from hybridcls.gate.scores import as_array

__all__ = [
    "GateDetection",
    "RoutingMatrix",
    "StackingCurve",
    "ausuc",
    "gate_detection",
    "routing_matrix",
    "seen_unseen_accuracy",
]


@dataclass(frozen=True)
class GateDetection:
    """Seen-vs-unseen detection figures of a gate score (seen = positive)."""

    auroc: float
    aupr_in: float
    aupr_out: float
    fpr_at_tpr: float
    tpr: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def gate_detection(scores: Any, is_unseen: Any, tpr: float = 0.95) -> GateDetection:
    """AUROC, AUPR-In/Out and FPR at a TPR for a gate score.

    Args:
        scores: ``[N]`` gate scores, higher = less like the seen classes.
        is_unseen: ``[N]`` booleans, True for images of unseen classes.
        tpr: The true-positive rate (seen images kept) at which to read the FPR.

    Returns:
        A :class:`GateDetection`.

    Example:
        >>> d = gate_detection([0.1, 0.2, 0.9, 0.8], [False, False, True, True])
        >>> d.auroc, d.fpr_at_tpr
        (1.0, 0.0)
    """
    s = as_array(scores, "scores", ndim=1)
    unseen = np.asarray(is_unseen, dtype=bool)
    if unseen.shape != s.shape or unseen.all() or not unseen.any():
        raise InputError(
            "gate_detection needs one label per score, with both seen and unseen images"
        )
    seen, confidence = ~unseen, -s
    fpr, tpr_curve, _ = roc_curve(seen, confidence, drop_intermediate=False)
    # the first operating point that keeps at least `tpr` of the seen images
    at = int(np.searchsorted(tpr_curve, tpr, side="left"))
    return GateDetection(
        auroc=float(roc_auc_score(seen, confidence)),
        aupr_in=float(average_precision_score(seen, confidence)),
        aupr_out=float(average_precision_score(unseen, s)),
        fpr_at_tpr=float(fpr[at]),
        tpr=tpr,
    )


@dataclass(frozen=True)
class RoutingMatrix:
    """Counts of a hard gate's decisions by true group."""

    seen_to_supervised: int
    seen_to_zeroshot: int
    unseen_to_supervised: int
    unseen_to_zeroshot: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def routing_matrix(to_zeroshot: Any, is_unseen: Any) -> RoutingMatrix:
    """Count seen images sent to zero-shot and unseen ones kept in the supervised branch.

    Args:
        to_zeroshot: ``[N]`` booleans from :func:`hybridcls.gate.fusion.route`.
        is_unseen: ``[N]`` booleans, True for images of unseen classes.

    Example:
        >>> routing_matrix([True, False, True], [True, True, False]).unseen_to_supervised
        1
    """
    z = np.asarray(to_zeroshot, dtype=bool)
    u = np.asarray(is_unseen, dtype=bool)
    if z.shape != u.shape:
        raise InputError(f"{z.size} routing decisions for {u.size} labels")
    return RoutingMatrix(
        seen_to_supervised=int(np.sum(~u & ~z)),
        seen_to_zeroshot=int(np.sum(~u & z)),
        unseen_to_supervised=int(np.sum(u & ~z)),
        unseen_to_zeroshot=int(np.sum(u & z)),
    )


def _class_weights(y: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per-image weights that make a sum over a group its mean per-class accuracy."""
    w = np.zeros(y.shape[0])
    classes, counts = np.unique(y[group], return_counts=True)
    if classes.size:
        per_image = dict(
            zip(classes.tolist(), (1.0 / (counts * classes.size)).tolist(), strict=True)
        )
        w[group] = [per_image[c] for c in y[group].tolist()]
    return w


def seen_unseen_accuracy(y_true: Any, y_pred: Any, n_seen: int) -> tuple[float, float, float]:
    """GZSL S, U and H on integer class indices (seen classes are ``< n_seen``).

    The same figures as :func:`hybridcls.eval.metrics.open_set_scores`, on
    indices and without per-call string work, for calibration's grid search.

    Args:
        y_true: ``[N]`` true class indices.
        y_pred: ``[N]`` predicted indices (-1 = unknown, always wrong).
        n_seen: Number of seen classes.

    Returns:
        ``(S, U, H)``; NaN for a group with no image.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    correct = (y == p).astype(np.float64)
    n_classes = int(max(y.max(initial=-1), p.max(initial=-1))) + 1
    hits = np.bincount(y, weights=correct, minlength=n_classes)
    counts = np.bincount(y, minlength=n_classes)
    present = counts > 0
    acc = np.divide(hits, counts, out=np.zeros(n_classes), where=present)
    is_seen = np.arange(n_classes) < n_seen
    s_mask, u_mask = present & is_seen, present & ~is_seen
    s = float(acc[s_mask].mean()) if s_mask.any() else float("nan")
    u = float(acc[u_mask].mean()) if u_mask.any() else float("nan")
    return s, u, harmonic_mean(s, u)


@dataclass(frozen=True)
class StackingCurve:
    """Calibrated stacking's trade-off curve.

    Attributes:
        area: AUSUC, the area under seen accuracy (y) against unseen accuracy (x).
        penalties: ``[P]`` penalties, ascending (the last one is ``inf``).
        seen_accuracy: ``[P]`` mean per-class accuracy of seen images, over all classes.
        unseen_accuracy: ``[P]`` the same for unseen images.
    """

    area: float
    penalties: np.ndarray
    seen_accuracy: np.ndarray
    unseen_accuracy: np.ndarray


def ausuc(clip_logits: Any, y_true: Any, n_seen: int) -> StackingCurve:
    """Area under the seen-unseen accuracy curve of calibrated stacking (Chao et al. 2016).

    An image is predicted as its best seen class while ``penalty <= max_seen -
    max_unseen`` and as its best unseen class beyond, so the curve is exact
    when evaluated at those per-image break points.

    Args:
        clip_logits: ``[N, C]`` zero-shot logits, seen columns first.
        y_true: ``[N]`` true class indices into the columns.
        n_seen: Number of seen classes.

    Returns:
        A :class:`StackingCurve`.

    Example:
        >>> c = np.array([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
        >>> ausuc(c, [0, 2], n_seen=2).area
        1.0
    """
    c = as_array(clip_logits, "clip_logits")
    y = np.asarray(y_true, dtype=np.int64)
    if y.shape != (c.shape[0],):
        raise InputError(f"{y.size} labels for {c.shape[0]} rows of clip_logits")
    if not 0 < n_seen < c.shape[1]:
        raise InputError(f"n_seen={n_seen} of {c.shape[1]} classes: no seen or no unseen class")
    seen_img = y < n_seen
    flip = c[:, :n_seen].max(axis=1) - c[:, n_seen:].max(
        axis=1
    )  # predicted seen iff penalty <= flip
    right_if_seen = (c[:, :n_seen].argmax(axis=1) == y) & seen_img
    right_if_unseen = (n_seen + c[:, n_seen:].argmax(axis=1) == y) & ~seen_img
    w_seen = _class_weights(y, seen_img) * right_if_seen
    w_unseen = _class_weights(y, ~seen_img) * right_if_unseen

    penalties = np.append(np.unique(flip), np.inf)
    order = np.argsort(flip, kind="stable")
    sorted_flip = flip[order]
    # images with flip < penalty are predicted unseen: a prefix of the sorted order
    n_unseen_pred = np.searchsorted(sorted_flip, penalties, side="left")
    cum_seen = np.concatenate([[0.0], np.cumsum(w_seen[order])])
    cum_unseen = np.concatenate([[0.0], np.cumsum(w_unseen[order])])
    seen_acc = cum_seen[-1] - cum_seen[n_unseen_pred]
    unseen_acc = cum_unseen[n_unseen_pred]
    area = float(np.trapezoid(seen_acc, unseen_acc))
    return StackingCurve(
        area=area, penalties=penalties, seen_accuracy=seen_acc, unseen_accuracy=unseen_acc
    )
