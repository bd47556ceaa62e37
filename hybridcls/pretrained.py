"""The folder a saved :class:`~hybridcls.HybridClassifier` lives in, and reading it back.

One self-contained folder (the Hugging Face convention of a directory of
JSON and safetensors files), which needs no prompts file to load:

==============================  ==============================================
``config.json``                 the supervised checkpoint's config (timm model,
                                classes, data config, weights' SHA-256)
``model.safetensors``           the supervised weights
``gate.json`` + ``index/``      the fitted :class:`~hybridcls.gate.Gate`
``prompts.txt``                 every class, seen first, as a prompts file
``templates.txt``               the templates
``text_classifier.safetensors`` the class-text matrix (``[embed_dim, C]``)
``hybrid.json``                 the CLIP model id, tag and fingerprint, the
                                classes and how many are seen
==============================  ==============================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
from hybridcls.errors import CheckpointError
from hybridcls.gate import GATE_FILENAME, INDEX_DIR
from hybridcls.supervised.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from hybridcls.zeroshot.prompts import PromptSet

__all__ = [
    "HYBRID_FILE",
    "PROMPTS_FILE",
    "TEMPLATES_FILE",
    "TEXT_FILE",
    "read_saved_folder",
    "write_saved_folder",
]

HYBRID_FILE = "hybrid.json"
PROMPTS_FILE = "prompts.txt"
TEMPLATES_FILE = "templates.txt"
TEXT_FILE = "text_classifier.safetensors"
_FORMAT = "hybridcls-hybrid"
_FORMAT_VERSION = 1


def write_saved_folder(
    directory: str | os.PathLike[str],
    *,
    run_dir: Path,
    prompts: PromptSet,
    templates: Sequence[str],
    text_features: np.ndarray,
    meta: dict[str, Any],
) -> Path:
    """Copy a run's files and write the zero-shot side beside them (see the module docstring).

    Args:
        directory: The folder to write (created; files already there are replaced).
        run_dir: The calibrated run directory whose checkpoint and gate are copied.
        prompts: Every class, seen first, in column order.
        templates: The templates the text matrix was built with.
        text_features: ``[embed_dim, C]`` the class-text matrix.
        meta: ``clip_model``, ``clip_pretrained``, ``clip_fingerprint``, ``classes``, ``n_seen``.

    Returns:
        The folder.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, GATE_FILENAME):
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
    atomic_write_json(out / HYBRID_FILE, {"format": _FORMAT, "format_version": _FORMAT_VERSION, **meta})
    return out


def read_saved_folder(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], np.ndarray]:
    """``(hybrid.json's content, the stored class-text matrix)`` of a saved folder.

    Raises:
        CheckpointError: Not a saved classifier's folder (names what is missing).
    """
    folder = Path(directory)
    meta_path = folder / HYBRID_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{folder}: not a saved HybridClassifier (no {HYBRID_FILE})")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format_version", _FORMAT_VERSION) != _FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: not a format this version reads")
    try:
        text = load_numpy(os.fspath(folder / TEXT_FILE))["text_features"]
    except Exception as exc:  # safetensors raises several types for a missing or bad file
        raise CheckpointError(f"{folder / TEXT_FILE}: cannot read the class-text matrix ({exc})") from exc
    return meta, text
