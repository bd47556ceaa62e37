"""Explanations people can look at: Grad-CAM, CLIP similarity maps, the decision, neighbours.

``gradcam`` (supervised branch, through pytorch-grad-cam), ``clip_maps``
(zero-shot branch: per-location CLIP embeddings against a class's text
embedding), ``overlay`` (heat maps over images, PNGs), ``explainer`` (runs
a hybrid over inputs and gathers everything per image) and ``page`` (the HTML).

Example:
    >>> from hybridcls.explain import explain_images, write_explain_page
    >>> res = explain_images(clf, ["photos/"], "explain-out")  # doctest: +SKIP
    >>> write_explain_page(res)  # doctest: +SKIP
    PosixPath('explain-out/index.html')
"""

from __future__ import annotations

from hybridcls.explain.clip_maps import clip_patch_embeddings, clip_similarity_map
from hybridcls.explain.explainer import ExplainResult, Explanation, Neighbour, explain_images
from hybridcls.explain.gradcam import gradcam_maps, last_stage, require_grad_cam
from hybridcls.explain.page import write_explain_page

__all__ = [
    "ExplainResult",
    "Explanation",
    "Neighbour",
    "clip_patch_embeddings",
    "clip_similarity_map",
    "explain_images",
    "gradcam_maps",
    "last_stage",
    "require_grad_cam",
    "write_explain_page",
]
