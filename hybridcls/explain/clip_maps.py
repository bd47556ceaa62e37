"""Where in the image CLIP sees a class: per-location image embeddings against a text embedding.

CLIP's image tower pools its last feature map into one embedding. Applying
the tower's final projection to every location instead gives one embedding
per patch in the joint image-text space; its cosine similarity to a class's
text embedding is a coarse map of where the class is seen (MaskCLIP: Zhou,
Loy and Dai, "Extract Free Dense Labels from CLIP", ECCV 2022).

* open_clip ``VisionTransformer``: the output patch tokens (open_clip returns
  them with ``output_tokens=True``, after ``ln_post``) times ``visual.proj``,
  the projection that the pooled token goes through.
* open_clip ``ModifiedResNet``: the last stage's feature map, then per
  location the attention pool's value projection and output projection
  (MaskCLIP's reformulation of ``v_proj`` and ``c_proj`` as 1x1
  convolutions; the query/key path, which only mixes locations, is skipped,
  and so is the positional embedding, as in MaskCLIP). Without a positional
  embedding the tower runs at any input size, so a feature grid coarser than
  ``min_grid`` (the shipped tiny CLIP's 32 px input gives 1x1) is refined by
  running the tower on the image up-sampled by an integer factor.

Other towers (timm-backed ones) have no such projection and are refused.
The similarity of plain output tokens is known to be noisy in large ViTs
(MaskCLIP, and later SCLIP / ClearCLIP, change the last attention block to
sharpen it); these maps are the unmodified model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from hybridcls.errors import InputError

__all__ = ["clip_patch_embeddings", "clip_similarity_map", "maskclip_values", "normalize_map"]


def maskclip_values(attnpool: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Per-location output of a CLIP attention pool's value path: ``c_proj(v_proj(x))``.

    Args:
        attnpool: open_clip's ``AttentionPool2d`` (``v_proj`` and ``c_proj`` linears).
        features: ``[B, C, h, w]`` the last stage's feature map.

    Returns:
        ``[B, h, w, D]`` one embedding per location, in the joint space.
    """
    x = features.permute(0, 2, 3, 1)
    return attnpool.c_proj(attnpool.v_proj(x))


def _vit_tokens(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    if visual.attn_pool is not None or visual.proj is None or visual.pool_type == "none":
        raise InputError(f"CLIP similarity maps: unsupported ViT pooling in {type(visual).__name__} "
                         "(attentional pool or no projection)")
    before = visual.output_tokens
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = before
    if visual.final_ln_after_pool:
        tokens = visual.ln_post(tokens)  # the tokens come back before the norm in that setup
    gh, gw = images.shape[-2] // visual.patch_size[0], images.shape[-1] // visual.patch_size[1]
    return (tokens @ visual.proj).reshape(images.shape[0], gh, gw, -1)


def _resnet_grid(visual: ModifiedResNet, images: torch.Tensor) -> torch.Tensor:
    x = visual.stem(images)
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = layer(x)
    return x


def _resnet_features(visual: ModifiedResNet, images: torch.Tensor, min_grid: int) -> torch.Tensor:
    x = _resnet_grid(visual, images)
    side = min(x.shape[-2:])
    if side < min_grid:
        # Convolutions work at any size and the value path has no positional embedding, so a
        # coarse grid (the shipped tiny CLIP's 32 px input gives 1x1) is refined by running the
        # tower on the image up-sampled until the grid has min_grid cells a side.
        factor = -(-min_grid // side)
        images = F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False)
        x = _resnet_grid(visual, images)
    return maskclip_values(visual.attnpool, x)


def clip_patch_embeddings(visual: nn.Module, images: torch.Tensor, *, min_grid: int = 7
                          ) -> torch.Tensor:
    """One joint-space embedding per location of the image tower's last feature map.

    Args:
        visual: An open_clip image tower (``model.visual``): ``VisionTransformer`` or ``ModifiedResNet``.
        images: ``[B, 3, H, W]`` preprocessed as for ``encode_image``.
        min_grid: ModifiedResNet only: when the last feature map has fewer
            cells a side, the images are up-sampled (bilinear) by the integer
            factor that reaches it. A ViT's grid is fixed by its positional embedding.

    Returns:
        ``[B, h, w, D]`` unnormalised embeddings (``D`` = the model's ``embed_dim``).

    Raises:
        InputError: Another kind of tower (e.g. a timm backbone).
    """
    if isinstance(visual, VisionTransformer):
        return _vit_tokens(visual, images)
    if isinstance(visual, ModifiedResNet):
        return _resnet_features(visual, images, min_grid)
    raise InputError(f"CLIP similarity maps support open_clip VisionTransformer and ModifiedResNet "
                     f"image towers, not {type(visual).__name__}")


def normalize_map(m: torch.Tensor) -> torch.Tensor:
    """Min-max scale each ``[..., H, W]`` map to [0, 1] (a flat map becomes all 0)."""
    flat = m.flatten(-2).float()
    lo = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - lo
    # A map flat up to rounding (a 1x1 grid up-sampled) has no "where": all 0, not scaled noise.
    flat_map = span <= 1e-6 * lo.abs().clamp_min(1.0)
    out = torch.where(flat_map, torch.zeros_like(flat), (flat - lo) / span.clamp_min(1e-12))
    return out.reshape(m.shape)


def clip_similarity_map(visual: nn.Module, images: torch.Tensor, text: torch.Tensor, *,
                        min_grid: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every location to a text embedding, up-sampled to the input size.

    Args:
        visual: An open_clip image tower (see :func:`clip_patch_embeddings`).
        images: ``[B, 3, H, W]`` preprocessed images.
        text: ``[B, D]`` (or ``[D]``, shared) text embeddings, e.g. the
            predicted class's column of the zero-shot text matrix.
        min_grid: See :func:`clip_patch_embeddings`.

    Returns:
        ``(map, cosine)``: ``map`` is ``[B, H, W]`` in [0, 1] (min-max scaled
        per image, bilinear up-sampling); ``cosine`` is the raw ``[B, h, w]``
        similarity on the feature grid.

    Example:
        >>> m, cos = clip_similarity_map(clf.bundle_.model.visual, x, text)  # doctest: +SKIP
    """
    with torch.no_grad():
        patches = F.normalize(clip_patch_embeddings(visual, images, min_grid=min_grid).float(), dim=-1)
        t = F.normalize(text.float().to(patches.device), dim=-1)
        t = t.expand(images.shape[0], -1) if t.ndim == 1 else t
        cosine = torch.einsum("bhwd,bd->bhw", patches, t)
        up = F.interpolate(cosine[:, None], size=images.shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0]
    return normalize_map(up), cosine
