"""The checkpoint format: a run directory with ``config.json`` and ``model.safetensors``.

``config.json`` holds everything needed to rebuild the model, its
preprocessing and its class names without the training data::

    {"format": "hybridcls-supervised", "format_version": 1, "hybridcls_version": "0.1.0",
     "model": {"name": "convnext_tiny.fb_in22k_ft_in1k", "num_classes": 40, "head": "mlp",
               "dropout": 0.6, "hidden_dim": 512, "num_features": 768},
     "classes": ["antelope", ...],             # label i is classes[i] (sorted folder names)
     "data_config": {"input_size": [3, 224, 224], "interpolation": "bicubic",
                     "mean": [...], "std": [...], "crop_pct": 0.875, "crop_mode": "center"},
     "weights": {"source": "timm", "tag": "fb_in22k_ft_in1k", "file": null},
     "train": {...},                            # the TrainConfig of the run
     "data_dir": "/abs/data/train",             # the training folder, made absolute
     "split": {"method": "val_split", "fraction": 0.15, "seed": 0,   # how validation was held out
               "held_out": ["antelope/10021.jpg", ...]}}  # and which files (train.data.split_record)

``model.safetensors`` holds the model's state dict (backbone + head). Both
files are written atomically (temporary file, then rename), and loading only
parses JSON and safetensors: nothing is unpickled. ``config.json`` also
records the SHA-256 of ``model.safetensors`` (``"weights_sha256"``), checked
before the weights are loaded, so a truncated or bit-flipped file is refused
with an error naming it instead of loading wrong weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from hybridcls.cache import atomic_write_bytes, atomic_write_json, file_fingerprint, read_json
from hybridcls.data import bound_aspect
from hybridcls.errors import CheckpointError, named_path
from hybridcls.provenance import tower_identity
from hybridcls.supervised.model import SupervisedModel
from hybridcls.supervised.weights import read_state_dict
from hybridcls.version import __version__

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "WEIGHTS_HASH_KEY",
    "build_eval_transform",
    "checkpoint_identity",
    "load_checkpoint",
    "make_checkpoint_config",
    "model_from_config",
    "read_checkpoint_config",
    "read_verified_safetensors",
    "save_checkpoint",
    "timm_data_config",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT = "hybridcls-supervised"
CHECKPOINT_FORMAT_VERSION = 1
#: The ``config.json`` key holding the SHA-256 (hex) of ``model.safetensors``.
WEIGHTS_HASH_KEY = "weights_sha256"


def make_checkpoint_config(
    model: SupervisedModel,
    *,
    model_name: str,
    classes: list[str],
    data_config: Mapping[str, Any],
    head: str,
    dropout: float,
    hidden_dim: int,
    weights: Mapping[str, Any],
    train: Mapping[str, Any] | None = None,
    data_dir: str | None = None,
    split: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` content for a trained :class:`SupervisedModel`.

    Args:
        model: The model (its sizes are recorded).
        model_name: The timm name it was created from (``arch.tag``).
        classes: Class names, index = label.
        data_config: Preprocessing, as returned by ``build_model``.
        head: Head type.
        dropout: Head dropout.
        hidden_dim: Hidden width of the mlp head.
        weights: Where the initial weights came from (``source``, ``tag``, ``file``).
        train: The training options (a ``TrainConfig`` as a dict).
        data_dir: The training folder.
        split: How the validation images were chosen (see ``TrainingData.split``).

    Returns:
        A JSON-ready dict.
    """
    if len(classes) != model.num_classes:
        raise CheckpointError(
            f"{len(classes)} class names for a model with {model.num_classes} outputs"
        )
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "hybridcls_version": __version__,
        "model": {
            "name": model_name,
            "num_classes": model.num_classes,
            "head": head,
            "dropout": float(dropout),
            "hidden_dim": int(hidden_dim),
            "num_features": model.num_features,
        },
        "classes": list(classes),
        "data_config": dict(data_config),
        "weights": dict(weights),
        "train": dict(train or {}),
        "data_dir": data_dir,
        "split": dict(split or {}),
    }


