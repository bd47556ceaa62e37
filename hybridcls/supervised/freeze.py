"""Freeze a timm backbone except its last N stages, found generically.

Stages come from timm's coarse group matcher (``model.group_matcher(coarse=True)``
grouped by ``timm.models.group_parameters``), the same grouping timm uses for
layer-wise learning-rate decay: ConvNeXt's ``stages.i``, EfficientNet's
``blocks.i``, ResNet's ``layerN``, ViT's ``blocks.i``. The stem is never a
stage. Parameters the matcher leaves unmatched (the neck that sits between
the last stage and the classifier, e.g. ConvNeXt's ``head.norm``) always
train, like the new head.
"""

from __future__ import annotations

import re

from timm.models import group_parameters
from torch import nn

from hybridcls.errors import InputError, ParameterError

__all__ = ["freeze_backbone", "stage_groups"]


def _matched_by(name: str, spec: object) -> bool:
    if spec is None:
        return False
    patterns = [spec] if isinstance(spec, str) else [s[0] for s in spec]  # type: ignore[union-attr]
    return any(re.match(p, name) for p in patterns)


def stage_groups(backbone: nn.Module) -> tuple[list[str], list[list[str]], list[str]]:
    """Split a timm backbone's parameter names into stem, stages and neck.

    Args:
        backbone: A timm model with ``group_matcher``.

    Returns:
        ``(stem, stages, neck)``: parameter names of the stem, a list of
        stages (each a list of names, input to output), and the unmatched
        names after the last stage.

    Raises:
        InputError: the model has no dict-style group matcher.
    """
    matcher = getattr(backbone, "group_matcher", None)
    spec = matcher(coarse=True) if callable(matcher) else None
    if not isinstance(spec, dict):
        raise InputError(
            f"cannot find the stages of {type(backbone).__name__} to freeze; train everything "
            f"(trainable_stages=None)"
        )
    groups = group_parameters(backbone, spec)
    stem: list[str] = []
    stages: list[list[str]] = []
    neck: list[str] = []
    for _, names in sorted(groups.items()):
        if all(_matched_by(n, spec.get("stem")) for n in names):
            stem.extend(names)
        elif any(_matched_by(n, spec.get("blocks")) for n in names):
            stages.append([n for n in names if _matched_by(n, spec.get("blocks"))])
            # A neck merged into the last stage group (MATCH_PREV_GROUP) is still neck.
            neck.extend(n for n in names if not _matched_by(n, spec.get("blocks")))
        else:
            neck.extend(names)
    return stem, stages, neck


def freeze_backbone(backbone: nn.Module, trainable_stages: int | None) -> list[str]:
    """Freeze all of a backbone but its last ``trainable_stages`` stages and its neck.

    Args:
        backbone: A timm model.
        trainable_stages: How many trailing stages keep training; ``None``
            trains everything, ``0`` only the neck (and the head on top).

    Returns:
        The names of the frozen parameters (empty when nothing is frozen).

    Raises:
        InputError: ``trainable_stages`` is negative or more than the model has.

    Example:
        >>> import timm
        >>> m = timm.create_model("test_convnext", num_classes=0)
        >>> frozen = freeze_backbone(m, 2)
        >>> frozen[0], any(n.startswith("stages.3") for n in frozen)
        ('stem.0.weight', False)
    """
    for p in backbone.parameters():
        p.requires_grad_(True)
    if trainable_stages is None:
        return []
    stem, stages, _ = stage_groups(backbone)
    if not 0 <= trainable_stages <= len(stages):
        raise ParameterError(
            "trainable_stages", trainable_stages, f"{type(backbone).__name__} has {len(stages)} "
            f"stages; use 0 to {len(stages)}, or None to train everything"
        )
    frozen = stem + [n for stage in stages[: len(stages) - trainable_stages] for n in stage]
    params = dict(backbone.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen
