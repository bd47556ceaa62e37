"""Where a backbone's weights come from: a timm pretrained tag, a local file, or none.

Three sources, chosen explicitly and resolved offline-first:

* ``"timm"``: ``timm.create_model(name.tag, pretrained=True)``; timm looks in
  the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``, or ``cache_dir``) and
  downloads only when the network is allowed (``HF_HUB_OFFLINE=1`` forbids it);
* ``"file"``: a state dict in timm's key layout, ``.safetensors`` (preferred) or
  ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``, so a
  crafted pickle is refused rather than run;
* ``"none"``: random initialisation.

Whatever the source, the preprocessing comes from the model's pretrained
config (``timm.data.resolve_data_config``), so weights and transforms agree.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from hybridcls.errors import CheckpointError, InputError, ParameterError, WeightsUnavailableError

__all__ = [
    "DEFAULT_PRETRAINED_TAGS",
    "WEIGHT_SOURCES",
    "create_backbone",
    "load_backbone_weights",
    "read_state_dict",
    "resolve_backbone_data_config",
    "resolve_model_name",
]

#: Pretrained tag used when the model is named without one. ConvNeXt-Tiny gets its
#: ImageNet-22k-pretrained, 1k-fine-tuned weights (docs/training.md says why);
#: any other model gets timm's own default tag.
DEFAULT_PRETRAINED_TAGS: dict[str, str] = {"convnext_tiny": "fb_in22k_ft_in1k"}

#: The accepted values of ``weights_source``.
WEIGHT_SOURCES: tuple[str, ...] = ("timm", "file", "none")

_TORCH_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def resolve_model_name(model: str, tag: str | None = None) -> str:
    """Return ``architecture.tag`` for a timm model, checking both exist.

    Args:
        model: A timm architecture, optionally with a tag (``"convnext_tiny.fb_in1k"``).
        tag: A pretrained tag; overrides one inside ``model``. ``None`` picks
            :data:`DEFAULT_PRETRAINED_TAGS` or timm's default tag.

    Returns:
        The full name, e.g. ``"convnext_tiny.fb_in22k_ft_in1k"``; just the
        architecture when timm knows no pretrained tag for it.

    Raises:
        InputError: unknown architecture (``--model``) or tag (``--pretrained``).
    """
    arch, _, name_tag = model.partition(".")
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:5]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ParameterError("model", model, f"timm has no architecture {arch!r}{hint}")
    # a tag that is not timm's is named where it was given: the tag parameter, or in the model name
    given = ("tag", tag) if tag else ("model", model)
    tag = tag or name_tag or DEFAULT_PRETRAINED_TAGS.get(arch)
    if tag is None:
        # timm's default pretrained cfg decides; None when timm has no tag at all.
        default = timm.models.get_pretrained_cfg(arch)
        tag = getattr(default, "tag", None) or None
        return f"{arch}.{tag}" if tag else arch
    known_names = set(timm.list_pretrained(f"{arch}.*"))
    if f"{arch}.{tag}" not in known_names:
        known = sorted(n.partition(".")[2] for n in known_names)
        raise ParameterError(
            *given, f"timm has no tag {tag!r} for {arch!r}"
            + (f"; known tags: {', '.join(known)}" if known else "")
        )
    return f"{arch}.{tag}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from disk without running any pickled code.

    Args:
        path: A ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin``/``.ckpt`` file
            that ``torch.load(weights_only=True)`` accepts. A checkpoint dict that
            wraps the weights under ``state_dict``/``model`` is unwrapped.

    Returns:
        Tensor name -> tensor, on the CPU.

    Raises:
        CheckpointError: missing, unreadable, not a state dict, or a pickle
            that needs code to load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix not in _TORCH_PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown weights format; use .safetensors, or a .pth/.pt state dict"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        # weights_only refuses any pickle that would import or call code.
        raise CheckpointError(
            f"{path}: refused: not a plain tensor state dict that loads with "
            f"torch.load(weights_only=True) ({str(exc).splitlines()[0]})"
        ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    # DataParallel / DDP checkpoints prefix every key.
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a timm-layout state dict into a headless backbone, strictly.

    The classifier tensors named by the model's pretrained config (e.g.
    ``head.fc``) are dropped, since hybridcls puts its own head on top; every
    other tensor must match by name and shape.

    Raises:
        CheckpointError: names the file and the first mismatching tensors.
    """
    state = read_state_dict(path)
    classifier = backbone.pretrained_cfg.get("classifier") or ()
    for name in (classifier,) if isinstance(classifier, str) else classifier:
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong_shape),
        ):
            if names:
                parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
        raise CheckpointError(
            f"{path}: does not match {backbone.pretrained_cfg.get('architecture')} in timm's key "
            f"layout: {'; '.join(parts)}"
        )
    backbone.load_state_dict(state, strict=True)


