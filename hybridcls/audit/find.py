"""The audit's analyses, on arrays: near-duplicate pairs and groups, label votes, class counts.

Nothing here decodes an image or runs a model. Nearest neighbours come from
:class:`~hybridcls.index.EmbeddingIndex` (FAISS exact inner product on unit
vectors, i.e. cosine); connected components from
``scipy.sparse.csgraph.connected_components``; the rest is numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from hybridcls.index import EmbeddingIndex

__all__ = [
    "ClassCount",
    "Match",
    "class_counts",
    "duplicate_groups",
    "find_matches",
    "label_votes",
    "self_neighbours",
]


@dataclass(frozen=True)
class Match:
    """A pair judged to be the same picture.

    Attributes:
        query: Row of the query image (in the query arrays).
        ref: Row of the matching reference image (in the reference arrays).
        clip_cosine: Cosine of their CLIP image embeddings.
        pixel_similarity: Their :func:`~hybridcls.audit.pixels.pixel_similarity`.
        rule: ``"pixels"``, ``"clip"`` or ``"both"``: which threshold(s) the pair passed.
    """

    query: int
    ref: int
    clip_cosine: float
    pixel_similarity: float
    rule: str


def _neighbours(query: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(ref))
    if k == 0 or len(query) == 0:
        return np.zeros((len(query), 0)), np.zeros((len(query), 0), dtype=np.int64)
    return EmbeddingIndex("flat").add(ref).search(query, k)


def self_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Each row's nearest rows of the same set, itself included: room for ``k`` others.

    One exact search of a set against itself, to be shared by every analysis
    that needs it (:func:`find_matches` with ``same_set=True`` and
    :func:`label_votes` both take it), so the set is searched once.

    Args:
        embeddings: ``[N, D]`` unit vectors.
        k: Neighbours wanted besides the row itself.

    Returns:
        ``[N, min(k + 1, N)]`` row numbers, nearest first.

    Example:
        >>> self_neighbours(np.eye(3, dtype=np.float32), 5).shape
        (3, 3)
    """
    return _neighbours(embeddings, embeddings, k + 1)[1]


def find_matches(
    query_clip: np.ndarray,
    query_pixels: np.ndarray,
    ref_clip: np.ndarray,
    ref_pixels: np.ndarray,
    pixel_similarity: Callable[[int, int], float],
    *,
    k: int,
    clip_threshold: float | None,
    pixel_threshold: float | None,
    same_set: bool = False,
    clip_nearest: np.ndarray | None = None,
) -> list[Match]:
    """Pairs (query, reference) that are the same picture, by either of two tests.

    Candidates are each query's ``k`` nearest references by CLIP cosine and its
    ``k`` nearest by coarse pixel signature (both exact FAISS searches); a
    candidate is a match when its pixel similarity reaches ``pixel_threshold``
    or its CLIP cosine reaches ``clip_threshold`` (``None`` turns a test off).

    Args:
        query_clip: ``[Q, D]`` unit CLIP embeddings of the queries.
        query_pixels: ``[Q, P]`` coarse pixel signatures of the queries.
        ref_clip: ``[R, D]`` unit CLIP embeddings of the references.
        ref_pixels: ``[R, P]`` coarse pixel signatures of the references.
        pixel_similarity: ``(query row, ref row) -> similarity`` (the fine, crop-searching check).
        k: Candidates per query from each search.
        clip_threshold: CLIP cosine at or above which a pair matches.
        pixel_threshold: Pixel similarity at or above which a pair matches.
        same_set: Queries and references are the same images: self-pairs are
            skipped and each pair is returned once, with ``query < ref``.
        clip_nearest: Each query's nearest references by CLIP, if already
            searched (with ``same_set``: :func:`self_neighbours` of ``ref_clip``);
            its first ``k`` (``k + 1`` with ``same_set``) columns are used.
            ``None`` searches here.

    Returns:
        Matches sorted by ``(query, ref)``.

    Example:
        >>> e = np.eye(3, dtype=np.float32)
        >>> [m.ref for m in find_matches(e[:1], e[:1], e, e, lambda i, j: float(i == j),
        ...                              k=2, clip_threshold=0.9, pixel_threshold=None)]
        [0]
    """
    extra = 1 if same_set else 0
    candidates: set[tuple[int, int]] = set()
    searches = [(query_clip, ref_clip, clip_nearest), (query_pixels, ref_pixels, None)]
    for q, r, ids in searches:
        # A shared search may hold more columns than this one needs; the nearest come first.
        ids = _neighbours(q, r, k + extra)[1] if ids is None else ids[:, :k + extra]
        for i, row in enumerate(ids):
            for j in row:
                j = int(j)
                if j < 0 or (same_set and j == i):
                    continue
                candidates.add((min(i, j), max(i, j)) if same_set else (i, j))
    out = []
    for i, j in sorted(candidates):
        cos = float(np.dot(query_clip[i], ref_clip[j]))
        pix = pixel_similarity(i, j)
        by_clip = clip_threshold is not None and cos >= clip_threshold
        by_pixels = pixel_threshold is not None and pix >= pixel_threshold
        if by_clip or by_pixels:
            rule = "both" if by_clip and by_pixels else ("clip" if by_clip else "pixels")
            out.append(Match(i, j, cos, pix, rule))
    return out


