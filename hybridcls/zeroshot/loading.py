"""Load an open_clip model from wherever its weights are, offline-first.

Four ways to name a model, all handled by open_clip's own factory; this
module adds what open_clip leaves out: it resolves the weights file *before*
building the model (so a missing download is one clear
:class:`~hybridcls.errors.WeightsUnavailableError`, never a randomly
initialised model nor a stack trace), fingerprints that file for caches, and
honours ``HF_HUB_OFFLINE`` even when it is set after ``huggingface_hub`` was
imported.

=================================  ==========================================
``model``                          weights
=================================  ==========================================
``ViT-B-32`` (built-in name)       ``pretrained`` tag (downloaded and cached),
                                   a local weights file, or None (random init)
``hf-hub:ORG/REPO``                the repo's ``open_clip_config.json`` + weights
``local-dir:DIR``                  ``DIR/open_clip_config.json`` + the weights
                                   file found in DIR
=================================  ==========================================
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import _find_checkpoint_in_dir, parse_model_name
from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

from hybridcls.cache import file_fingerprint, stable_hash
from hybridcls.data import bound_aspect
from hybridcls.device import resolve_device
from hybridcls.errors import CheckpointError, ParameterError, WeightsUnavailableError
from hybridcls.zeroshot.defaults import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "PRECISIONS",
    "ClipBundle",
    "hub_offline",
    "load_clip",
]

# Weight precisions open_clip builds models in; mixed precision (autocast) is
# decided at inference time by the classifier, not here.
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")

_CONFIG_NAME = "open_clip_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")

_log = logging.getLogger(__name__)


@dataclass
class ClipBundle:
    """An open_clip model with everything needed to use it and to key caches on it.

    Attributes:
        model: The model, in eval mode, on ``device``.
        preprocess: open_clip's eval transform (PIL image -> tensor), its resize
            bounded by :func:`~hybridcls.data.bound_aspect`.
        tokenizer: open_clip's tokenizer for this model.
        model_id: The model as asked for (``ViT-B-32``, ``hf-hub:...``, ``local-dir:...``).
        pretrained: The tag or weights file used with a built-in name; None for
            ``hf-hub:``/``local-dir:`` (weights come with the model) and random init.
        fingerprint: SHA-256 of the weights file, or ``random:<config hash>``.
        embed_dim: Size of the joint image-text embedding.
        image_size: (height, width) the preprocess produces.
        config_hash: Hash of the model config (architecture + text settings).
        weights_path: The weights file loaded, None for random init.
        device: Where ``model`` lives.
        precision: The open_clip weight precision (``fp32``, ``fp16``, ...).
    """

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    model_id: str
    pretrained: str | None
    fingerprint: str
    embed_dim: int
    image_size: tuple[int, int]
    config_hash: str
    weights_path: str | None
    device: torch.device
    precision: str = "fp32"

    @property
    def random_init(self) -> bool:
        """True when no weights were loaded (tests, speed benchmarks)."""
        return self.weights_path is None


@dataclass
class _Resolved:
    """What to hand open_clip, and what we learned while finding it."""

    oc_name: str
    oc_pretrained: str | None
    weights_path: str | None
    model_cfg: dict[str, Any]


def hub_offline() -> bool:
    """Whether downloads are forbidden (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


@contextmanager
def _hub_offline_scope(offline: bool) -> Iterator[None]:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a process that sets it
    # later (a notebook, a test, a CLI that imported torch first) would still reach
    # the network, so mirror the current environment into its flag while we load.
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _short(exc: BaseException, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unavailable(
    what: str, offline: bool, cache_dir: str | None, cause: BaseException | None
) -> WeightsUnavailableError:
    where = f"cache {cache_dir}" if cache_dir else "Hugging Face cache"
    why = (
        f"HF_HUB_OFFLINE is set, so nothing is downloaded, and they are not in the {where}"
        if offline
        else f"they are not in the {where} and could not be downloaded"
    )
    msg = (
        f"The weights of {what} are not available: {why}. "
        "To use a local copy, pass clip_model='local-dir:DIR' (a folder holding "
        "open_clip_config.json and open_clip_model.safetensors), or clip_pretrained='FILE' "
        "(a weights file of that model), or cache_dir='DIR' (a cache that already "
        "holds them). "
        "To download them instead, run once with network access and HF_HUB_OFFLINE unset."
    )
    if cause is not None:
        msg += f" (Cause: {_short(cause)})"
    return WeightsUnavailableError(msg)


def _read_config_file(path: Path, model: str) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParameterError("clip_model", model, f"cannot read {path}: {_short(exc)}") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise ParameterError(
            "clip_model", model, f"{path} has no 'model_cfg' object (open_clip hub layout)"
        )
    return cfg["model_cfg"]


def _resolve_local_dir(model: str, folder: str) -> _Resolved:
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise ParameterError("clip_model", model, f"folder {d} not found")
    cfg_path = d / _CONFIG_NAME
    if not cfg_path.is_file():
        raise ParameterError(
            "clip_model", model, f"{cfg_path} is missing; a local-dir: folder holds "
            f"{_CONFIG_NAME} (model_cfg + preprocess_cfg) and open_clip_model.safetensors"
        )
    model_cfg = _read_config_file(cfg_path, model)
    # open_clip's own search, so the file we fingerprint is the file it loads.
    weights = _find_checkpoint_in_dir(d)
    if weights is None:
        raise WeightsUnavailableError(
            f"clip_model={model!r}: no weights file (*.safetensors, *.bin, *.pth) in {d}; "
            "put open_clip_model.safetensors beside open_clip_config.json"
        )
    return _Resolved(f"local-dir:{d}", None, weights, model_cfg)


def _resolve_hf_hub(model: str, repo: str, cache_dir: str | None, offline: bool) -> _Resolved:
    try:
        cfg_path = download_pretrained_from_hf(repo, filename=_CONFIG_NAME, cache_dir=cache_dir)
        weights = download_pretrained_from_hf(repo, cache_dir=cache_dir)
    except Exception as exc:  # hub/network errors come in many types; all mean "not available"
        raise _unavailable(f"open_clip model {model}", offline, cache_dir, exc) from exc
    return _Resolved(model, None, weights, _read_config_file(Path(cfg_path), model))


def _resolve_builtin(
    model: str, pretrained: str | None, cache_dir: str | None, offline: bool
) -> _Resolved:
    name = model.replace("/", "-")  # open_clip accepts 'ViT-B/32' for 'ViT-B-32'
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ParameterError(
            "clip_model", model, f"not an open_clip model name{hint}; "
            "use a name from open_clip.list_models(), hf-hub:ORG/REPO or local-dir:DIR"
        )
    if not pretrained:
        return _Resolved(name, None, None, model_cfg)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        try:
            weights = download_pretrained(tag_cfg, cache_dir=cache_dir)
        except Exception as exc:  # hub/network errors come in many types; all mean "not available"
            raise _unavailable(
                f"open_clip model {name} with pretrained tag {pretrained}", offline, cache_dir, exc
            ) from exc
        if not weights or not os.path.isfile(weights):
            raise _unavailable(
                f"open_clip model {name} with pretrained tag {pretrained}", offline, cache_dir, None
            )
        # The tag, not the file, goes to open_clip: the tag also carries the
        # preprocessing (mean/std/resize) and QuickGELU settings of those weights.
        return _Resolved(name, pretrained, weights, model_cfg)
    if os.path.isfile(pretrained):
        return _Resolved(name, pretrained, pretrained, model_cfg)
    if os.sep in pretrained or "/" in pretrained or pretrained.lower().endswith(_WEIGHT_SUFFIXES):
        raise ParameterError("clip_pretrained", pretrained, "file not found")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ParameterError(
        "clip_pretrained", pretrained, f"neither a pretrained tag of {name} "
        f"(known: {', '.join(tags) or 'none'}) nor an existing weights file"
    )


def _resolve(model: str, pretrained: str | None, cache_dir: str | None, offline: bool) -> _Resolved:
    try:
        schema, ident = parse_model_name(model)
    except ValueError as exc:
        raise ParameterError("clip_model", model, str(exc)) from exc
    if schema in ("local-dir", "hf-hub") and pretrained not in (None, DEFAULT_CLIP_PRETRAINED):
        raise ParameterError("clip_pretrained", pretrained, f"not used with a {schema}: model, whose "
                             "weights come with it; leave clip_pretrained out")
    if schema == "local-dir":
        return _resolve_local_dir(model, ident)
    if schema == "hf-hub":
        return _resolve_hf_hub(model, ident, cache_dir, offline)
    return _resolve_builtin(model, pretrained, cache_dir, offline)


def _create(
    res: _Resolved, model: str, device: torch.device, precision: str, cache_dir: str | None
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            res.oc_name,
            pretrained=res.oc_pretrained,
            precision=precision,
            device=device,
            cache_dir=cache_dir,
            # Only matters without a full checkpoint (random init): never fetch
            # separate tower weights behind the caller's back.
            pretrained_text=False,
            weights_only=True,
        )
    except torch.OutOfMemoryError:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{res.weights_path}: refused to load: the file holds pickled objects other than "
            "tensors, and hybridcls never runs code from a weights file; convert it to "
            ".safetensors or save a plain state dict of tensors"
        ) from exc
    except (RuntimeError, ValueError, TypeError, KeyError, OSError, AssertionError) as exc:
        if res.weights_path is None:
            raise ParameterError(
                "clip_model", model, f"open_clip cannot build it: {_short(exc)}"
            ) from exc
        raise CheckpointError(
            f"{res.weights_path}: cannot load these weights into open_clip model {model}: {_short(exc)}"
        ) from exc
    return clip, preprocess


def _as_hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def load_clip(
    model: str = DEFAULT_CLIP_MODEL,
    pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    precision: str = "fp32",
) -> ClipBundle:
    """Build an open_clip model, its eval transform and tokenizer, offline-first.

    Args:
        model: A built-in name (``ViT-B-32``), ``hf-hub:ORG/REPO`` or ``local-dir:DIR``.
        pretrained: With a built-in name: a pretrained tag, a weights file
            (``.safetensors``; ``.pt``/``.bin`` are read tensors-only), or
            None/``""`` for random weights. Ignored for ``hf-hub:``/``local-dir:``,
            whose weights come with the model.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...
        cache_dir: Download cache for weights; None uses the Hugging Face default
            (so weights downloaded by other tools are reused).
        precision: Weight precision, one of :data:`PRECISIONS`.

    Returns:
        A :class:`ClipBundle`.

    Raises:
        WeightsUnavailableError: Weights neither cached nor downloadable (one
            paragraph naming ``clip_model='local-dir:DIR'``, ``clip_pretrained``,
            ``cache_dir`` and HF_HUB_OFFLINE).
        ParameterError: Unknown model name or tag, missing local-dir folder or config.
        CheckpointError: A weights file that does not fit or holds pickled code.

    Example:
        >>> bundle = load_clip("local-dir:tiny_clip")  # doctest: +SKIP
        >>> bundle.embed_dim, bundle.image_size  # doctest: +SKIP
        (32, (32, 32))
    """
    if precision not in PRECISIONS:
        raise ParameterError("precision", precision, f"expected one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    cache = os.fspath(Path(cache_dir).expanduser()) if cache_dir is not None else None
    pretrained = pretrained or None
    offline = hub_offline()
    # Look in the cache first with the hub switched off: when the weights are
    # there, nothing below touches the network, which matters on machines where
    # huggingface_hub would otherwise retry an unreachable host for a minute.
    cached = True
    try:
        with _hub_offline_scope(True):
            res = _resolve(model, pretrained, cache, offline)
    except WeightsUnavailableError:
        if offline:
            raise
        cached = False
        res = _resolve(model, pretrained, cache, offline)
    fingerprint = (
        file_fingerprint(res.weights_path)
        if res.weights_path is not None
        else f"random:{stable_hash(res.model_cfg)}"
    )
    with _hub_offline_scope(offline or cached):
        clip, preprocess = _create(res, model, dev, precision, cache)
        tokenizer = open_clip.get_tokenizer(res.oc_name, cache_dir=cache)
    clip.eval()
    if res.weights_path is None:
        _log.info("open_clip model %s initialised with random weights", model)
    return ClipBundle(
        model=clip,
        preprocess=bound_aspect(preprocess),
        tokenizer=tokenizer,
        model_id=model,
        pretrained=res.oc_pretrained,
        fingerprint=fingerprint,
        embed_dim=int(res.model_cfg["embed_dim"]),
        image_size=_as_hw(clip.visual.preprocess_cfg["size"]),
        config_hash=stable_hash(res.model_cfg),
        weights_path=res.weights_path,
        device=dev,
        precision=precision,
    )
