"""hybridcls: open-set image classification.

A fine-tuned timm backbone for the classes you have images of, open_clip
zero-shot scores for every class named in a prompts file, and a gate,
calibrated without unseen images, that routes or mixes the two.

Example:
    >>> from hybridcls import ZeroShotClassifier
    >>> clf = ZeroShotClassifier(prompts="prompts/animals.txt").fit()  # doctest: +SKIP
    >>> clf.predict(["photos/"])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybridcls._lazy import lazy_getattr
from hybridcls.errors import HybridclsError
from hybridcls.version import __version__

if TYPE_CHECKING:
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.zeroshot import ZeroShotClassifier

__all__ = ["HybridClassifier", "HybridclsError", "ZeroShotClassifier", "__version__"]

# The classifiers import torch and open_clip: resolved on first use (PEP 562).
__getattr__ = lazy_getattr(__name__, {
    "HybridClassifier": "hybridcls.hybrid",
    "ZeroShotClassifier": "hybridcls.zeroshot",
})
