"""What the two towers say about N images: the arrays the gate is fitted on and predicts from.

:class:`BranchOutputs` is the one record that passes between the inference
engine (which fills it, a batch at a time) and the gate (which reads it); it
holds arrays only. A zero-shot-only run has no supervised side
(``sup_logits is None``); rows of the CLIP arrays are NaN where the CLIP tower
did not run (lazy zero-shot, the cascade).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from hybridcls.cache import atomic_path
from hybridcls.errors import CheckpointError, InputError, ParameterError

__all__ = ["BranchOutputs"]

_ARRAYS = ("sup_logits", "sup_features", "clip_logits", "clip_embeddings")


@dataclass
class BranchOutputs:
    """Both towers' raw outputs for N images, in input order.

    Attributes:
        sup_logits: ``[N, S]`` supervised logits over the seen classes (``None``: no
            supervised tower).
        sup_features: ``[N, F]`` the supervised backbone's pooled features.
        clip_logits: ``[N, C]`` zero-shot logits over every class, seen columns first
            (CLIP's own logit scale times the cosine similarities); NaN rows where CLIP
            did not run.
        clip_embeddings: ``[N, D]`` L2-normalised CLIP image embeddings; NaN rows likewise.

    Example:
        >>> out = BranchOutputs(clip_logits=np.array([[1.0, 2.0], [np.nan, np.nan]]))
        >>> len(out), out.clip_ran.tolist()
        (2, [True, False])
    """

    sup_logits: np.ndarray | None = None
    sup_features: np.ndarray | None = None
    clip_logits: np.ndarray | None = None
    clip_embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        sizes = {name: len(getattr(self, name)) for name in _ARRAYS if getattr(self, name) is not None}
        if not sizes:
            raise InputError("BranchOutputs needs the outputs of at least one tower")
        if len(set(sizes.values())) > 1:
            shown = ", ".join(f"{k} {v}" for k, v in sizes.items())
            raise InputError(f"branch outputs must have one row per image; got {shown} rows")

    @staticmethod
    def check(value: Any, parameter: str) -> BranchOutputs:
        """``value`` itself when it is a :class:`BranchOutputs`.

        Raises:
            ParameterError: Anything else (``None``, a path, an image), naming ``parameter``:
                images and paths go to the classifier's ``predict`` / ``predict_proba``.
        """
        if not isinstance(value, BranchOutputs):
            shown = value if value is None or isinstance(value, str) else f"<{type(value).__name__}>"
            raise ParameterError(parameter, shown, "expected the BranchOutputs of extract_features "
                                 "(images and paths go to predict / predict_proba)")
        return value

    def __len__(self) -> int:
        return next(len(getattr(self, n)) for n in _ARRAYS if getattr(self, n) is not None)

    @property
    def has_supervised(self) -> bool:
        """Whether a supervised tower ran (a hybrid rather than zero-shot only)."""
        return self.sup_logits is not None

    @property
    def clip_ran(self) -> np.ndarray:
        """``[N]`` True where the CLIP tower encoded the image."""
        if self.clip_logits is None:
            return np.zeros(len(self), dtype=bool)
        return ~np.isnan(self.clip_logits).all(axis=1)

    def rows(self, index: np.ndarray | Sequence[int] | slice) -> BranchOutputs:
        """The outputs of some images (a boolean mask, indices or a slice)."""
        return BranchOutputs(**{n: None if getattr(self, n) is None else getattr(self, n)[index]
                                for n in _ARRAYS})

    def without_clip(self, mask: np.ndarray) -> BranchOutputs:
        """A copy with the CLIP arrays blanked (NaN) on ``mask``: what a run that skipped them holds."""
        blank = np.asarray(mask, dtype=bool)[:, None]
        return BranchOutputs(
            self.sup_logits, self.sup_features,
            None if self.clip_logits is None else np.where(blank, np.nan, self.clip_logits),
            None if self.clip_embeddings is None else np.where(blank, np.nan, self.clip_embeddings))

    @classmethod
    def concat(cls, parts: Sequence[BranchOutputs]) -> BranchOutputs:
        """Stack several records (batches) in order; all must hold the same arrays.

        Raises:
            InputError: No part (nothing decoded), or parts with different arrays.
        """
        if not parts:
            raise InputError("no image could be decoded")
        present = [tuple(getattr(p, n) is not None for n in _ARRAYS) for p in parts]
        if len(set(present)) > 1:
            raise InputError("branch outputs to concatenate hold different arrays")
        return cls(**{n: np.concatenate([getattr(p, n) for p in parts]).astype(np.float32)
                      if getattr(parts[0], n) is not None else None for n in _ARRAYS})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the arrays to one safetensors file (no pickle)."""
        arrays = {n: np.ascontiguousarray(getattr(self, n), dtype=np.float32)
                  for n in _ARRAYS if getattr(self, n) is not None}
        with atomic_path(path) as tmp:
            save_file(arrays, os.fspath(tmp))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BranchOutputs:
        """Read a file written by :meth:`save`.

        Raises:
            CheckpointError: Not such a file.
        """
        try:
            arrays = load_file(os.fspath(path))
        except Exception as exc:  # safetensors raises several types for a bad file
            raise CheckpointError(f"{path}: not a branch-outputs file ({exc})") from exc
        unknown = sorted(set(arrays) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"{path}: unknown arrays {', '.join(unknown)}")
        return cls(**arrays)
