"""The supervised branch: a headless timm backbone with a new classification head.

The backbone is created with ``num_classes=0`` (timm's way to get pooled
pre-logits features), and the head sits on top, so one forward gives both
the logits and the features that the gate's light heads and
nearest-neighbour scores need (:meth:`SupervisedModel.forward_with_features`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hybridcls.errors import InputError, ParameterError
from hybridcls.supervised.freeze import freeze_backbone
from hybridcls.supervised.weights import create_backbone, resolve_backbone_data_config

__all__ = ["HEAD_TYPES", "SupervisedModel", "build_head", "build_model"]

#: ``"mlp"``: the regularised head (default); ``"linear"``: a single linear layer,
#: the classifier timm itself would put on the backbone.
HEAD_TYPES: tuple[str, ...] = ("mlp", "linear")


def build_head(
    in_features: int,
    num_classes: int,
    head: str = "mlp",
    dropout: float = 0.6,
    hidden_dim: int = 512,
) -> nn.Module:
    """Create a classification head over pooled backbone features.

    Args:
        in_features: Size of the backbone's pooled features.
        num_classes: Number of output classes.
        head: ``"mlp"``: ``Dropout(p) -> Linear(in, hidden) -> BatchNorm1d ->
            ReLU -> Dropout(p) -> Linear(hidden, C)``; ``"linear"``:
            ``Dropout(p) -> Linear(in, C)``, as timm's own classifier with
            ``drop_rate=p``.
        dropout: Dropout probability ``p``.
        hidden_dim: Width of the mlp head's hidden layer.

    Returns:
        The head module.

    Raises:
        InputError: unknown head type or out-of-range sizes.
    """
    if head not in HEAD_TYPES:
        raise ParameterError("head", head, f"must be one of {', '.join(HEAD_TYPES)}")
    if not 0.0 <= dropout < 1.0:
        raise ParameterError("dropout", dropout, "must be in [0, 1)")
    if num_classes < 2 or hidden_dim < 1:
        raise InputError(
            f"a head needs num_classes >= 2 and hidden_dim >= 1, got {num_classes}, {hidden_dim}"
        )
    if head == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, num_classes),
    )


class SupervisedModel(nn.Module):
    """A timm backbone (``num_classes=0``) plus a classification head.

    Args:
        backbone: A headless timm model whose forward returns pooled features.
        num_classes: Number of seen classes.
        head: One of :data:`HEAD_TYPES`.
        dropout: Head dropout probability.
        hidden_dim: Hidden width of the mlp head.

    Attributes:
        num_features: Size of the pooled features.
        frozen: Names of the backbone parameters frozen by :meth:`freeze`.

    Example:
        >>> import timm, torch
        >>> m = SupervisedModel(timm.create_model("test_convnext", num_classes=0), 5).eval()
        >>> logits, feats = m.forward_with_features(torch.zeros(2, 3, 64, 64))
        >>> tuple(logits.shape), tuple(feats.shape)
        ((2, 5), (2, 64))
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head: str = "mlp",
        dropout: float = 0.6,
        hidden_dim: int = 512,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.num_features = int(
            getattr(backbone, "head_hidden_size", None) or backbone.num_features
        )
        self.head = build_head(self.num_features, self.num_classes, head, dropout, hidden_dim)
        self.frozen: list[str] = []
        self._frozen_norms: list[nn.Module] = []

    def freeze(self, trainable_stages: int | None) -> list[str]:
        """Freeze the backbone but its last ``trainable_stages`` stages (``None``: nothing).

        Batch-norm layers whose parameters are frozen also stay in eval mode
        during training, so their running statistics keep the pretrained values.

        Returns:
            The frozen parameter names.
        """
        self.frozen = freeze_backbone(self.backbone, trainable_stages)
        frozen_modules = {name.rpartition(".")[0] for name in self.frozen}
        self._frozen_norms = [
            m
            for name, m in self.backbone.named_modules()
            if name in frozen_modules and isinstance(m, _BatchNorm)
        ]
        self.train(self.training)
        return self.frozen

    def train(self, mode: bool = True) -> SupervisedModel:
        super().train(mode)
        for module in self._frozen_norms:
            module.eval()
        return self

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and pooled backbone features from one forward pass.

        Args:
            x: Normalised images, ``(N, 3, H, W)``.

        Returns:
            ``(logits (N, C), features (N, num_features))``; the features are
            the backbone's pooled pre-logits, before the head's dropout.
        """
        features = self.backbone(x)
        return self.head(features), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the seen classes, ``(N, C)``."""
        return self.head(self.backbone(x))


def build_model(
    model: str,
    num_classes: int,
    *,
    head: str = "mlp",
    dropout: float = 0.6,
    hidden_dim: int = 512,
    weights_source: str = "timm",
    pretrained_tag: str | None = None,
    weights_file: str | Path | None = None,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[SupervisedModel, dict[str, Any]]:
    """Create a :class:`SupervisedModel` with its weights and its preprocessing.

    Args:
        model: timm architecture, optionally ``arch.tag``.
        num_classes: Number of seen classes.
        head: One of :data:`HEAD_TYPES`.
        dropout: Head dropout.
        hidden_dim: Hidden width of the mlp head.
        weights_source: ``"timm"``, ``"file"`` or ``"none"``.
        pretrained_tag: timm pretrained tag (also picks the preprocessing).
        weights_file: Weights in timm's key layout for ``weights_source="file"``.
        image_size: Optional input size overriding the pretrained config's.
        cache_dir: timm / Hugging Face download cache.

    Returns:
        ``(model, data_config)``; ``data_config`` is what
        ``timm.data.create_transform`` takes, as JSON-ready values.

    Example:
        >>> m, data_cfg = build_model("test_convnext", 3, weights_source="none", image_size=64)
        >>> data_cfg["input_size"], m.num_classes
        ([3, 64, 64], 3)
    """
    backbone = create_backbone(
        model, source=weights_source, tag=pretrained_tag, file=weights_file, cache_dir=cache_dir
    )
    data_config = resolve_backbone_data_config(backbone, image_size)
    return SupervisedModel(backbone, num_classes, head, dropout, hidden_dim), data_config
