"""Few-shot support images as a class-balanced Tip-Adapter cache on the zero-shot logits.

A handful of labelled images per class (the *support* set, for any class of
the prompts file, seen or unseen) is a key-value cache: keys their CLIP
embeddings ``k_j``, values their classes ``y_j`` over every class
(``classes_`` order). This docstring is the one statement of the rule
(:func:`support_term` computes it; :class:`SupportAdapter`, :meth:`Gate.with_support
<hybridcls.gate.Gate.with_support>` and docs/gate.md point here). For a query
``q`` (L2-normalised), with ``K`` the classes that have support images
(``n_c > 0`` of them in class ``c``)::

    m_c   = (1 / n_c) * sum over j with y_j = c of exp(-beta * (1 - cos(q, k_j)))   for c in K
    t_c   = m_c - (1 / |K|) * sum over c' in K of m_c'                                for c in K
    t_c   = 0                                                                         otherwise
    clip_logits'_c = clip_logits_c + alpha * t_c

added before the gate scores and the fusion read the zero-shot logits. Under
leave-one-out (the fit) a query that is a support image has its own entry left
out of the sum and out of its class's ``n_c``; a class left with none leaves
``K``.

It is a class-balanced variant of Tip-Adapter (Zhang et al. 2022), whose
cache term is the *sum* ``alpha * A @ L`` (``A = exp(-beta (1 - cos))`` to
every key, ``L`` the one-hot labels) over a K-shot, balanced cache:

* the per-class mean ``m_c`` instead of the sum: support sets are not
  balanced (5 images of one class, 1 of another), and a sum favours the class
  with more images, each of which adds affinity however far it is (three
  moderately near images outweigh one identical image). With ``K`` images in
  every class the sum is ``K`` times the mean, and the factor goes into
  ``alpha``. The per-class mean is the cache branch's
  (:func:`hybridcls.gate.cache_branch.cache_logits`, reused);
* the centring over ``K``: with every class supported it is a row constant,
  which the softmax ignores (so with equal counts the probabilities are
  Tip-Adapter's); with some classes only, it keeps the affinity every image
  has to any support image (> 0) from lifting the supported classes as a
  block over the others (on the synthetic world, support images of the 10
  unseen classes alone took zero-shot accuracy over all 50 classes from 83%
  to 23% uncentred).

As in the cache branch, ``alpha`` is searched in standard deviations of the
zero-shot logits (``scale``), on the same grids, plus ``alpha = 0`` (the
adapter off).

``alpha`` and ``beta`` are fitted without test images: by leave-one-out over
the support images themselves and the held-out seen images of classes with
support images when there are any (never in the cache), highest zero-shot
accuracy over every class first, then the lower cross-entropy, then the
smaller ``alpha``, then the first ``beta`` of the grid
(:func:`~hybridcls.gate.cache_branch.grid_search`). With one image per class,
leave-one-out leaves a support image's class empty: the fit then sees no gain
and keeps ``alpha`` small or zero. When some class has no support image,
``alpha`` is capped (:data:`ONE_SIDED_MAX_ALPHA`).

A hybrid also keys a second cache, by the same rule, on the supervised
backbone's pooled features (L2-normalised, as keys and queries;
:attr:`SupportAdapter.backbone`), as CaFo keys one on DINO
features beside CLIP's (Zhang et al. 2023, "Prompt, Generate, then Cache"):
the backbone tells apart the classes it was trained near better than CLIP does
(on the synthetic world, the 10 unseen classes' 5 support images per class as
prototypes in backbone space: 95-99.5% accuracy over the unseen classes
against CLIP's 96%). Its ``alpha`` and ``beta`` are fitted the same way, on
the logits the CLIP cache has already adapted. Works on arrays only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from hybridcls.cache import atomic_path
from hybridcls.errors import CheckpointError, InputError
from hybridcls.gate.cache_branch import ALPHA_GRID, BETA_GRID, cache_logits, grid_search
from hybridcls.gate.scores import as_array

__all__ = ["ONE_SIDED_MAX_ALPHA", "SUPPORT_ALPHA_GRID", "SUPPORT_FILE", "SupportAdapter",
           "fit_support_adapter", "unit_rows"]

#: The support embeddings and labels, beside ``gate.json`` (safetensors).
SUPPORT_FILE = "support.safetensors"
#: ``alpha`` candidates in standard deviations of the zero-shot logits: 0 (off) and the cache
#: branch's grid.
SUPPORT_ALPHA_GRID = (0.0, *ALPHA_GRID)
#: The largest ``alpha`` (in standard deviations of the logits) a fit may choose when some class
#: has no support image: the fitting images are support images and held-out images of classes
#: with support images (:meth:`~hybridcls.gate.Gate.with_support`), where a larger ``alpha``
#: always looks better (it only pulls images towards their own, supported, class), and nothing
#: measures what it costs the other classes' images; measured: support for 2 of 6 classes in a
#: zero-shot classifier chose 32 and pulled half the test images onto them.
ONE_SIDED_MAX_ALPHA = 1.0


@dataclass(frozen=True)
class SupportAdapter:
    """A fitted support cache: ``clip_logits' = clip_logits + alpha * t`` (``t``: the module
    docstring's class-balanced, centred cache term, :func:`support_term`).

    Attributes:
        keys: ``[n, D]`` the support images' L2-normalised CLIP embeddings (for
            :attr:`backbone`: their backbone features, L2-normalised).
        labels: ``[n]`` their class indices over every class (``classes_`` order).
        n_classes: C, every class.
        alpha: Weight of the cache term, in zero-shot-logit units (``alpha_rel * scale``).
        beta: Affinity sharpness.
        alpha_rel: ``alpha`` in standard deviations of the zero-shot logits.
        scale: That standard deviation (over the images it was fitted on).
        fit_accuracy: Zero-shot accuracy with the adapter on the fitting images
            (leave-one-out for the support images).
        fit_accuracy_plain: The same without it.
        n_fit: Images it was fitted on (support images + held-out seen images).
        class_names: Every class's name, for the record's counts.
        backbone: The second cache, keyed on the supervised backbone's L2-normalised
            features (:func:`unit_rows`), applied after this one; ``None`` for a zero-shot
            classifier or support images without backbone features.
    """

    keys: np.ndarray
    labels: np.ndarray
    n_classes: int
    alpha: float
    beta: float
    alpha_rel: float = 0.0
    scale: float = 1.0
    fit_accuracy: float | None = None
    fit_accuracy_plain: float | None = None
    n_fit: int = 0
    class_names: Sequence[str] = field(default_factory=tuple)
    backbone: SupportAdapter | None = None

    @property
    def counts(self) -> np.ndarray:
        """``[C]`` support images per class."""
        return np.bincount(self.labels, minlength=self.n_classes)

    def term(self, clip_emb: Any, *, leave_out: Any = None) -> np.ndarray:
        """``[N, C]`` the cache term ``t`` of ``clip_emb`` (:func:`support_term`; NaN rows: zero).

        Args:
            clip_emb: ``[N, D]`` L2-normalised query embeddings.
            leave_out: ``[N]`` the row of ``keys`` each query is (its own entry left out,
                its class's ``n`` one fewer), -1 for none; ``None``: nothing left out.
        """
        return support_term(clip_emb, self.keys, self.labels, self.n_classes, self.beta,
                            leave_out=leave_out)

    def apply(self, clip_logits: Any, clip_emb: Any, *, features: Any = None,
              leave_out: Any = None) -> np.ndarray:
        """``[N, C]`` the adapted zero-shot logits (NaN rows, where CLIP did not run, stay NaN).

        Args:
            clip_logits: ``[N, C]`` zero-shot logits.
            clip_emb: ``[N, D]`` L2-normalised CLIP embeddings (the keys' space).
            features: ``[N, F]`` the supervised backbone's features, for :attr:`backbone`
                (``None``: that cache is not applied).
            leave_out: As in :meth:`term`, for both caches.

        Example:
            >>> a = SupportAdapter(np.eye(2), np.array([0, 1]), 2, alpha=2.0, beta=1.0)
            >>> a.apply(np.array([[1.0, 1.0]]), np.array([[1.0, 0.0]])).round(4).tolist()
            [[1.6321, 0.3679]]
        """
        z = as_array(clip_logits, "clip_logits")
        if not len(z):  # no query: the features of none may have no width either
            return z
        if self.alpha != 0.0:
            z = z + self.alpha * self.term(clip_emb, leave_out=leave_out)
        if self.backbone is not None and features is not None:
            z = self.backbone.apply(z, unit_rows(features), leave_out=leave_out)
        return z

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (``gate.json``'s ``support``; the arrays go to :data:`SUPPORT_FILE`)."""
        counts = self.counts
        names = list(self.class_names) or [str(i) for i in range(self.n_classes)]
        return {
            "alpha": self.alpha, "beta": self.beta, "alpha_rel": self.alpha_rel, "scale": self.scale,
            "fit_accuracy": self.fit_accuracy, "fit_accuracy_plain": self.fit_accuracy_plain,
            "n_fit": self.n_fit, "n_support": len(self.labels), "n_classes": self.n_classes,
            "counts": {names[c]: int(counts[c]) for c in np.flatnonzero(counts)},
            **({} if self.backbone is None else {"backbone": {
                k: v for k, v in self.backbone.to_dict().items()
                if k in ("alpha", "beta", "alpha_rel", "scale", "fit_accuracy",
                         "fit_accuracy_plain", "n_fit")}}),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``keys`` and ``labels`` (and the backbone cache's keys) to one safetensors file
        (no pickle)."""
        arrays = {"keys": np.ascontiguousarray(self.keys, dtype=np.float32),
                  "labels": np.ascontiguousarray(self.labels, dtype=np.int64)}
        if self.backbone is not None:
            arrays["backbone_keys"] = np.ascontiguousarray(self.backbone.keys, dtype=np.float32)
        with atomic_path(path) as tmp:
            save_file(arrays, os.fspath(tmp))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], record: dict[str, Any]) -> SupportAdapter:
        """Rebuild from :meth:`save`'s file and :meth:`to_dict`'s record.

        Raises:
            CheckpointError: A missing or foreign file, or one that disagrees with the record.
        """
        try:
            arrays = load_file(os.fspath(path))
            keys, labels = arrays["keys"], arrays["labels"].astype(np.int64)
        except Exception as exc:  # safetensors raises several types for a bad file
            raise CheckpointError(f"{path}: not a support file ({exc}); calibrate or add the "
                                  "support images again") from exc
        if len(labels) != record.get("n_support") or len(keys) != len(labels):
            raise CheckpointError(f"{path}: holds {len(labels)} support images, its gate records "
                                  f"{record.get('n_support')}")
        backbone = None
        if "backbone" in record:
            if "backbone_keys" not in arrays or len(arrays["backbone_keys"]) != len(labels):
                raise CheckpointError(f"{path}: its gate records a backbone cache but the file "
                                      "holds no backbone key per support image; add the support "
                                      "images again")
            b = record["backbone"]
            backbone = cls(arrays["backbone_keys"], labels, int(record["n_classes"]),
                           float(b["alpha"]), float(b["beta"]), float(b["alpha_rel"]),
                           float(b["scale"]), b.get("fit_accuracy"), b.get("fit_accuracy_plain"),
                           int(b.get("n_fit", 0)))
        n_classes = int(record["n_classes"])
        # the record names the classes that have support images, in class order
        names = [str(i) for i in range(n_classes)]
        for c, name in zip(np.flatnonzero(np.bincount(labels, minlength=n_classes)),
                           record.get("counts", {})):
            names[c] = name
        return cls(keys, labels, n_classes, float(record["alpha"]), float(record["beta"]),
                   float(record["alpha_rel"]), float(record["scale"]), record.get("fit_accuracy"),
                   record.get("fit_accuracy_plain"), int(record.get("n_fit", 0)), tuple(names),
                   backbone)


def unit_rows(x: Any) -> np.ndarray:
    """``[N, F]`` the rows of ``x`` scaled to unit L2 norm (a zero row stays zero, NaN stays NaN).

    The backbone cache's keys and queries: cosine similarity as an inner product.

    Example:
        >>> unit_rows([[3.0, 4.0], [0.0, 0.0]]).tolist()
        [[0.6, 0.8], [0.0, 0.0]]
    """
    a = as_array(x, "features")
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)


def support_term(clip_emb: Any, keys: Any, labels: Any, n_classes: int, beta: float, *,
                 leave_out: Any = None) -> np.ndarray:
    """``[N, C]`` the cache term ``t`` of the module docstring: each query's per-class mean
    affinity to the support images, centred over the classes that have support images.

    The support set is small: every key is read (a dense ``[N, n]`` cosine matrix),
    through :func:`~hybridcls.gate.cache_branch.cache_logits` (the per-class mean).

    Args:
        clip_emb: ``[N, D]`` L2-normalised queries (NaN rows get zero).
        keys: ``[n, D]`` L2-normalised support embeddings.
        labels: ``[n]`` their classes in ``0..n_classes-1``.
        n_classes: C.
        beta: Sharpness of ``A = exp(-beta (1 - cos))``.
        leave_out: ``[N]`` each query's own row of ``keys`` (-1: none), left out of its sum
            and of its class's count.

    Example:
        >>> keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        >>> support_term([[0.0, 1.0]], keys, [0, 1, 1], 2, beta=1.0).round(4).tolist()
        [[-0.158, 0.158]]
        >>> support_term([[0.0, 1.0]], keys, [0, 1, 1], 2, beta=1.0, leave_out=[1]).round(4).tolist()
        [[0.0, 0.0]]
    """
    q = as_array(clip_emb, "clip_emb")
    k = as_array(keys, "keys")
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if k.shape[0] != lab.size:
        raise InputError(f"{k.shape[0]} support embeddings for {lab.size} labels")
    sims = q @ k.T  # NaN rows stay NaN: cache_logits gives them nothing
    ids = np.broadcast_to(np.arange(lab.size), sims.shape).copy()
    counts: np.ndarray = np.bincount(lab, minlength=n_classes)
    if leave_out is not None:
        own = np.asarray(leave_out, dtype=np.int64).reshape(-1)
        if own.shape != (len(q),):
            raise InputError(f"leave_out has {own.size} entries for {len(q)} queries")
        rows = np.flatnonzero(own >= 0)
        ids[rows, own[rows]] = -1
        counts = np.broadcast_to(counts, (len(q), n_classes)).copy()
        counts[rows, lab[own[rows]]] -= 1
    term = cache_logits(sims, ids, lab, n_classes, beta, counts=counts)
    # centred per row over the classes with support images (why: the module docstring)
    has = np.broadcast_to(counts > 0, term.shape)
    mean = (term * has).sum(axis=1, keepdims=True) / np.maximum(has.sum(axis=1, keepdims=True), 1)
    return np.where(has, term - mean, 0.0)


def fit_support_adapter(
    clip_logits: Any,
    clip_emb: Any,
    y: Any,
    keys: Any,
    labels: Any,
    *,
    leave_out: Any = None,
    class_names: Sequence[str] = (),
    alpha_grid: Sequence[float] = SUPPORT_ALPHA_GRID,
    beta_grid: Sequence[float] = BETA_GRID,
) -> SupportAdapter:
    """Fit ``alpha`` and ``beta`` by grid search on labelled images, without test images.

    Args:
        clip_logits: ``[N, C]`` zero-shot logits of the fitting images (the support images,
            then any held-out seen images).
        clip_emb: ``[N, D]`` their embeddings.
        y: ``[N]`` their classes over every class.
        keys: ``[n, D]`` the support embeddings (the cache).
        labels: ``[n]`` their classes.
        leave_out: ``[N]`` each fitting image's own row of ``keys`` (-1 for a held-out image):
            leave-one-out, so that no image finds itself at affinity 1.
        class_names: Every class's name (for the record).
        alpha_grid: ``alpha`` candidates in standard deviations of ``clip_logits``; those above
            :data:`ONE_SIDED_MAX_ALPHA` are left out when some class has no support image
            (nothing measures their cost to that class's images).
        beta_grid: ``beta`` candidates.

    Returns:
        The setting with the highest accuracy (ties: lower cross-entropy, then the smaller
        ``alpha``, then the first ``beta``; :func:`~hybridcls.gate.cache_branch.grid_search`),
        with the accuracies with and without it.

    Raises:
        InputError: No fitting image, or labels and images that disagree.
    """
    z = as_array(clip_logits, "clip_logits")
    yy = np.asarray(y, dtype=np.int64).reshape(-1)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(yy) != len(z) or len(yy) == 0:
        raise InputError(f"{len(yy)} labels for {len(z)} fitting images (need at least one)")
    if not alpha_grid or not beta_grid:
        raise InputError("alpha_grid and beta_grid need at least one value each")
    n_classes = z.shape[1]
    scale = float(np.std(z)) or 1.0
    plain = float(np.mean(z.argmax(axis=1) == yy))
    supported = np.unique(lab)
    if supported.size < n_classes:
        alpha_grid = [a for a in alpha_grid if a <= ONE_SIDED_MAX_ALPHA] or [min(alpha_grid)]
    acc, a, beta = grid_search(
        z, yy, lambda b: support_term(clip_emb, keys, lab, n_classes, b, leave_out=leave_out),
        scale, alpha_grid, beta_grid)
    return SupportAdapter(
        np.asarray(keys, dtype=np.float32), lab, n_classes, alpha=a * scale, beta=beta,
        alpha_rel=a, scale=scale, fit_accuracy=acc, fit_accuracy_plain=plain, n_fit=len(yy),
        class_names=tuple(class_names))
