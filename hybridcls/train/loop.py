"""The training loop: one run of the recipe, from a folder to a run directory.

A run directory ends up holding::

    config.json, model.safetensors    the best checkpoint (lowest validation loss)
    train_state.json/.safetensors     the last completed epoch, for --resume
    metrics.csv, metrics.json         one record per epoch
    report.json                       the final summary, with the unreadable images
    curves.png                        loss / accuracy curves (with matplotlib)

Everything is checked (folders, every image's decoding, options, weights, a
resumed run's model and classes) before the first epoch starts, and before
anything is written.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from hybridcls.cache import atomic_write_json, read_json
from hybridcls.data import Batch, scan_image_folder
from hybridcls.device import resolve_device
from hybridcls.errors import CheckpointError, DatasetError, InputError, ParameterError
from hybridcls.supervised import (
    CONFIG_FILE,
    build_eval_transform,
    build_model,
    make_checkpoint_config,
    resolve_model_name,
    save_checkpoint,
)
from hybridcls.train.config import RESUME_FREE_FIELDS, TrainConfig
from hybridcls.train.data import (
    BalancedSampler,
    ImageCheck,
    TrainingData,
    build_train_transform,
    derive_seed,
    make_loader,
    resolve_training_data,
    seed_everything,
    split_record,
)
from hybridcls.train.distributed import (
    DistributedBalancedSampler,
    broadcast_object,
    current,
    gather_dicts,
    process_group,
    reduce_min,
    reduce_sums,
)
from hybridcls.train.metrics import per_class_from_counts, plot_curves, write_metrics
from hybridcls.train.state import (
    Divergence,
    TrainState,
    diverged_training,
    flatten_optimizer_state,
    holds_training_run,
    load_train_state,
    record_divergence,
    save_train_state,
    unflatten_optimizer_state,
)

__all__ = ["REPORT_FILE", "TrainResult", "Trainer", "resolve_device", "train"]

REPORT_FILE = "report.json"
#: No update of the epoch had a training loss that was not finite (a reduce_min identity).
_ALL_FINITE = torch.iinfo(torch.int64).max

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a finished run reports.

    Attributes:
        run_dir: The run directory (best checkpoint in ``config.json`` + ``model.safetensors``).
        classes: Class names, index = label.
        best_epoch: 1-based epoch of the lowest validation loss.
        best_val_loss: That loss.
        val_accuracy: Validation accuracy at the best epoch.
        epochs_run: Epochs completed.
        stopped_early: Whether early stopping ended the run.
        resumed_from: The epochs the run had completed when this call resumed it
            (``train(resume=)``); ``None`` for a new run.
        resumed_after: The epochs completed when each resume of the run that trained
            started, in order (this call's last); empty for a run trained in one go.
        history: The per-epoch records (see :mod:`hybridcls.train.metrics`).
        skipped_images: ``{"path", "reason"}`` of every image that failed to decode:
            those the check before training found in the training and validation
            folders (never trained on), then any that failed later, during the run.
    """

    run_dir: Path
    classes: list[str]
    best_epoch: int
    best_val_loss: float
    val_accuracy: float
    epochs_run: int
    stopped_early: bool
    resumed_from: int | None = None
    resumed_after: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_images: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: best epoch, its validation accuracy and loss, skipped images."""
        line = (
            f"best epoch {self.best_epoch}/{self.epochs_run}: "
            f"val acc {100 * self.val_accuracy:.1f}% val loss {self.best_val_loss:.4f}"
            + ("  (stopped early)" if self.stopped_early else "")
        )
        if self.skipped_images:
            line += f"; {len(self.skipped_images)} image(s) skipped, see {REPORT_FILE}"
        return f"{line}; checkpoint in {self.run_dir}"


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    # Mixed precision only where it pays and is well supported: CUDA.
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class Trainer:
    """One training run, set up completely before :meth:`fit` trains.

    Inside a live process group of more than one process (torchrun; see
    :func:`hybridcls.train.distributed.process_group`) the run is data-parallel:
    the model trains wrapped in ``DistributedDataParallel``, each rank draws its
    share of the balanced sampler and of the validation images, the metrics are
    reduced across ranks, and rank 0 alone writes files and calls
    ``on_epoch_end``. Without one, nothing of that runs.

    Args:
        run_dir: The run directory.
        config: The options (``batch_size`` is per step, all ranks together).
        data: Classes and training / validation samples.
        resume_state: The state of an interrupted run to continue.
        on_epoch_end: Called with each epoch's record (plus ``"epochs"``, the
            run's maximum), after the epoch is saved; on rank 0 only.

    Raises:
        InputError: a batch size that does not split into at least 2 images per rank.

    Example:
        >>> data = resolve_training_data("data/train", TrainConfig())  # doctest: +SKIP
        >>> result = Trainer("runs/a", TrainConfig(), data).fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: TrainConfig,
        data: TrainingData,
        *,
        resume_state: TrainState | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = cfg = config
        self.data = data
        self.on_epoch_end = on_epoch_end
        # Under torchrun: this rank's place and device (cuda:LOCAL_RANK); else one process.
        self.dist = current(cfg.device)
        self.device = self.dist.device
        world, rank = self.dist.world_size, self.dist.rank
        if cfg.batch_size % world or cfg.batch_size // world < 2:
            raise ParameterError(
                "batch_size", cfg.batch_size, f"images per step, all processes together, must "
                f"be a multiple of the {world} processes with at least 2 images each"
            )
        # The global batch is split: N ranks together take the steps one process would.
        self.rank_batch_size = cfg.batch_size // world
        self.amp_dtype = _amp_dtype(cfg.amp, self.device)
        num_classes = len(data.classes)

        # The initial weights (head, or everything without pretraining) come from the seed.
        seed_everything(derive_seed(cfg.seed, -1, "init"))
        model_name = resolve_model_name(cfg.model, cfg.pretrained_tag)
        self.model, data_config = build_model(
            model_name,
            num_classes,
            head=cfg.head,
            dropout=cfg.dropout,
            hidden_dim=cfg.head_hidden,
            # A resumed run takes its weights from the resume state, not from the source.
            weights_source="none" if resume_state is not None else cfg.weights_source,
            weights_file=cfg.weights,
            image_size=cfg.image_size,
            cache_dir=cfg.cache_dir,
        )
        self.model.freeze(cfg.freeze)
        self.model.to(self.device)
        tag = model_name.partition(".")[2] or None
        self.checkpoint_config = make_checkpoint_config(
            self.model,
            model_name=model_name,
            classes=data.classes,
            data_config=data_config,
            head=cfg.head,
            dropout=cfg.dropout,
            hidden_dim=cfg.head_hidden,
            weights={"source": cfg.weights_source, "tag": tag, "file": cfg.weights},
            train=cfg.to_dict(),
            # absolute: a relative folder would be read against whatever folder predict runs in
            data_dir=os.path.abspath(data.root),
            split=split_record(data),
        )
        self.train_transform = build_train_transform(data_config, cfg)
        self.eval_transform = build_eval_transform(self.checkpoint_config)
        self.train_labels = torch.tensor([label for _, label in data.train], dtype=torch.long)
        # Validation is sharded (every N-th image from this rank's position) and the
        # sums are reduced, so each image is scored once and the metrics are exact.
        self.val_samples = data.val[rank::world]
        self.val_labels = torch.tensor([label for _, label in self.val_samples], dtype=torch.long)
        self.sampler: BalancedSampler = (
            DistributedBalancedSampler(
                self.train_labels.tolist(), cfg.balance, cfg.seed, rank, world
            )
            if self.dist.distributed
            else BalancedSampler(self.train_labels.tolist(), cfg.balance, cfg.seed)
        )

        self.optimizer = create_optimizer_v2(
            self.model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        steps_per_epoch = max(1, math.ceil(len(self.sampler) / self.rank_batch_size))
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        # Per-update cosine over the whole run: short runs still get a smooth decay.
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=max(1, cfg.epochs * steps_per_epoch - warmup_steps),
            lr_min=cfg.min_lr,
            warmup_t=warmup_steps,
            warmup_lr_init=cfg.lr / 100,
            warmup_prefix=True,
            t_in_epochs=False,
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype is torch.float16
        )
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
        self.mixup = (
            Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )
            if cfg.mixup > 0 or cfg.cutmix > 0
            else None
        )
        self.train_loss_fn: torch.nn.Module = (
            SoftTargetCrossEntropy()
            if self.mixup
            else torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        )

        self.epoch = 0  # epochs completed
        self.num_updates = 0
        self.best_val_loss = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped_early = False
        self.resumed_after: list[int] = []
        # the first update of the epoch whose training loss was not finite (None: none was)
        self.nonfinite_update: int | None = None
        self.history: list[dict[str, Any]] = []
        check = data.image_check
        self.skipped: dict[str, str] = dict(check.unreadable) if check is not None else {}
        if resume_state is not None:
            self._restore(resume_state)
        self.resumed_from = None if resume_state is None else self.epoch
        # DDP wraps the module that trains; self.model stays the plain module that is saved,
        # evaluated and averaged by the EMA. DDP broadcasts rank 0's weights on creation.
        self.train_model: torch.nn.Module = self.model
        if self.dist.distributed:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # ----------------------------------------------------------------- state

    def _eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        opt_tensors, opt_rest = flatten_optimizer_state(self.optimizer.state_dict())
        tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
        check = self.data.image_check
        finished = self.stopped_early or self.epoch >= self.config.epochs
        info = {
            "epoch": self.epoch,
            "finished": finished,
            "num_updates": self.num_updates,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
            "resumed_after": self.resumed_after,
            "diverged": None,
            "config": self.config.to_dict(),
            "classes": list(self.data.classes),
            "optimizer": opt_rest,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "skipped_images": self.skipped,
            "image_check": None if check is None else check.to_dict(),
        }
        return tensors, info

    def _restore(self, state: TrainState) -> None:
        info = state.info
        try:
            self.model.load_state_dict(state.prefixed("model"), strict=True)
            if self.ema is not None:
                self.ema.module.load_state_dict(state.prefixed("ema"), strict=True)
            self.optimizer.load_state_dict(
                unflatten_optimizer_state(state.prefixed("optimizer"), info["optimizer"])
            )
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"resume={str(self.run_dir)!r}: the saved state does not fit this model "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        self.scheduler.load_state_dict(info["scheduler"])
        if info.get("scaler"):
            self.scaler.load_state_dict(info["scaler"])
        self.epoch = int(info["epoch"])
        self.num_updates = int(info["num_updates"])
        best = info.get("best_val_loss")
        self.best_val_loss = math.inf if best is None else float(best)
        self.best_epoch = int(info["best_epoch"])
        self.bad_epochs = int(info["bad_epochs"])
        self.stopped_early = bool(info["stopped_early"])
        self.history = list(info["history"])
        self.resumed_after = list(info.get("resumed_after", []))  # absent: written before it
        if self.epoch < self.config.epochs and not self.stopped_early:  # a resume that trains
            self.resumed_after.append(self.epoch)
        # Today's check first; then what the earlier epochs met (files since replaced included).
        for path, reason in info["skipped_images"].items():
            self.skipped.setdefault(path, reason)

    # ----------------------------------------------------------------- epochs

    def _note_errors(self, batch: Batch, samples: list[tuple[str, int]]) -> None:
        for index, reason in batch.errors.items():
            self.skipped.setdefault(samples[index][0], reason)

    def _bar(self, loader: Any, desc: str) -> Any:
        return tqdm(
            loader,
            desc=desc,
            total=len(loader),
            leave=False,
            file=sys.stderr,
            disable=not self.config.progress or not self.dist.is_main,
            dynamic_ncols=True,
        )

    @contextlib.contextmanager
    def _quiet_reducer(self) -> Iterator[None]:
        if not self.dist.distributed:
            yield
            return
        # DDP warns (once) when a gradient's strides differ from its bucket's, which
        # depthwise convolutions' [C, 1, k, k] weights always do (ConvNeXt): a note
        # about one small copy, not a fault.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
            yield

    def _train_epoch(self) -> dict[str, float]:
        cfg, epoch = self.config, self.epoch
        # Every random stream of the epoch follows from (seed, epoch): a resumed run
        # replays exactly the epochs an uninterrupted one would have run. Ranks other
        # than 0 get streams of their own (augmentations, dropout, MixUp differ per rank).
        stream = "" if self.dist.rank == 0 else f"/rank{self.dist.rank}"
        seed_everything(derive_seed(cfg.seed, epoch, "global" + stream))
        self.sampler.set_epoch(epoch)
        loader = make_loader(
            self.data.train,
            self.train_transform,
            batch_size=self.rank_batch_size,
            workers=cfg.workers,
            sampler=self.sampler,
            seed=derive_seed(cfg.seed, epoch, "workers" + stream),
            pin_memory=self.device.type == "cuda",
        )
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        # The running sums stay on the device and are read once, after the loop: reading
        # them every step (float(), int()) would make the host wait for the GPU each step.
        # float64, as the Python floats it replaces, so the sums are the same to the bit;
        # MPS has no float64, so there the loss sum stays on the CPU (a copy per step).
        sum_device = self.device if self.device.type != "mps" else torch.device("cpu")
        loss_sum = torch.zeros((), dtype=torch.float64, device=sum_device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        first_nonfinite = torch.full((), _ALL_FINITE, dtype=torch.long, device=self.device)
        seen = 0
        start = time.perf_counter()
        # Entered once for the epoch, not around each backward(): every entry mutates the
        # warning filters, which also resets Python's record of "once" warnings shown.
        with self._quiet_reducer():
            for batch in self._bar(loader, f"epoch {epoch + 1}/{cfg.epochs} train"):
                self._note_errors(batch, self.data.train)
                # BatchNorm in the head cannot train on a single image; under DDP every rank
                # must take or skip the step together, so the smallest batch decides.
                if reduce_min(len(batch.ok), self.device) < 2:
                    continue
                images = batch.images.to(self.device, non_blocking=True)
                labels = self.train_labels[batch.ok].to(self.device, non_blocking=True)
                targets: torch.Tensor = labels
                if self.mixup is not None:
                    if len(images) % 2 == 0:
                        images, targets = self.mixup(images, labels)
                    else:  # timm's Mixup pairs images, so an odd batch goes unmixed
                        targets = mixup_target(
                            labels, len(self.data.classes), 1.0, cfg.label_smoothing
                        )
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    logits = self.train_model(images)
                    loss = self.train_loss_fn(logits, targets)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.clip_grad is not None:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in self.model.parameters() if p.requires_grad], cfg.clip_grad
                    )
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.num_updates += 1
                # on the device, as the sums: where the loss first broke, without a read per step
                first_nonfinite = torch.where(torch.isfinite(loss.detach()), first_nonfinite,
                                              first_nonfinite.clamp(max=self.num_updates))
                self.scheduler.step_update(self.num_updates)
                if self.ema is not None:
                    self.ema.update(self.model, step=self.num_updates)
                n = len(labels)
                # Cast, then scale by n: the two roundings float(loss) * n made, in that order.
                loss_sum += loss.detach().to(sum_device, torch.float64) * n
                # With MixUp/CutMix this is agreement with the dominant (unmixed) label.
                correct += (logits.detach().argmax(1) == labels).sum()
                seen += n
        # The epoch's one read of the sums; it waits for the last step, so it comes before
        # the clock stops (the time then covers the device's work, not just its queueing).
        local_sums = [loss_sum.item(), int(correct.item()), seen]
        elapsed = time.perf_counter() - start
        loss_total, n_correct, seen = reduce_sums(local_sums, self.device)
        first = reduce_min(int(first_nonfinite.item()), self.device)
        self.nonfinite_update = None if first == _ALL_FINITE else first
        if seen == 0:
            raise DatasetError(
                "no training image could be decoded in a whole epoch; see the skipped images"
            )
        return {
            "train_loss": loss_total / seen,
            "train_acc": n_correct / seen,
            "lr": lr,
            "images_per_sec": seen / max(elapsed, 1e-9),
            "train_time_s": elapsed,
        }

    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        cfg = self.config
        model = self._eval_model()
        model.eval()
        loader = make_loader(
            self.val_samples,
            self.eval_transform,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
        )
        num_classes = len(self.data.classes)
        loss_sum = 0.0
        total = torch.zeros(num_classes, dtype=torch.long)  # images per class
        hits = torch.zeros(num_classes, dtype=torch.long)  # correctly classified, per class
        for batch in self._bar(loader, f"epoch {self.epoch + 1}/{cfg.epochs} val"):
            self._note_errors(batch, self.val_samples)
            if not batch.ok:
                continue
            images = batch.images.to(self.device, non_blocking=True)
            labels = self.val_labels[batch.ok].to(self.device)
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                logits = model(images)
            # Plain cross-entropy (no smoothing): the quantity early stopping watches.
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            labels = labels.cpu()
            right = logits.argmax(1).cpu() == labels
            total += torch.bincount(labels, minlength=num_classes)
            hits += torch.bincount(labels[right], minlength=num_classes)
        # One reduction of [loss, per-class totals, per-class hits] over the ranks' shards.
        sums = reduce_sums([loss_sum, *total.tolist(), *hits.tolist()], self.device)
        loss_sum = sums[0]
        total_counts = [round(v) for v in sums[1 : 1 + num_classes]]
        hit_counts = [round(v) for v in sums[1 + num_classes :]]
        n = sum(total_counts)
        if n == 0:
            raise DatasetError("no validation image could be decoded; see the skipped images")
        return {
            "val_loss": loss_sum / n,
            "val_acc": sum(hit_counts) / n,
            "val_acc_per_class": per_class_from_counts(hit_counts, total_counts, self.data.classes),
        }

    def fit(self) -> TrainResult:
        """Train until the last epoch or early stopping, saving after every epoch.

        Returns:
            The run's :class:`TrainResult`.
        """
        cfg = self.config
        main = self.dist.is_main
        while self.epoch < cfg.epochs and not self.stopped_early:
            start = time.perf_counter()
            record: dict[str, Any] = {"epoch": self.epoch + 1}
            record.update(self._train_epoch())
            record.update(self._validate())
            record["time_s"] = time.perf_counter() - start
            # Rank 0's record decides on every rank (best epoch, early stopping), and
            # every rank learns of the images the others could not decode.
            record = broadcast_object(record)
            self.skipped = gather_dicts(self.skipped)
            if not (math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])):
                divergence = Divergence.of(record, update=self.nonfinite_update,
                                           best_epoch=self.best_epoch, config=cfg.to_dict())
                if main and self.epoch > 0:  # the state of the last finite epoch says so
                    record_divergence(self.run_dir, divergence)
                raise InputError(
                    f"training diverged in {divergence.describe()}; {divergence.kept(self.run_dir)}"
                    f". Start again with {divergence.remedy()}"
                )
            if main:  # created with the first epoch's files: a run that fails before leaves none
                self.run_dir.mkdir(parents=True, exist_ok=True)
            improved = record["val_loss"] < self.best_val_loss
            record["best"] = improved
            self.epoch += 1
            if improved:
                self.best_val_loss, self.best_epoch, self.bad_epochs = (
                    record["val_loss"],
                    self.epoch,
                    0,
                )
                if main:
                    save_checkpoint(self.run_dir, self._eval_model(), self.checkpoint_config)
            else:
                self.bad_epochs += 1
            self.stopped_early = cfg.patience is not None and self.bad_epochs >= cfg.patience
            self.history.append(record)
            if main:
                write_metrics(self.run_dir, self.history, self.data.classes)
                save_train_state(self.run_dir, *self._state())
                if self.on_epoch_end is not None:
                    self.on_epoch_end({**record, "epochs": cfg.epochs})
        return self._finish()

    def _finish(self) -> TrainResult:
        best = next(r for r in self.history if r["epoch"] == self.best_epoch)
        result = TrainResult(
            run_dir=self.run_dir,
            classes=list(self.data.classes),
            best_epoch=self.best_epoch,
            best_val_loss=self.best_val_loss,
            val_accuracy=float(best["val_acc"]),
            epochs_run=self.epoch,
            stopped_early=self.stopped_early,
            resumed_from=self.resumed_from,
            resumed_after=list(self.resumed_after),
            history=self.history,
            skipped_images=[{"path": p, "reason": r} for p, r in self.skipped.items()],
        )
        if not self.dist.is_main:
            return result
        atomic_write_json(
            self.run_dir / REPORT_FILE,
            {
                "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss,
                "val_accuracy": result.val_accuracy,
                "val_acc_per_class": best["val_acc_per_class"],
                "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early,
                "resumed_after": result.resumed_after,
                "num_classes": len(result.classes),
                "num_train_images": len(self.data.train),
                "num_val_images": len(self.data.val),
                "total_time_s": sum(r["time_s"] for r in self.history),
                "skipped_images": result.skipped_images,
            },
        )
        plot_curves(self.run_dir, self.history)
        return result