def duplicate_groups(n: int, matches: Sequence[Match]) -> np.ndarray:
    """Group label per row (``-1`` = in no group) from within-set matches, as connected components.

    Groups are numbered from 0 in order of their first row, so the numbering is stable.

    Example:
        >>> m = [Match(0, 2, 1.0, 1.0, "both"), Match(2, 4, 1.0, 1.0, "both")]
        >>> duplicate_groups(5, m).tolist()
        [0, -1, 0, -1, 0]
    """
    if not matches:
        return np.full(n, -1, dtype=np.int64)
    rows = np.array([m.query for m in matches])
    cols = np.array([m.ref for m in matches])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    out = np.full(n, -1, dtype=np.int64)
    order: dict[int, int] = {}
    for i, c in enumerate(comp):
        if sizes[c] > 1:
            out[i] = order.setdefault(int(c), len(order))
    return out


def label_votes(
    embeddings: np.ndarray, labels: np.ndarray, k: int, *, nearest: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What each image's ``k`` nearest other images (by CLIP cosine) say its label is.

    Args:
        embeddings: ``[N, D]`` unit CLIP embeddings.
        labels: ``[N]`` integer labels.
        k: Neighbours that vote (fewer when there are fewer other images).
        nearest: :func:`self_neighbours` of ``embeddings`` with at least
            this ``k``, if already searched; ``None`` searches here.

    Returns:
        ``(suggested, agreement, own, neighbours)``: the most common label
        among the neighbours (ties: the label of the nearest neighbour among
        the tied ones), the share of neighbours carrying it, the share
        carrying the image's own label, and the ``[N, k]`` neighbour rows,
        nearest first.

    Example:
        >>> emb = np.array([[1, 0], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1]], dtype=np.float32)
        >>> suggested, agreement, own, _ = label_votes(emb, np.array([0, 0, 1, 1, 1]), k=2)
        >>> suggested[2], agreement[2], own[2]  # image 2 is labelled 1 among images of 0
        (np.int64(0), np.float64(1.0), np.float64(0.0))
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    k = min(k, n - 1)
    if k < 1:
        return labels.copy(), np.ones(n), np.ones(n), np.zeros((n, 0), dtype=np.int64)
    ids = self_neighbours(embeddings, k) if nearest is None else nearest
    # Drop the image itself (normally the first hit; with exact copies it may not be).
    nb = np.array([[j for j in row if j != i][:k] for i, row in enumerate(ids)], dtype=np.int64)
    nl = labels[nb]
    suggested = np.empty(n, dtype=np.int64)
    agreement = np.empty(n)
    for i, row in enumerate(nl):
        values, counts = np.unique(row, return_counts=True)
        tied = set(values[counts == counts.max()].tolist())
        suggested[i] = next(v for v in row if v in tied)  # row is nearest first
        agreement[i] = counts.max() / len(row)
    own = (nl == labels[:, None]).mean(axis=1)
    return suggested, agreement, own, nb


@dataclass(frozen=True)
class ClassCount:
    """Images of one class.

    Attributes:
        name: The class (folder) name.
        images: Readable images.
        unreadable: Files that did not decode.
        share: ``images`` over all readable images of the set.
        below_minimum: Fewer readable images than the audit's minimum.
    """

    name: str
    images: int
    unreadable: int
    share: float
    below_minimum: bool


def class_counts(
    classes: Sequence[str], labels: np.ndarray, readable: np.ndarray, minimum: int
) -> tuple[list[ClassCount], float]:
    """Per-class counts and the imbalance ratio (largest class over smallest, readable images).

    Args:
        classes: Class names by label.
        labels: ``[N]`` label of every file.
        readable: ``[N]`` bool, whether each file decoded.
        minimum: A class with fewer readable images is flagged.

    Returns:
        ``(counts, ratio)``; ``ratio`` is ``inf`` when a class has no readable image.

    Example:
        >>> c, r = class_counts(["a", "b"], np.array([0, 0, 0, 1]), np.ones(4, bool), minimum=2)
        >>> [(x.name, x.images, x.below_minimum) for x in c], r
        ([('a', 3, False), ('b', 1, True)], 3.0)
    """
    labels = np.asarray(labels, dtype=np.int64)
    readable = np.asarray(readable, dtype=bool)
    good = np.bincount(labels[readable], minlength=len(classes))
    bad = np.bincount(labels[~readable], minlength=len(classes))
    total = max(int(good.sum()), 1)
    counts = [ClassCount(name, int(g), int(b), float(g) / total, bool(g < minimum))
              for name, g, b in zip(classes, good, bad)]
    ratio = float(good.max() / good.min()) if good.min() > 0 else float("inf")
    return counts, ratio
