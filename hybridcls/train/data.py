"""What training reads: the checked images, the split, the augmentations, the sampler, the loaders.

Every file of the training (and validation) folder is decoded once before
anything trains (:func:`check_images`): the files that fail are left out of
the split and listed in the run's report, and a class with no readable image
is refused by name. The split is then made of readable images only.

Everything random here is a function of ``(seed, epoch)`` only, which is what
makes an interrupted-and-resumed run equal to an uninterrupted one: the
sampler's generator, the DataLoader's worker seeds and (through
:func:`seed_everything`) the main process's Python, NumPy and torch RNGs are
all reseeded at the start of each epoch.
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import timm
import torch
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms

from hybridcls.cache import read_json, stable_hash
from hybridcls.data import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    Source,
    drop_unreadable,
    find_unreadable,
    scan_image_folder,
    stratified_split,
)
from hybridcls.data import make_loader as make_image_loader
from hybridcls.errors import (
    CheckpointError,
    DatasetError,
    DataTooSmallError,
    MissingDataWarning,
    name_some,
)
from hybridcls.supervised import timm_data_config
from hybridcls.train.config import TrainConfig
from hybridcls.train.state import STATE_JSON_FILE
from hybridcls.version import __version__

__all__ = [
    "BalancedSampler",
    "ImageCheck",
    "TrainingData",
    "build_train_transform",
    "check_images",
    "derive_seed",
    "make_loader",
    "recorded_image_check",
    "resolve_training_data",
    "seed_everything",
]

Samples = list[tuple[str, int]]


@dataclass(frozen=True)
class ImageCheck:
    """Which files of a run's folders failed to decode, and the state of the files when checked.

    Attributes:
        fingerprint: :func:`~hybridcls.cache.stable_hash` of every checked
            file's path, size and modification time and of the decoder
            (hybridcls' and Pillow's versions, the pixel and side limits). While it is
            unchanged the check need not run again (``--resume``).
        unreadable: ``path -> reason`` of each file that failed, in scan order.
    """

    fingerprint: str
    unreadable: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the resume state."""
        return {"fingerprint": self.fingerprint, "unreadable": dict(self.unreadable)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ImageCheck | None:
        """The check recorded by :meth:`to_dict`; ``None`` for a state that has none."""
        if not values:
            return None
        return cls(str(values["fingerprint"]), dict(values["unreadable"]))


@dataclass(frozen=True)
class TrainingData:
    """The classes and the two sample lists of a run.

    Attributes:
        classes: Class names; label ``i`` is ``classes[i]`` (sorted folder names).
        train: ``(path, label)`` pairs to train on (files that decode).
        val: ``(path, label)`` pairs to validate on (files that decode).
        root: The training folder, as given.
        split: How ``val`` was chosen: ``{"method": "val_split", "fraction", "seed"}``,
            ``{"method": "val_dir", "val_dir"}`` or ``{"method": "fold", "fold", "k", "seed"}``;
            recorded in the checkpoint so the held-out images can be found again.
        image_check: The decode check of the training and validation folders:
            its ``unreadable`` files are in neither ``train`` nor ``val``.
    """

    classes: list[str]
    train: Samples
    val: Samples
    root: str = ""
    split: dict[str, Any] = field(default_factory=dict)
    image_check: ImageCheck | None = None


def _files_fingerprint(paths: Sequence[str]) -> str:
    """What the check's result depends on: each file's size and mtime, and the decoder."""

    def state(path: str) -> list[Any]:
        try:
            st = os.stat(path)
        except OSError as err:
            return [path, None, err.errno]
        return [path, st.st_size, st.st_mtime_ns]

    decoder = {
        "hybridcls": __version__,
        "pillow": PIL.__version__,
        "max_pixels": DEFAULT_MAX_PIXELS,
        "max_side": DEFAULT_MAX_SIDE,
    }
    return stable_hash({"decoder": decoder, "files": [state(p) for p in paths]})


def check_images(
    paths: Sequence[str],
    *,
    workers: int = 0,
    progress: bool = False,
    previous: ImageCheck | None = None,
) -> ImageCheck:
    """Decode every file once (:func:`~hybridcls.data.find_unreadable`) and record the failures.

    Inside a live process group (torchrun) each rank decodes its share of the
    files (every N-th from its rank on) and the shares are gathered, so every
    rank returns the same check, and refuses or trains alike.

    Args:
        paths: The files, in scan order.
        workers: DataLoader worker processes (per rank).
        progress: Show a progress bar (rank 0 only).
        previous: A check recorded earlier (``--resume``): returned as it is
            when no file's path, size or modification time changed since.

    Returns:
        The :class:`ImageCheck`.
    """
    # distributed.py imports this module (BalancedSampler), so it is imported here.
    from hybridcls.train.distributed import broadcast_object, current, gather_dicts

    fingerprint = _files_fingerprint(paths)
    # Rank 0 decides for all: a rank that skipped the gather below would leave the others waiting.
    unchanged = previous is not None and previous.fingerprint == fingerprint
    if broadcast_object(unchanged) and previous is not None:
        return previous
    ctx = current()
    failed = find_unreadable(
        list(paths[ctx.rank :: ctx.world_size]),
        workers=workers,
        progress=progress and ctx.is_main,
    )
    failed = gather_dicts(failed)
    return ImageCheck(fingerprint, {p: failed[p] for p in paths if p in failed})


def recorded_image_check(run_dir: str | Path) -> ImageCheck | None:
    """The decode check a run's training recorded (its resume state), or ``None`` without one.

    Read from ``train_state.json`` alone, so that ``calibrate`` reuses the check without
    loading the resume tensors; :func:`check_images` reuses it only if no file changed.
    """
    path = Path(run_dir) / STATE_JSON_FILE
    if not path.is_file():
        return None
    try:
        info = read_json(path)
    except CheckpointError:
        return None
    return ImageCheck.from_dict(info.get("image_check")) if isinstance(info, dict) else None


def _relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators: how a run records its held-out files."""
    return Path(os.path.relpath(path, root)).as_posix()


def fold_split(samples: Samples, k: int, seed: int, fold: int) -> tuple[Samples, Samples]:
    """``(train, val)`` of fold ``fold`` (1 to ``k``) of ``samples``: scikit-learn's
    ``StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)``, as ``--folds`` cuts them."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.array([label for _, label in samples])
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    train_idx, val_idx = list(splitter.split(np.zeros(len(labels)), labels))[fold - 1]
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def split_record(data: TrainingData) -> dict[str, Any]:
    """``data.split`` as a run records it: with the held-out files (``held_out``, paths relative
    to the training folder, sorted) unless a ``val_dir`` folder held them out.

    A split drawn again from the folder is not the same split once a file was added, removed or
    became unreadable (the draw is over the whole list), and a fold's is not drawn from
    ``val_split`` at all; images that trained the model would then set the gate's thresholds.
    :func:`resolve_training_data` reads the recorded list back (``held_out``).
    """
    if data.split.get("method") == "val_dir":  # absolute, as the training folder
        return {**data.split, "val_dir": os.path.abspath(data.split["val_dir"])}
    return {**data.split, "held_out": sorted(_relative(p, data.root) for p, _ in data.val)}


