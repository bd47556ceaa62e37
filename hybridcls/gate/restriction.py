"""Class lists per image: the candidate classes of each row, applied to the routing and the fusion.

A restriction is an ``[N, C]`` boolean mask over the ``classes_`` columns (seen
first): True where the class may be the answer for that image (a site's class
list, SpeciesNet's geofence). :meth:`hybridcls.gate.Gate.predict` applies it
to the branch outputs before the fusion:

* the supervised logits of disallowed seen classes and the zero-shot logits of
  disallowed classes become ``-inf`` (:func:`restrict_outputs`), so that every
  softmax (:func:`hybridcls.gate.scores.softmax_rows`) gives them probability
  exactly 0 and renormalises over the allowed classes, in every mode (the
  cache branch's logits included: a masked logit stays ``-inf`` with its
  affinity added);
* the gate score is read on every class, as calibration read it: its
  threshold, and the combined score's standardisation, were set on that
  distribution, and a score over fewer classes lies elsewhere (MCM's softmax
  over 16 prompts instead of 40 is far sharper). On the synthetic world split
  into sites, routing on the restricted scores dropped the calibrated
  hybrid's accuracy from 96.9% to 86.3% (docs/benchmarks.md); every score is
  still defined on masked logits (``msp``, ``energy``, ``entropy``,
  ``max_logit`` over the allowed seen classes, ``mcm`` over the allowed seen
  prompts, ``unseen_mass`` and ``clip_margin`` over the allowed prompts), and
  ``knn`` / ``backbone_knn`` read embeddings, which a list leaves alone;
* a row that allows no seen class is decided by the zero-shot branch, and a
  row that allows no unseen class keeps the supervised answer, in every
  fusion mode (:func:`forced_routing`);
* a row that allows no class at all cannot be answered: :func:`check_allowed`
  refuses it (the predictor turns it into an error row naming the input).

Arrays only: no model, no image, no file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hybridcls.errors import ParameterError
from hybridcls.gate.branches import BranchOutputs

__all__ = ["check_allowed", "forced_routing", "mask_logits", "restrict_outputs"]


def check_allowed(allowed: Any, n_rows: int, n_classes: int) -> np.ndarray:
    """``allowed`` as an ``[n_rows, n_classes]`` boolean mask, checked.

    Args:
        allowed: ``[N, C]`` booleans (True = the class may be predicted for the row), or
            ``[C]`` for one list shared by every row.
        n_rows: ``N``, the rows of the outputs it restricts.
        n_classes: ``C``, every class (seen columns first).

    Raises:
        ParameterError: A shape that is not ``[C]`` or ``[N, C]``, values that are not
            booleans, or a row that allows no class (named by its index).

    Example:
        >>> check_allowed([True, False, True], 2, 3).tolist()
        [[True, False, True], [True, False, True]]
    """
    mask = np.asarray(allowed)
    if mask.dtype != np.bool_:
        raise ParameterError("allowed", f"<array of {mask.dtype}>",
                             "expected booleans (True = the class may be predicted)")
    if mask.shape == (n_classes,):
        mask = np.broadcast_to(mask, (n_rows, n_classes))
    if mask.shape != (n_rows, n_classes):
        raise ParameterError("allowed", f"<array of shape {mask.shape}>",
                             f"expected [{n_classes}] or [{n_rows}, {n_classes}] (rows x classes)")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if empty.size > 10 else "")
        raise ParameterError("allowed", f"<{empty.size} empty rows>",
                             f"row(s) {shown} allow no class: nothing could be predicted there")
    return np.array(mask, dtype=bool)


def mask_logits(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A copy of ``[N, K]`` logits with ``-inf`` where ``allowed [N, K]`` is False.

    NaN rows (a branch that did not run) stay NaN: nothing was measured there.

    Example:
        >>> mask_logits(np.array([[1.0, 2.0]]), np.array([[True, False]])).tolist()
        [[1.0, -inf]]
    """
    z = np.asarray(logits, dtype=np.float64)
    not_run = np.isnan(z).all(axis=1, keepdims=True)
    return np.where(allowed | not_run, z, -np.inf)


def restrict_outputs(outputs: BranchOutputs, allowed: np.ndarray, n_seen: int) -> BranchOutputs:
    """The branch outputs with the disallowed classes' logits at ``-inf`` (see the module's notes).

    Args:
        outputs: Both towers' outputs for N images.
        allowed: ``[N, C]`` checked mask (:func:`check_allowed`).
        n_seen: ``S``: the first ``S`` columns are the supervised logits' classes.

    Returns:
        New outputs; features and embeddings are shared, not copied.
    """
    sup = outputs.sup_logits
    clip = outputs.clip_logits
    return BranchOutputs(
        None if sup is None else mask_logits(sup, allowed[:, :n_seen]),
        outputs.sup_features,
        None if clip is None else mask_logits(clip, allowed),
        outputs.clip_embeddings)


def forced_routing(allowed: np.ndarray, n_seen: int) -> tuple[np.ndarray, np.ndarray]:
    """``(to_zeroshot, to_supervised)``: ``[N]`` rows whose class list leaves one branch only.

    A row with no allowed seen class goes to the zero-shot branch; one with no
    allowed unseen class stays with the supervised branch.

    Example:
        >>> z, s = forced_routing(np.array([[True, False, True], [False, False, True],
        ...                                 [False, True, False]]), n_seen=2)
        >>> z.tolist(), s.tolist()
        ([False, True, False], [False, False, True])
    """
    return ~allowed[:, :n_seen].any(axis=1), ~allowed[:, n_seen:].any(axis=1)
