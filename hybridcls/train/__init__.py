"""Training the supervised branch: the recipe, the loop, resume, metrics and folds.

Example:
    >>> from hybridcls.train import TrainConfig, train
    >>> result = train("data/train", "runs/seen40", TrainConfig(epochs=20))  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    best epoch 14/17: val acc 96.1% val loss 0.1532  (stopped early); checkpoint in runs/seen40
"""

from __future__ import annotations

from hybridcls.train.config import AMP_MODES, BALANCE_MODES, RESUME_FREE_FIELDS, TrainConfig
from hybridcls.train.data import (
    BalancedSampler,
    ImageCheck,
    TrainingData,
    build_train_transform,
    check_images,
    resolve_training_data,
)
from hybridcls.train.folds import FOLDS_FILE, FoldsResult, make_folds, train_folds
from hybridcls.train.loop import REPORT_FILE, Trainer, TrainResult, resolve_device, train
from hybridcls.train.metrics import CURVES_PNG, METRICS_CSV, METRICS_JSON

__all__ = [
    "AMP_MODES",
    "BALANCE_MODES",
    "CURVES_PNG",
    "FOLDS_FILE",
    "METRICS_CSV",
    "METRICS_JSON",
    "REPORT_FILE",
    "RESUME_FREE_FIELDS",
    "BalancedSampler",
    "FoldsResult",
    "ImageCheck",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingData",
    "build_train_transform",
    "check_images",
    "make_folds",
    "resolve_device",
    "resolve_training_data",
    "train",
    "train_folds",
]