def _recorded_split(index: Any, held_out: Sequence[str]) -> tuple[Samples, Samples, list[str]]:
    """``(train, val, missing)``: the folder's readable samples on the sides the run recorded;
    ``missing``: recorded held-out files that are not among them now (removed, or unreadable)."""
    wanted = set(held_out)
    train: Samples = []
    val: Samples = []
    for path, label in index.samples:
        (val if _relative(path, index.root) in wanted else train).append((path, label))
    found = {_relative(p, index.root) for p, _ in val}
    return train, val, [p for p in held_out if p not in found]


def _about(index: Any) -> str:
    """The start of a message about a whole training folder: the parameter that gave it
    (``data_dir='DIR': ``), else the folder (``DIR: ``)."""
    return index.at or f"{index.root}: "


def _class_difference(found: Sequence[str], expected: Sequence[str]) -> str:
    """Why a folder's classes are not a run's, naming the classes that differ.

    Example:
        >>> _class_difference(["ant", "owl"], ["ant", "bat", "cat"])
        "its 2 classes differ from the run's 3: 'bat', 'cat' missing; 'owl' not a class of the run; give the folder the run was trained on"
    """
    def names(values: Sequence[str]) -> str:
        return name_some([repr(v) for v in values])

    missing = [c for c in expected if c not in set(found)]
    extra = [c for c in found if c not in set(expected)]
    parts = [f"{names(missing)} missing"] if missing else []
    parts += [f"{names(extra)} not a class of the run"] if extra else []
    return (f"its {len(found)} classes differ from the run's {len(expected)}: "
            f"{'; '.join(parts) or 'the same names in another order'}; "
            "give the folder the run was trained on")


