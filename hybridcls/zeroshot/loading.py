"""Load an open_clip model from wherever its weights are, offline-first.

Four ways to name a model, all handled by open_clip's own factory; this
module adds what open_clip leaves out: it resolves the weights file *before*
building the model (so a missing download is one clear
:class:`~hybridcls.errors.WeightsUnavailableError`, never a randomly
initialised model nor a stack trace), fingerprints that file for caches, and
honours ``HF_HUB_OFFLINE`` even when it is set after ``huggingface_hub`` was
imported.

The weights are looked up in the cache first, with huggingface_hub's own
``hf_hub_download(..., local_files_only=True)`` (hf-hub: models and pretrained
tags that open_clip keeps on the hub) or in open_clip's download folder (tags
that only have a URL, OpenAI's), asking for the same files open_clip's
``download_pretrained`` would; the network is asked only when they are not
there and ``HF_HUB_OFFLINE`` is not set.

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
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError
from open_clip.factory import parse_model_name  # not exported at the top; imported here only

from hybridcls.cache import file_fingerprint, stable_hash
from hybridcls.data import bound_aspect
from hybridcls.device import resolve_device
from hybridcls.errors import CheckpointError, ParameterError, WeightsUnavailableError
from hybridcls.provenance import tower_identity
from hybridcls.zeroshot.defaults import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "PRECISIONS",
    "CachedWeights",
    "ClipBundle",
    "cached_hub_models",
    "hub_offline",
    "hub_offline_scope",
    "list_pretrained_weights",
    "load_clip",
    "local_dir_weights",
]

# Weight precisions open_clip builds models in; mixed precision (autocast) is
# decided at inference time by the classifier, not here.
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")

_CONFIG_NAME = "open_clip_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
# The files open_clip looks for (open_clip/constants.py, pretrained.py, factory.py); the tests
# check each rule below against open_clip's own code, so that a change there fails loudly.
_HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
_HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
_URL_CACHE = "~/.cache/clip"  # download_pretrained_from_url's folder without a cache_dir
# A local-dir: folder's weights: these names in this order, else the first *.safetensors,
# else the first *.bin / *.pth, by path.
_LOCAL_DIR_SUFFIXES = (".safetensors", ".bin", ".pth")
_LOCAL_DIR_PREFERRED = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
    "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
)

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

    def identity(self) -> dict[str, Any]:
        """Which CLIP this is, as run records and ``gate.json`` name it.

        Returns:
            ``{"model_id", "fingerprint", "pretrained"}``
            (:func:`hybridcls.provenance.tower_identity`); ``pretrained`` is the tag or
            file used with a built-in name, None for ``hf-hub:``/``local-dir:`` models.
        """
        return tower_identity(self.model_id, self.fingerprint, pretrained=self.pretrained)


@dataclass
class _Resolved:
    """What to hand open_clip, and what we learned while finding it."""

    oc_name: str
    oc_pretrained: str | None
    weights_path: str | None
    model_cfg: dict[str, Any]


def hub_offline() -> bool:
    """Whether downloads are forbidden (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    huggingface_hub's own answer (``huggingface_hub.constants.HF_HUB_OFFLINE``,
    which it reads from the environment once, at import), or the same
    variables read now by its own rule (``constants.ENV_VARS_TRUE_VALUES``):
    a process that sets them later (a notebook, a test, a command line that
    imported torch first) is honoured too.
    """
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in constants.ENV_VARS_TRUE_VALUES


@contextmanager
def hub_offline_scope(offline: bool) -> Iterator[None]:
    """With ``offline``, huggingface_hub's own offline flag set while the block runs."""
    # huggingface_hub's process-wide flag, set while we load, for what local_files_only
    # cannot reach: open_clip's own calls (building the model and its tokenizer pass no
    # local_files_only), and huggingface_hub's own requests around a download (2.x fetches
    # an agent registry to build its request headers, even with local_files_only=True).
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; setting its flag is its
    # maintainers' advice for a value set later.
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
    # open_clip's own choice, so the file we fingerprint is the file it loads.
    weights = local_dir_weights(d)
    if weights is None:
        raise WeightsUnavailableError(
            f"clip_model={model!r}: no weights file (*.safetensors, *.bin, *.pth) in {d}; "
            "put open_clip_model.safetensors beside open_clip_config.json"
        )
    return _Resolved(f"local-dir:{d}", None, weights, model_cfg)


