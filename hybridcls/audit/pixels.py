"""A pixel-level check for near-duplicates: correlation of small thumbnails.

CLIP embeddings say two images *show the same thing*; they do not tell a
re-encoded copy from another photo of the same class, whose cosine can be as
high (``docs/audit.md`` has the figures). This second, cheap check looks at
the pixels. Each image is decoded once into a ``THUMB x THUMB`` RGB
thumbnail (box filter: every source pixel counts once, so resizing and JPEG
noise average out). Two thumbnails are compared as ``SIDE x SIDE`` crops
with the mean removed and the length set to one, i.e. by the Pearson
correlation of their pixels: removing the mean and the scale cancels
brightness and contrast shifts, and trying the centred crops in ``CROPS`` on
both sides (the best pair counts) cancels centred crops of up to 10 % per
side. Different photos of one class differ in layout and do not correlate.

Written here: no installed library computes it (``imagehash`` is not a
dependency, and its 64-bit hashes are coarser than this continuous score).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from hybridcls.data import ReduceLongSide

__all__ = [
    "CROPS",
    "SEARCH_SIDE",
    "SIDE",
    "THUMB",
    "ThumbnailTransform",
    "crop_signatures",
    "pixel_similarity",
    "search_signatures",
    "thumbnail_of_image",
]

#: Side of the stored thumbnail every comparison starts from (pixels).
THUMB = 64
#: Side of the crops compared (pixels).
SIDE = 32
#: Side of the coarse signature used to *find* candidate pairs with FAISS.
SEARCH_SIDE = 16
#: Centred crops tried on each image, as a share of the side cut from each edge.
CROPS = (0.0, 0.025, 0.05, 0.075, 0.1)


def thumbnail_of_image(image: Image.Image) -> np.ndarray:
    """``[THUMB, THUMB, 3]`` uint8 box-filtered thumbnail of a PIL image (aspect not kept).

    The long side of a strip longer than 16:1 is box-reduced first
    (:class:`~hybridcls.data.ReduceLongSide`): Pillow's filter weights grow with
    the source side, 0.4 GB for a 1 x 50,000,000 strip resized in one step. An
    RGB image is not copied (``convert`` would copy it).
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    rgb = ReduceLongSide((THUMB, THUMB))(rgb)
    return np.asarray(rgb.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)


class ThumbnailTransform:
    """PIL image -> ``[THUMB, THUMB, 3]`` uint8 tensor, for the engine's workers (its ``extra_views``)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(thumbnail_of_image(image).copy())


def _unit(x: np.ndarray) -> np.ndarray:
    """Mean removed (over all channels at once), scaled to length one, per row."""
    # One mean for all channels: a brightness shift moves them together, while the
    # balance between channels is part of what a copy keeps.
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # A flat image has no pattern to compare: all zeros, it matches nothing.
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-6)


def crop_signatures(thumb: np.ndarray) -> np.ndarray:
    """``[len(CROPS), 3 * SIDE * SIDE]`` float32 unit signatures of one thumbnail's centred crops.

    Example:
        >>> t = thumbnail_of_image(Image.linear_gradient("L"))
        >>> s = crop_signatures(t)
        >>> s.shape, round(float(s[0] @ s[0]), 4)
        ((5, 3072), 1.0)
    """
    im = Image.fromarray(np.asarray(thumb, dtype=np.uint8))
    rows = []
    for c in CROPS:
        a, b = c * THUMB, (1.0 - c) * THUMB
        # Fractional boxes: the box filter weighs the edge pixels by how much of them is inside.
        rows.append(np.asarray(im.resize((SIDE, SIDE), Image.Resampling.BOX, box=(a, a, b, b)),
                               dtype=np.float32).reshape(-1))
    return _unit(np.stack(rows))


def pixel_similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Best correlation between any crop of one image and any crop of the other, in ``[-1, 1]``.

    Args:
        sig_a: :func:`crop_signatures` of the first image.
        sig_b: :func:`crop_signatures` of the second.
    """
    return float(np.max(sig_a @ sig_b.T))


def search_signatures(thumbs: np.ndarray) -> np.ndarray:
    """``[N, 3 * SEARCH_SIDE ** 2]`` float32 coarse unit signatures of ``[N, THUMB, THUMB, 3]`` thumbnails.

    Uncropped and coarse on purpose: they only have to put a copy among an
    image's nearest neighbours for :func:`pixel_similarity` to judge.
    """
    thumbs = np.asarray(thumbs, dtype=np.float32)
    f = THUMB // SEARCH_SIDE
    small = thumbs.reshape(len(thumbs), SEARCH_SIDE, f, SEARCH_SIDE, f, 3).mean(axis=(2, 4))
    return _unit(small.reshape(len(thumbs), -1))
