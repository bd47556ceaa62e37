"""The supervised branch: a timm backbone fine-tuned on the seen classes.

Building (:func:`build_model`), freezing (:meth:`SupervisedModel.freeze`),
weight sources (a timm pretrained tag, a local file in timm's key layout, or
none) and the checkpoint format (``config.json`` + ``model.safetensors``).
Training itself lives in :mod:`hybridcls.train`.

Example:
    >>> from hybridcls.supervised import load_checkpoint, build_eval_transform
    >>> model, config = load_checkpoint("runs/seen40")  # doctest: +SKIP
    >>> transform = build_eval_transform(config)  # doctest: +SKIP
    >>> logits, features = model.forward_with_features(transform(image)[None])  # doctest: +SKIP
"""

from __future__ import annotations

from hybridcls.supervised.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    CONFIG_FILE,
    WEIGHTS_FILE,
    WEIGHTS_HASH_KEY,
    build_eval_transform,
    load_checkpoint,
    make_checkpoint_config,
    model_from_config,
    read_checkpoint_config,
    read_verified_safetensors,
    save_checkpoint,
    timm_data_config,
)
from hybridcls.supervised.freeze import freeze_backbone, stage_groups
from hybridcls.supervised.model import HEAD_TYPES, SupervisedModel, build_head, build_model
from hybridcls.supervised.weights import (
    DEFAULT_PRETRAINED_TAGS,
    WEIGHT_SOURCES,
    create_backbone,
    read_state_dict,
    resolve_model_name,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CONFIG_FILE",
    "DEFAULT_PRETRAINED_TAGS",
    "HEAD_TYPES",
    "WEIGHTS_FILE",
    "WEIGHTS_HASH_KEY",
    "WEIGHT_SOURCES",
    "SupervisedModel",
    "build_eval_transform",
    "build_head",
    "build_model",
    "create_backbone",
    "freeze_backbone",
    "load_checkpoint",
    "make_checkpoint_config",
    "model_from_config",
    "read_checkpoint_config",
    "read_state_dict",
    "read_verified_safetensors",
    "resolve_model_name",
    "save_checkpoint",
    "stage_groups",
    "timm_data_config",
]
