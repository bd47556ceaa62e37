"""Accuracy figures for an open-set test set.

Overall accuracy is the challenge's metric (each image counts once). S, U and
H follow the generalised zero-shot protocol of Xian et al. (2018): S is the
mean per-class accuracy over the seen classes' images, U the same over the
unseen classes' images (both judged against *all* classes), and H their
harmonic mean. scikit-learn has no per-class-mean over a class subset, so it
is computed here from its confusion-free definition.

Top-k accuracy (ImageNet's top-5, Russakovsky et al. 2015) counts an image
right when its true class is among its k most probable classes, as the
predictions file ranks them; scikit-learn's ``top_k_accuracy_score`` needs
every class's score, which a predictions file keeps only with
``--all-scores``, so it is computed here from the ranked labels.

The reliability diagram and the expected calibration error (ECE) follow Guo
et al., "On Calibration of Modern Neural Networks" (ICML 2017): the top-1
confidences are put into equal-width bins of (0, 1], and ECE is the
image-weighted mean gap between each bin's accuracy and its mean confidence.
scikit-learn's ``calibration_curve`` drops empty bins and returns no counts,
which ECE needs, so the binning is done here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from hybridcls.errors import InputError
from hybridcls.gate.metrics import as_flags, harmonic_mean

__all__ = [
    "PROBABILITY_TOLERANCE",
    "OpenSetScores",
    "Reliability",
    "open_set_scores",
    "per_class_accuracy",
    "reliability",
    "top_k_accuracy",
]


@dataclass(frozen=True)
class OpenSetScores:
    """Accuracy figures, all in [0, 1] (NaN where a group has no image)."""

    accuracy: float
    seen: float
    unseen: float
    harmonic: float
    n_images: int
    n_seen_images: int
    n_unseen_images: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def summary(self) -> str:
        """One line, percentages: ``acc 81.2  S 90.1  U 70.3  H 79.0  (n=1000)``."""
        return (
            f"acc {100 * self.accuracy:5.1f}  S {100 * self.seen:5.1f}  "
            f"U {100 * self.unseen:5.1f}  H {100 * self.harmonic:5.1f}  (n={self.n_images})"
        )


def per_class_accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float]:
    """Accuracy of the images of each true class, keyed by class.

    Raises:
        InputError: ``y_true`` and ``y_pred`` of different lengths.
    """
    _same_length(y_true, y_pred)
    t = np.asarray(y_true, dtype=object)
    p = np.asarray(y_pred, dtype=object)
    return {c: float(np.mean(p[t == c] == c)) for c in dict.fromkeys(t.tolist())}


def _same_length(y_true: Sequence[str], y_pred: Sequence[str]) -> None:
    if len(y_true) != len(y_pred):
        raise InputError(f"y_true has {len(y_true)} labels but y_pred {len(y_pred)} predictions")


def _mean_over(per_class: dict[str, float], classes: Iterable[str]) -> float:
    vals = [per_class[c] for c in classes if c in per_class]
    return float(np.mean(vals)) if vals else float("nan")


def open_set_scores(
    y_true: Sequence[str], y_pred: Sequence[str], seen_classes: Iterable[str]
) -> OpenSetScores:
    """Overall accuracy and GZSL S / U / H.

    Args:
        y_true: True class of each image.
        y_pred: Predicted class of each image (any string; ``"unknown"`` counts as wrong).
        seen_classes: The classes that had training images; every other true class is unseen.

    Raises:
        InputError: ``y_true`` and ``y_pred`` of different lengths.

    Example:
        >>> s = open_set_scores(["a", "a", "z"], ["a", "b", "z"], seen_classes=["a", "b"])
        >>> round(s.seen, 2), s.unseen, round(s.harmonic, 3)
        (0.5, 1.0, 0.667)
    """
    _same_length(y_true, y_pred)
    seen = set(seen_classes)
    per_class = per_class_accuracy(y_true, y_pred)
    s = _mean_over(per_class, [c for c in per_class if c in seen])
    u = _mean_over(per_class, [c for c in per_class if c not in seen])
    t = np.asarray(y_true, dtype=object)
    acc = float(np.mean(t == np.asarray(y_pred, dtype=object))) if len(t) else float("nan")
    n_seen = int(sum(1 for c in y_true if c in seen))
    return OpenSetScores(
        accuracy=acc, seen=s, unseen=u, harmonic=harmonic_mean(s, u),
        n_images=len(t), n_seen_images=n_seen, n_unseen_images=len(t) - n_seen,
    )


def top_k_accuracy(y_true: Sequence[str], ranked: Sequence[Sequence[str] | None], k: int = 5
                   ) -> float:
    """The share of images whose true class is among the first ``k`` of their ranked classes.

    Args:
        y_true: True class of each image.
        ranked: Each image's classes, most probable first (at least ``k`` of them), or
            ``None`` for an image that was not predicted (it counts as wrong).
        k: How many of the first classes count.

    Returns:
        The accuracy in [0, 1] (NaN without images).

    Raises:
        InputError: ``y_true`` and ``ranked`` of different lengths, ``k`` below 1, or a
            ranking shorter than ``k`` (names the image's position).

    Example:
        >>> top_k_accuracy(["fox", "elk", "owl"], [["elk", "fox"], ["elk", "fox"], None], k=2)
        0.6666666666666666
    """
    if len(y_true) != len(ranked):
        raise InputError(f"y_true has {len(y_true)} labels but ranked {len(ranked)} rankings")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k={k!r}: expected a whole number, at least 1")
    hits = 0
    for i, (truth, classes) in enumerate(zip(y_true, ranked)):
        if classes is None:
            continue
        if len(classes) < k:
            raise InputError(f"ranked[{i}] lists {len(classes)} classes; top-{k} accuracy needs {k}")
        hits += truth in list(classes)[:k]
    return hits / len(y_true) if len(y_true) else float("nan")


#: How far outside [0, 1] a confidence may stray by rounding before it is refused.
PROBABILITY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Reliability:
    """Top-1 confidence against accuracy, per equal-width confidence bin.

    Attributes:
        edges: ``[n_bins + 1]`` bin edges from 0 to 1; bin ``b`` holds
            confidences in ``(edges[b], edges[b + 1]]`` (a confidence of 0 goes to the first).
        counts: ``[n_bins]`` images per bin.
        accuracy: ``[n_bins]`` fraction correct per bin (NaN where empty).
        confidence: ``[n_bins]`` mean confidence per bin (NaN where empty).
        ece: Expected calibration error, in [0, 1] (NaN without images).
        n_images: Images counted (those with a confidence).
        n_without_confidence: Images left out because their confidence is NaN
            (images that were not predicted, such as error rows).
    """

    edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    ece: float
    n_images: int
    n_without_confidence: int = 0


def reliability(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 15
                ) -> Reliability:
    """Bin top-1 confidences and compare each bin's accuracy with its mean confidence.

    Args:
        confidence: ``[N]`` probability of each predicted label; NaN marks an
            image that was not predicted: it is left out of the bins and counted
            in :attr:`Reliability.n_without_confidence`.
        correct: ``[N]`` whether each prediction is right (True / False or 1 / 0).
        n_bins: Equal-width bins over (0, 1] (15, as in Guo et al. 2017).

    Raises:
        InputError: ``confidence`` and ``correct`` of different shapes, a
            confidence outside [0, 1] (or infinite), ``correct`` not booleans
            (:func:`~hybridcls.gate.metrics.as_flags`), or ``n_bins`` below 1.

    Example:
        >>> r = reliability([0.9, 0.9, 0.6, 0.6], [True, False, True, True], n_bins=10)
        >>> round(r.ece, 3), int(r.counts[5]), int(r.counts[8])
        (0.4, 2, 2)
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = as_flags(correct, "correct")
    if conf.shape != ok.shape:
        raise InputError(f"confidence has shape {conf.shape}, correct {ok.shape}: one flag per confidence")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"n_bins={n_bins!r}: expected a whole number, at least 1")
    keep = ~np.isnan(conf)
    # a float32 softmax can end a hair above 1; anything farther out is not a probability
    outside = int((keep & ((conf < -PROBABILITY_TOLERANCE) | (conf > 1 + PROBABILITY_TOLERANCE))).sum())
    if outside:
        raise InputError(f"confidence contains {outside} value{'s' if outside > 1 else ''} "
                         "outside [0, 1] (probabilities expected; NaN marks an image not predicted)")
    conf, ok = np.clip(conf[keep], 0.0, 1.0), ok[keep]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(bins, weights=ok.astype(float), minlength=n_bins) / counts
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / counts
    filled = counts > 0
    ece = (float(np.sum(counts[filled] * np.abs(acc[filled] - mean_conf[filled])) / conf.size)
           if conf.size else float("nan"))
    return Reliability(edges, counts, acc, mean_conf, ece, int(conf.size), int((~keep).sum()))
