"""A FAISS index of image embeddings, with the labels, paths and provenance that go with it.

One class, :class:`EmbeddingIndex`, serves every nearest-neighbour need of
hybridcls: the ``knn`` gate score, the nearest-neighbour cache branch, and
the nearest training images an explanation shows. It works on arrays only
(numpy + FAISS) and imports no model.

Embeddings are L2-normalised float32, so the inner product FAISS computes is
the cosine. What FAISS does: the search and the index file
(``faiss.write_index`` / ``faiss.read_index``). What is written here: the
choice of index by size, incremental building, the per-row labels and paths,
the provenance metadata (which model made the embeddings, for which class
list) and the check that refuses an index made by another model.

Kinds:

=========  =====================================================  ===========================
kind       FAISS index                                            when
=========  =====================================================  ===========================
``flat``   ``IndexFlatIP`` (exact)                                small sets; the reference
``hnsw``   ``IndexHNSWFlat``, ``METRIC_INNER_PRODUCT``            large sets; no training
``ivf``    ``IndexIVFFlat`` over an ``IndexFlatIP`` quantizer     large sets, less memory per row
``auto``   ``flat`` up to :data:`AUTO_EXACT_MAX` rows, then HNSW  the default
=========  =====================================================  ===========================

On disk an index is two files in one folder: ``<name>.faiss`` (the FAISS
index) and ``<name>.json`` (kind, parameters, metadata, labels, paths), each
written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from hybridcls.cache import atomic_path, atomic_write_json
from hybridcls.errors import CheckpointError, DataTooSmallError, InputError

__all__ = [
    "AUTO_EXACT_MAX",
    "KINDS",
    "RUN_INDEX_DIR",
    "EmbeddingIndex",
    "class_bounded_k",
    "index_meta",
    "load_run_index",
    "run_index_meta",
    "run_index_path",
]

KINDS = ("auto", "flat", "hnsw", "ivf")

#: ``kind="auto"`` stays exact up to this many rows and becomes HNSW above it. An exact
#: search over 100,000 CLIP embeddings (512 floats) reads 200 MB per query batch, a few
#: milliseconds per query on one core, which is still cheaper than building a graph;
#: above it the scan grows linearly while HNSW's search stays near-logarithmic.
AUTO_EXACT_MAX = 100_000

#: The run directory's subfolder for indexes (``index/clip.faiss`` + ``index/clip.json``).
RUN_INDEX_DIR = "index"

_FORMAT = "hybridcls-embedding-index"
_FORMAT_VERSION = 1
#: HNSW links per node; FAISS's guidelines suggest 16-64. 32 reaches recall@1 ~ 0.99 on
#: a few thousand random 64-d vectors at efSearch 64 (see tests/test_index.py).
_HNSW_M = 32
#: IVF trains k-means with at least this many points per list (FAISS warns below 39).
_IVF_POINTS_PER_LIST = 39


def index_meta(embedding: str, model_id: str, fingerprint: str,
               classes: Sequence[str]) -> dict[str, Any]:
    """The provenance an index carries, in the keys :meth:`EmbeddingIndex.load` checks.

    Args:
        embedding: ``"clip"`` (CLIP image embeddings) or ``"backbone"`` (pooled features).
        model_id: The model that made the embeddings (open_clip id, timm name).
        fingerprint: Its weights' content hash.
        classes: The class list ``labels`` index into.

    Example:
        >>> index_meta("clip", "ViT-B-32", "ab12", ["cat", "dog"])["classes"]
        ['cat', 'dog']
    """
    return {"embedding": embedding, "model_id": model_id, "fingerprint": fingerprint,
            "classes": [str(c) for c in classes]}


def class_bounded_k(k: int, labels: Any) -> int:
    """``k`` lowered, where needed, to the number of rows of the smallest class.

    The neighbour searches whose k-th distance says "near the training
    images" (the ``knn`` gate score, the cascade's feature distance) mean
    "near images of some class": a seen image should find its k-th neighbour
    in its own class, which needs every class to hold at least ``k`` rows.
    An index of any subset of whole classes (a leave-classes-out stand-in)
    then also holds at least ``k`` rows, so every search of it can be asked
    for the k-th neighbour.

    Args:
        k: The neighbour asked for (a default such as ``DEFAULT_KNN_K``).
        labels: ``[N]`` class index of each training row; -1 (unlabelled) rows are not counted.

    Returns:
        ``min(k, smallest class's row count)``.

    Raises:
        InputError: ``k`` below 1.
        DataTooSmallError: No labelled row.

    Example:
        >>> class_bounded_k(10, [0, 0, 0, 1, 1, 1, 1])
        3
    """
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    counts = np.bincount(lab[lab >= 0])
    counts = counts[counts > 0]
    if counts.size == 0:
        raise DataTooSmallError(
            f"no labelled training image to search for neighbours of (k={k}); the nearest-neighbour "
            "search needs at least 1 per class: add training images")
    return int(min(k, counts.min()))


def _normalised_float32(emb: Any, dim: int | None) -> np.ndarray:
    if hasattr(emb, "detach"):  # a torch tensor; duck-typed so that this module never imports torch
        emb = emb.detach().cpu().numpy()
    x = np.array(emb, dtype=np.float32, order="C")  # a copy: normalize_L2 works in place
    if x.ndim != 2:
        raise InputError(f"embeddings must be [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise InputError(f"embeddings have dimension {x.shape[1]}, the index has {dim}")
    # re-normalise: callers pass normalised embeddings, but float16 storage or a
    # mean-pooled view drift off the sphere, and cosine = inner product assumes it
    faiss.normalize_L2(x)
    return x


def _shown(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(repr(v) for v in value[:5])}, ... ({len(value)} in all)]"
    return repr(value)


def _difference(field: str, got: Any, want: Any) -> str:
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return f"{field} has {len(got)} entries, expected {len(want)}: {_shown(got)} vs {_shown(want)}"
        i = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        return f"{field} differs at position {i}: {got[i]!r}, expected {want[i]!r}"
    return f"{field} is {_shown(got)}, expected {_shown(want)}"


class EmbeddingIndex:
    """Cosine nearest neighbours of L2-normalised embeddings, with labels, paths and metadata.

    Args:
        kind: ``"auto"``, ``"flat"``, ``"hnsw"`` or ``"ivf"`` (see the module docstring).
        meta: Provenance (:func:`index_meta`): checked by :meth:`load`'s ``expect``.
        name: File stem for :meth:`save`; defaults to ``meta["embedding"]`` or ``"index"``.
        exact_max: ``kind="auto"``: rows kept in an exact index before switching to HNSW.
        ef_search: HNSW search breadth (raised to ``k`` when a search asks for more).
        ivf_nlist: IVF lists; default ``4 sqrt(n)`` of the training rows, at most
            ``n / 39`` so that k-means has enough points per centroid.
        ivf_nprobe: IVF lists visited per query.
        ivf_train_size: IVF: rows buffered before k-means is trained on them
            (a search or save trains on whatever is buffered).

    Attributes:
        labels: ``[ntotal]`` int64 class index per row, -1 where none was given.
        paths: One string per row, ``""`` where none was given.
        meta: The provenance dict.

    Example:
        >>> idx = EmbeddingIndex("flat").add(np.eye(3), labels=[0, 1, 1], paths=["a", "b", "c"])
        >>> sims, ids = idx.search(np.array([[1.0, 0.1, 0.0]]), k=2)
        >>> ids.tolist(), [idx.paths[i] for i in ids[0]], idx.labels[ids[0]].tolist()
        ([[0, 1]], ['a', 'b'], [0, 1])
    """

    def __init__(
        self,
        kind: str = "auto",
        *,
        meta: Mapping[str, Any] | None = None,
        name: str | None = None,
        exact_max: int = AUTO_EXACT_MAX,
        ef_search: int = 64,
        ivf_nlist: int | None = None,
        ivf_nprobe: int = 16,
        ivf_train_size: int = 20_000,
    ) -> None:
        if kind not in KINDS:
            raise InputError(f"index kind {kind!r}: choose from {', '.join(KINDS)}")
        self.kind = kind
        self.meta: dict[str, Any] = dict(meta or {})
        self.name = name or str(self.meta.get("embedding", "index"))
        self.exact_max = exact_max
        self.ef_search = ef_search
        self.ivf_nlist = ivf_nlist
        self.ivf_nprobe = ivf_nprobe
        self.ivf_train_size = ivf_train_size
        self.labels = np.empty(0, dtype=np.int64)
        self.paths: list[str] = []
        self._index: faiss.Index | None = None
        self._dim: int | None = None
        # IVF only: rows waiting for k-means to be trained
        self._pending: list[np.ndarray] = []

    # ------------------------------------------------------------------ state

    @property
    def dim(self) -> int | None:
        """The embedding dimension (``None`` before anything is added)."""
        return self._dim

    @property
    def ntotal(self) -> int:
        """How many embeddings the index holds (IVF rows still buffered included)."""
        stored = 0 if self._index is None else int(self._index.ntotal)
        return stored + sum(len(p) for p in self._pending)

    @property
    def index_kind(self) -> str | None:
        """The FAISS structure in use now: ``"flat"``, ``"hnsw"``, ``"ivf"`` (``None`` when empty)."""
        if self._index is None:
            return "ivf" if self._pending else None
        if isinstance(self._index, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(self._index, faiss.IndexIVF):
            return "ivf"
        return "flat"

    @property
    def exact(self) -> bool:
        """Whether searches are exact (an ``IndexFlatIP``)."""
        return self.index_kind in (None, "flat")

    # ------------------------------------------------------------------ building

    def _new_hnsw(self, dim: int) -> faiss.Index:
        index = faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = self.ef_search
        return index

    def _train_ivf(self) -> None:
        x = np.concatenate(self._pending)
        nlist = self.ivf_nlist or int(4 * np.sqrt(len(x)))
        nlist = max(1, min(nlist, len(x) // _IVF_POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(x.shape[1])
        index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(self.ivf_nprobe, nlist)
        index.add(x)
        self._index = index
        self._pending = []

    def add(self, emb: Any, labels: Any = None, paths: Sequence[str] | None = None) -> EmbeddingIndex:
        """Append a batch of embeddings (normalised again here), with their labels and paths.

        Call it once per batch: rows keep the order they were added in, and
        search ids are those row numbers.

        Args:
            emb: ``[N, D]`` embeddings (numpy array or torch tensor).
            labels: ``[N]`` class indices into ``meta["classes"]`` (``None``: -1).
            paths: ``N`` image paths (``None``: empty strings).

        Returns:
            ``self``.

        Raises:
            InputError: Wrong shape, another dimension than earlier batches, or
                labels / paths of another length than the batch.
        """
        x = _normalised_float32(emb, self._dim)
        n = len(x)
        lab = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(lab) != n:
            raise InputError(f"{len(lab)} labels for {n} embeddings")
        names = [""] * n if paths is None else [str(p) for p in paths]
        if len(names) != n:
            raise InputError(f"{len(names)} paths for {n} embeddings")
        if not np.isfinite(x).all():
            raise InputError("embeddings contain NaN or infinite values (an image the model did not encode?)")
        self._dim = x.shape[1]
        kind = self.kind
        if self._index is None and not self._pending:
            if kind in ("flat", "auto"):
                self._index = faiss.IndexFlatIP(self._dim)
            elif kind == "hnsw":
                self._index = self._new_hnsw(self._dim)
        if kind == "ivf" and self._index is None:
            self._pending.append(x)
            if sum(len(p) for p in self._pending) >= self.ivf_train_size:
                self._train_ivf()
        else:
            assert self._index is not None
            self._index.add(x)
        self.labels = np.concatenate([self.labels, lab])
        self.paths.extend(names)
        if kind == "auto" and self.index_kind == "flat" and self.ntotal > self.exact_max:
            # Past the size where an exact scan pays: move the rows into a graph once.
            assert self._index is not None
            rows = self._index.reconstruct_n(0, self._index.ntotal)
            self._index = self._new_hnsw(self._dim)
            self._index.add(rows)
        return self

    # ------------------------------------------------------------------ search

    def search(self, emb: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored embeddings of each query.

        Args:
            emb: ``[N, D]`` query embeddings.
            k: Neighbours per query, at most :attr:`ntotal`.

        Returns:
            ``(sims, ids)``: ``[N, k]`` cosine similarities (float64, best first)
            and ``[N, k]`` int64 row numbers in the order rows were added. A query
            row that is not finite (CLIP did not run on it) gets NaN and -1; an
            approximate index that finds fewer than ``k`` gives -inf and -1.

        Raises:
            InputError: ``k`` outside ``1..ntotal`` or queries of another dimension.
        """
        if not 1 <= k <= self.ntotal:
            raise InputError(f"k={k} neighbours asked of an index holding {self.ntotal} embeddings")
        if self._pending:
            self._train_ivf()
        assert self._index is not None
        q = _normalised_float32(emb, self._dim)
        finite = np.isfinite(q).all(axis=1)
        sims = np.full((len(q), k), np.nan)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        params = None
        if isinstance(self._index, faiss.IndexHNSW):
            # HNSW returns at most efSearch results: widen this search only, not the index's setting
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        if finite.any():
            s, i = self._index.search(np.ascontiguousarray(q[finite]), k, params=params)
            s = s.astype(np.float64)
            s[i < 0] = -np.inf
            sims[finite], ids[finite] = s, i.astype(np.int64)
        return sims, ids

    def kth_distance(self, emb: Any, k: int) -> np.ndarray:
        """Euclidean distance on the unit sphere, ``sqrt(2 - 2 cos)``, to the k-th neighbour.

        This is the distance Sun et al. (2022, "Out-of-distribution detection
        with deep nearest neighbors") threshold.

        Args:
            emb: ``[N, D]`` query embeddings.
            k: Which neighbour (1 = the nearest).

        Returns:
            ``[N]`` float64 distances in ``[0, 2]`` (NaN for non-finite queries).
        """
        sims, _ = self.search(emb, k)
        # float32 cosines can exceed 1 by an ulp; clip so the root stays real
        return np.sqrt(np.clip(2.0 - 2.0 * sims[:, k - 1], 0.0, 4.0))

    # ------------------------------------------------------------------ files

    def _sidecar(self) -> dict[str, Any]:
        return {
            "format": _FORMAT, "format_version": _FORMAT_VERSION, "name": self.name,
            "kind": self.kind, "index_kind": self.index_kind, "dim": self._dim,
            "ntotal": self.ntotal,
            "params": {"exact_max": self.exact_max, "ef_search": self.ef_search,
                       "ivf_nlist": self.ivf_nlist, "ivf_nprobe": self.ivf_nprobe,
                       "ivf_train_size": self.ivf_train_size},
            "meta": self.meta, "labels": self.labels.tolist(), "paths": self.paths,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``<name>.faiss`` (``faiss.write_index``) and ``<name>.json`` into ``directory``.

        Each file is written atomically; the sidecar is written last and records
        the row count, so a crash between the two is caught by :meth:`load`.

        Returns:
            The ``.faiss`` file.

        Raises:
            InputError: The index is empty.
        """
        if self.ntotal == 0:
            raise InputError(f"nothing to save: the {self.name!r} index is empty")
        if self._pending:
            self._train_ivf()
        directory = Path(directory)
        target = directory / f"{self.name}.faiss"
        with atomic_path(target) as tmp:
            faiss.write_index(self._index, str(tmp))
        atomic_write_json(directory / f"{self.name}.json", self._sidecar(), indent=None)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, name: str | None = None,
             expect: Mapping[str, Any] | None = None) -> EmbeddingIndex:
        """Read an index written by :meth:`save`, without recomputing anything.

        Args:
            path: The folder, its ``.faiss`` file or its ``.json`` sidecar.
            name: The file stem when ``path`` is a folder holding several indexes.
            expect: Metadata the index must carry (e.g. ``{"model_id": ...,
                "fingerprint": ..., "classes": [...]}``); a key it lacks counts as differing.

        Returns:
            The index, its labels, paths and metadata.

        Raises:
            CheckpointError: Files missing, unreadable or inconsistent, or a
                metadata field differing from ``expect`` (names the file and the field).

        Example:
            >>> EmbeddingIndex.load("runs/seen40/index", name="clip",
            ...                     expect={"model_id": "ViT-B-32"})  # doctest: +SKIP
        """
        path = Path(path)
        if path.is_dir():
            if name is None:
                found = sorted(p.stem for p in path.glob("*.json"))
                if len(found) != 1:
                    raise CheckpointError(
                        f"{path}: {'no' if not found else 'several'} index sidecars ({', '.join(found)}); "
                        "pass name=")
                name = found[0]
            side, faiss_file = path / f"{name}.json", path / f"{name}.faiss"
        else:
            side, faiss_file = path.with_suffix(".json"), path.with_suffix(".faiss")
        for f in (side, faiss_file):
            if not f.is_file():
                raise CheckpointError(f"{f}: embedding index file not found")
        try:
            d = json.loads(side.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{side}: not valid JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise CheckpointError(f"{side}: not a hybridcls embedding-index sidecar")
        if d.get("format_version") != _FORMAT_VERSION:
            raise CheckpointError(
                f"{side}: index format {d.get('format_version')}, this version reads {_FORMAT_VERSION}")
        meta = d.get("meta") or {}
        for field, want in (expect or {}).items():
            if field not in meta:
                raise CheckpointError(f"{side}: the index records no {field}; expected {_shown(want)}; "
                                      "rebuild it with HybridClassifier.calibrate()")
            if meta[field] != want:
                # a run resumed or trained again after calibrate has other weights: the same cure
                raise CheckpointError(f"{side}: built with another {field}: "
                                      f"{_difference(field, meta[field], want)}; the model or its "
                                      "classes changed since the run was calibrated (a resumed or "
                                      "retrained run, other weights): rebuild it with "
                                      "HybridClassifier.calibrate()")
        try:
            index = faiss.read_index(str(faiss_file))
        except RuntimeError as e:
            raise CheckpointError(f"{faiss_file}: not a FAISS index ({e})") from e
        labels = np.asarray(d.get("labels", []), dtype=np.int64)
        paths = [str(p) for p in d.get("paths", [])]
        if not (index.ntotal == d.get("ntotal") == len(labels) == len(paths)) or index.d != d.get("dim"):
            raise CheckpointError(
                f"{faiss_file}: holds {index.ntotal} rows of dimension {index.d}, its sidecar {side.name} "
                f"says {d.get('ntotal')} of {d.get('dim')} ({len(labels)} labels, {len(paths)} paths); "
                "rebuild it")
        new = cls(d.get("kind", "flat"), meta=meta, name=d.get("name", side.stem), **d.get("params", {}))
        new._index, new._dim = index, int(index.d)
        # search breadth is a setting, not data: take it from the sidecar whatever FAISS kept
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = new.ef_search
        elif isinstance(index, faiss.IndexIVF):
            index.nprobe = min(new.ivf_nprobe, index.nlist)
        new.labels, new.paths = labels, paths
        return new


def run_index_path(run_dir: str | os.PathLike[str], kind: str = "clip") -> Path:
    """Where a run keeps its ``kind`` index: ``RUN_DIR/index/<kind>.faiss``."""
    return Path(run_dir) / RUN_INDEX_DIR / f"{kind}.faiss"


def run_index_meta(run_dir: str | os.PathLike[str], kind: str = "clip") -> dict[str, Any] | None:
    """The ``meta`` a run's ``kind`` index records (what it was built from), read from its
    sidecar without loading the index; ``None`` when the run has none or it cannot be read."""
    try:
        meta = json.loads(run_index_path(run_dir, kind).with_suffix(".json").read_text(encoding="utf-8"))["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def load_run_index(run_dir: str | os.PathLike[str], kind: str = "clip", *,
                   expect: Mapping[str, Any] | None = None) -> EmbeddingIndex | None:
    """The run's index of training-image embeddings, or ``None`` when the run has none.

    Args:
        run_dir: A calibrated run directory (or a ``save_pretrained`` folder).
        kind: ``"clip"`` (CLIP image embeddings) or ``"backbone"`` (pooled features).
        expect: Metadata it must carry (see :meth:`EmbeddingIndex.load`).

    Raises:
        CheckpointError: The index exists but is unreadable or built otherwise than ``expect``.

    Example:
        >>> idx = load_run_index("runs/seen40")  # doctest: +SKIP
        >>> sims, ids = idx.search(query_embeddings, k=5)  # doctest: +SKIP
        >>> [idx.paths[i] for i in ids[0]]  # doctest: +SKIP
    """
    path = run_index_path(run_dir, kind)
    if not path.is_file() and not path.with_suffix(".json").is_file():
        return None
    return EmbeddingIndex.load(path, expect=expect)
