"""Nearest training images of a CLIP embedding, for the kNN gate score.

A thin wrapper over a FAISS inner-product index on L2-normalised embeddings:
on the unit sphere the inner product is the cosine, and the Euclidean
distance follows from it as ``sqrt(2 - 2 cos)``, which is the distance Sun
et al. (2022, "Out-of-distribution detection with deep nearest neighbors")
threshold. The index is exact (``IndexFlatIP``); a later issue picks IVF or
HNSW by size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from hybridcls.errors import CheckpointError, InputError

__all__ = ["EmbeddingKNN"]


def _normalised_float32(emb: Any, dim: int | None) -> np.ndarray:
    if hasattr(emb, "detach"):  # a torch tensor; duck-typed so that gate/ never imports torch
        emb = emb.detach().cpu().numpy()
    x = np.array(emb, dtype=np.float32, order="C")  # a copy: normalize_L2 works in place
    if x.ndim != 2:
        raise InputError(f"embeddings must be [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise InputError(f"embeddings have dimension {x.shape[1]}, the index has {dim}")
    # re-normalise: callers pass normalised embeddings, but float16 storage or a
    # mean-pooled view drift off the sphere, and the distance formula assumes it
    faiss.normalize_L2(x)
    return x


class EmbeddingKNN:
    """Exact cosine nearest neighbours of normalised embeddings (FAISS ``IndexFlatIP``).

    Args:
        dim: The embedding dimension; taken from the first :meth:`add` when ``None``.

    Example:
        >>> knn = EmbeddingKNN().add(np.eye(3))
        >>> knn.kth_distance(np.array([[1.0, 0.0, 0.0]]), k=1).tolist()
        [0.0]
    """

    def __init__(self, dim: int | None = None) -> None:
        self._index: faiss.IndexFlatIP | None = None if dim is None else faiss.IndexFlatIP(dim)

    @property
    def dim(self) -> int | None:
        """The embedding dimension (``None`` before anything is added)."""
        return None if self._index is None else int(self._index.d)

    @property
    def ntotal(self) -> int:
        """How many embeddings the index holds."""
        return 0 if self._index is None else int(self._index.ntotal)

    def add(self, emb: Any) -> EmbeddingKNN:
        """Add ``[N, D]`` embeddings (normalised again here); returns ``self``."""
        x = _normalised_float32(emb, self.dim)
        if self._index is None:
            self._index = faiss.IndexFlatIP(x.shape[1])
        self._index.add(x)
        return self

    def search(self, emb: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored embeddings of each query.

        Args:
            emb: ``[N, D]`` query embeddings.
            k: Neighbours per query, at most :attr:`ntotal`.

        Returns:
            ``(sims, ids)``: ``[N, k]`` cosine similarities (float64, best first)
            and ``[N, k]`` row numbers in the order embeddings were added.
        """
        if not 1 <= k <= self.ntotal:
            raise InputError(f"k={k} neighbours asked of an index holding {self.ntotal} embeddings")
        assert self._index is not None
        sims, ids = self._index.search(_normalised_float32(emb, self.dim), k)
        return sims.astype(np.float64), ids.astype(np.int64)

    def kth_distance(self, emb: Any, k: int) -> np.ndarray:
        """Euclidean distance on the unit sphere, ``sqrt(2 - 2 cos)``, to the k-th neighbour.

        Args:
            emb: ``[N, D]`` query embeddings.
            k: Which neighbour (1 = the nearest).

        Returns:
            ``[N]`` float64 distances in ``[0, 2]``.
        """
        sims, _ = self.search(emb, k)
        # float32 cosines can exceed 1 by an ulp; clip so the root stays real
        return np.sqrt(np.clip(2.0 - 2.0 * sims[:, k - 1], 0.0, 4.0))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index with ``faiss.write_index`` (atomically: temp file, then rename)."""
        if self._index is None:
            raise InputError("nothing to save: the kNN index is empty")
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self._index, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EmbeddingKNN:
        """Read an index written by :meth:`save`.

        Raises:
            CheckpointError: When the file is missing or not a FAISS index.
        """
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: kNN index file not found")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise CheckpointError(f"{path}: not a FAISS index ({e})") from e
        new = cls()
        new._index = index
        return new
