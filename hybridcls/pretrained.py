"""The folder a saved :class:`~hybridcls.HybridClassifier` lives in, and reading it back.

One self-contained folder (the Hugging Face convention of a directory of
JSON and safetensors files), which needs no prompts file to load:

==============================  ==============================================
``config.json``                 the supervised checkpoint's config (timm model,
                                classes, data config, weights' SHA-256), with
                                the keys timm reads from a Hub ``config.json``
                                (:func:`timm_config`)
``model.safetensors``           the supervised weights
``gate.json`` + ``index/``      the fitted :class:`~hybridcls.gate.Gate`
``prompts.txt``                 every class, seen first, as a prompts file
``templates.txt``               the templates
``text_classifier.safetensors`` the class-text matrix (``[embed_dim, C]``)
``hybrid.json``                 the CLIP model id, tag and fingerprint, the
                                classes and how many are seen, the
                                ``model_version`` and the hybridcls version
``support.safetensors``         support images joined (:meth:`~hybridcls.HybridClassifier.add_support`),
                                as their embeddings, when there are any
``README.md``                   the model card (:func:`hybridcls.hub.model_card`)
==============================  ==============================================

:data:`SAVED_FOLDER_FILES` lists what loading the folder reads (all but the card), and
:data:`RUN_FILES` what loading a run directory reads: what a resumed or merged
prediction compares by content (``predict --resume``, ``hybridcls merge``).

The same folder is a Hugging Face Hub repo: ``push_to_hub`` uploads it and
``from_pretrained`` takes its repo id (:mod:`hybridcls.hub`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from hybridcls.cache import (
    atomic_copy,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from hybridcls.errors import CheckpointError, HybridclsError
from hybridcls.gate import GATE_FILENAME, INDEX_DIR
from hybridcls.gate.support import SUPPORT_FILE
from hybridcls.hub import model_card
from hybridcls.supervised.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from hybridcls.version import __version__
from hybridcls.zeroshot.gate_clip import recorded_clip, templates_difference
from hybridcls.zeroshot.prompts import PromptSet, as_prompt_set, as_template_set

__all__ = [
    "CARD_FILE",
    "HYBRID_FILE",
    "PROMPTS_FILE",
    "RESAVE",
    "RUN_FILES",
    "SAVED_FOLDER_FILES",
    "TEMPLATES_FILE",
    "TEXT_FILE",
    "is_saved_folder",
    "read_saved_folder",
    "timm_config",
    "write_saved_folder",
]

CARD_FILE = "README.md"
HYBRID_FILE = "hybrid.json"
PROMPTS_FILE = "prompts.txt"
TEMPLATES_FILE = "templates.txt"
TEXT_FILE = "text_classifier.safetensors"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, GATE_FILENAME, SUPPORT_FILE, INDEX_DIR)
"""The files and folders of a calibrated run directory that loading it reads (``load_run``): the
supervised checkpoint and the gate (support images' embeddings and embedding index beside it).
A gate's support file or index may be absent."""
SAVED_FOLDER_FILES = (*RUN_FILES, HYBRID_FILE, PROMPTS_FILE, TEMPLATES_FILE, TEXT_FILE)
"""The files and folders of a saved folder that ``from_pretrained`` reads: the run's, and the
zero-shot side (the stored class-text matrix replaces one built from the prompts and templates)."""
#: What to do about a saved folder whose files are missing or disagree (its messages end with it).
RESAVE = ("the folder was changed after save_pretrained() wrote it: put its files back as they were "
          "saved (or fetch the Hub repo again), or save it again from the run directory it was "
          "saved from")
# what every saved folder holds (its gate.json is absent when it was saved uncalibrated, and a
# gate's support file and index may be absent, as in a run)
_REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, PROMPTS_FILE, TEMPLATES_FILE, TEXT_FILE)
_FORMAT = "hybridcls-hybrid"
_FORMAT_VERSION = 1


