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

__version__ = "0.1.0"

from hybridcls.errors import HybridclsError
from hybridcls.zeroshot import ZeroShotClassifier

__all__ = ["__version__", "HybridclsError", "ZeroShotClassifier"]