def resolve_training_data(
    data_dir: str | Path, config: TrainConfig, *, previous_check: ImageCheck | None = None,
    recorded_split: Mapping[str, Any] | None = None, parameter: str | None = None,
    classes: Sequence[str] | None = None,
) -> TrainingData:
    """Scan the training folder (and the ``val_dir`` folder), check every image, split.

    Cheap checks come first (folders, labels, ``val_dir`` classes); then every
    file is decoded once (:func:`check_images`, with ``config.workers``
    processes), the unreadable ones are left out, and the readable images are
    split (or the ``val_dir`` folder's readable images validate).

    Args:
        data_dir: ImageFolder-style folder, one subfolder per class.
        config: Uses ``val_dir``, ``val_split``, ``seed``, ``workers`` and ``progress``.
        previous_check: The check a resumed run recorded, reused if the files are unchanged.
        recorded_split: The split a run recorded (its ``config.json``'s ``split``,
            :func:`split_record`). With its ``held_out`` files, they validate and every other
            readable image trains, whatever the folder holds now; recorded files missing or
            unreadable now are named in a :class:`~hybridcls.errors.MissingDataWarning`.
            Without (``None``, a ``val_dir`` run, or a run trained before runs recorded
            them): the folder is split again (``val_split``, ``seed``).
        parameter: The parameter that gave ``data_dir`` (``"data_dir"`` of
            :meth:`~hybridcls.hybrid.HybridClassifier.calibrate`), named in front of the
            folder's errors so that the command line names its flag; None for ``train``'s
            positional folder.
        classes: The classes the folder must hold, in order (a run's): checked right after
            the scan, before any image is decoded.

    Returns:
        The classes, the training / validation samples and the check.

    Raises:
        DatasetError: a bad folder (missing, empty class, invalid label), classes other
            than ``classes``, a class folder (training or ``val_dir``) none of whose files
            decodes, or a ``val_dir`` class that is not a training class.
        DataTooSmallError: one class only, a class with too few readable
            images to have one on each side of the split, or fewer images
            than classes on a side (see :func:`~hybridcls.data.stratified_split`).
    """
    index = scan_image_folder(data_dir, parameter=parameter)
    if classes is not None and index.classes != list(classes):
        raise DatasetError(_about(index) + _class_difference(index.classes, classes))
    val_index = None
    if config.val_dir is not None:
        val_index = scan_image_folder(config.val_dir, role="validation folder", min_classes=1,
                                      # a run's recorded folder is no parameter given now
                                      parameter="val_dir" if recorded_split is None else None)
        strangers = [name for name in val_index.classes if name not in index.classes]
        if strangers:
            raise DatasetError(
                f"val_dir={str(config.val_dir)!r}: class folder {strangers[0]!r} is not a class "
                f"of the training folder {data_dir}"
                + (f" ({len(strangers)} such folders)" if len(strangers) > 1 else "")
            )
    paths = [path for ix in (index, val_index) if ix is not None for path, _ in ix.samples]
    check = check_images(
        paths, workers=config.workers, progress=config.progress, previous=previous_check
    )
    index = drop_unreadable(index, check.unreadable)
    held_out = None if recorded_split is None else recorded_split.get("held_out")
    if val_index is None and held_out is not None:
        held_out = [str(p) for p in held_out]
        train, val, missing = _recorded_split(index, held_out)
        if missing:
            warnings.warn(f"{_about(index)}{len(missing)} of the {len(held_out)} images the run held "
                          f"out are missing or unreadable now, and are left out: {name_some(missing)}",
                          MissingDataWarning, stacklevel=2)
        # the others that do not decode now were training images: they leave the kNN bank
        recorded = set(held_out)
        broken = [rel for rel in (_relative(p, index.root) for p in check.unreadable) if rel not in recorded]
        if broken:
            warnings.warn(f"{_about(index)}{len(broken)} training image(s) cannot be read and are left "
                          f"out: {name_some(broken)}", MissingDataWarning, stacklevel=2)
        if not val:
            raise DataTooSmallError(
                f"{_about(index)}none of the {len(held_out)} images the run held out is in the "
                "folder now (or readable), so no held-out image can set the gate's thresholds; "
                "give the folder the run was trained on")
        assert recorded_split is not None
        return TrainingData(index.classes, train, val, index.root, dict(recorded_split), check)
    if val_index is None and recorded_split is not None and recorded_split.get("method") == "fold":
        # a fold run trained before runs recorded their held-out files: its fold, cut again
        fold, k, seed = (int(recorded_split[key]) for key in ("fold", "k", "seed"))
        train, val = fold_split(index.samples, k, seed, fold)
        return TrainingData(index.classes, train, val, index.root, dict(recorded_split), check)
    if val_index is None:
        train, val = stratified_split(
            index.samples,
            config.val_split,
            config.seed,
            classes=index.classes,
            unreadable=index.unreadable,
        )
        split = {"method": "val_split", "fraction": config.val_split, "seed": config.seed}
        return TrainingData(index.classes, train, val, index.root, split, check)
    val_index = drop_unreadable(val_index, check.unreadable)
    position = {name: i for i, name in enumerate(index.classes)}
    val = [(path, position[val_index.classes[label]]) for path, label in val_index.samples]
    split = {"method": "val_dir", "val_dir": str(config.val_dir)}
    return TrainingData(index.classes, list(index.samples), val, index.root, split, check)


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
