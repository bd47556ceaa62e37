"""How well a gate separates seen from unseen images, and the stacking trade-off curve.

- Detection figures (:func:`gate_detection`), each named by its convention.
  The field's (OpenOOD's ``openood/evaluators/metrics.py`` since v1.5,
  pytorch-ood's ``OODMetrics``) counts the **unseen (OOD) images as
  positives**: FPR at 95% TPR is the share of seen images flagged unseen
  when 95% of the unseen images are; AUPR-In (seen positive) and AUPR-Out
  (unseen positive) integrate the precision-recall curve with the
  trapezoid rule (``sklearn.metrics.auc(recall, precision)``). The
  seen-positive FPR (the share of unseen images kept with the seen ones when
  95% of those are) and scikit-learn's average precision (a step-wise sum,
  which differs from the trapezoid when scores tie) are reported beside
  them under their own names. AUROC is the same whichever side is positive.
- Open-set classification (:func:`open_set_classification`): OSCR, the area
  under the Open-Set Classification Rate curve of Dhamija et al., "Reducing
  Network Agnostophobia" (NeurIPS 2018), and the correct classification rate
  (CCR) at fixed FPRs, as OpenOOD reports them (``ccr_fpr`` at 1e-1 ... 1e-4).
- The routing matrix of a hard gate.
- AUSUC (Chao et al. 2016): the area under the seen-accuracy vs
  unseen-accuracy curve traced by calibrated stacking's penalty.
- S / U / H on integer class indices, vectorised for the calibration grid.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from hybridcls.errors import InputError
from hybridcls.gate.scores import as_array

__all__ = [
    "CCR_FPRS",
    "GateDetection",
    "OpenSetClassification",
    "RoutingMatrix",
    "StackingCurve",
    "as_class_indices",
    "as_flags",
    "ausuc",
    "gate_detection",
    "harmonic_mean",
    "open_set_classification",
    "routing_matrix",
    "seen_unseen_accuracy",
]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _numpy(values: Any) -> np.ndarray:
    """Any array-like as numpy; torch tensors are detached and moved to the CPU (duck-typed)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def as_flags(values: Any, name: str) -> np.ndarray:
    """Booleans given as booleans or as 0 / 1, as a bool array; anything else refused.

    ``np.asarray(values, dtype=bool)`` would take 2 and NaN for True: a mask
    built from the wrong column would pass unnoticed.

    Args:
        values: Array-like of True / False, or of the numbers 0 and 1.
        name: The parameter, for messages.

    Returns:
        A bool array of the same shape.

    Raises:
        InputError: NaN values (counted), other values than 0 and 1 (counted,
            the first shown), or values that are not numbers (strings...).

    Example:
        >>> as_flags([0, 1, 1.0], "is_unseen").tolist()
        [False, True, True]
    """
    arr = _numpy(values)
    if arr.dtype == bool:
        return arr
    if arr.dtype == object:  # mixed Python values: numbers and bools only
        strangers = [v for v in arr.flat if not isinstance(v, (numbers.Real, np.bool_))]
        if strangers:
            raise InputError(f"{name}: expected booleans (True/False or 1/0), found {strangers[0]!r}")
        arr = arr.astype(np.float64)
    if arr.dtype.kind not in "iuf":
        raise InputError(f"{name} has values of type {arr.dtype}: expected booleans "
                         "(True/False or 1/0)")
    if arr.dtype.kind == "f":
        n_nan = int(np.isnan(arr).sum())
        if n_nan:
            raise InputError(f"{name} contains {_plural(n_nan, 'NaN value')}: expected booleans "
                             "(True/False or 1/0)")
    other = (arr != 0) & (arr != 1)
    if other.any():
        raise InputError(f"{name} contains {_plural(int(other.sum()), 'value')} other than "
                         f"True/False (1/0), e.g. {arr[other].flat[0].item()!r}")
    return arr == 1


