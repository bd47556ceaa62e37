"""A run's resume state: ``train_state.safetensors`` (tensors) + ``train_state.json`` (the rest).

Written atomically at the end of every epoch, never pickled. The tensors are
the last weights (``model.*``), the EMA weights (``ema.*``) and the
optimizer's per-parameter state (``optimizer.<param index>.<name>``); the
JSON holds the optimizer's parameter groups and non-tensor state, the
scheduler's and gradient scaler's state dicts, the training options, the
class names and the progress (epochs done, updates, best loss, early-stopping
counter, metrics history, skipped images, the epochs after which it was
resumed). The RNG streams need no storing: each epoch reseeds them from
``(seed, epoch)`` (see :mod:`hybridcls.train.data`).

A run whose loss stopped being finite keeps the state of its last finite epoch,
and its JSON records the divergence (``diverged``: :class:`Divergence`): such a
run is neither interrupted nor finished, and resuming it would replay the same
epoch into the same divergence.

Corruption is detected, not loaded: the JSON records the SHA-256 of the
tensors file (``tensors_sha256``) and of its own content (``json_sha256``, over
the canonical JSON of everything else), and both are checked before anything
is restored.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hybridcls.cache import atomic_write_bytes, atomic_write_json, read_json, stable_hash
from hybridcls.errors import CheckpointError
from hybridcls.supervised.checkpoint import (
    CONFIG_FILE,
    read_verified_safetensors,
    safetensors_bytes,
)

__all__ = [
    "STATE_FORMAT_VERSION",
    "STATE_JSON_FILE",
    "STATE_TENSORS_FILE",
    "Divergence",
    "TrainState",
    "diverged_training",
    "flatten_optimizer_state",
    "holds_training_run",
    "load_train_state",
    "record_divergence",
    "save_train_state",
    "unfinished_training",
    "unflatten_optimizer_state",
]

STATE_TENSORS_FILE = "train_state.safetensors"
STATE_JSON_FILE = "train_state.json"
STATE_FORMAT_VERSION = 2  # 2: content hashes
_JSON_HASH_KEY = "json_sha256"


@dataclass
class TrainState:
    """A run's resume state as read from disk.

    Attributes:
        tensors: Name -> tensor (``model.*``, ``ema.*``, ``optimizer.*``).
        info: The JSON part (``epoch``, ``config``, ``classes``, ``scheduler``,
            ``scaler``, ``optimizer`` groups, ``progress``...).
    """

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix.``, with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


@dataclass(frozen=True)
class Divergence:
    """Where a run's training diverged: the epoch whose training or validation loss was not finite.

    Attributes:
        epoch: The 1-based epoch whose loss was not finite (the run keeps the epochs before it).
        update: The optimizer update (1-based, counted over the whole run) whose training
            loss was the first that was not finite; ``None`` when every training loss of the
            epoch was finite (only the validation loss was not).
        train_loss: The epoch's mean training loss; ``None`` when not finite.
        val_loss: The epoch's validation loss; ``None`` when not finite.
        reason: The two losses as they were (``"train loss nan, val loss nan"``).
        best_epoch: The best epoch before it (the run's ``model.safetensors``), 0 for none.
        lr: The run's peak learning rate.
        clip_grad: The run's gradient-norm clipping (``None``: none).
    """

    epoch: int
    update: int | None
    train_loss: float | None
    val_loss: float | None
    reason: str
    best_epoch: int
    lr: float
    clip_grad: float | None

    @classmethod
    def of(cls, record: Mapping[str, Any], *, update: int | None, best_epoch: int,
           config: Mapping[str, Any]) -> Divergence:
        """The divergence of an epoch's record (``epoch``, ``train_loss``, ``val_loss``).

        Example:
            >>> d = Divergence.of({"epoch": 2, "train_loss": float("nan"), "val_loss": 1.5},
            ...                   update=7, best_epoch=1, config={"lr": 0.1, "clip_grad": None})
            >>> d.describe(), d.train_loss
            ('epoch 2 (train loss nan, not finite from update 7; val loss 1.5)', None)
        """
        train_loss, val_loss = float(record["train_loss"]), float(record["val_loss"])
        first = "" if update is None else f", not finite from update {update}"
        return cls(
            epoch=int(record["epoch"]),
            update=update,
            train_loss=train_loss if math.isfinite(train_loss) else None,
            val_loss=val_loss if math.isfinite(val_loss) else None,
            reason=f"train loss {train_loss}{first}; val loss {val_loss}",
            best_epoch=best_epoch,
            lr=float(config["lr"]),
            clip_grad=config.get("clip_grad"),
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Divergence:
        """Inverse of :meth:`to_dict`."""
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON fields (a loss that was not finite is ``None``; ``reason`` says which)."""
        return asdict(self)

    def describe(self) -> str:
        """``"epoch E (train loss ..., val loss ...)"``."""
        return f"epoch {self.epoch} ({self.reason})"

    def kept(self, run_dir: str | Path) -> str:
        """What the run directory holds of the run: the epochs before the divergence."""
        if self.epoch == 1:
            return "nothing was written"
        if self.epoch == 2:
            return f"{run_dir} keeps epoch 1 and its checkpoint, the best before it diverged"
        return (f"{run_dir} keeps epochs 1-{self.epoch - 1} and the checkpoint of epoch "
                f"{self.best_epoch}, the best before it diverged")

    def remedy(self) -> str:
        """The options of a run that may not diverge, for "start again with ..."."""
        clip = ("with clip_grad=1.0" if self.clip_grad is None
                else f"a lower clip_grad (this run: clip_grad={self.clip_grad})")
        return f"a lower lr (this run: lr={self.lr}) or {clip}"

    def new_run(self) -> str:
        """What to do instead, for a message outside ``train``: train a new run with
        :meth:`remedy`'s options, as ``train(...)`` calls (the command line shows each as the
        ``hybridcls train`` command): a tenth of this run's ``lr``, or gradient clipping (a
        tenth of this run's, when it clipped).

        Example:
            >>> d = Divergence(epoch=2, update=None, train_loss=1.0, val_loss=None,
            ...                reason="train loss 1.0; val loss nan", best_epoch=1, lr=0.01,
            ...                clip_grad=None)
            >>> head, calls = d.new_run().split(", such as ")
            >>> head
            'train a new run with a lower lr or gradient clipping'
            >>> print(*calls.split(" or "), sep="\\n")
            train(data_dir=DATA_DIR, output=NEW_DIR, lr=0.001)
            train(data_dir=DATA_DIR, output=NEW_DIR, clip_grad=1)
        """
        clip = 1.0 if self.clip_grad is None else self.clip_grad / 10
        return ("train a new run with a lower lr or gradient clipping, such as "
                f"train(data_dir=DATA_DIR, output=NEW_DIR, lr={self.lr / 10:g}) or "
                f"train(data_dir=DATA_DIR, output=NEW_DIR, clip_grad={clip:g})")


def flatten_optimizer_state(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-ready values.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.AdamW([p]); p.grad = torch.ones(2); opt.step()
        >>> tensors, rest = flatten_optimizer_state(opt.state_dict())
        >>> sorted(tensors)
        ['0.exp_avg', '0.exp_avg_sq', '0.step']
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], rest: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`, ready for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, _, key = name.partition(".")
        state.setdefault(int(pid), {})[key] = value
    for pid, values in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for group in rest["param_groups"]:
        # JSON turns tuples into lists; torch's optimizers unpack betas either way,
        # but keep the saved types equal to a fresh optimizer's.
        groups.append({k: tuple(v) if k == "betas" else v for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def save_train_state(
    run_dir: str | Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]
) -> None:
    """Write the resume state, tensors first, each file atomically.

    The epoch number goes into both files, so a reader can tell a torn pair
    (a crash between the two renames) from a consistent one.
    """
    run_dir = Path(run_dir)
    epoch = str(info["epoch"])
    blob = safetensors_bytes(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        {"epoch": epoch, "format_version": str(STATE_FORMAT_VERSION)},
    )
    atomic_write_bytes(run_dir / STATE_TENSORS_FILE, blob)
    _write_state_json(run_dir, {
        "format_version": STATE_FORMAT_VERSION,
        **info,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    })


def _write_state_json(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_json(run_dir / STATE_JSON_FILE, {**record, _JSON_HASH_KEY: stable_hash(record)})


def _read_state_json(run_dir: Path) -> dict[str, Any]:
    """``train_state.json`` checked against its own hash, without ``json_sha256``."""
    json_path = run_dir / STATE_JSON_FILE
    try:
        info = read_json(json_path)
    except CheckpointError as exc:
        raise CheckpointError(f"resume={str(run_dir)!r}: {exc}") from exc
    if not isinstance(info, dict) or info.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"resume={str(run_dir)!r}: {STATE_JSON_FILE}: unknown format (not a resume state)"
        )
    recorded = info.pop(_JSON_HASH_KEY, None)
    if recorded != stable_hash(info):
        raise CheckpointError(
            f"resume={str(run_dir)!r}: {STATE_JSON_FILE}: corrupt: its content differs from the "
            f"SHA-256 recorded in it when it was written; it is not loaded"
        )
    return info


def record_divergence(run_dir: str | Path, divergence: Divergence) -> None:
    """Add ``diverged`` to the run's ``train_state.json``, leaving its last finite epoch's state.

    The tensors file is not touched: it still holds the epoch before the divergence, which
    the JSON's ``epoch`` and ``tensors_sha256`` keep naming.

    Raises:
        CheckpointError: no readable state (the run had not finished an epoch).
    """
    run_dir = Path(run_dir)
    _write_state_json(run_dir, {**_read_state_json(run_dir), "diverged": divergence.to_dict()})


def load_train_state(run_dir: str | Path) -> TrainState:
    """Read a run's resume state.

    Raises:
        CheckpointError: missing, unreadable or inconsistent files, naming the folder.
    """
    run_dir = Path(run_dir)
    json_path = run_dir / STATE_JSON_FILE
    tensor_path = run_dir / STATE_TENSORS_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"resume={str(run_dir)!r}: folder not found")
    if not json_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(
            f"resume={str(run_dir)!r}: no {STATE_JSON_FILE} / {STATE_TENSORS_FILE}; not a run "
            f"that finished at least one epoch"
        )
    info = _read_state_json(run_dir)
    tensors_sha = info.pop("tensors_sha256")
    try:
        tensors, metadata = read_verified_safetensors(tensor_path, tensors_sha)
    except CheckpointError as exc:
        raise CheckpointError(f"resume={str(run_dir)!r}: {exc}") from exc
    if metadata.get("epoch") != str(info.get("epoch")):
        raise CheckpointError(
            f"resume={str(run_dir)!r}: {STATE_TENSORS_FILE} (epoch {metadata.get('epoch')}) and "
            f"{STATE_JSON_FILE} (epoch {info.get('epoch')}) disagree; the run was interrupted "
            f"while saving"
        )
    return TrainState(tensors=tensors, info=info)


def holds_training_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` already holds a training run (finished or not): ``train`` refuses to
    start one there, and a bench resumes it, reuses it or (diverged) refuses it."""
    return any((Path(run_dir) / name).exists() for name in (CONFIG_FILE, STATE_JSON_FILE))


def _progress(run_dir: str | Path) -> dict[str, Any] | None:
    """``train_state.json`` as written (unverified: a status, not a restore), or None."""
    try:
        info = read_json(Path(run_dir) / STATE_JSON_FILE)
    except (CheckpointError, OSError):
        return None
    return info if isinstance(info, dict) else None


def diverged_training(run_dir: str | Path) -> Divergence | None:
    """Where a run's training diverged (its ``train_state.json``'s ``diverged``), or None.

    Example:
        >>> diverged_training("runs/seen40") is None  # doctest: +SKIP
        True
    """
    info = _progress(run_dir)
    if info is None or not info.get("diverged"):
        return None
    try:
        return Divergence.from_dict(info["diverged"])
    except (KeyError, TypeError):
        return None


def unfinished_training(run_dir: str | Path) -> str | None:
    """How far an interrupted training got, or None for a finished, diverged or stateless run.

    Reads ``train_state.json``'s progress (not its tensors): a run whose last saved epoch is
    short of its ``epochs``, did not stop early and did not diverge (see
    :func:`diverged_training`) was interrupted, and its ``model.safetensors`` holds the best
    epoch so far. A run without the file (a ``save_pretrained`` folder, a checkpoint written
    by hand) or with one that cannot be read counts as finished: loading it says nothing.

    Returns:
        ``"epoch E of N"``, or None.

    Example:
        >>> unfinished_training("runs/seen40") is None  # doctest: +SKIP
        True
    """
    info = _progress(run_dir)
    if info is None:
        return None
    try:
        epoch, epochs = int(info["epoch"]), int(info["config"]["epochs"])
        finished, diverged = info["finished"], info.get("diverged")
    except (KeyError, TypeError, ValueError):
        return None
    # ``finished`` is the training loop's own verdict (early stopping, or every epoch run)
    return None if finished or diverged else f"epoch {epoch} of {epochs}"
