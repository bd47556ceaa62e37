"""CLIP image embeddings of many files, through the project's engine.

The audit needs only the image tower. It is loaded the way ``hybridcls
predict`` loads it (:class:`~hybridcls.zeroshot.ClipTower`, offline
first, :meth:`~hybridcls.zeroshot.ClipTower.image_only`) and run by
:class:`~hybridcls.engine.InferenceEngine` (batching, worker decoding, AMP on
CUDA, error rows for files that do not decode).

The pixel check's thumbnails (:mod:`hybridcls.audit.pixels`) are made in the
same pass, from the same decoded image (the engine's ``extra_views``), so
every file is decoded once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hybridcls.audit.pixels import THUMB, ThumbnailTransform
from hybridcls.data import Source
from hybridcls.device import resolve_device
from hybridcls.engine import InferenceEngine
from hybridcls.runtime import RuntimeSettings
from hybridcls.zeroshot.tower import ClipTower

__all__ = ["Embeddings", "clip_image_encoder", "embed_sources"]


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised CLIP image embeddings of a list of sources.

    Attributes:
        vectors: ``[n_ok, D]`` float32, one row per readable source.
        ok: Source positions of the rows of ``vectors``, increasing.
        errors: Source position -> why that file could not be read.
        thumbnails: ``[n_ok, THUMB, THUMB, 3]`` uint8 thumbnails
            (:func:`~hybridcls.audit.pixels.thumbnail_of_image`) aligned with
            ``vectors``, when asked for; else ``None``.
    """

    vectors: np.ndarray
    ok: np.ndarray
    errors: dict[int, str]
    thumbnails: np.ndarray | None = None


def clip_image_encoder(
    clip_model: str,
    clip_pretrained: str | None,
    *,
    device: str = RuntimeSettings.device,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClipTower:
    """A :class:`~hybridcls.zeroshot.ClipTower` used for its image tower only.

    Raises:
        WeightsUnavailableError: The model's weights cannot be had offline.
    """
    return ClipTower.image_only(clip_model, clip_pretrained, device=resolve_device(device),
                                cache_dir=cache_dir)


def embed_sources(
    encoder: ClipTower,
    sources: Sequence[Source],
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
    desc: str = "embed",
    thumbnails: bool = False,
) -> Embeddings:
    """Embed every readable source with ``encoder``'s image tower.

    Args:
        encoder: From :func:`clip_image_encoder`.
        sources: The files, in order.
        batch_size: Images per batch.
        workers: Decoding processes.
        progress: Show a progress bar.
        desc: The bar's label.
        thumbnails: Also make each readable image's pixel-check thumbnail, from
            the decode that feeds the CLIP tower.

    Returns:
        The embeddings of the files that decoded and the reasons of those that did not;
        every source is in exactly one of the two.
    """
    engine = InferenceEngine(
        clip=encoder, settings=RuntimeSettings(device=str(encoder.device), batch_size=batch_size,
                                               workers=workers),
        extra_views=[ThumbnailTransform()] if thumbnails else ())
    rows: list[np.ndarray] = []
    ok: list[int] = []
    errors: dict[int, str] = {}
    # Filled in place, one row per readable image, so the thumbnails are never held twice
    # (a list of batches joined at the end would be).
    thumbs = np.empty((len(sources) if thumbnails else 0, THUMB, THUMB, 3), dtype=np.uint8)
    for batch in engine.iter_batches(sources, progress=progress, desc=desc):
        errors.update(batch.errors)
        if batch.ok:
            if thumbnails:
                thumbs[len(ok):len(ok) + len(batch.ok)] = batch.extra_views[0]
            ok.extend(batch.ok)
            rows.append(batch.outputs.clip_embeddings)
    dim = encoder.embed_dim
    vectors = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    return Embeddings(vectors=vectors, ok=np.asarray(ok, dtype=np.int64), errors=errors,
                      thumbnails=thumbs[:len(ok)] if thumbnails else None)
