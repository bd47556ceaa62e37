"""The zero-shot branch's default model, in a module that imports nothing heavy.

Read by :mod:`hybridcls.zeroshot.loading` and by the command line's flag
defaults, which must not import torch to build the parser.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CLIP_MODEL", "DEFAULT_CLIP_PRETRAINED", "HF_HUB_PREFIX", "LOCAL_DIR_PREFIX",
           "MODEL_PREFIXES"]

#: open_clip's ViT-B/32, with the LAION-2B weights (a good zero-shot model at modest cost).
DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"

#: The schemas open_clip reads in a model name (``open_clip.factory``'s own constants): a model
#: named with one brings its weights, so it takes no pretrained tag.
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
MODEL_PREFIXES = (HF_HUB_PREFIX, LOCAL_DIR_PREFIX)
