"""K-fold cross-validation: K runs on stratified folds, the mean and spread of accuracy.

Folds come from scikit-learn's ``StratifiedKFold(shuffle=True,
random_state=seed)`` over the readable images (every file is decoded once
first, as for a single run); fold ``i`` validates on its held-out part and
trains on the rest, into ``OUTPUT/fold_<i>``. ``OUTPUT/folds.json`` holds the
summary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.cache import atomic_write_json
from hybridcls.data import class_size_error, drop_unreadable, scan_image_folder
from hybridcls.errors import InputError
from hybridcls.train.config import TrainConfig
from hybridcls.train.data import TrainingData, check_images, fold_split
from hybridcls.train.distributed import process_group
from hybridcls.train.loop import EpochCallback, Trainer, TrainResult

__all__ = ["FOLDS_FILE", "FoldsResult", "make_folds", "train_folds"]

FOLDS_FILE = "folds.json"


@dataclass
class FoldsResult:
    """The outcome of :func:`train_folds`.

    Attributes:
        output: The folder holding ``fold_<i>`` run directories and ``folds.json``.
        folds: Each fold's :class:`~hybridcls.train.loop.TrainResult`.
        mean_val_accuracy: Mean of the folds' best-epoch validation accuracy.
        std_val_accuracy: Its standard deviation (population, ``ddof=0``).
    """

    output: Path
    folds: list[TrainResult]
    mean_val_accuracy: float
    std_val_accuracy: float

    def summary(self) -> str:
        """One line, e.g. ``5 folds: val acc 91.2% +/- 1.3%``."""
        return (
            f"{len(self.folds)} folds: val acc {100 * self.mean_val_accuracy:.1f}% "
            f"+/- {100 * self.std_val_accuracy:.1f}% (mean +/- std); runs in {self.output}"
        )


def make_folds(
    data_dir: str | Path, k: int, seed: int, *, workers: int = 0, progress: bool = False
) -> list[TrainingData]:
    """Scan a training folder, check every image, and cut the readable ones into ``k`` folds.

    Args:
        data_dir: One subfolder per class.
        k: Number of folds.
        seed: Seed of the folds.
        workers: DataLoader worker processes for the decode check.
        progress: Show the check's progress bar.

    Returns:
        One :class:`~hybridcls.train.data.TrainingData` per fold, all sharing the check.

    Raises:
        InputError: ``k`` not a whole number of at least 2.
        DatasetError: a bad folder, or a class folder none of whose files decodes.
        DataTooSmallError: a class with fewer than ``k`` readable images (it
            could not appear in every fold's validation part).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise InputError(f"k={k!r}: the number of folds must be a whole number, at least 2")
    index = scan_image_folder(data_dir)
    check = check_images([p for p, _ in index.samples], workers=workers, progress=progress)
    index = drop_unreadable(index, check.unreadable)
    counts = Counter(label for _, label in index.samples)
    small = [label for label, n in sorted(counts.items()) if n < k]
    if small:
        raise class_size_error(
            index.classes, small[0], counts[small[0]], index.unreadable,
            f"fewer than the k={k} folds (each fold validates on one image of it or more); "
            "lower it or add images",
        )
    folds = []
    for fold in range(1, k + 1):
        train, val = fold_split(index.samples, k, seed, fold)
        folds.append(
            TrainingData(
                classes=list(index.classes),
                train=train,
                val=val,
                root=index.root,
                split={"method": "fold", "fold": fold, "k": k, "seed": seed},
                image_check=check,
            )
        )
    return folds


def train_folds(
    data_dir: str | Path,
    output: str | Path,
    k: int = 5,
    config: TrainConfig | None = None,
    *,
    on_epoch_end: EpochCallback | None = None,
    **overrides: Any,
) -> FoldsResult:
    """Train ``k`` stratified folds and report the mean and spread of validation accuracy.

    Args:
        data_dir: One subfolder per class.
        output: Folder for the ``fold_<i>`` runs and ``folds.json``; must not hold them yet.
        k: Number of folds.
        config: The options (``val_split`` / ``val_dir`` do not apply).
        on_epoch_end: Called with each epoch's record (its ``"fold"`` key set).
        **overrides: Options replacing ``config``'s.

    Returns:
        The :class:`FoldsResult`.

    Example:
        >>> from hybridcls.train import train_folds
        >>> train_folds("data/train", "runs/cv", k=5, epochs=10).summary()  # doctest: +SKIP
        '5 folds: val acc 91.2% +/- 1.3% (mean +/- std); runs in runs/cv'
    """
    config = (config or TrainConfig()).replace(**overrides)
    config.check_files()
    if config.val_dir is not None:
        raise InputError(
            f"val_dir={config.val_dir!r} does not apply to folds: each fold validates on its "
            "own part; leave val_dir=None"
        )
    output = Path(output)
    if (output / FOLDS_FILE).exists() or (output / "fold_1").exists():
        raise InputError(f"output={str(output)!r} already holds fold runs; choose another folder")
    results = []
    # Joined before the folds are made, so that the ranks share out the image check.
    with process_group(config.device) as ctx:
        folds = make_folds(
            data_dir, k, config.seed, workers=config.workers, progress=config.progress
        )
        for i, data in enumerate(folds, start=1):

            def tagged(record: dict[str, Any], fold: int = i) -> None:
                if on_epoch_end is not None:
                    on_epoch_end({**record, "fold": fold})

            trainer = Trainer(output / f"fold_{i}", config, data, on_epoch_end=tagged)
            results.append(trainer.fit())
    accuracies = np.array([r.val_accuracy for r in results])
    summary = FoldsResult(output, results, float(accuracies.mean()), float(accuracies.std()))
    if not ctx.is_main:
        return summary
    atomic_write_json(
        output / FOLDS_FILE,
        {
            "k": k,
            "mean_val_accuracy": summary.mean_val_accuracy,
            "std_val_accuracy": summary.std_val_accuracy,
            "folds": [
                {
                    "fold": i,
                    "run_dir": f"fold_{i}",
                    "best_epoch": r.best_epoch,
                    "val_accuracy": r.val_accuracy,
                    "best_val_loss": r.best_val_loss,
                }
                for i, r in enumerate(results, start=1)
            ],
        },
    )
    return summary
