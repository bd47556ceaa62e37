"""The training recipe: every option of a run and its default, in one dataclass.

docs/training.md explains each default and where it comes from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hybridcls.errors import InputError
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
            trains everything (``--freeze none``).
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
            never stops early.
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
        self.validate()

    @property
    def weights_source(self) -> str:
        """``"file"``, ``"timm"`` or ``"none"``."""
        if self.weights is not None:
            return "file"
        return "timm" if self.pretrained else "none"

    def validate(self) -> None:
        """Check every option; errors name the command-line flag.

        Raises:
            InputError: an option is out of range or options conflict.
        """

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InputError(message)

        need(
            self.head in HEAD_TYPES,
            f"--head must be one of {', '.join(HEAD_TYPES)}, not {self.head!r}",
        )
        need(
            self.balance in BALANCE_MODES,
            f"--balance must be one of {', '.join(BALANCE_MODES)}, not {self.balance!r}",
        )
        need(
            self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}, not {self.amp!r}"
        )
        need(
            self.weights is None or self.pretrained,
            "--weights and --no-pretrained exclude each other",
        )
        need(
            self.weights is None or self.pretrained_tag is None,
            "--weights and --pretrained exclude each other; put a tag in --model "
            "(e.g. convnext_tiny.fb_in1k) to choose the preprocessing of a local file",
        )
        need(
            self.freeze is None or self.freeze >= 0,
            f"--freeze must be >= 0 or 'none', got {self.freeze}",
        )
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 2, f"--batch-size must be >= 2, got {self.batch_size}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr], got {self.min_lr}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        need(
            0 <= self.label_smoothing < 1,
            f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        need(
            0 < self.val_split < 1,
            f"--val-split must be between 0 and 1 (exclusive), got {self.val_split}",
        )
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.head_hidden >= 1, f"head_hidden must be >= 1, got {self.head_hidden}")
        need(
            self.image_size is None or self.image_size >= 16,
            f"--image-size must be >= 16, got {self.image_size}",
        )
        need(0 <= self.hflip <= 1, f"hflip must be in [0, 1], got {self.hflip}")
        need(0 <= self.rotation <= 180, f"rotation must be in [0, 180], got {self.rotation}")
        need(self.color_jitter >= 0, f"color_jitter must be >= 0, got {self.color_jitter}")
        need(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}",
        )
        need(
            self.randaugment is None or self.randaugment.startswith("rand"),
            f"--randaugment must be a timm RandAugment spec such as 'rand-m9-mstd0.5-inc1', "
            f"got {self.randaugment!r}",
        )
        need(
            0 <= self.random_erasing <= 1,
            f"--random-erasing must be in [0, 1], got {self.random_erasing}",
        )
        need(self.mixup >= 0, f"--mixup must be >= 0, got {self.mixup}")
        need(self.cutmix >= 0, f"--cutmix must be >= 0, got {self.cutmix}")
        need(
            self.clip_grad is None or self.clip_grad > 0,
            f"--clip-grad must be > 0, got {self.clip_grad}",
        )
        need(0 < self.ema_decay < 1, f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        need(
            self.patience is None or self.patience >= 1,
            f"--patience must be >= 1, got {self.patience}",
        )
        need(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")

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
