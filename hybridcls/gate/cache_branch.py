"""The nearest-neighbour cache branch, in the manner of Tip-Adapter (Zhang et al. 2022).

The training images' CLIP embeddings are a key-value cache: keys the
embeddings, values the one-hot labels ``L``. A query's affinity to each key is
``A = exp(-beta (1 - cos))`` (1 for an identical image, falling with the
cosine distance; ``beta`` sets how fast), and the class evidence it brings is
added to the supervised branch's seen-class logits::

    logits' = sup_logits + alpha * (A @ L) / n

Two departures from Tip-Adapter, both about scale:

* ``/ n``: each class's summed affinity is divided by its number of cached
  images (a mean, a Parzen-window estimate). Tip-Adapter's cache is K-shot,
  balanced, so its sum is K times this mean and the factor goes into alpha;
  our training sets are imbalanced, and the supervised head already learned
  their class prior: a plain sum would count it twice.
* ``alpha`` multiplies logits of a fine-tuned head, not CLIP's ``100 * cos``
  logits, so its grid is in units of the held-out supervised logits' standard
  deviation (``scale``): the same grid fits heads trained to any logit size.

``alpha`` and ``beta`` are fitted by grid search on held-out seen images
(never in the cache): highest accuracy, ties broken by the lower
cross-entropy, then the smaller ``alpha`` (:func:`grid_search`). ``auto`` keeps the branch only when it raises that accuracy.
Works on arrays (and an :class:`~hybridcls.index.EmbeddingIndex`) only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridcls.errors import CheckpointError, InputError
from hybridcls.gate.scores import as_array, mean_nll

if TYPE_CHECKING:
    from hybridcls.index import EmbeddingIndex

__all__ = [
    "ALPHA_GRID",
    "BETA_GRID",
    "CACHE_MODES",
    "DEFAULT_CACHE_K",
    "CacheBranch",
    "cache_logits",
    "fit_cache_branch",
    "grid_search",
]

#: ``alpha`` candidates, in standard deviations of the held-out supervised logits.
ALPHA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
#: ``beta`` candidates; Tip-Adapter's ImageNet default 5.5 is among them.
BETA_GRID = (1.0, 2.0, 3.5, 5.5, 7.5, 10.0, 15.0, 20.0)
#: Neighbours read per query. Up to this many cached images the branch is exactly
#: Tip-Adapter's dense ``A @ L``; beyond it the farthest images, whose affinity
#: ``exp(-beta (1 - cos))`` is smallest, are left out. A smaller cache is read whole
#: (the fitted branch records ``min(k, cache size)``).
DEFAULT_CACHE_K = 4096
#: ``HybridClassifier(cache_branch=...)``: fit and keep when it helps, always keep, never fit.
CACHE_MODES = ("auto", "on", "off")


def cache_logits(sims: Any, ids: Any, labels: Any, n_classes: int, beta: float, *,
                 counts: Any = None) -> np.ndarray:
    """Per-class mean affinity ``(A @ L) / n`` of queries to their cached neighbours.

    Args:
        sims: ``[N, k]`` cosine similarities to the neighbours (an index search).
        ids: ``[N, k]`` their rows in the cache; -1 = none (contributes nothing).
        labels: ``[Ncache]`` class of each cached row, in ``0..n_classes-1``.
        n_classes: Seen classes S.
        beta: Sharpness of ``A = exp(-beta (1 - cos))``.
        counts: The divisor ``n``: ``[S]`` cached images per class, or ``[N, S]`` per query
            (leave-one-out: a query's own class counts one image fewer). Default: the
            counts of ``labels``.

    Returns:
        ``[N, S]`` float64; all zero for a query row without neighbours (NaN sims).

    Example:
        >>> cache_logits([[1.0, 0.5]], [[0, 1]], [0, 1], 2, beta=2.0).round(4).tolist()
        [[1.0, 0.3679]]
    """
    s = as_array(sims, "sims")
    i = np.asarray(ids, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if s.shape != i.shape:
        raise InputError(f"sims {s.shape} and ids {i.shape} must have the same shape")
    if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
        raise InputError(f"cache labels must be class indices in 0..{n_classes - 1}; "
                         "the index holds rows without a label")
    if counts is None:
        counts = np.bincount(lab, minlength=n_classes)
    counts = np.asarray(counts, dtype=np.float64)
    valid = (i >= 0) & np.isfinite(s)
    aff = np.where(valid, np.exp(-beta * (1.0 - np.where(valid, s, 1.0))), 0.0)
    rows = np.broadcast_to(np.arange(s.shape[0])[:, None], s.shape)
    # bincount sums the affinities per (row, class) cell, in one pass (np.add.at is far slower)
    out = np.bincount(rows[valid] * n_classes + lab[i[valid]], weights=aff[valid],
                      minlength=s.shape[0] * n_classes).reshape(s.shape[0], n_classes)
    # a class with no cached image gets no evidence rather than a division by zero
    return out / np.maximum(counts, 1.0)


@dataclass(frozen=True)
class CacheBranch:
    """A fitted cache branch: ``logits' = sup_logits + alpha * cache_logits(beta)``.

    Attributes:
        alpha: Weight of the cache term, in supervised-logit units (``alpha_rel * scale``).
        beta: Affinity sharpness.
        k: Neighbours read per query.
        enabled: Whether predictions use it (``auto``: only when it raised held-out accuracy).
        alpha_rel: ``alpha`` in standard deviations of the held-out supervised logits.
        scale: That standard deviation.
        val_accuracy: Held-out seen-class accuracy with the branch.
        val_accuracy_plain: The same without it.
        n_val: Held-out images it was fitted on.
        mode: ``"auto"`` or ``"on"``: how ``enabled`` was decided.
    """

    alpha: float
    beta: float
    k: int = DEFAULT_CACHE_K
    enabled: bool = True
    alpha_rel: float | None = None
    scale: float | None = None
    val_accuracy: float | None = None
    val_accuracy_plain: float | None = None
    n_val: int | None = None
    mode: str = "auto"

    def term(self, clip_emb: Any, index: EmbeddingIndex, n_classes: int) -> np.ndarray:
        """``[N, S]`` cache evidence ``(A @ L) / n`` of ``clip_emb`` against ``index``."""
        sims, ids = index.search(clip_emb, min(self.k, index.ntotal))
        return cache_logits(sims, ids, index.labels, n_classes, self.beta)

    def apply(self, sup_logits: Any, clip_emb: Any, index: EmbeddingIndex) -> np.ndarray:
        """The fused seen-class logits; rows whose embedding is NaN (CLIP skipped) stay as they are.

        Example:
            >>> branch = CacheBranch.from_dict(clf.gate_.cache_branch)  # doctest: +SKIP
            >>> fused = branch.apply(sup_logits, clip_emb, clf.knn_)  # doctest: +SKIP
        """
        sup = as_array(sup_logits, "sup_logits")
        return sup + self.alpha * self.term(clip_emb, index, sup.shape[1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (stored in ``gate.json``'s ``cache_branch``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheBranch:
        """Rebuild from :meth:`to_dict`; unknown keys are an error."""
        extra = sorted(set(d) - {f.name for f in fields(cls)})
        if extra:
            raise CheckpointError(f"cache branch has unknown field(s): {', '.join(extra)}")
        return cls(**d)


def _accuracy_and_loss(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    acc = float(np.mean(logits.argmax(axis=1) == y))
    return acc, mean_nll(logits, y)


def grid_search(logits: np.ndarray, y: np.ndarray, term: Callable[[float], np.ndarray], scale: float,
                alpha_grid: Sequence[float], beta_grid: Sequence[float]) -> tuple[float, float, float]:
    """The best ``logits + alpha_rel * scale * term(beta)`` on labelled images, by grid search.

    Args:
        logits: ``[N, K]`` the logits the cache term is added to.
        y: ``[N]`` the images' classes.
        term: ``beta -> [N, K]`` cache evidence (:func:`cache_logits` of a search).
        scale: The unit of ``alpha_rel`` (a standard deviation of ``logits``).
        alpha_grid: ``alpha_rel`` candidates, in any order.
        beta_grid: ``beta`` candidates.

    Returns:
        ``(accuracy, alpha_rel, beta)``: highest accuracy, ties broken by the lower
        cross-entropy, then by the smaller ``alpha_rel`` (the weaker cache: what the
        labelled images cannot tell apart is not taken on trust), then by the ``beta``
        first in ``beta_grid``.

    Example:
        >>> z, y = np.zeros((1, 2)), np.array([0])
        >>> grid_search(z, y, lambda b: np.zeros((1, 2)), 1.0, [4.0, 1.0], [2.0, 1.0])
        (1.0, 1.0, 2.0)
    """
    best: tuple[float, float, float, int] | None = None  # (acc, -loss, -alpha_rel, -beta position)
    for j, beta in enumerate(beta_grid):
        t = term(beta)  # one term per beta: the costly part
        for a in alpha_grid:
            acc, loss = _accuracy_and_loss(logits + a * scale * t, y)
            key = (acc, -loss, -float(a), -j)
            if best is None or key > best:
                best = key
    assert best is not None
    return best[0], -best[2], float(beta_grid[-best[3]])


def fit_cache_branch(
    sup_logits: Any,
    y: Any,
    clip_emb: Any,
    index: EmbeddingIndex,
    *,
    mode: str = "auto",
    alpha_grid: Sequence[float] = ALPHA_GRID,
    beta_grid: Sequence[float] = BETA_GRID,
    k: int = DEFAULT_CACHE_K,
) -> CacheBranch:
    """Fit ``alpha`` and ``beta`` on held-out seen images by grid search.

    Args:
        sup_logits: ``[N, S]`` supervised logits of held-out seen images.
        y: ``[N]`` their class indices.
        clip_emb: ``[N, D]`` their CLIP embeddings (normalised).
        index: The training images' embeddings with their labels; it must not
            hold these held-out images (their affinity to themselves would be 1).
        mode: ``"auto"`` (enabled only when held-out accuracy rises) or ``"on"``.
        alpha_grid: ``alpha`` candidates in standard deviations of ``sup_logits``.
        beta_grid: ``beta`` candidates.
        k: Neighbours read per query, at most the cache's size.

    Returns:
        The best setting by accuracy (ties: :func:`grid_search`'s order), with the
        accuracies with and without it; its ``k`` is the one used,
        ``min(k, index.ntotal)``, so that the file says what predictions read.

    Example:
        >>> branch = fit_cache_branch(val_logits, y_val, val_emb, train_index)  # doctest: +SKIP
        >>> branch.enabled, branch.alpha_rel, branch.beta  # doctest: +SKIP
        (True, 8.0, 2.0)
    """
    if mode not in ("auto", "on"):
        raise InputError(f"cache branch mode {mode!r} cannot be fitted: choose 'auto' or 'on'")
    sup = as_array(sup_logits, "sup_logits")
    yy = np.asarray(y, dtype=np.int64).reshape(-1)
    if len(yy) != len(sup) or len(yy) == 0:
        raise InputError(f"{len(yy)} labels for {len(sup)} held-out images (need at least one)")
    if not alpha_grid or not beta_grid:
        raise InputError("alpha_grid and beta_grid need at least one value each")
    n_classes = sup.shape[1]
    k = min(k, index.ntotal)
    sims, ids = index.search(clip_emb, k)
    scale = float(sup.std()) or 1.0
    plain_acc, _ = _accuracy_and_loss(sup, yy)
    acc, a, beta = grid_search(sup, yy, lambda b: cache_logits(sims, ids, index.labels, n_classes, b),
                               scale, alpha_grid, beta_grid)
    return CacheBranch(
        alpha=a * scale, beta=beta, k=int(k), enabled=mode == "on" or acc > plain_acc,
        alpha_rel=a, scale=scale, val_accuracy=acc, val_accuracy_plain=plain_acc,
        n_val=len(yy), mode=mode,
    )