def as_class_indices(values: Any, name: str) -> np.ndarray:
    """Class indices given as whole numbers (integers, or floats with no fraction), as int64.

    ``np.asarray(values, dtype=np.int64)`` would turn 1.7 into 1 and NaN into
    an arbitrary number, with a RuntimeWarning at best.

    Args:
        values: Array-like of class indices.
        name: The parameter, for messages.

    Returns:
        An int64 array of the same shape.

    Raises:
        InputError: NaN or infinite values, values with a fraction (each
            counted), or values that are not numbers.

    Example:
        >>> as_class_indices([0, 2.0, -1], "y_pred").tolist()
        [0, 2, -1]
    """
    arr = _numpy(values)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype == object:  # mixed Python values: numbers only
        strangers = [v for v in arr.flat if not isinstance(v, numbers.Real)]
        if strangers:
            raise InputError(f"{name}: expected class indices (whole numbers), found {strangers[0]!r}")
        arr = arr.astype(np.float64)
    if arr.dtype.kind != "f":
        raise InputError(f"{name} has values of type {arr.dtype}: expected class indices "
                         "(whole numbers)")
    for what, bad in (("NaN value", np.isnan(arr)), ("infinite value", np.isinf(arr))):
        if bad.any():
            raise InputError(f"{name} contains {_plural(int(bad.sum()), what)}: expected class "
                             "indices (whole numbers)")
    fraction = arr != np.round(arr)
    if fraction.any():
        raise InputError(f"{name} contains {_plural(int(fraction.sum()), 'value')} that "
                         f"{'is' if fraction.sum() == 1 else 'are'} not a whole number, "
                         f"e.g. {arr[fraction].flat[0].item()!r}: expected class indices")
    return arr.astype(np.int64)


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)``: the GZSL H of seen and unseen accuracy (Xian et al. 2018).

    0 when both are 0; NaN when either is (a group without images).

    Example:
        >>> harmonic_mean(0.5, 1.0)
        0.6666666666666666
    """
    if np.isnan(a) or np.isnan(b):
        return float("nan")
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


@dataclass(frozen=True)
class GateDetection:
    """Seen-vs-unseen detection figures of a gate score; each name says its convention.

    Attributes:
        auroc: Area under the ROC curve (the same with either side positive).
        aupr_in_trapezoid: Area under the precision-recall curve with the
            seen images positive, trapezoid rule (the field's AUPR-In).
        aupr_out_trapezoid: The same with the unseen images positive (AUPR-Out).
        aupr_in_average_precision: scikit-learn's average precision, seen positive.
        aupr_out_average_precision: The same, unseen positive.
        fpr_at_tpr_unseen_positive: The field's FPR at ``tpr`` TPR: the share of
            seen images flagged unseen when ``tpr`` of the unseen images are.
        fpr_at_tpr_seen_positive: The share of unseen images kept with the seen
            ones when ``tpr`` of the seen images are kept.
        tpr: The true-positive rate the two FPRs are read at.
    """

    auroc: float
    aupr_in_trapezoid: float
    aupr_out_trapezoid: float
    aupr_in_average_precision: float
    aupr_out_average_precision: float
    fpr_at_tpr_unseen_positive: float
    fpr_at_tpr_seen_positive: float
    tpr: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def gate_detection(scores: Any, is_unseen: Any, tpr: float = 0.95) -> GateDetection:
    """AUROC, AUPR-In/Out and FPR at a TPR of a gate score (see the module docstring).

    Formulas as in OpenOOD (``auc_and_fpr_recall``) and pytorch-ood
    (``OODMetrics``, ``fpr_at_tpr``): the FPR is read at the first operating
    point (the ROC curve of every threshold) whose TPR reaches ``tpr``.

    Args:
        scores: ``[N]`` gate scores, higher = less like the seen classes; finite.
        is_unseen: ``[N]`` booleans (or 0 / 1), True for images of unseen classes; both
            kinds present.
        tpr: The true-positive rate at which to read the FPRs, in (0, 1] (0.95, not 95).

    Returns:
        A :class:`GateDetection`.

    Raises:
        InputError: NaN or infinite scores, labels that are not booleans
            (:func:`as_flags`), not one per score or all
            of one kind, or ``tpr`` outside (0, 1] (names the parameter).

    Example:
        >>> d = gate_detection([0.1, 0.2, 0.9, 0.8], [False, False, True, True])
        >>> d.auroc, d.fpr_at_tpr_unseen_positive
        (1.0, 0.0)
    """
    tpr = _rate(tpr, "tpr")
    s, unseen = _scores_of_both_groups(scores, is_unseen, "detection")
    seen = ~unseen
    return GateDetection(
        auroc=float(roc_auc_score(unseen, s)),
        aupr_in_trapezoid=_aupr_trapezoid(seen, -s),
        aupr_out_trapezoid=_aupr_trapezoid(unseen, s),
        aupr_in_average_precision=float(average_precision_score(seen, -s)),
        aupr_out_average_precision=float(average_precision_score(unseen, s)),
        fpr_at_tpr_unseen_positive=_fpr_at_tpr(unseen, s, tpr),
        fpr_at_tpr_seen_positive=_fpr_at_tpr(seen, -s, tpr),
        tpr=tpr,
    )


def _scores_of_both_groups(scores: Any, is_unseen: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite scores and their is-unseen flags, one per score, both groups present.

    Raises:
        InputError: as :func:`gate_detection` says; ``what`` names the figure that needs
            both groups.
    """
    s = _finite(scores, "scores")
    unseen = as_flags(is_unseen, "is_unseen")
    if unseen.shape != s.shape:
        raise InputError(f"is_unseen has shape {unseen.shape} for scores of shape {s.shape}: "
                         "one label per score")
    if unseen.all() or not unseen.any():
        raise InputError(f"is_unseen: all {unseen.size} images are {'un' if unseen.any() else ''}seen; "
                         f"{what} needs both seen and unseen images")
    return s, unseen


def _aupr_trapezoid(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve by the trapezoid rule (OpenOOD, pytorch-ood)."""
    precision, recall, _ = precision_recall_curve(positive, score)
    return float(auc(recall, precision))


def _fpr_at_tpr(positive: np.ndarray, score: np.ndarray, tpr: float) -> float:
    """FPR at the first ROC operating point whose TPR reaches ``tpr`` (``score`` higher = positive)."""
    fpr, tpr_curve, _ = roc_curve(positive, score, drop_intermediate=False)
    # tpr_curve rises to 1.0 and tpr <= 1, so the index is on the curve
    return float(fpr[int(np.searchsorted(tpr_curve, tpr, side="left"))])


def _rate(value: Any, name: str) -> float:
    """``value`` as a float in (0, 1]; an InputError naming ``name`` otherwise (95 for 0.95...)."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = float("nan")
    if not 0.0 < rate <= 1.0:  # NaN fails too
        raise InputError(f"{name}={value!r}: expected a rate in (0, 1]")
    return rate


def _finite(values: Any, name: str, ndim: int = 1) -> np.ndarray:
    """``values`` as float64 of ``ndim`` dimensions; an InputError counting NaN / infinite entries."""
    arr = as_array(values, name, ndim=ndim)
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise InputError(f"{name} contains {n_nan} NaN value{'s' if n_nan > 1 else ''}")
    n_inf = int(np.isinf(arr).sum())
    if n_inf:
        raise InputError(f"{name} contains {n_inf} infinite value{'s' if n_inf > 1 else ''}")
    return arr


#: The FPRs the CCR is read at: OpenOOD's ``ccr_1`` ... ``ccr_4`` (Dhamija et al.'s figures go
#: down to 1e-4 too).
CCR_FPRS = (1e-1, 1e-2, 1e-3, 1e-4)


@dataclass(frozen=True)
class OpenSetClassification:
    """How well classification and rejection work together (Dhamija et al. 2018).

    A seen (known) image counts as correct when the gate accepts it (its score is
    at most the threshold) and its class is right; an unseen (unknown) image counts
    as a false positive when the gate accepts it.

    Attributes:
        oscr: Area under the curve of the correct classification rate (CCR, over
            the seen images) against the false positive rate (FPR, over the unseen
            images), every threshold an operating point, trapezoid rule; at most
            ``closed_set_accuracy``.
        ccr_at_fpr: ``{fpr: CCR}``: the highest CCR at an FPR of at most ``fpr``
            (keys as written, ``"0.1"``, ``"0.01"``, ...).
        closed_set_accuracy: Accuracy over the seen images (the CCR when every image
            is accepted).
    """

    oscr: float
    ccr_at_fpr: dict[str, float]
    closed_set_accuracy: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_set_classification(scores: Any, correct: Any, is_unseen: Any,
                            fprs: Any = CCR_FPRS) -> OpenSetClassification:
    """OSCR and the CCR at fixed FPRs of a gate score and a closed-set classifier.

    The OSCR curve (Dhamija et al., "Reducing Network Agnostophobia", NeurIPS 2018)
    is the ROC curve of the seen images classified correctly against the unseen
    images (scikit-learn's ``roc_curve``, every distinct score a threshold, so
    that ties between the two make a diagonal segment), its true-positive rate
    scaled by the share of seen images classified correctly; its area is the
    OSCR. The same convention as pytorch-ood's ``oscr_score``.

    Args:
        scores: ``[N]`` gate scores, higher = less like the seen classes; finite.
        correct: ``[N]`` booleans (or 0 / 1): the closed-set prediction is right (read
            for seen images only).
        is_unseen: ``[N]`` booleans (or 0 / 1), True for images of unseen classes; both
            kinds present.
        fprs: The FPRs to read the CCR at, each in (0, 1].

    Returns:
        An :class:`OpenSetClassification`.

    Raises:
        InputError: NaN or infinite scores, flags that are not booleans, not one per
            score or all of one kind, or an FPR outside (0, 1] (names the parameter).

    Example:
        >>> r = open_set_classification([0.1, 0.2, 0.3, 0.9], [True, False, True, False],
        ...                             [False, False, False, True])
        >>> round(r.oscr, 4), r.ccr_at_fpr["0.1"], round(r.closed_set_accuracy, 4)
        (0.6667, 0.6666666666666666, 0.6667)
    """
    rates = [_rate(f, "fprs") for f in np.atleast_1d(np.asarray(fprs, dtype=object))]
    s, unseen = _scores_of_both_groups(scores, is_unseen, "open-set classification")
    right = as_flags(correct, "correct")
    if right.shape != s.shape:
        raise InputError(f"correct has shape {right.shape} for scores of shape {s.shape}: "
                         "one flag per score")
    known_right = ~unseen & right
    accuracy = float(known_right.sum() / (~unseen).sum())
    if not known_right.any():  # nothing to accept correctly: the curve lies on CCR = 0
        return OpenSetClassification(0.0, {f"{f:g}": 0.0 for f in rates}, accuracy)
    # The curve only moves at the scores of correct seen images and of unseen ones.
    keep = known_right | unseen
    fpr, tpr, _ = roc_curve(known_right[keep], -s[keep], drop_intermediate=False)
    ccr = tpr * accuracy
    # the last operating point (FPR and CCR both rise along the curve) with FPR <= f
    at = {f"{f:g}": float(ccr[int(np.searchsorted(fpr, f * (1 + 1e-12), side="right")) - 1])
          for f in rates}
    return OpenSetClassification(float(auc(fpr, ccr)), at, accuracy)


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
        to_zeroshot: ``[N]`` booleans (or 0 / 1) from :func:`hybridcls.gate.fusion.route`.
        is_unseen: ``[N]`` booleans (or 0 / 1), True for images of unseen classes.

    Raises:
        InputError: values that are not booleans (:func:`as_flags`),
            or the two of different shapes.

    Example:
        >>> routing_matrix([True, False, True], [True, True, False]).unseen_to_supervised
        1
    """
    z = as_flags(to_zeroshot, "to_zeroshot")
    u = as_flags(is_unseen, "is_unseen")
    if z.shape != u.shape:
        raise InputError(f"to_zeroshot has shape {z.shape}, is_unseen {u.shape}: one label per decision")
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

    Raises:
        InputError: ``y_true`` and ``y_pred`` not two 1-D arrays of one length,
            values that are not whole numbers (NaN counted,
            :func:`as_class_indices`), a negative true
            class, a prediction below -1, or ``n_seen`` not a whole number >= 0.
    """
    y = as_class_indices(y_true, "y_true")
    p = as_class_indices(y_pred, "y_pred")
    if y.ndim != 1 or p.shape != y.shape:
        raise InputError(f"y_true has shape {y.shape}, y_pred {p.shape}: one prediction per label")
    if isinstance(n_seen, bool) or not isinstance(n_seen, (int, np.integer)) or n_seen < 0:
        raise InputError(f"n_seen={n_seen!r}: expected a whole number, 0 or more")
    if y.size and y.min() < 0:
        raise InputError(f"y_true contains {int((y < 0).sum())} negative class indices")
    if p.size and p.min() < -1:
        raise InputError(f"y_pred contains {int((p < -1).sum())} values below -1 (-1 = unknown)")
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

    Raises:
        InputError: NaN or infinite logits, labels that are not whole numbers,
            not one per row or outside the columns, or ``n_seen`` leaving no seen
            or no unseen class.

    Example:
        >>> c = np.array([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
        >>> ausuc(c, [0, 2], n_seen=2).area
        1.0
    """
    c = _finite(clip_logits, "clip_logits", ndim=2)
    y = as_class_indices(y_true, "y_true")
    if y.shape != (c.shape[0],):
        raise InputError(f"{y.size} labels for {c.shape[0]} rows of clip_logits")
    if not 0 < n_seen < c.shape[1]:
        raise InputError(f"n_seen={n_seen} of {c.shape[1]} classes: no seen or no unseen class")
    outside = int(((y < 0) | (y >= c.shape[1])).sum())
    if outside:
        raise InputError(f"y_true contains {outside} class indices outside 0..{c.shape[1] - 1}")
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
    area = float(auc(unseen_acc, seen_acc))  # unseen accuracy rises with the penalty
    return StackingCurve(
        area=area, penalties=penalties, seen_accuracy=seen_acc, unseen_accuracy=unseen_acc
    )