def local_dir_weights(folder: str | os.PathLike[str]) -> str | None:
    """The weights file open_clip loads from a ``local-dir:`` folder, or None when it has none.

    open_clip's rule (``create_model``'s local-dir branch): the first of its
    preferred names present (``open_clip_model.safetensors`` first), else the
    first ``*.safetensors`` file by name, else the first ``*.bin`` / ``*.pth``.

    Example:
        >>> local_dir_weights("tiny_clip")  # doctest: +SKIP
        'tiny_clip/open_clip_model.safetensors'
    """
    d = Path(folder)
    found = sorted(p for suffix in _LOCAL_DIR_SUFFIXES for p in d.glob(f"*{suffix}"))
    preferred = [p for p in found if p.name in _LOCAL_DIR_PREFERRED]
    if preferred:
        return str(min(preferred, key=lambda p: _LOCAL_DIR_PREFERRED.index(p.name)))
    return str(min(found, key=lambda p: (p.suffix != ".safetensors", p))) if found else None


def _hub_candidates(filename: str | None) -> list[str]:
    """The names open_clip's ``download_pretrained_from_hf`` asks a repo for, in its order.

    The default weights name, or a ``.bin`` / ``.pth`` one, is tried as
    ``.safetensors`` first.
    """
    filename = filename or _HF_WEIGHTS_NAME
    if filename == _HF_WEIGHTS_NAME:
        return [_HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _hub_file(repo: str, filename: str | None, cache_dir: str | None, local_only: bool) -> str:
    """The first of open_clip's candidate files for ``filename`` that ``repo`` has, as a local path.

    Raises:
        Exception: huggingface_hub's error (the last candidate not cached with
            ``local_only``, or not in the repo; no network...).
    """
    *alternatives, name = _hub_candidates(filename)
    for alternative in alternatives:
        try:
            return _hub_download(repo, alternative, cache_dir, local_only)
        except EntryNotFoundError:  # not in the cache (LocalEntryNotFoundError) or the repo
            pass
    return _hub_download(repo, name, cache_dir, local_only)


def _hub_download(repo: str, filename: str, cache_dir: str | None, local_only: bool) -> str:
    return hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=local_only,
                           library_name="open_clip", library_version=open_clip.__version__)


def _tag_weights(tag_cfg: dict[str, Any], cache_dir: str | None, local_only: bool) -> str:
    """The weights file of a pretrained tag, as open_clip's ``download_pretrained`` finds it.

    ``hf_hub`` (``ORG/REPO/FILE``, or ``ORG/REPO/`` for the default file) wins
    over ``url``; a URL's file lies in open_clip's download folder, and is
    looked for there only with ``local_only``.

    Raises:
        Exception: Not cached with ``local_only``, or the download failed.
    """
    if "file" in tag_cfg:
        return tag_cfg["file"]
    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        return _hub_file(repo, filename or None, cache_dir, local_only)
    url = tag_cfg.get("url", "")
    target = Path(cache_dir or os.path.expanduser(_URL_CACHE)) / os.path.basename(url)
    if local_only and not target.is_file():
        raise FileNotFoundError(f"{target} is not in open_clip's download folder")
    # open_clip checks the file's SHA-256 against the URL's and downloads it when absent.
    return open_clip.download_pretrained_from_url(url, cache_dir=cache_dir)


@dataclass(frozen=True)
class CachedWeights:
    """An open_clip model and its weights, and whether they are already on this machine.

    Attributes:
        model: A built-in open_clip name (``ViT-B-32``) or ``hf-hub:ORG/REPO``.
        pretrained: The pretrained tag of a built-in name; ``None`` for ``hf-hub:``.
        path: The weights file :func:`load_clip` would load from the caches, or ``None``
            when it would have to download it.
    """

    model: str
    pretrained: str | None
    path: str | None


