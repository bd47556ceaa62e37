"""Grad-CAM of the supervised branch, through the ``grad-cam`` package (the ``[explain]`` extra).

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks
via Gradient-based Localization", ICCV 2017) weights the channels of a
layer's activations by the mean gradient of the class logit and keeps the
positive part. The computation, the per-image [0, 1] scaling and the
up-sampling to the input size are pytorch-grad-cam's (``GradCAM``,
``ClassifierOutputTarget``); what is ours is which layer: the backbone's last
stage, read from timm's ``feature_info`` (ConvNeXt ``stages.3``,
EfficientNet ``blocks.6``, ResNet ``layer4``, ViT the last block, whose
tokens are put back on their grid).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hybridcls.errors import InputError, MissingExtraError

__all__ = ["gradcam_maps", "last_stage", "require_grad_cam"]


def require_grad_cam() -> Any:
    """The ``pytorch_grad_cam`` module.

    Raises:
        MissingExtraError: grad-cam is not installed (names the ``[explain]`` extra).
    """
    try:
        import pytorch_grad_cam
        import pytorch_grad_cam.utils.model_targets
    except ImportError:
        raise MissingExtraError("Grad-CAM (hybridcls explain)", "grad-cam", "explain") from None
    return pytorch_grad_cam


def last_stage(backbone: nn.Module) -> tuple[str, nn.Module]:
    """The name and module of a timm backbone's last feature stage.

    Raises:
        InputError: The model has no timm ``feature_info``.
    """
    info = getattr(backbone, "feature_info", None)
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    if not entries or "module" not in entries[-1]:
        raise InputError(f"Grad-CAM: cannot find the last stage of {type(backbone).__name__} "
                         "(no timm feature_info)")
    name = entries[-1]["module"]
    return name, backbone.get_submodule(name)


def _tokens_to_grid(backbone: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """ViT blocks give ``[B, prefix + h*w, C]`` tokens; Grad-CAM wants ``[B, C, h, w]``."""
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))

    def reshape(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            return x
        tokens = x[:, prefix:]
        grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
        h, w = grid if grid is not None else (int(tokens.shape[1] ** 0.5),) * 2
        return tokens.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)

    return reshape


def gradcam_maps(model: nn.Module, images: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    """Grad-CAM of ``model`` (a :class:`~hybridcls.supervised.SupervisedModel`) for given classes.

    Args:
        model: The supervised branch: ``model(x)`` gives seen-class logits and
            ``model.backbone`` is the timm backbone.
        images: ``[B, 3, H, W]`` normalised as for the supervised branch.
        targets: One seen-class index per image (e.g. the branch's top-1).

    Returns:
        ``[B, H, W]`` float32 maps in [0, 1] (each scaled to its own maximum).

    Raises:
        MissingExtraError: grad-cam is not installed.
        InputError: No last stage can be found.

    Example:
        >>> maps = gradcam_maps(clf.supervised_, x, [3])  # doctest: +SKIP
    """
    cam_lib = require_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    _, layer = last_stage(model.backbone)
    device = next(model.parameters()).device
    # A leaf that needs its gradient makes every activation differentiable, even when the
    # layers before (or at) the target were frozen during training.
    x = images.detach().to(device).requires_grad_(True)
    was_training = model.training
    try:
        with torch.enable_grad(), cam_lib.GradCAM(model=model, target_layers=[layer],
                                                  reshape_transform=_tokens_to_grid(model.backbone)
                                                  ) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        model.train(was_training)
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0)