def is_saved_folder(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` is a :func:`write_saved_folder` folder (it holds ``hybrid.json``),
    not a training run directory."""
    return (Path(directory) / HYBRID_FILE).is_file()


def timm_config(config: dict[str, Any], label_names: Sequence[str]) -> dict[str, Any]:
    """The keys timm reads from a Hub ``config.json`` (``timm.models.load_model_config_from_hf``).

    ``architecture``, ``num_classes``, ``num_features``, ``label_names`` (the head's
    classes, index = output) and ``pretrained_cfg`` (the preprocessing: ``input_size``,
    ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, and the weights'
    ``tag``). The head is hybridcls's own (``config["model"]["head"]``): timm users build
    the backbone with ``num_classes=0`` and load the ``backbone.`` tensors of
    ``model.safetensors`` (docs/hub.md).

    Args:
        config: The supervised checkpoint's ``config.json``.
        label_names: The seen classes in the head's order.

    Example:
        >>> cfg = {"model": {"name": "convnext_tiny.fb_in1k", "num_classes": 2, "num_features": 768},
        ...        "data_config": {"input_size": [3, 224, 224], "interpolation": "bicubic",
        ...                        "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.95,
        ...                        "crop_mode": "center"}}
        >>> t = timm_config(cfg, ["fox", "elk"])
        >>> t["architecture"], t["label_names"], t["pretrained_cfg"]["tag"]
        ('convnext_tiny', ['fox', 'elk'], 'fb_in1k')
    """
    model = config["model"]
    architecture, _, tag = str(model["name"]).partition(".")
    data = config["data_config"]
    pretrained_cfg = {key: data[key] for key in ("input_size", "interpolation", "mean", "std",
                                                 "crop_pct", "crop_mode") if key in data}
    if tag:
        pretrained_cfg["tag"] = tag
    pretrained_cfg["num_classes"] = int(model["num_classes"])
    return {"architecture": architecture, "num_classes": int(model["num_classes"]),
            "num_features": model.get("num_features"), "label_names": list(label_names),
            "pretrained_cfg": pretrained_cfg}


def write_saved_folder(
    directory: str | os.PathLike[str],
    *,
    run_dir: Path,
    prompts: PromptSet,
    templates: Sequence[str],
    text_features: np.ndarray,
    meta: dict[str, Any],
    gate: dict[str, Any] | None,
    repo_id: str | None = None,
) -> Path:
    """Copy a run's files and write the zero-shot side and the model card beside them (see the
    module docstring).

    Args:
        directory: The folder to write (created; files already there are replaced).
        run_dir: The calibrated run directory whose checkpoint and gate are copied.
        prompts: Every class, seen first, in column order.
        templates: The templates the text matrix was built with.
        text_features: ``[embed_dim, C]`` the class-text matrix.
        meta: ``clip_model``, ``clip_pretrained``, ``clip_fingerprint``, ``classes``, ``n_seen``,
            ``model_version``.
        gate: :meth:`hybridcls.gate.Gate.summary` of the calibrated gate, for the card
            (None: not calibrated).
        repo_id: The Hub repo the folder is for, shown in the card's example.

    Returns:
        The folder.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # the checkpoint's config, readable by timm too (its keys do not meet hybridcls's)
    config = read_json(run_dir / CONFIG_FILE)
    label_names = meta["classes"][: meta["n_seen"]]
    atomic_write_json(out / CONFIG_FILE, {**config, **timm_config(config, label_names)}, indent=2)
    for name in (WEIGHTS_FILE, GATE_FILENAME):
        src = run_dir / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            atomic_copy(src, out / name)
    src = run_dir / INDEX_DIR
    if src.is_dir() and src.resolve() != (out / INDEX_DIR).resolve():
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            atomic_copy(file, out / INDEX_DIR / file.relative_to(src))
    atomic_write_text(out / PROMPTS_FILE, prompts.to_text())
    atomic_write_text(out / TEMPLATES_FILE, "".join(t + "\n" for t in templates))
    with atomic_path(out / TEXT_FILE) as tmp:
        save_numpy({"text_features": np.ascontiguousarray(text_features, dtype=np.float32)},
                   os.fspath(tmp))
    atomic_write_json(out / HYBRID_FILE, {"format": _FORMAT, "format_version": _FORMAT_VERSION,
                                          "hybridcls_version": __version__, **meta})
    atomic_write_text(out / CARD_FILE, model_card(
        classes=meta["classes"], n_seen=meta["n_seen"], config=config, clip=meta, gate=gate,
        model_version=meta["model_version"], repo_id=repo_id))
    return out


def read_saved_folder(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], np.ndarray]:
    """``(hybrid.json's content, the stored class-text matrix)`` of a saved folder, whose files
    are checked to agree with each other.

    Loading the folder passes its ``prompts.txt`` and ``templates.txt`` as ``prompts`` and
    ``templates``, which the user did not give: a disagreement is the folder's own, said here
    as its file's, never as a parameter's.

    Raises:
        CheckpointError: Not a saved classifier's folder (names what is missing), or one whose
            files disagree: ``prompts.txt`` and the class-text matrix with ``hybrid.json``'s
            classes, ``templates.txt`` with the templates ``gate.json`` was calibrated with
            (:data:`RESAVE` says what to do).
    """
    folder = Path(directory)
    meta_path = folder / HYBRID_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{folder}: not a saved HybridClassifier (no {HYBRID_FILE})")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format_version", _FORMAT_VERSION) != _FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: not a format this version reads")
    for name in _REQUIRED_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: its {name} is missing; {RESAVE}")
    try:
        text = load_numpy(os.fspath(folder / TEXT_FILE))["text_features"]
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{folder / TEXT_FILE}: not a readable class-text matrix ({type(exc).__name__}); "
                              f"{RESAVE}") from exc
    classes = [str(c) for c in meta.get("classes") or []]
    if text.ndim != 2 or text.shape[1] != len(classes):
        columns = text.shape[1] if text.ndim == 2 else "no"
        raise CheckpointError(f"{folder / TEXT_FILE}: a class-text matrix with {columns} class "
                              f"columns (shape {text.shape}, embedding dimension by class), but "
                              f"{HYBRID_FILE} records {len(classes)} classes; {RESAVE}")
    try:
        names = as_prompt_set(folder / PROMPTS_FILE).names
        templates = list(as_template_set(folder / TEMPLATES_FILE))
    except HybridclsError as exc:  # names the file and line: the folder's own, not a parameter's
        raise CheckpointError(f"{exc}; {RESAVE}") from exc
    if names != classes:
        i = next(i for i, (a, b) in enumerate(zip_longest(names, classes)) if a != b)
        here, there = (repr(seq[i]) if i < len(seq) else "none" for seq in (names, classes))
        raise CheckpointError(
            f"{folder / PROMPTS_FILE}: its {len(names)} classes are not the {len(classes)} that "
            f"{HYBRID_FILE} records (the class-text matrix's columns, in order): class {i + 1} is "
            f"{here} in it, {there} in {HYBRID_FILE}; {RESAVE}")
    record = recorded_clip(folder)
    recorded = (None if record is None or record.get("templates") is None
                else [str(x) for x in record["templates"]])
    differs = None if recorded is None else templates_difference(recorded, templates)
    if differs is not None:
        raise CheckpointError(
            f"{folder / TEMPLATES_FILE}: holds {len(templates)} templates, but {folder / GATE_FILENAME} "
            f"was calibrated with {len(recorded)} that differ ({differs}), and the folder's class-text "
            f"matrix was built from those; {RESAVE}")
    return meta, text