def list_pretrained_weights(cache_dir: str | os.PathLike[str] | None = None) -> list[CachedWeights]:
    """Every model and pretrained tag open_clip knows (``open_clip.list_pretrained()``), each with
    the weights file already in the local caches, offline.

    The files are looked for exactly as :func:`load_clip` looks for them before
    it would download: in the Hugging Face cache (``hf_hub_download(...,
    local_files_only=True)``, the ``.safetensors`` form first) for tags kept on
    the hub, in open_clip's download folder for tags that only have a URL.
    Nothing is fetched, even with ``HF_HUB_OFFLINE`` unset.

    Args:
        cache_dir: The weights cache, as given to :func:`load_clip` (``None``: the Hugging
            Face cache and open_clip's ``~/.cache/clip``).

    Returns:
        One entry per (model, tag), in open_clip's order.

    Example:
        >>> [w for w in list_pretrained_weights() if w.path]  # doctest: +SKIP
        [CachedWeights(model='ViT-B-32', pretrained='laion2b_s34b_b79k', path='/.../open_clip_model.safetensors')]
    """
    cache = os.fspath(Path(cache_dir).expanduser()) if cache_dir is not None else None
    out = []
    with hub_offline_scope(True):
        for name, tag in open_clip.list_pretrained():
            try:
                path = _tag_weights(open_clip.get_pretrained_cfg(name, tag), cache, local_only=True)
            except (OSError, ValueError, EntryNotFoundError):  # huggingface_hub's "not in the cache"
                path = None
            out.append(CachedWeights(name, tag, path if path and os.path.isfile(path) else None))
    return out


def cached_hub_models(cache_dir: str | os.PathLike[str] | None = None) -> list[CachedWeights]:
    """The ``hf-hub:ORG/REPO`` open_clip models whose config and weights are in the Hugging Face
    cache (huggingface_hub's ``scan_cache_dir``), offline, sorted by repo.

    A repo counts when its cache holds ``open_clip_config.json``; its weights file
    is the one :func:`load_clip` would load (``None`` when only the config is there).

    Args:
        cache_dir: The Hugging Face cache to scan (``None``: its default).
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = os.fspath(Path(cache_dir).expanduser()) if cache_dir is not None else None
    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        return []
    out = []
    with hub_offline_scope(True):
        for repo in sorted(info.repos, key=lambda r: r.repo_id):
            files = {f.file_name for rev in repo.revisions for f in rev.files}
            if repo.repo_type != "model" or _CONFIG_NAME not in files:
                continue
            try:
                path = _hub_file(repo.repo_id, None, cache, local_only=True)
            except (OSError, ValueError, EntryNotFoundError):  # the config without the weights
                path = None
            out.append(CachedWeights(f"hf-hub:{repo.repo_id}", None, path))
    return out


def _resolve_hf_hub(
    model: str, repo: str, cache_dir: str | None, offline: bool, local_only: bool
) -> _Resolved:
    try:
        cfg_path = _hub_file(repo, _CONFIG_NAME, cache_dir, local_only)
        weights = _hub_file(repo, None, cache_dir, local_only)
    except Exception as exc:  # hub/network errors come in many types; all mean "not available"
        raise _unavailable(f"open_clip model {model}", offline, cache_dir, exc) from exc
    return _Resolved(model, None, weights, _read_config_file(Path(cfg_path), model))


def _resolve_builtin(
    model: str, pretrained: str | None, cache_dir: str | None, offline: bool, local_only: bool
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
            weights = _tag_weights(tag_cfg, cache_dir, local_only)
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


def _resolve(
    model: str, pretrained: str | None, cache_dir: str | None, offline: bool, local_only: bool
) -> _Resolved:
    """Where the weights are: with ``local_only`` in the caches alone, else downloaded if need be."""
    try:
        schema, ident = parse_model_name(model)
    except ValueError as exc:
        raise ParameterError("clip_model", model, str(exc)) from exc
    if schema in ("local-dir", "hf-hub") and pretrained not in (None, DEFAULT_CLIP_PRETRAINED):
        raise ParameterError("clip_pretrained", pretrained, f"not used with a {schema}: model, whose "
                             f"weights come with it; leave out clip_pretrained={pretrained!r}")
    if schema == "local-dir":
        return _resolve_local_dir(model, ident)
    if schema == "hf-hub":
        return _resolve_hf_hub(model, ident, cache_dir, offline, local_only)
    return _resolve_builtin(model, pretrained, cache_dir, offline, local_only)


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
    # Look in the caches first: when the weights are there, nothing below touches the
    # network, which matters on machines where huggingface_hub would otherwise retry an
    # unreachable host for a minute.
    cached = True
    try:
        with hub_offline_scope(offline):
            res = _resolve(model, pretrained, cache, offline, local_only=True)
    except WeightsUnavailableError:
        if offline:
            raise
        cached = False
        res = _resolve(model, pretrained, cache, offline, local_only=False)
    fingerprint = (
        file_fingerprint(res.weights_path, cache_dir=cache)
        if res.weights_path is not None
        else f"random:{stable_hash(res.model_cfg)}"
    )
    with hub_offline_scope(offline or cached):
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