def _safetensors_header(data: bytes) -> tuple[int, dict[str, Any]]:
    """``(length, parsed JSON)`` of a safetensors file's header: 8 little-endian bytes, then JSON."""
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialise tensors and metadata to safetensors bytes that are the same on every run.

    ``safetensors`` writes the metadata in a hash map's order, which changes from
    process to process; the header is rewritten with sorted metadata so that two
    identical states give identical bytes (and the same SHA-256 in the JSON beside them).

    Example:
        >>> a = safetensors_bytes({"w": torch.zeros(2)}, {"epoch": "1", "format": "x"})
        >>> a == safetensors_bytes({"w": torch.zeros(2)}, {"format": "x", "epoch": "1"})
        True
    """
    blob = save_safetensors_bytes(dict(tensors), metadata=dict(metadata))
    n, header = _safetensors_header(blob)
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    # the tensors' entries keep safetensors' own (deterministic) order; the header is
    # space-padded to a multiple of 8 bytes, as safetensors aligns the data that follows
    text = json.dumps({"__metadata__": header.pop("__metadata__"), **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``run_dir``, each atomically.

    The weights go first: a reader that finds a ``config.json`` then finds
    weights that it describes, or the previous best ones of the same model.

    Args:
        run_dir: The run directory (created if needed).
        model: The model whose ``state_dict`` is saved.
        config: The checkpoint config (see :func:`make_checkpoint_config`).
    """
    run_dir = Path(run_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = safetensors_bytes(tensors, {"format": CHECKPOINT_FORMAT})
    atomic_write_bytes(run_dir / WEIGHTS_FILE, blob)
    atomic_write_json(
        run_dir / CONFIG_FILE, {**config, WEIGHTS_HASH_KEY: hashlib.sha256(blob).hexdigest()}
    )


def read_verified_safetensors(
    path: str | Path, sha256: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file we wrote, after checking its content hash.

    The bytes are read once, then parsed and hashed from memory, so what is
    checked is what is loaded.

    Args:
        path: The file.
        sha256: Its expected SHA-256 (hex), from the JSON written beside it;
            ``None`` skips the check (files from before hashes were recorded).

    Returns:
        ``(tensors on the CPU, the file's metadata)``.

    Raises:
        CheckpointError: missing, unreadable, not safetensors, or a content
            hash that differs (truncated or corrupted), naming the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        tensors = load_safetensors_bytes(data)
        metadata = _safetensors_header(data)[1].get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    # Parsing is pure data (no code runs); a file that parses can still hold flipped bits.
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(
            f"{path}: corrupt: its SHA-256 differs from the one recorded when it was written "
            f"({len(data)} bytes); the file was truncated or changed, and is not loaded"
        )
    return dict(tensors), dict(metadata)


def read_checkpoint_config(run_dir: str | Path, *, parameter: str | None = None) -> dict[str, Any]:
    """Read and check a run directory's ``config.json``.

    Args:
        run_dir: The run directory.
        parameter: The parameter that gave ``run_dir`` (``"run_dir"``): a folder that is
            missing or no run is named as ``parameter='run_dir'`` (the command line: its flag).

    Raises:
        CheckpointError: the folder or file is missing, not JSON, not a
            hybridcls supervised checkpoint, or from a newer format version.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"{named_path(run_dir, parameter)}: run directory not found")
    if not path.is_file():
        raise CheckpointError(f"{named_path(run_dir, parameter)}: no {CONFIG_FILE}; "
                              "not a hybridcls training run")
    config = read_json(path)
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a hybridcls supervised checkpoint")
    version = config.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r} is newer than this hybridcls reads "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade hybridcls"
        )
    for key in ("model", "classes", "data_config"):
        if key not in config:
            raise CheckpointError(f"{path}: missing {key!r}")
    return config


def checkpoint_identity(run_dir: str | Path, config: Mapping[str, Any], *,
                        cache_dir: str | Path | None = None) -> dict[str, Any]:
    """A run's supervised tower as a run record names it (:func:`~hybridcls.provenance.tower_identity`).

    Args:
        run_dir: The run directory.
        config: Its ``config.json`` (:func:`read_checkpoint_config`).

    Returns:
        ``{"model_id": timm name, "fingerprint": weights' SHA-256, "weights": the pretrained
        weights it started from}``: the SHA-256 ``train`` recorded (and the load checked),
        hashed here for a checkpoint from before hashes.
    """
    fingerprint = config.get(WEIGHTS_HASH_KEY) or file_fingerprint(Path(run_dir) / WEIGHTS_FILE,
                                                                    cache_dir=cache_dir)
    return tower_identity(config["model"]["name"], fingerprint, weights=config.get("weights"))


def model_from_config(config: Mapping[str, Any]) -> SupervisedModel:
    """Rebuild the architecture a checkpoint config describes, with random weights.

    Raises:
        CheckpointError: the architecture is unknown to the installed timm.
    """
    spec = config["model"]
    name = str(spec["name"])
    if not timm.is_model(name.partition(".")[0]):
        raise CheckpointError(
            f"model {name!r} is not known to the installed timm {timm.__version__}"
        )
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    return SupervisedModel(
        backbone,
        int(spec["num_classes"]),
        head=str(spec["head"]),
        dropout=float(spec["dropout"]),
        hidden_dim=int(spec["hidden_dim"]),
    )


def load_checkpoint(
    run_dir: str | Path, device: str | torch.device = "cpu", *, parameter: str | None = None
) -> tuple[SupervisedModel, dict[str, Any]]:
    """Load a trained supervised model from its run directory.

    Args:
        run_dir: A folder with ``config.json`` and ``model.safetensors``.
        device: Where to put the model.
        parameter: The parameter that gave ``run_dir``, for errors
            (:func:`read_checkpoint_config`).

    Returns:
        ``(model, config)``: the model in eval mode, and the parsed
        ``config.json`` (class names under ``"classes"``, preprocessing
        under ``"data_config"``).

    Raises:
        CheckpointError: missing or corrupt files, or weights that do not
            fit the described model.

    Example:
        >>> model, config = load_checkpoint("runs/seen40")  # doctest: +SKIP
        >>> transform = build_eval_transform(config)  # doctest: +SKIP
        >>> config["classes"][model(transform(img)[None]).argmax()]  # doctest: +SKIP
        'zebra'
    """
    config = read_checkpoint_config(run_dir, parameter=parameter)
    path = Path(run_dir) / WEIGHTS_FILE
    expected = config.get(WEIGHTS_HASH_KEY)
    if expected is None:  # a checkpoint from before hashes were recorded
        state = read_state_dict(path)
    else:
        state, _ = read_verified_safetensors(path, str(expected))
    model = model_from_config(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the model described in {CONFIG_FILE}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.to(device).eval(), config


def build_eval_transform(config: Mapping[str, Any]) -> Callable[[Any], torch.Tensor]:
    """The inference transform (PIL RGB image -> tensor) stored in a checkpoint config.

    Uses ``timm.data.create_transform(**data_config, is_training=False)``, so
    resize, centre crop and normalisation are the model's own; an image longer
    than 16:1 is first cut around its centre, or box-reduced along its length
    before a squash (:func:`~hybridcls.data.bound_aspect`), so that the resize's
    work stays bounded.

    Args:
        config: A checkpoint config (or any mapping with ``"data_config"``).

    Returns:
        A torchvision transform.
    """
    return bound_aspect(
        timm.data.create_transform(**timm_data_config(config["data_config"]), is_training=False))


def timm_data_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored (JSON) data config in the types ``timm.data.create_transform`` expects."""
    out = dict(data_config)
    for key in ("input_size", "mean", "std"):
        out[key] = tuple(out[key])
    return out
