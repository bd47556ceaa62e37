"""Heat maps drawn over images, and the PNG files the explanation page shows.

The colouring and blending are pytorch-grad-cam's ``show_cam_on_image`` (an
OpenCV colour map, half image, half heat); what is ours is putting a map and
the crop its tower saw at one display size, and writing PNGs atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from hybridcls.cache import atomic_path
from hybridcls.data import MAX_ASPECT_RATIO, CentreCropAspect
from hybridcls.explain.gradcam import require_grad_cam

__all__ = ["DISPLAY_SIZE", "overlay", "save_png", "thumbnail"]

#: Shorter side of the pictures on the page: tiny inputs (32 px crops) are enlarged to it.
DISPLAY_SIZE = 192


def _display_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    w, h = size
    scale = max(side / min(w, h), 1.0)
    return round(w * scale), round(h * scale)


def overlay(image: Image.Image, heat: np.ndarray, *, side: int = DISPLAY_SIZE) -> Image.Image:
    """``heat`` (``[h, w]`` in [0, 1], over the whole of ``image``) drawn on ``image``.

    Both are resized to the display size (at least ``side`` pixels on the
    shorter side); the map bilinearly, so a coarse grid shows as a smooth blob.
    ``image`` is the crop a tower saw, so that size is bounded by the tower's input.
    """
    require_grad_cam()
    from pytorch_grad_cam.utils.image import show_cam_on_image

    size = _display_size(image.size, side)
    base = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC),
                      dtype=np.float32) / 255.0
    heat_img = Image.fromarray(np.clip(heat, 0.0, 1.0).astype(np.float32))
    mask = np.asarray(heat_img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return Image.fromarray(show_cam_on_image(base, np.clip(mask, 0.0, 1.0), use_rgb=True))


def thumbnail(image: Image.Image, *, side: int = DISPLAY_SIZE) -> Image.Image:
    """``image`` at the display size (enlarged or reduced so its shorter side is ``side``).

    An image longer than :data:`~hybridcls.data.MAX_ASPECT_RATIO` times its short
    side is cut to its central part first, so the thumbnail of a thin strip is at most
    ``side x 16 * side`` pixels rather than millions long.
    """
    image = CentreCropAspect(MAX_ASPECT_RATIO)(image)
    w, h = image.size
    scale = side / min(w, h)
    return image.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                       Image.Resampling.BICUBIC)


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` as a PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
