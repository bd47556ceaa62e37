"""What training reads: the split, the augmentations, the balancing sampler, the loaders.

Everything random here is a function of ``(seed, epoch)`` only, which is what
makes an interrupted-and-resumed run equal to an uninterrupted one: the
sampler's generator, the DataLoader's worker seeds and (through
:func:`seed_everything`) the main process's Python, NumPy and torch RNGs are
all reseeded at the start of each epoch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms

from hybridcls.data import Source, scan_image_folder, stratified_split
from hybridcls.data import make_loader as make_image_loader
from hybridcls.errors import DatasetError
from hybridcls.supervised import timm_data_config
from hybridcls.train.config import TrainConfig

__all__ = [
    "BalancedSampler",
    "TrainingData",
    "build_train_transform",
    "derive_seed",
    "make_loader",
    "resolve_training_data",
    "seed_everything",
]

Samples = list[tuple[str, int]]


@dataclass(frozen=True)
class TrainingData:
    """The classes and the two sample lists of a run.

    Attributes:
        classes: Class names; label ``i`` is ``classes[i]`` (sorted folder names).
        train: ``(path, label)`` pairs to train on.
        val: ``(path, label)`` pairs to validate on.
        root: The training folder, as given.
        split: How ``val`` was chosen: ``{"method": "val_split", "fraction", "seed"}``,
            ``{"method": "val_dir", "val_dir"}`` or ``{"method": "fold", "fold", "k", "seed"}``;
            recorded in the checkpoint so the held-out images can be found again.
    """

    classes: list[str]
    train: Samples
    val: Samples
    root: str = ""
    split: dict[str, Any] = field(default_factory=dict)


def resolve_training_data(data_dir: str | Path, config: TrainConfig) -> TrainingData:
    """Scan the training folder and split it, or read the ``--val`` folder.

    Args:
        data_dir: ImageFolder-style folder, one subfolder per class.
        config: Uses ``val_dir``, ``val_split`` and ``seed``.

    Returns:
        The classes and the training / validation samples.

    Raises:
        DatasetError: a bad folder (missing, empty class, one class, invalid
            label), a split that leaves a class without images on a side, or
            a ``--val`` class that is not a training class.
    """
    index = scan_image_folder(data_dir)
    if config.val_dir is None:
        train, val = stratified_split(
            index.samples, config.val_split, config.seed, classes=index.classes
        )
        split = {"method": "val_split", "fraction": config.val_split, "seed": config.seed}
        return TrainingData(index.classes, train, val, index.root, split)
    val_index = scan_image_folder(config.val_dir)
    position = {name: i for i, name in enumerate(index.classes)}
    strangers = [name for name in val_index.classes if name not in position]
    if strangers:
        raise DatasetError(
            f"--val {config.val_dir}: class folder {strangers[0]!r} is not a class of the "
            f"training folder {data_dir}"
            + (f" ({len(strangers)} such folders)" if len(strangers) > 1 else "")
        )
    val = [(path, position[val_index.classes[label]]) for path, label in val_index.samples]
    split = {"method": "val_dir", "val_dir": str(config.val_dir)}
    return TrainingData(index.classes, list(index.samples), val, index.root, split)


def build_train_transform(
    data_config: dict[str, Any], config: TrainConfig
) -> Callable[[Any], torch.Tensor]:
    """The training augmentation, built by timm around the model's preprocessing.

    ``timm.data.create_transform(is_training=True, separate=True)`` gives the
    crop-and-flip, colour (or RandAugment) and tensor/normalise/erase stages;
    a random rotation, which timm's ImageNet recipe lacks, goes between the
    first two.

    Args:
        data_config: The model's data config (input size, mean, std, interpolation).
        config: Uses ``hflip``, ``rotation``, ``color_jitter``, ``crop_scale``,
            ``randaugment``, ``random_erasing``.

    Returns:
        PIL RGB image -> normalised tensor.
    """
    cfg = timm_data_config(data_config)
    primary, colour, final = timm.data.create_transform(
        input_size=cfg["input_size"],
        is_training=True,
        scale=tuple(config.crop_scale),
        hflip=config.hflip,
        color_jitter=config.color_jitter,
        auto_augment=config.randaugment,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        re_prob=config.random_erasing,
        re_mode="pixel",
        separate=True,
    )
    stages = [primary]
    if config.rotation > 0:
        stages.append(transforms.RandomRotation(config.rotation))
    return transforms.Compose([*stages, colour, final])


def derive_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for one random stream of one epoch, stable across processes.

    Example:
        >>> derive_seed(0, 1, "sampler") == derive_seed(0, 1, "sampler")
        True
        >>> derive_seed(0, 1, "sampler") != derive_seed(0, 2, "sampler")
        True
    """
    digest = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (timm's Mixup draws from NumPy's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class BalancedSampler(Sampler[int]):
    """Indices for one epoch, class-balanced and reproducible from ``(seed, epoch)``.

    Modes: ``"sampler"`` draws ``len(labels)`` indices with replacement, each
    class with the same probability (``WeightedRandomSampler`` with weights
    ``1 / class count``); ``"oversample"`` repeats every class up to the
    largest class's count (whole copies plus a random remainder) and shuffles;
    ``"none"`` shuffles the samples once each.

    Args:
        labels: Label of each dataset index.
        mode: One of ``"sampler"``, ``"oversample"``, ``"none"``.
        seed: Run seed.

    Example:
        >>> s = BalancedSampler([0, 0, 0, 1], "oversample", seed=0)
        >>> s.set_epoch(0)
        >>> sorted(s)
        [0, 1, 2, 3, 3, 3]
    """

    def __init__(self, labels: Sequence[int], mode: str, seed: int) -> None:
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.mode = mode
        self.seed = seed
        self.epoch = 0
        counts = torch.bincount(self.labels)
        self._counts = counts
        if mode == "oversample":
            self._length = int(counts.max()) * int((counts > 0).sum())
        else:
            self._length = len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, "sampler"))
        if self.mode == "sampler":
            weights = 1.0 / self._counts.double()[self.labels]
            order = torch.multinomial(weights, self._length, replacement=True, generator=g)
        elif self.mode == "oversample":
            target = int(self._counts.max())
            chosen = []
            for label in torch.nonzero(self._counts).flatten().tolist():
                members = torch.nonzero(self.labels == label).flatten()
                whole, rest = divmod(target, len(members))
                extra = members[torch.randperm(len(members), generator=g)[:rest]]
                chosen.append(torch.cat([members.repeat(whole), extra]))
            pool = torch.cat(chosen)
            order = pool[torch.randperm(len(pool), generator=g)]
        else:
            order = torch.randperm(self._length, generator=g)
        return iter(order.tolist())


def make_loader(
    samples: Samples,
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int,
    workers: int,
    sampler: Sampler[int] | None = None,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of :class:`hybridcls.data.Batch` over ``(path, label)`` samples.

    Undecodable images come back in ``batch.errors`` instead of stopping the
    run; ``batch.ok`` holds the dataset indices of the decoded images, whose
    labels the caller looks up in ``samples``.

    Args:
        samples: ``(path, label)`` pairs.
        transform: PIL image -> tensor.
        batch_size: Images per batch.
        workers: Worker processes (0: decode in this process).
        sampler: Index order; ``None`` keeps the samples' order (validation).
        seed: Seeds the workers' RNGs (through the loader's generator).
        pin_memory: Pin batches for faster copies to a GPU.
    """
    return make_image_loader([Source(path) for path, _ in samples], transform, batch_size=batch_size,
                             workers=workers, pin_memory=pin_memory, sampler=sampler, seed=seed)