def _resume_config(
    run_dir: Path, state: TrainState, config: TrainConfig | None, overrides: dict[str, Any]
) -> TrainConfig:
    """The stored options, with only the ones that do not change results replaced."""
    stored = TrainConfig.from_dict(state.info["config"])
    requested = dict(overrides)
    if config is not None:
        requested = {**config.to_dict(), **requested}
    current = stored.to_dict()
    # Checked and spelt as the run stores options ("none" as None, paths as str); an unknown
    # option name is refused here rather than ignored.
    wanted = stored.replace(**requested).to_dict()
    for name, value in requested.items():
        if name in RESUME_FREE_FIELDS:
            continue
        if wanted[name] != current[name]:
            raise CheckpointError(
                f"resume={str(run_dir)!r}: that run was trained with {name}={current[name]!r}, not "
                f"{name}={value!r}; resume without changing it, or start a new run in another "
                f"folder (output=RUN_DIR)"
            )
    free = {k: v for k, v in requested.items() if k in RESUME_FREE_FIELDS}
    return stored.replace(**free)


def _check_resumed_classes(run_dir: Path, state: TrainState, data_dir: str | Path) -> None:
    """Refuse a folder whose classes are not the resumed run's (a scan: before the image check)."""
    stored = list(state.info["classes"])
    classes = scan_image_folder(data_dir).classes
    if classes != stored:
        diff = sorted(set(stored) ^ set(classes))
        raise CheckpointError(
            f"resume={str(run_dir)!r}: that run was trained on {len(stored)} classes, the folder "
            f"{data_dir} has {len(classes)}"
            + (f"; differing class(es): {', '.join(diff[:5])}" if diff else "; in a different order")
        )