def _unavailable(full_name: str, exc: BaseException) -> WeightsUnavailableError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WeightsUnavailableError(
        f"the pretrained weights {full_name!r} are not in the local cache and could not be "
        f"downloaded ({reason}). Either pass a local file in timm's key layout with "
        f"weights=FILE (.safetensors, or a .pth state dict), train from random "
        f"initialisation with pretrained=False, or make the weights available: download them "
        f"once where there is a network (timm.create_model({full_name!r}, pretrained=True)) "
        f"and point HF_HOME or HF_HUB_CACHE (or cache_dir=DIR) at that cache; HF_HUB_OFFLINE=1 "
        f"makes the lookup fail fast instead of retrying the network."
    )


def create_backbone(
    model: str,
    *,
    source: str = "timm",
    tag: str | None = None,
    file: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> nn.Module:
    """Create a headless timm backbone (``num_classes=0``) with its weights.

    Args:
        model: A timm architecture, optionally ``arch.tag``.
        source: ``"timm"`` (pretrained tag), ``"file"`` or ``"none"``.
        tag: The pretrained tag (its config also sets the preprocessing).
        file: The weights file for ``source="file"``.
        cache_dir: Where timm looks for / stores downloaded weights.

    Returns:
        The backbone; its forward returns pooled pre-logits features of size
        ``backbone.num_features``.

    Raises:
        InputError: unknown model, tag or source.
        WeightsUnavailableError: the tag's weights can be neither found nor downloaded.
        CheckpointError: the file cannot be read or does not fit the model.

    Example:
        >>> backbone = create_backbone("test_convnext", source="none")
        >>> backbone.num_features
        64
    """
    if source not in WEIGHT_SOURCES:
        raise InputError(
            f"weights source must be one of {', '.join(WEIGHT_SOURCES)}, not {source!r}"
        )
    full_name = resolve_model_name(model, tag)
    if source == "timm":
        if "." not in full_name:
            raise WeightsUnavailableError(
                f"timm has no pretrained weights for {full_name!r}; "
                f"use weights=FILE or pretrained=False"
            )
        try:
            return timm.create_model(full_name, pretrained=True, num_classes=0, cache_dir=cache_dir)
        except (OSError, RuntimeError, ValueError) as exc:
            # OSError covers hub/URL download and cache misses (LocalEntryNotFoundError, URLError).
            raise _unavailable(full_name, exc) from exc
    backbone = timm.create_model(full_name, pretrained=False, num_classes=0)
    if source == "file":
        if file is None:
            raise ParameterError("file", file, "a weights file is required for source='file'")
        load_backbone_weights(backbone, file)
    return backbone


def resolve_backbone_data_config(
    backbone: nn.Module, image_size: int | None = None
) -> dict[str, Any]:
    """The preprocessing of the backbone's pretrained config, as JSON-ready values.

    Args:
        backbone: A timm model (its ``pretrained_cfg`` is read).
        image_size: Optional square input size overriding the config's (e.g.
            small images in tests); everything else stays the model's.

    Returns:
        ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``.
    """
    args = {"img_size": int(image_size)} if image_size else None
    cfg = timm.data.resolve_data_config(args=args, model=backbone)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }
