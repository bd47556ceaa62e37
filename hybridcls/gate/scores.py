"""Gate scores: how little an image looks like the seen classes.

Every score follows one convention, the one of pytorch-ood: **higher = less
like the seen classes** (more likely an unseen class). Each function is the
published formula, on arrays:

================  ==============================================  ===========================
name              formula (per row)                                reference
================  ==============================================  ===========================
``msp``           ``-max_j softmax(z / T)_j``                      Hendrycks & Gimpel 2017
``max_logit``     ``-max_j z_j``                                   Hendrycks et al. 2022
``energy``        ``-T * logsumexp(z / T)``                        Liu et al. 2020
``entropy``       ``-sum_j p_j log p_j``, ``p = softmax(z)``       (pytorch-ood ``Entropy``)
``mcm``           ``-max_s softmax(cos_seen / tau)_s``             Ming et al. 2022
``unseen_mass``   ``sum_u softmax(cos / tau)_u``                   Fort et al. 2021
``clip_margin``   ``max_u c_u - max_s c_s``                        (best unseen minus best seen)
``knn``           k-th nearest CLIP embedding's distance           Sun et al. 2022, on CLIP
``backbone_knn``  k-th nearest backbone feature's distance         Sun et al. 2022
================  ==============================================  ===========================

``z`` are the supervised head's logits over the seen classes; ``c`` the
zero-shot logits, ``c = scale * cos`` (CLIP's own logit scale times the
cosine similarities of image and class text), whose first ``n_seen`` columns
are the seen classes. ``s`` runs over the seen classes, ``u`` over the
unseen ones.

The CLIP-side softmax scores (``mcm``, ``unseen_mass``) take their
temperature ``tau`` on the cosine similarities, as their papers define it:
MCM is ``tau = 1`` in Ming et al. (and pytorch-ood's ``MCM``), which for a
CLIP whose logit scale is 100 is a far flatter softmax than the one the
logits give (``tau = 1 / scale``). ``clip_temperature=None`` means that
softmax of the logits as they are (CLIP's own scale; needs no scale), any
number a ``tau`` in cosine units (needs ``clip_logit_scale``). Calibration
chooses among them (:data:`hybridcls.gate.calibration.CLIP_TEMPERATURE_GRID`).
:class:`CombinedScore` mixes several scores with a small logistic model.

Functions accept numpy arrays or torch tensors and return numpy float64.

Infinite logits have defined scores (a ``-inf`` logit is a masked class; a
``+inf`` one a certain class), through :func:`softmax_rows`, the softmax on the
extended reals: ``-inf`` entries get probability 0, the ``+inf`` entries of a
row share it equally, and a row of ``-inf`` only (every class masked) is
uniform, the limit of equal logits. So for ``[2, 1, -inf]`` every score is
that of ``[2, 1]``; one ``+inf`` logit gives ``msp = -1``, ``entropy = 0``,
``max_logit = energy = -inf``; an all ``-inf`` row gives ``msp = -1/S``,
``entropy = log S``, ``max_logit = energy = +inf`` (nothing looks seen). A NaN
entry makes its row's score NaN (not computed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy.special import entr, log_softmax, logsumexp, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from hybridcls.errors import DataTooSmallError, InputError
from hybridcls.index import EmbeddingIndex

__all__ = [
    "DEFAULT_KNN_K",
    "INDEX_OF",
    "INPUTS",
    "MIN_COMBINED_SEEN",
    "SCORES",
    "TEMPERATURE_KINDS",
    "CombinedScore",
    "ScoreInputs",
    "ScoreSpec",
    "as_array",
    "clip_margin_score",
    "compute_scores",
    "energy_score",
    "entropy_score",
    "knn_distance_score",
    "max_logit_score",
    "mcm_score",
    "mean_nll",
    "msp_score",
    "needs_of",
    "softmax_rows",
    "unseen_mass_score",
]

#: The arrays a score can need; the names are the keyword arguments of :func:`compute_scores`.
INPUTS = ("sup_logits", "sup_features", "clip_logits", "clip_emb")

#: Which temperature a score takes: the supervised softmax's (``"sup"``), the CLIP-side
#: softmax's on cosine similarities (``"clip"``), or none.
TEMPERATURE_KINDS = ("sup", "clip")

#: Neighbours used by the kNN score when none is given. Sun et al. use k=50 for
#: 50,000 training images; a seen class here has tens of images, so a smaller k
#: keeps the k-th neighbour inside the image's own class.
DEFAULT_KNN_K = 10


#: Seen images (with finite scores) that :class:`CombinedScore` standardises on, at least:
#: one image has no spread to standardise by.
MIN_COMBINED_SEEN = 2


def as_array(x: Any, name: str = "array", ndim: int = 2) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or nested list) as float64 numpy.

    Args:
        x: The values; torch tensors are detached and moved to the CPU.
        name: What to call it in an error message.
        ndim: The number of dimensions it must have.

    Raises:
        InputError: When it has the wrong number of dimensions.
    """
    if hasattr(x, "detach"):  # a torch tensor; duck-typed so that gate/ never imports torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


def mean_nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes ``y`` under ``softmax(logits)``.

    Example:
        >>> round(mean_nll(np.array([[0.0, 0.0]]), np.array([1])), 4)  # log 2
        0.6931
    """
    return float(-np.mean(log_softmax(logits, axis=1)[np.arange(len(y)), y]))


def softmax_rows(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[N, K]`` logits on the extended reals.

    ``-inf`` entries get 0; when a row has ``+inf`` entries they share the
    probability equally (the limit as they grow together) and the finite
    entries get 0; a row of ``-inf`` only is uniform (the limit of equal
    logits); a row with a NaN is NaN. Every score and fusion mode reads
    probabilities through it, so that a masked class (``-inf``) never turns
    a row into NaN.

    Example:
        >>> inf = np.inf
        >>> softmax_rows(np.array([[0.0, 0.0, -inf], [inf, 1.0, inf], [-inf, -inf, -inf]])).round(3)
        array([[0.5  , 0.5  , 0.   ],
               [0.5  , 0.   , 0.5  ],
               [0.333, 0.333, 0.333]])
    """
    z = np.asarray(z, dtype=np.float64)
    top = np.isposinf(z)
    has_top = top.any(axis=1)
    masked = np.isneginf(z).all(axis=1)
    regular = ~has_top & ~masked
    out = np.empty_like(z)
    out[regular] = softmax(z[regular], axis=1)
    out[has_top] = top[has_top] / top[has_top].sum(axis=1, keepdims=True)
    out[masked] = 1.0 / z.shape[1]
    out[np.isnan(z).any(axis=1)] = np.nan
    return out


def msp_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Negative maximum softmax probability (pytorch-ood ``MaxSoftmax``).

    Args:
        logits: ``[N, S]`` logits over the seen classes.
        temperature: Softmax temperature ``T`` (1 = the plain baseline).

    Returns:
        ``[N]`` scores in ``[-1, -1/S]``; higher = less like the seen classes.

    Example:
        >>> msp_score([[10.0, 0.0], [0.0, 0.0]]).round(3).tolist()
        [-1.0, -0.5]
    """
    z = as_array(logits, "logits")
    return -softmax_rows(z / temperature).max(axis=1)


def max_logit_score(logits: Any) -> np.ndarray:
    """Negative maximum logit (pytorch-ood ``MaxLogit``).

    Args:
        logits: ``[N, S]`` logits over the seen classes.

    Returns:
        ``[N]`` scores; higher = less like the seen classes.
    """
    return -as_array(logits, "logits").max(axis=1)


def energy_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Free energy ``-T * logsumexp(z / T)`` (pytorch-ood ``EnergyBased``, Liu et al. 2020).

    Args:
        logits: ``[N, S]`` logits over the seen classes.
        temperature: ``T``; higher values smooth towards the mean logit.

    Returns:
        ``[N]`` energies; higher = less like the seen classes. ``-inf`` for a row with
        a ``+inf`` logit, ``+inf`` for a row of ``-inf`` only.
    """
    z = as_array(logits, "logits")
    with np.errstate(divide="ignore"):  # log(0) of an all -inf row: +inf energy, as defined
        return -temperature * logsumexp(z / temperature, axis=1)


