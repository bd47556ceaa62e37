"""The zero-shot branch: open_clip loading, prompt files, the class-text matrix.

* :mod:`~hybridcls.zeroshot.prompts`: prompts and templates files;
* :mod:`~hybridcls.zeroshot.loading`: :func:`load_clip`, offline-first;
* :mod:`~hybridcls.zeroshot.text_checks`: class text against the model's
  context length, and classes the model cannot tell apart;
* :mod:`~hybridcls.zeroshot.text_classifier`: :func:`build_text_classifier`
  with its on-disk cache;
* :mod:`~hybridcls.zeroshot.tower`: :class:`ClipTower`, the model with its class-text matrix;
* :mod:`~hybridcls.zeroshot.classifier`: :class:`ZeroShotClassifier`.

Importing this package loads only the prompts parser; torch and open_clip
load on first use of the other names, so reading a prompts file stays cheap.

Example:
    >>> from hybridcls.zeroshot import ZeroShotClassifier
    >>> clf = ZeroShotClassifier("local-dir:tiny_clip", prompts=["cat", "dog"]).fit()  # doctest: +SKIP
    >>> clf.classes_  # doctest: +SKIP
    array(['cat', 'dog'], dtype='<U3')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybridcls._lazy import lazy_getattr
from hybridcls.zeroshot.prompts import (
    ClassPrompt,
    PromptSet,
    TemplateSet,
    as_prompt_set,
    as_template_set,
    check_templates,
    class_phrases,
    normalize_label,
    parse_prompts,
    parse_templates,
    read_prompts,
    read_templates,
)

if TYPE_CHECKING:
    from hybridcls.zeroshot.classifier import (
        ZeroShotClassifier,
    )
    from hybridcls.zeroshot.loading import (
        DEFAULT_CLIP_MODEL,
        DEFAULT_CLIP_PRETRAINED,
        ClipBundle,
        load_clip,
    )
    from hybridcls.zeroshot.text_checks import (
        NEAR_IDENTICAL_COSINE,
        check_class_text,
        token_counts,
    )
    from hybridcls.zeroshot.text_classifier import (
        build_text_classifier,
        text_cache_key,
    )
    from hybridcls.zeroshot.tower import ClipTower

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "NEAR_IDENTICAL_COSINE",
    "ClassPrompt",
    "ClipBundle",
    "ClipTower",
    "PromptSet",
    "TemplateSet",
    "ZeroShotClassifier",
    "as_prompt_set",
    "as_template_set",
    "build_text_classifier",
    "check_class_text",
    "check_templates",
    "class_phrases",
    "load_clip",
    "normalize_label",
    "parse_prompts",
    "parse_templates",
    "read_prompts",
    "read_templates",
    "text_cache_key",
    "token_counts",
]

# Names whose modules import torch and open_clip, resolved on first access (PEP 562).
_LAZY = {
    "ZeroShotClassifier": "hybridcls.zeroshot.classifier",
    "ClipTower": "hybridcls.zeroshot.tower",
    "DEFAULT_CLIP_MODEL": "hybridcls.zeroshot.loading",
    "DEFAULT_CLIP_PRETRAINED": "hybridcls.zeroshot.loading",
    "ClipBundle": "hybridcls.zeroshot.loading",
    "load_clip": "hybridcls.zeroshot.loading",
    "NEAR_IDENTICAL_COSINE": "hybridcls.zeroshot.text_checks",
    "check_class_text": "hybridcls.zeroshot.text_checks",
    "token_counts": "hybridcls.zeroshot.text_checks",
    "build_text_classifier": "hybridcls.zeroshot.text_classifier",
    "text_cache_key": "hybridcls.zeroshot.text_classifier",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
