"""The training recipe: every option of a run and its default, in one dataclass.

docs/training.md explains each default and where it comes from.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hybridcls.errors import InputError, ParameterError
from hybridcls.runtime import RuntimeSettings
from hybridcls.supervised import HEAD_TYPES

__all__ = ["AMP_MODES", "BALANCE_MODES", "RESUME_FREE_FIELDS", "TrainConfig"]

#: ``sampler``: weighted random sampling, each class equally likely per draw;
#: ``oversample``: every class repeated to the largest class's count per epoch;
#: ``none``: plain shuffling.
BALANCE_MODES: tuple[str, ...] = ("sampler", "oversample", "none")

#: ``auto``: bf16 on a CUDA device that supports it, else fp16; never on the CPU.
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "none")

#: Options that may differ when resuming: they change where and how fast a run
#: goes, not what it computes (``workers`` aside, see docs/training.md).
RESUME_FREE_FIELDS: frozenset[str] = frozenset({"device", "workers", "progress", "cache_dir"})


@dataclass
class TrainConfig:
    """Every option of a training run, with the recipe's defaults.

    Attributes:
        model: timm architecture, optionally with a tag (``convnext_tiny.fb_in1k``).
        pretrained: Start from pretrained weights (a timm tag, or ``weights``).
        pretrained_tag: timm pretrained tag; ``None``: the model's default
            (``fb_in22k_ft_in1k`` for ``convnext_tiny``).
        weights: Local weights file in timm's key layout (``.safetensors`` or a
            ``.pth`` state dict); overrides the tag's weights, keeps its preprocessing.
        head: ``"mlp"`` (regularised head) or ``"linear"``.
        dropout: Head dropout.
        head_hidden: Hidden width of the mlp head.
        freeze: Train only the head and the last N backbone stages; ``None``
            (or ``"none"``, the command line's spelling) trains everything.
        image_size: Input size overriding the pretrained config's (``None``: the model's).
        epochs: Maximum number of epochs.
        batch_size: Images per optimizer step.
        lr: Peak learning rate of AdamW.
        min_lr: Learning rate at the end of the cosine schedule.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_epochs: Linear warmup from ``lr/100`` before the cosine decay.
        label_smoothing: Cross-entropy label smoothing (training loss only).
        val_split: Share of each class held out for validation (seeded, stratified).
        val_dir: An explicit validation folder instead of a split.
        balance: One of :data:`BALANCE_MODES`.
        hflip: Horizontal flip probability.
        rotation: Maximum rotation, in degrees.
        color_jitter: Brightness/contrast/saturation jitter strength.
        crop_scale: Area range of timm's random-resized crop; ``(1, 1)``
            resizes the whole image to the model's size.
        randaugment: A timm RandAugment spec (e.g. ``"rand-m9-mstd0.5-inc1"``) or ``None``.
        random_erasing: Random erasing probability.
        mixup: MixUp alpha (0 = off).
        cutmix: CutMix alpha (0 = off).
        amp: One of :data:`AMP_MODES`; mixed precision only ever runs on CUDA.
        clip_grad: Gradient-norm clipping threshold, or ``None``.
        ema: Keep an exponential moving average of the weights (timm's
            ``ModelEmaV3``); validation and the saved checkpoint then use it.
        ema_decay: Its decay (with timm's warmup of the decay).
        patience: Epochs without a lower validation loss before stopping; ``None``
            (or ``"none"``) never stops early.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        workers: DataLoader worker processes.
        seed: Seed of the split, the sampler, the augmentations and the initialisation.
        progress: Show progress bars (on stderr).
        cache_dir: Where timm looks for downloaded weights.
    """

    model: str = "convnext_tiny"
    pretrained: bool = True
    pretrained_tag: str | None = None
    weights: str | None = None
    head: str = "mlp"
    dropout: float = 0.6
    head_hidden: int = 512
    freeze: int | None = 2
    image_size: int | None = None
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 1e-3
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.2
    val_split: float = 0.15
    val_dir: str | None = None
    balance: str = "sampler"
    hflip: float = 0.5
    rotation: float = 30.0
    color_jitter: float = 0.4
    crop_scale: tuple[float, float] = (1.0, 1.0)
    randaugment: str | None = None
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    amp: str = "auto"
    clip_grad: float | None = None
    ema: bool = False
    ema_decay: float = 0.999
    patience: int | None = 3
    # the runtime settings' defaults are RuntimeSettings' (one home, shared with inference)
    device: str = RuntimeSettings.device
    workers: int = RuntimeSettings.workers
    seed: int = 0
    progress: bool = RuntimeSettings.progress
    cache_dir: str | None = RuntimeSettings.cache_dir

    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    @property
    def weights_source(self) -> str:
        """``"file"``, ``"timm"`` or ``"none"``."""
        if self.weights is not None:
            return "file"
        return "timm" if self.pretrained else "none"

    def _normalise(self) -> None:
        """Accept the spellings that mean the same: ``"none"`` for None, paths, numpy scalars.

        A number option that may be None (``freeze``, ``patience``...) takes the
        command line's ``"none"`` (any case) as None; a path option takes any
        ``os.PathLike``, ``device`` a ``torch.device``; a list of two numbers is a
        ``crop_scale`` pair. Values of other types are left for :meth:`validate`
        to refuse.
        """
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), _HINTS[f.name]
            if isinstance(value, str) and value.strip().lower() == "none" and _numeric_or_none(hint):
                value = None
            elif isinstance(value, os.PathLike) and f.name in _PATH_FIELDS:
                value = os.fspath(value)
            elif isinstance(value, torch.device) and f.name == "device":
                value = str(value)  # resolve_device takes both; runs store the name
            elif isinstance(value, list) and typing.get_origin(hint) is tuple:
                value = tuple(value)
            if _accepts(value, hint):
                value = _plain(value, hint)
            setattr(self, f.name, value)

    def validate(self) -> None:
        """Check every option's type and range; errors name the option as ``name=value``.

        Raises:
            InputError: an option of the wrong type, out of range, or options
                that conflict.
        """
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), _HINTS[f.name]
            if not _accepts(value, hint):
                raise InputError(
                    f"{f.name}={value!r}: expected {_describe(hint)}, got {type(value).__name__}"
                )

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InputError(message)

        need(
            self.head in HEAD_TYPES,
            f"head={self.head!r}: must be one of {', '.join(HEAD_TYPES)}",
        )
        need(
            self.balance in BALANCE_MODES,
            f"balance={self.balance!r}: must be one of {', '.join(BALANCE_MODES)}",
        )
        need(self.amp in AMP_MODES, f"amp={self.amp!r}: must be one of {', '.join(AMP_MODES)}")
        need(
            self.weights is None or self.pretrained,
            f"weights={self.weights!r} and pretrained=False exclude each other",
        )
        need(
            self.weights is None or self.pretrained_tag is None,
            f"weights={self.weights!r} and pretrained_tag={self.pretrained_tag!r} exclude each "
            "other; put a tag in model (e.g. model='convnext_tiny.fb_in1k') to choose the "
            "preprocessing of a local file",
        )
        need(
            self.freeze is None or self.freeze >= 0,
            f"freeze={self.freeze}: must be >= 0, or None (train everything)",
        )
        need(self.epochs >= 1, f"epochs={self.epochs}: must be >= 1")
        need(self.batch_size >= 2, f"batch_size={self.batch_size}: must be >= 2")
        need(self.lr > 0, f"lr={self.lr}: must be > 0")
        need(
            0 <= self.min_lr <= self.lr,
            f"min_lr={self.min_lr}: must be between 0 and the peak lr ({self.lr})",
        )
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be >= 0")
        need(self.warmup_epochs >= 0, f"warmup_epochs={self.warmup_epochs}: must be >= 0")
        need(
            0 <= self.label_smoothing < 1,
            f"label_smoothing={self.label_smoothing}: must be in [0, 1)",
        )
        need(
            0 < self.val_split < 1,
            f"val_split={self.val_split}: must be between 0 and 1 (exclusive)",
        )
        need(0 <= self.dropout < 1, f"dropout={self.dropout}: must be in [0, 1)")
        need(self.head_hidden >= 1, f"head_hidden={self.head_hidden}: must be >= 1")
        need(
            self.image_size is None or self.image_size >= 16,
            f"image_size={self.image_size}: must be >= 16, or None (the model's)",
        )
        need(0 <= self.hflip <= 1, f"hflip={self.hflip}: must be in [0, 1]")
        need(0 <= self.rotation <= 180, f"rotation={self.rotation}: must be in [0, 180]")
        need(self.color_jitter >= 0, f"color_jitter={self.color_jitter}: must be >= 0")
        need(
            0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            f"crop_scale={self.crop_scale}: must be (lo, hi) with 0 < lo <= hi <= 1",
        )
        need(
            self.randaugment is None or self.randaugment.startswith("rand"),
            f"randaugment={self.randaugment!r}: must be a timm RandAugment spec such as "
            "'rand-m9-mstd0.5-inc1', or None",
        )
        need(
            0 <= self.random_erasing <= 1,
            f"random_erasing={self.random_erasing}: must be in [0, 1]",
        )
        need(self.mixup >= 0, f"mixup={self.mixup}: must be >= 0")
        need(self.cutmix >= 0, f"cutmix={self.cutmix}: must be >= 0")
        need(
            self.clip_grad is None or self.clip_grad > 0,
            f"clip_grad={self.clip_grad}: must be > 0, or None",
        )
        need(0 < self.ema_decay < 1, f"ema_decay={self.ema_decay}: must be in (0, 1)")
        need(
            self.patience is None or self.patience >= 1,
            f"patience={self.patience}: must be >= 1, or None (never stop early)",
        )
        need(self.workers >= 0, f"workers={self.workers}: must be >= 0")

    def check_files(self) -> None:
        """That the files a new run reads before it trains are here (``weights``), so that a
        missing one is said before every training image is checked. A resumed run is not
        checked: it loads its own weights.

        Raises:
            ParameterError: ``weights`` is not a file (named as ``weights='path'``).
        """
        if self.weights is not None and not os.path.isfile(self.weights):
            raise ParameterError("weights", self.weights, (
                "a folder, not a weights file" if os.path.isdir(self.weights) else "no such file")
                + " (.safetensors, or a .pth state dict)")

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with some options changed (and checked).

        Raises:
            InputError: an unknown option name.
        """
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["crop_scale"] = list(self.crop_scale)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Options from :meth:`to_dict` output; unknown keys (from newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        if "crop_scale" in kwargs:
            kwargs["crop_scale"] = tuple(kwargs["crop_scale"])
        return cls(**kwargs)


#: Options that name a file or folder: any ``os.PathLike`` is accepted and kept as ``str``.
_PATH_FIELDS = frozenset({"weights", "val_dir", "cache_dir"})
#: Each option's type, from the annotations (strings under ``from __future__ import annotations``).
_HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)


def _options(hint: Any) -> tuple[Any, ...]:
    """The members of a union type (``int | None`` -> ``(int, NoneType)``), or the type alone."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _numeric_or_none(hint: Any) -> bool:
    members = _options(hint)
    return type(None) in members and any(m in (int, float) for m in members)


def _accepts(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type.

    A bool is not a number; a whole number is a float; a float must be finite.
    """
    for member in _options(hint):
        if member is type(None) and value is None:
            return True
        if member is bool and isinstance(value, bool):
            return True
        if member is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return True
        if (member is float and isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value)):
            return True
        if member is str and isinstance(value, str):
            return True
        if typing.get_origin(member) is tuple:
            args = typing.get_args(member)
            if (isinstance(value, tuple) and len(value) == len(args)
                    and all(_accepts(v, a) for v, a in zip(value, args))):
                return True
    return False


def _plain(value: Any, hint: Any) -> Any:
    """An accepted value as plain Python (numpy scalars would not go into JSON)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, tuple):
        return tuple(float(v) for v in value)
    members = _options(hint)
    return int(value) if int in members and isinstance(value, numbers.Integral) else float(value)


_TYPE_NAMES = {bool: "True or False", int: "a whole number", float: "a finite number",
               str: "a string", type(None): "None"}


def _describe(hint: Any) -> str:
    """``int | None`` -> ``"a whole number or None"``, for messages."""
    names = []
    for member in _options(hint):
        if typing.get_origin(member) is tuple:
            names.append("a pair of numbers (lo, hi)")
        else:
            names.append(_TYPE_NAMES.get(member, getattr(member, "__name__", str(member))))
    return " or ".join(names)
