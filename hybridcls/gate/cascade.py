"""The cascade's threshold: when is the supervised branch sure enough to skip CLIP?

With a gate that reads CLIP's outputs, both towers normally run on every
image. The cascade runs the supervised branch first and CLIP only on images
whose supervised maximum softmax probability (MSP) is at or below a
threshold; the others are decided by the supervised branch alone. The
threshold is fitted on held-out seen images with both towers' outputs: it is
the lowest MSP above which the full hybrid's decision equals the supervised
branch's in at least ``agreement`` of the images. Works on arrays only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import softmax

from hybridcls.errors import InputError
from hybridcls.gate.scores import as_array

__all__ = ["DEFAULT_AGREEMENT", "cascade_keep", "fit_cascade", "max_softmax"]

#: Share of the images the cascade keeps whose decision must equal the full hybrid's.
DEFAULT_AGREEMENT = 0.99


def max_softmax(sup_logits: Any, temperature: float = 1.0) -> np.ndarray:
    """``[N]`` maximum softmax probability of the supervised logits."""
    logits = as_array(sup_logits, "sup_logits", ndim=2)
    return softmax(logits / temperature, axis=1).max(axis=1)


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


def cascade_keep(sup_logits: Any, threshold: float, temperature: float = 1.0) -> np.ndarray:
    """``[N]`` True where the supervised branch decides alone (MSP strictly above ``threshold``)."""
    return max_softmax(sup_logits, temperature) > threshold