def train(
    data_dir: str | Path,
    output: str | Path | None = None,
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune the supervised branch on an ImageFolder-style folder.

    Started by torchrun (``WORLD_SIZE`` > 1), every worker calls this with the
    same arguments; the run then trains data-parallel over the workers (see
    :class:`Trainer` and docs/scale.md) and returns the same result on each.

    Args:
        data_dir: One subfolder per class.
        output: The run directory to create; must not already hold a run.
            With ``resume``, omit it (or give the same folder).
        config: The options (default: :class:`TrainConfig`'s recipe).
        resume: A run directory to continue from its last completed epoch;
            its stored options apply, and only ``device``, ``workers``,
            ``progress`` and ``cache_dir`` may change.
        on_epoch_end: Called with each epoch's record.
        **overrides: Options replacing ``config``'s (``epochs=3``, ``model="resnet18"``...).

    Returns:
        The :class:`TrainResult`.

    Raises:
        DatasetError: a bad training or validation folder.
        DataTooSmallError: too few classes or images for the run (see docs/training.md).
        InputError: a bad option, ``output`` already holds a run, or the training
            diverged (a loss that is not finite; only the epochs before it are
            written, nothing if it was the first, and ``train_state.json`` records
            the divergence: :func:`hybridcls.train.state.diverged_training`).
        CheckpointError: a ``resume`` folder that is not a run, is one from
            a different model, class list or options, or is one that diverged
            (resumed with its own options, it would diverge again).
        WeightsUnavailableError: pretrained weights that cannot be had offline.

    Example:
        >>> from hybridcls.train import train
        >>> result = train("data/train", "runs/seen40", epochs=20)  # doctest: +SKIP
        >>> result.val_accuracy  # doctest: +SKIP
        0.96
    """
    state: TrainState | None = None
    if resume is not None:
        resume = Path(resume)
        if output is not None and Path(output).resolve() != resume.resolve():
            raise InputError(
                f"output={str(output)!r}: a resumed run continues in its own folder "
                f"(resume={str(resume)!r})"
            )
        state = load_train_state(resume)
        diverged = state.info.get("diverged")
        if diverged:  # before the options: this run's cannot change on a resume
            divergence = Divergence.from_dict(diverged)
            raise CheckpointError(
                f"resume={str(resume)!r}: that run diverged in {divergence.describe()}; resumed, "
                f"it would train epoch {divergence.epoch} again with the same options and random "
                f"streams and diverge again, so it is not resumed. {divergence.kept(resume)}: "
                f"start a new run in another folder (output=RUN_DIR) with {divergence.remedy()}"
            )
        config = _resume_config(resume, state, config, overrides)
        run_dir = resume
    else:
        if output is None:
            raise InputError("output=None: a run directory is required (or resume=RUN_DIR)")
        config = (config or TrainConfig()).replace(**overrides)
        config.check_files()
        run_dir = Path(output)
        if holds_training_run(run_dir):
            diverged = diverged_training(run_dir)
            raise InputError(
                f"output={str(run_dir)!r} already holds a training run; "
                + (f"its training diverged in {diverged.describe()} (resumed, it would diverge "
                   f"again): choose another folder, or delete it, and start again with "
                   f"{diverged.remedy()}" if diverged is not None else
                   f"continue it with resume={str(run_dir)!r}, or choose another folder")
            )
    # Under torchrun the process group lives for this run only (see train.distributed);
    # it is joined first so that the ranks share out the image check.
    with process_group(config.device):
        previous = None
        if state is not None:
            _check_resumed_classes(run_dir, state, data_dir)
            previous = ImageCheck.from_dict(state.info.get("image_check"))
        # a resumed run validates on the images it held out, even if the folder changed since
        recorded = (read_json(run_dir / CONFIG_FILE).get("split")
                    if state is not None and (run_dir / CONFIG_FILE).is_file() else None)
        data = resolve_training_data(data_dir, config, previous_check=previous, recorded_split=recorded)
        trainer = Trainer(run_dir, config, data, resume_state=state, on_epoch_end=on_epoch_end)
        return trainer.fit()