def entropy_score(logits: Any) -> np.ndarray:
    """Entropy of the softmax, ``-sum p log p`` in nats (pytorch-ood ``Entropy``).

    Args:
        logits: ``[N, S]`` logits over the seen classes.

    Returns:
        ``[N]`` entropies in ``[0, log S]``; higher = less like the seen classes.
    """
    z = as_array(logits, "logits")
    # entr(p) = -p log p with entr(0) = 0: a masked class (p = 0) adds nothing, not 0 * -inf
    return entr(softmax_rows(z)).sum(axis=1)


def mcm_score(similarities_seen: Any, temperature: float = 1.0) -> np.ndarray:
    """Negative maximum concept matching (Ming et al. 2022; pytorch-ood ``MCM``).

    MCM is the largest softmax probability over the seen classes' prompts of the
    image-text cosine similarities divided by ``temperature``; the paper's
    default is 1. Given logits (``scale * cos``) with ``temperature=1``, it is
    MCM at ``tau = 1 / scale``, CLIP's own sharpness.

    Args:
        similarities_seen: ``[N, S]`` cosine similarities (or logits) with the seen
            classes' prompts only.
        temperature: ``tau``, in the units of ``similarities_seen``.

    Returns:
        ``[N]`` scores in ``[-1, -1/S]``; higher = less like the seen classes.

    Example:
        >>> mcm_score([[0.30, 0.20]]).round(4).tolist()  # paper: tau = 1 on cosines
        [-0.525]
        >>> mcm_score([[0.30, 0.20]], temperature=0.01).round(4).tolist()  # CLIP's scale 100
        [-1.0]
    """
    c = as_array(similarities_seen, "similarities_seen")
    return -softmax_rows(c / temperature).max(axis=1)


def unseen_mass_score(similarities: Any, n_seen: int, temperature: float = 1.0) -> np.ndarray:
    """Probability mass of the unseen classes' prompts (Fort et al. 2021).

    With the names of the outlier classes known, Fort et al. ("Exploring the
    limits of out-of-distribution detection", 2021) score an image by the sum of
    CLIP's softmax over those names, taken over every prompt, seen and unseen:
    unlike MCM, it knows what an unseen image should look like.

    Args:
        similarities: ``[N, C]`` cosine similarities (or logits), seen classes first.
        n_seen: Number of seen classes (``0 < n_seen < C``).
        temperature: ``tau``, in the units of ``similarities``.

    Returns:
        ``[N]`` masses in ``[0, 1]``; higher = less like the seen classes.

    Example:
        >>> unseen_mass_score([[0.30, 0.20, 0.25]], n_seen=2).round(4).tolist()
        [0.3331]
    """
    c = as_array(similarities, "similarities")
    _check_seen_columns(n_seen, c.shape[1], "unseen_mass")
    return softmax_rows(c / temperature)[:, n_seen:].sum(axis=1)


def _check_seen_columns(n_seen: int, n_classes: int, score: str) -> None:
    if not 0 < n_seen < n_classes:
        raise InputError(
            f"{score} needs seen and unseen columns: n_seen={n_seen} of {n_classes} classes"
        )


