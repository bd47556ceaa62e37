"""The cascade's thresholds: when is the supervised branch sure enough to skip CLIP?

With a gate that reads CLIP's outputs, both towers normally run on every
image. The cascade runs the supervised branch first; an image skips CLIP and
is decided by the supervised branch alone only when both hold:

- its supervised maximum softmax probability (MSP) is above ``cascade_msp``;
- its backbone features lie near the training images': the distance to the
  ``k``-th nearest training image's features is at or below
  ``cascade_distance`` (deep nearest neighbours, Sun et al. 2022), the
  ``DEFAULT_DISTANCE_TPR`` quantile of held-out seen images' distances
  (:func:`hybridcls.gate.threshold_at_tpr`, as for the gate's own threshold).

The second condition catches what the MSP cannot: an image of an unseen class
that the head classifies confidently (and wrongly) still lies away from every
training image in feature space. On the synthetic world it recovered the 2.4
points of harmonic mean the MSP-only cascade lost, for one more percent of
images through CLIP (docs/gate.md).

The MSP threshold must satisfy two conditions, and is the higher of the two:

- on held-out seen images with both towers' outputs, the full hybrid's
  decision equals the supervised branch's in at least ``agreement`` of the
  images above it (:func:`fit_cascade`);
- unseen images must reach CLIP, yet calibration has none. Leave-classes-out
  stand-ins (hidden seen classes, scored by light heads) show how confident a
  supervised head is on classes it never saw: :func:`cascade_seen_share`
  measures, per stand-in problem, which share of the *seen* images' MSP lies
  below the MSP that all but ``miss`` of the stand-in unseen images stay under
  (by default all of them, and the largest share over the problems).
  That share transfers to the real model as a quantile of its held-out seen
  MSP (:func:`threshold_from_seen_share`), the way the gate's TPR does.

Without the stand-in condition, the MSP-only cascade skipped CLIP on unseen
images that the supervised branch got confidently wrong (the harmonic mean fell
by 4 points on the synthetic world). Works on arrays (and a distance callback) only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from hybridcls.errors import InputError
from hybridcls.gate.scores import as_array, msp_score

__all__ = [
    "CASCADE_KNN_K",
    "DEFAULT_AGREEMENT",
    "DEFAULT_DISTANCE_TPR",
    "DEFAULT_MISS",
    "MIN_SEEN_SHARE",
    "cascade_keep",
    "cascade_seen_share",
    "fit_cascade",
    "max_softmax",
    "threshold_from_seen_share",
]

#: Share of the images the cascade keeps whose decision must equal the full hybrid's.
DEFAULT_AGREEMENT = 0.99
#: The least share of held-out seen images whose MSP the cascade threshold must
#: reach, so that at least as many images reach CLIP: stand-ins can look so easy
#: (a head that never saw a class is unsure of all its images) that they ask for
#: no CLIP at all, while real unseen images are often confidently misclassified.
MIN_SEEN_SHARE = 0.5
#: Share of (stand-in) unseen images the cascade may keep away from CLIP: none,
#: because stand-ins are less confident than real unseen images (the backbone
#: was trained on the hidden classes), so any slack there is exceeded on real data.
DEFAULT_MISS = 0.0
#: The neighbour whose feature distance the cascade reads. Small, because a class
#: may have few training images; above 1, so that one stray training image near
#: an unseen class does not vouch for it alone.
CASCADE_KNN_K = 5
#: Share of held-out seen images whose feature distance the cascade's distance
#: threshold keeps at or below it (the others go to CLIP, at a small cost).
DEFAULT_DISTANCE_TPR = 0.95


def max_softmax(sup_logits: Any, temperature: float = 1.0) -> np.ndarray:
    """``[N]`` maximum softmax probability of the supervised logits."""
    return -msp_score(as_array(sup_logits, "sup_logits", ndim=2), temperature)


def fit_cascade(sup_logits: Any, full_pred: Any, *, agreement: float = DEFAULT_AGREEMENT,
                temperature: float = 1.0) -> float:
    """Fit the MSP threshold above which the supervised branch decides alone.

    Args:
        sup_logits: ``[N, S]`` supervised logits of held-out images.
        full_pred: ``[N]`` the full hybrid's predicted column for them (both towers run).
        agreement: Required share, among the images above the threshold, whose
            full-hybrid prediction is the supervised argmax.
        temperature: Softmax temperature (the gate's).

    Returns:
        The threshold: images with MSP strictly above it skip CLIP. 1.0 when no
        confidence level is safe (the cascade then runs CLIP everywhere).

    Example:
        >>> logits = np.array([[5.0, 0.0], [4.0, 0.0], [0.1, 0.0], [0.0, 0.2]])
        >>> round(fit_cascade(logits, [0, 0, 2, 1]), 3)  # the third row went to CLIP
        0.525
    """
    if not 0.0 < agreement <= 1.0:
        raise InputError(f"cascade agreement must be in (0, 1], got {agreement}")
    logits = as_array(sup_logits, "sup_logits", ndim=2)
    pred = as_array(full_pred, "full_pred", ndim=1)
    if len(pred) != len(logits):
        raise InputError(f"full_pred has {len(pred)} rows, sup_logits {len(logits)}")
    msp = max_softmax(logits, temperature)
    order = np.argsort(-msp, kind="stable")
    agree = (pred == logits.argmax(axis=1))[order]
    rate = np.cumsum(agree) / np.arange(1, len(agree) + 1)
    ok = np.flatnonzero(rate >= agreement)
    if not len(ok):
        return 1.0
    k = int(ok[-1]) + 1  # the most confident k images are kept
    # The threshold is the first excluded image's MSP, so ties with it are excluded too.
    return float(msp[order[k]]) if k < len(msp) else 0.0


def cascade_keep(sup_logits: Any, threshold: float, temperature: float = 1.0, *,
                 distance: Callable[[np.ndarray], np.ndarray] | None = None,
                 distance_threshold: float | None = None) -> np.ndarray:
    """``[N]`` True where the supervised branch decides alone, without CLIP.

    Args:
        sup_logits: ``[N, S]`` supervised logits.
        threshold: Kept images have an MSP strictly above it.
        temperature: Softmax temperature of the MSP.
        distance: ``rows -> [len(rows)]`` feature distances of the given row
            indices to the training images; called only for the rows the MSP
            keeps, so that the search costs nothing where CLIP runs anyway.
        distance_threshold: Kept images also have a distance at or below it
            (``None``: the MSP alone decides).

    Example:
        >>> logits = np.array([[9.0, 0.0], [9.0, 0.0], [0.0, 0.0]])
        >>> cascade_keep(logits, 0.9).tolist()
        [True, True, False]
        >>> far = lambda rows: np.where(rows == 1, 1.5, 0.1)  # row 1 is far from training
        >>> cascade_keep(logits, 0.9, distance=far, distance_threshold=0.5).tolist()
        [True, False, False]
    """
    keep = max_softmax(sup_logits, temperature) > threshold
    if distance is not None and distance_threshold is not None and keep.any():
        rows = np.flatnonzero(keep)
        d = np.asarray(distance(rows), dtype=np.float64)
        # NaN (a non-finite feature row) fails the comparison: such images go to CLIP
        keep[rows] = d <= distance_threshold
    return keep


def cascade_seen_share(msp_seen: Any, msp_unseen: Any, *, miss: float = DEFAULT_MISS) -> float:
    """Share of seen images that must reach CLIP so that unseen ones do, on one stand-in problem.

    Args:
        msp_seen: ``[Ns]`` a head's maximum softmax probability on images of its own classes.
        msp_unseen: ``[Nu]`` the same head's MSP on images of classes it was not trained on.
        miss: Share of the unseen images allowed above the threshold (kept from CLIP).

    Returns:
        The fraction of ``msp_seen`` at or below the ``1 - miss`` quantile of
        ``msp_unseen`` (the threshold that lets ``1 - miss`` of the unseen images reach CLIP).

    Example:
        >>> cascade_seen_share([0.5, 0.9, 0.95, 0.99], [0.3, 0.6, 0.92], miss=0.0)
        0.5
    """
    seen = as_array(msp_seen, "msp_seen", ndim=1)
    unseen = as_array(msp_unseen, "msp_unseen", ndim=1)
    if not 0.0 <= miss < 1.0:
        raise InputError(f"cascade miss rate must be in [0, 1), got {miss}")
    if not len(seen) or not len(unseen):
        raise InputError("cascade_seen_share needs seen and unseen images")
    bound = float(np.quantile(unseen, 1.0 - miss, method="inverted_cdf"))
    return float(np.mean(seen <= bound))


def threshold_from_seen_share(msp_seen: Any, share: float) -> float:
    """The MSP at or below which ``share`` of the real model's held-out seen images fall.

    Example:
        >>> threshold_from_seen_share([0.2, 0.4, 0.6, 0.8], 0.5)
        0.4
    """
    seen = as_array(msp_seen, "msp_seen", ndim=1)
    if share <= 0.0:
        return 0.0
    return float(np.quantile(seen, min(share, 1.0), method="inverted_cdf"))