def clip_margin_score(clip_logits: Any, n_seen: int) -> np.ndarray:
    """Best unseen class's zero-shot logit minus the best seen class's.

    Unlike MCM it knows the unseen classes' names: an image of an unseen class
    usually matches its own prompt better than any seen prompt.

    Args:
        clip_logits: ``[N, C]`` zero-shot logits, seen classes in the first ``n_seen`` columns.
        n_seen: Number of seen classes (``0 < n_seen < C``).

    Returns:
        ``[N]`` margins in logit units; positive = an unseen prompt wins. Both maxima
        equal (infinite ones included) is a tie: 0.

    Example:
        >>> clip_margin_score([[5.0, 1.0, 2.0], [1.0, 0.0, 4.0]], n_seen=2).tolist()
        [-3.0, 3.0]
    """
    c = as_array(clip_logits, "clip_logits")
    _check_seen_columns(n_seen, c.shape[1], "clip_margin")
    best_unseen, best_seen = c[:, n_seen:].max(axis=1), c[:, :n_seen].max(axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf, replaced by the tie's 0
        return np.where(best_unseen == best_seen, 0.0, best_unseen - best_seen)


def knn_distance_score(
    embeddings: Any, index: EmbeddingIndex, k: int = DEFAULT_KNN_K
) -> np.ndarray:
    """Distance on the unit sphere to the k-th nearest training embedding (Sun et al. 2022).

    Sun et al. measure it on the supervised model's normalised penultimate
    features (``backbone_knn``); ``knn`` measures it on CLIP's image embeddings.

    Args:
        embeddings: ``[N, D]`` embeddings (normalised here, by the index).
        index: The training images' embeddings of the same kind.
        k: Which neighbour.

    Returns:
        ``[N]`` distances in ``[0, 2]``; higher = farther from every seen image. NaN
        for a row that is not finite (no embedding: nothing to measure), which every
        fusion mode keeps in the supervised branch.
    """
    return index.kth_distance(as_array(embeddings, "embeddings"), k)


@dataclass(frozen=True)
class ScoreInputs:
    """The arrays and settings a score may be computed from (see :func:`compute_scores`)."""

    sup_logits: np.ndarray | None = None
    sup_features: np.ndarray | None = None
    clip_logits: np.ndarray | None = None
    n_seen: int | None = None
    clip_emb: np.ndarray | None = None
    knn_index: EmbeddingIndex | None = None
    backbone_index: EmbeddingIndex | None = None
    temperature: float = 1.0
    clip_temperature: float | None = None
    clip_logit_scale: float | None = None
    knn_k: int = DEFAULT_KNN_K

    def clip_similarities(self) -> tuple[np.ndarray, float]:
        """``(similarities, tau)`` for the CLIP-side softmax scores (see the module's notes).

        Raises:
            InputError: A ``clip_temperature`` without the ``clip_logit_scale`` to read it by.
        """
        assert self.clip_logits is not None
        if self.clip_temperature is None:
            return self.clip_logits, 1.0
        if self.clip_logit_scale is None or not self.clip_logit_scale > 0:
            raise InputError(
                f"clip_temperature={self.clip_temperature} is in cosine units: it needs "
                f"clip_logit_scale (CLIP's logit scale), got {self.clip_logit_scale}")
        return self.clip_logits / self.clip_logit_scale, self.clip_temperature


class ScoreSpec(NamedTuple):
    """A registered score.

    Attributes:
        function: The public formula (e.g. :func:`energy_score`).
        needs: Which of :data:`INPUTS` it reads; a gate whose scores need no
            ``clip_*`` input lets the zero-shot branch run only on routed images.
        temperature: Which temperature changes it (a calibration grid axis): ``"sup"``
            (``temperature``), ``"clip"`` (``clip_temperature``) or ``None``.
        call: Computes it from a :class:`ScoreInputs` (the adapter behind :func:`compute_scores`).
    """

    function: Callable[..., np.ndarray]
    needs: tuple[str, ...]
    temperature: str | None
    call: Callable[[ScoreInputs], np.ndarray]


def _mcm(i: ScoreInputs) -> np.ndarray:
    sims, tau = i.clip_similarities()
    return mcm_score(sims[:, : i.n_seen], tau)


def _unseen_mass(i: ScoreInputs) -> np.ndarray:
    sims, tau = i.clip_similarities()
    return unseen_mass_score(sims, i.n_seen, tau)


SCORES: dict[str, ScoreSpec] = {
    "msp": ScoreSpec(
        msp_score, ("sup_logits",), "sup", lambda i: msp_score(i.sup_logits, i.temperature)
    ),
    "max_logit": ScoreSpec(
        max_logit_score, ("sup_logits",), None, lambda i: max_logit_score(i.sup_logits)
    ),
    "energy": ScoreSpec(
        energy_score, ("sup_logits",), "sup", lambda i: energy_score(i.sup_logits, i.temperature)
    ),
    "entropy": ScoreSpec(
        entropy_score, ("sup_logits",), None, lambda i: entropy_score(i.sup_logits)
    ),
    "mcm": ScoreSpec(mcm_score, ("clip_logits",), "clip", _mcm),
    "unseen_mass": ScoreSpec(unseen_mass_score, ("clip_logits",), "clip", _unseen_mass),
    "clip_margin": ScoreSpec(
        clip_margin_score,
        ("clip_logits",),
        None,
        lambda i: clip_margin_score(i.clip_logits, i.n_seen),
    ),
    "knn": ScoreSpec(
        knn_distance_score,
        ("clip_emb",),
        None,
        lambda i: knn_distance_score(i.clip_emb, i.knn_index, i.knn_k),
    ),
    "backbone_knn": ScoreSpec(
        knn_distance_score,
        ("sup_features",),
        None,
        lambda i: knn_distance_score(i.sup_features, i.backbone_index, i.knn_k),
    ),
}

#: The index each kNN score reads (a keyword argument of :func:`compute_scores`).
INDEX_OF = {"knn": "knn_index", "backbone_knn": "backbone_index"}


def needs_of(names: Sequence[str]) -> set[str]:
    """The inputs (of :data:`INPUTS`) that the named scores read together.

    Raises:
        InputError: For a name not in :data:`SCORES`.
    """
    _check_names(names)
    return {need for name in names for need in SCORES[name].needs}


def _check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise InputError(f"unknown gate score {unknown[0]!r}; choose from {', '.join(SCORES)}")


def compute_scores(
    names: Sequence[str],
    *,
    sup_logits: Any = None,
    sup_features: Any = None,
    clip_logits: Any = None,
    n_seen: int | None = None,
    clip_emb: Any = None,
    knn_index: EmbeddingIndex | None = None,
    backbone_index: EmbeddingIndex | None = None,
    temperature: float = 1.0,
    clip_temperature: float | None = None,
    clip_logit_scale: float | None = None,
    knn_k: int = DEFAULT_KNN_K,
) -> dict[str, np.ndarray]:
    """Compute several registered scores from one set of arrays.

    Args:
        names: Keys of :data:`SCORES`.
        sup_logits: ``[N, S]`` supervised logits (``msp``, ``max_logit``, ``energy``, ``entropy``).
        sup_features: ``[N, F]`` supervised backbone features (``backbone_knn``).
        clip_logits: ``[N, C]`` zero-shot logits, seen columns first (``mcm``,
            ``unseen_mass``, ``clip_margin``).
        n_seen: Number of seen columns in ``clip_logits``; defaults to ``sup_logits``' width.
        clip_emb: ``[N, D]`` normalised CLIP embeddings (``knn``).
        knn_index: The training images' CLIP embeddings (``knn``).
        backbone_index: The training images' backbone features (``backbone_knn``).
        temperature: For the supervised scores that take one (``msp``, ``energy``).
        clip_temperature: For ``mcm`` and ``unseen_mass``, on the cosine similarities
            (``None``: the logits as they are, CLIP's own scale).
        clip_logit_scale: CLIP's logit scale, which turns the logits back into cosine
            similarities (needed with ``clip_temperature``).
        knn_k: The neighbour the kNN scores measure.

    Returns:
        ``{name: [N] float64 scores}`` in the order of ``names``.

    Raises:
        InputError: For an unknown name or when an input a score needs is missing.

    Example:
        >>> s = compute_scores(["energy", "clip_margin"], sup_logits=[[2.0, 0.0]],
        ...                    clip_logits=[[3.0, 1.0, 0.5]])
        >>> sorted(s), s["clip_margin"].tolist()
        (['clip_margin', 'energy'], [-2.5])
    """
    _check_names(names)
    given = {"sup_logits": sup_logits, "sup_features": sup_features, "clip_logits": clip_logits,
             "clip_emb": clip_emb}
    indexes = {"knn_index": knn_index, "backbone_index": backbone_index}
    for name in names:
        for need in SCORES[name].needs:
            if given[need] is None:
                raise InputError(f"gate score {name!r} needs {need}, which was not given")
        if name in INDEX_OF and indexes[INDEX_OF[name]] is None:
            raise InputError(f"gate score {name!r} needs {INDEX_OF[name]} (the training "
                             "images' embeddings)")
    sup = None if sup_logits is None else as_array(sup_logits, "sup_logits")
    clip = None if clip_logits is None else as_array(clip_logits, "clip_logits")
    if clip is not None and n_seen is None:
        if sup is None:
            raise InputError("n_seen is needed with clip_logits when sup_logits is not given")
        n_seen = sup.shape[1]
    inputs = ScoreInputs(
        sup_logits=sup,
        sup_features=None if sup_features is None else as_array(sup_features, "sup_features"),
        clip_logits=clip,
        n_seen=n_seen,
        clip_emb=None if clip_emb is None else as_array(clip_emb, "clip_emb"),
        knn_index=knn_index,
        backbone_index=backbone_index,
        temperature=temperature,
        clip_temperature=clip_temperature,
        clip_logit_scale=clip_logit_scale,
        knn_k=knn_k,
    )
    return {name: SCORES[name].call(inputs) for name in names}


class CombinedScore:
    """A logistic model over several standardised scores; its logit is the score.

    The scores are standardised with the mean and spread of the **seen**
    images only (those whose scores are all finite, as is the fit). That
    anchor exists on both sides of calibration (the light heads' held-out
    seen images, then the real model's), so :meth:`anchored`
    can move the weights learned on stand-in problems onto the real model's
    score scales.

    Args:
        names: The base scores (keys of :data:`SCORES`), in column order.
        C: Inverse regularisation strength of the logistic model.

    Example:
        >>> X = np.array([[0.0, 1.0], [0.2, 0.9], [3.0, 0.1], [2.8, 0.0]])
        >>> m = CombinedScore(["energy", "mcm"]).fit(X, np.array([False, False, True, True]))
        >>> bool(m.score(X)[2] > m.score(X)[0])
        True
    """

    def __init__(self, names: Sequence[str], C: float = 1.0) -> None:
        _check_names(names)
        self.names = list(names)
        self.C = C
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.coef_: np.ndarray | None = None
        self.intercept_: float = 0.0

    def fit(self, score_matrix: Any, is_unseen: Any) -> CombinedScore:
        """Fit on ``[N, len(names)]`` scores and a boolean "unseen" label per row.

        Rows with a non-finite score are left out (no logistic model takes them).
        """
        X = self._matrix(score_matrix)
        y = np.asarray(is_unseen, dtype=bool)
        if y.shape != (X.shape[0],):
            raise InputError(f"CombinedScore.fit: {y.size} labels for {X.shape[0]} rows")
        finite = np.isfinite(X).all(axis=1)
        X, y = X[finite], y[finite]
        if y.all() or not y.any():
            raise InputError(
                "CombinedScore.fit needs one label per row, with both seen and unseen rows"
            )
        self._set_anchor(X[~y])
        # balanced, because a stand-in problem hides only ~20% of the classes
        lr = LogisticRegression(C=self.C, class_weight="balanced", max_iter=200)
        lr.fit(self._standardise(X), y)
        self.coef_ = lr.coef_[0].astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        return self

    def score(self, score_matrix: Any) -> np.ndarray:
        """The logistic model's logit per row: higher = less like the seen classes.

        An infinite base score with a non-zero weight makes the logit infinite, with
        the sign of its term; infinite terms of both signs cancel, leaving the finite
        terms to decide; a NaN base score makes the row NaN.

        Example:
            >>> m = CombinedScore.from_dict({"names": ["energy", "mcm"], "mean": [0, 0],
            ...                              "scale": [1, 1], "coef": [2.0, -1.0], "intercept": 0.5})
            >>> m.score([[1.0, 1.0], [np.inf, 0.0], [np.inf, np.inf], [np.inf, -np.inf]]).tolist()
            [1.5, inf, 0.5, inf]
        """
        if self.coef_ is None:
            raise InputError("CombinedScore is not fitted: call fit() or from_dict() first")
        X = self._matrix(score_matrix)
        with np.errstate(invalid="ignore"):  # inf * 0: a zero weight ignores its score
            terms = np.where(self.coef_ == 0, 0.0, self._standardise(X) * self.coef_)
        up, down = np.isposinf(terms).any(axis=1), np.isneginf(terms).any(axis=1)
        out = np.where(np.isfinite(terms), terms, 0.0).sum(axis=1) + self.intercept_
        out[up & ~down] = np.inf
        out[down & ~up] = -np.inf
        out[np.isnan(X).any(axis=1)] = np.nan
        return out

    def anchored(self, seen_score_matrix: Any) -> CombinedScore:
        """A copy with the same weights, standardised on other seen images' scores."""
        new = CombinedScore.from_dict(self.to_dict())
        new._set_anchor(self._matrix(seen_score_matrix))
        return new

    def matrix_from(self, scores: Mapping[str, Any]) -> np.ndarray:
        """Stack ``{name: [N] scores}`` (as from :func:`compute_scores`) into ``[N, names]``."""
        missing = [n for n in self.names if n not in scores]
        if missing:
            raise InputError(f"the combined score needs score {missing[0]!r}, which was not given")
        return np.column_stack([as_array(scores[n], n, ndim=1) for n in self.names])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able parameters (no pickle)."""
        if self.coef_ is None or self.mean_ is None or self.scale_ is None:
            raise InputError("CombinedScore is not fitted: nothing to save")
        return {
            "names": list(self.names),
            "C": self.C,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CombinedScore:
        """Rebuild from :meth:`to_dict`'s output."""
        try:
            new = cls(d["names"], C=float(d.get("C", 1.0)))
            new.mean_ = np.asarray(d["mean"], dtype=np.float64)
            new.scale_ = np.asarray(d["scale"], dtype=np.float64)
            new.coef_ = np.asarray(d["coef"], dtype=np.float64)
            new.intercept_ = float(d["intercept"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a saved CombinedScore: {e}") from e
        if not (len(new.names) == new.mean_.size == new.scale_.size == new.coef_.size):
            raise InputError(
                "not a saved CombinedScore: names, mean, scale and coef differ in length"
            )
        return new

    def _matrix(self, score_matrix: Any) -> np.ndarray:
        X = as_array(score_matrix, "score_matrix")
        if X.shape[1] != len(self.names):
            raise InputError(f"score_matrix has {X.shape[1]} columns for {len(self.names)} scores")
        return X

    def _set_anchor(self, seen_rows: np.ndarray) -> None:
        seen_rows = seen_rows[np.isfinite(seen_rows).all(axis=1)]
        if seen_rows.shape[0] < MIN_COMBINED_SEEN:
            raise DataTooSmallError(
                f"standardising the combined score needs the scores of at least {MIN_COMBINED_SEEN} "
                f"held-out seen images, got {seen_rows.shape[0]}: add held-out images or choose "
                "a single score")
        scaler = StandardScaler().fit(seen_rows)
        self.mean_ = scaler.mean_.astype(np.float64)
        self.scale_ = scaler.scale_.astype(np.float64)

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        assert self.mean_ is not None and self.scale_ is not None
        return (X - self.mean_) / self.scale_
