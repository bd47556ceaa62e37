"""Keep the cost of a tower's resize bounded by its input size, whatever the image's aspect ratio.

An eval transform (timm's ``create_transform(is_training=False)``, open_clip's
preprocess) resizes, then centre-crops. Decoding is bounded by the pixel limit
(:data:`~hybridcls.data.DEFAULT_MAX_PIXELS`); the resize is bounded by the
model's input size only if the image's shape is not extreme:

* shorter side to ``S`` (timm ``crop_mode="center"``, open_clip
  ``resize_mode="shortest"``): an image of aspect ratio ``a`` first becomes
  ``S x a*S`` pixels. A valid 1 x 16000 PNG of 150 bytes becomes a
  224 x 3,584,000 image (2.4 GB) of which the crop keeps 224 x 224.
  :class:`CentreCropAspect` cuts the long side around the centre to the
  region the crop takes plus the resampling filter's reach on both sides, so
  the crop sees the same source pixels (on a sampling grid that may move by a
  fraction of a pixel), and never below :data:`MAX_ASPECT_RATIO`. The resized
  image then holds at most ``16 * S * S`` pixels.
* squash to ``(h, w)`` (timm ``crop_mode="squash"``, open_clip
  ``resize_mode="squash"``, SigLIP's and DFN's): the output is bounded, but
  the filter weights Pillow precomputes grow with the long side (about 32
  bytes a source pixel): 1.5 GB and 6 s for a 1 x 50,000,000 strip (a PNG of
  about 150 KB, 143 MB decoded). :class:`ReduceLongSide` first box-averages
  the long side by an integer factor ``k``, keeping at least 16 times the
  output length (Pillow's ``reducing_gap``, with a wider gap than its 3). The
  sampling moves by at most ``k`` source pixels, 1/16 of an output pixel: the
  result is within 3 levels of 255 of the one-step resize on noise and 7 at
  the edges of a sawtooth (a gap of 3 is off by up to 20 there).
* letterbox (timm ``crop_mode="border"``, open_clip ``resize_mode="longest"``):
  the long side is fitted to ``S``, so the work is bounded, but the short side
  of a strip longer than ``2 * S`` times its width rounds to 0 pixels and the
  resize raises. :class:`CentreCropAspect` with a limit of ``2 * S - 1`` cuts
  only such strips, to their central part, which shows as a 1-pixel line.

Each step leaves every image up to :data:`MAX_ASPECT_RATIO` (16:1: photos,
2:1 and 4:1 panoramas) as it is, so those give exactly the pixels of the
transform without it. :func:`bound_aspect` puts the right step in front of a
transform's resize: the one rule every eval transform of the package goes
through, on PIL images and on the device decoder's ``uint8`` tensors alike.

Example:
    >>> from torchvision import transforms
    >>> from PIL import Image
    >>> tf = bound_aspect(transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224)]))
    >>> tf.transforms[0]
    CentreCropAspect(max_aspect=16.0)
    >>> tf(Image.new("RGB", (1, 16000))).size
    (224, 224)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch.nn.functional as F
from PIL import Image

__all__ = [
    "MAX_ASPECT_RATIO",
    "CentreCropAspect",
    "ReduceLongSide",
    "bound_aspect",
    "bound_step",
    "resize_side",
]

#: Aspect ratio (long side / short side) up to which an image reaches a resize untouched.
MAX_ASPECT_RATIO: float = 16.0

# Room for the resampling filter on both ends of the crop, in units of the short side: Lanczos
# (the widest filter of PIL and torch) reaches 3 source pixels when enlarging (fewer, relative to
# the short side, when reducing), and the short side is at least 1 pixel.
_FILTER_MARGIN = 2 * 3.0

# Source pixels per output pixel left after a box reduction (Pillow's reducing_gap; see above).
_REDUCING_GAP = 16

_CROP_NAMES = ("CenterCrop", "CenterCropOrPad")

Img = TypeVar("Img")


def _size_of(image: Any) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[-1]), int(image.shape[-2])


class CentreCropAspect:
    """Centre crop of the long side to at most ``max_aspect`` times the short side.

    Works on PIL images and on ``[..., H, W]`` tensors (the device decoder's
    ``uint8`` CHW images); an image within the limit is returned as it is.
    Picklable, for loader workers.

    Args:
        max_aspect: The largest long side / short side ratio kept (at least 1).

    Example:
        >>> from PIL import Image
        >>> CentreCropAspect(16)(Image.new("RGB", (3, 1000))).size
        (3, 48)
        >>> CentreCropAspect(16)(Image.new("RGB", (640, 480))).size
        (640, 480)
    """

    def __init__(self, max_aspect: float) -> None:
        if not max_aspect >= 1:
            raise ValueError(f"max_aspect={max_aspect!r}: expected a number >= 1")
        self.max_aspect = float(max_aspect)

    def __call__(self, image: Img) -> Img:
        width, height = _size_of(image)
        keep = max(1, math.floor(self.max_aspect * min(width, height)))
        if max(width, height) <= keep:
            return image
        w, h = (keep, height) if width > height else (width, keep)
        # The offset rounds as in torchvision's CenterCrop.
        left, top = round((width - w) / 2.0), round((height - h) / 2.0)
        if isinstance(image, Image.Image):
            return image.crop((left, top, left + w, top + h))
        return image[..., top:top + h, left:left + w]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_aspect={self.max_aspect})"


class ReduceLongSide:
    """Box-average the long side of a strip before a resize to ``size`` squashes it.

    An image longer than :data:`MAX_ASPECT_RATIO` times its short side, whose
    long side holds at least ``2 * 16`` times its output length, is reduced
    along that side by the integer factor ``k = long // (16 * output length)``
    (Pillow's ``Image.reduce``; on tensors the same box mean, rounded, with a
    short last box as Pillow does). Any other image is returned as it is.
    Works on PIL images and ``[..., H, W]`` tensors; picklable.

    Args:
        size: The ``(h, w)`` (or side) the next step resizes to.

    Example:
        >>> from PIL import Image
        >>> ReduceLongSide((224, 224))(Image.new("RGB", (1, 16000))).size
        (1, 4000)
        >>> ReduceLongSide((224, 224))(Image.new("RGB", (4000, 3000))).size
        (4000, 3000)
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        hw = _hw(size)
        if hw is None or min(hw) < 1:
            raise ValueError(f"size={size!r}: expected a positive side or (h, w)")
        self.size = hw

    def __call__(self, image: Img) -> Img:
        width, height = _size_of(image)
        if max(width, height) <= MAX_ASPECT_RATIO * min(width, height):
            return image
        tall = height > width
        k = height // (_REDUCING_GAP * self.size[0]) if tall else width // (_REDUCING_GAP * self.size[1])
        if k < 2:
            return image
        factor = (1, k) if tall else (k, 1)  # (x, y), as Pillow counts
        if isinstance(image, Image.Image):
            return image.reduce(factor)
        x = image.reshape(-1, 1, height, width).float()
        # ceil_mode keeps the short last box, averaged over the pixels it has (no padding counted).
        y = F.avg_pool2d(x, factor[::-1], stride=factor[::-1], ceil_mode=True)
        y = y.reshape(*image.shape[:-2], *y.shape[-2:])
        return y.round().to(image.dtype) if not image.dtype.is_floating_point else y.to(image.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _hw(size: Any) -> tuple[int, int] | None:
    """``(h, w)`` of a resize or crop ``size``; None for anything else."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, Sequence) and len(size) == 1:
        return int(size[0]), int(size[0])
    if isinstance(size, Sequence) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def bound_step(resize: Any, after: Sequence[Any] = ()) -> CentreCropAspect | ReduceLongSide | None:
    """The step a resize needs in front of it to stay bounded; None when it needs none.

    Args:
        resize: A step of an eval transform: torchvision's ``Resize``, or timm's or
            open_clip's ``ResizeKeepRatio`` (recognised by class name: this
            package imports neither, nor torchvision).
        after: The steps after it; the first centre crop among them sets how much
            of a shorter-side resize is seen.

    Returns:
        For a shorter-side resize to ``(th, tw)`` followed by a centre crop
        ``(ch, cw)``: ``CentreCropAspect(max(16, max(ch / tw, cw / th) + 6))``
        (the crop plus the filter's reach). For a letterbox fit to ``(th, tw)``:
        ``CentreCropAspect(2 * min(th, tw) - 1)``. For a squash to ``(h, w)``:
        ``ReduceLongSide((h, w))``. None for a resize with ``max_size``, a
        shorter-side resize whose whole output is kept, and any other step.
    """
    name = type(resize).__name__
    target = _hw(getattr(resize, "size", None))
    if target is None or getattr(resize, "max_size", None) is not None:
        return None
    longest = getattr(resize, "longest", None)
    if name == "Resize":  # an int (or one-element) size is the shorter side; (h, w) squashes
        if not (isinstance(resize.size, int) or len(resize.size) == 1):
            return ReduceLongSide(target)
    elif name == "ResizeKeepRatio" and longest == 1:
        return CentreCropAspect(2.0 * min(target) - 1)
    elif name != "ResizeKeepRatio" or longest != 0:
        return None
    crop = next((_hw(getattr(t, "size", None)) for t in after if type(t).__name__ in _CROP_NAMES), None)
    if crop is None:
        return None
    (th, tw), (ch, cw) = target, crop
    return CentreCropAspect(max(MAX_ASPECT_RATIO, max(ch / tw, cw / th) + _FILTER_MARGIN))


def bound_aspect(transform: Any) -> Any:
    """``transform`` with :func:`bound_step`'s step in front of its resize, where it needs one.

    Args:
        transform: A ``Compose`` eval transform (timm, open_clip, torchvision);
            anything else, or one that already has such a step, is returned as it is.

    Returns:
        A new ``Compose`` (the given one is not changed) or ``transform`` itself
        when its resize needs nothing.
    """
    # Recognised by name, like the steps: torchvision is not imported by this package.
    steps = list(getattr(transform, "transforms", None) or [])
    if type(transform).__name__ != "Compose" or any(
            isinstance(t, (CentreCropAspect, ReduceLongSide)) for t in steps):
        return transform
    for i, step in enumerate(steps):
        if "Resize" in type(step).__name__:
            bound = bound_step(step, steps[i + 1:])
            if bound is None:
                return transform
            return type(transform)([*steps[:i], bound, *steps[i:]])
    return transform


def resize_side(transform: Any) -> int | None:
    """The longest side a ``Compose`` eval transform's resize brings an image to; None if unknown.

    A decoded image whose two sides are both at least this long is only ever
    reduced by the transform, whatever its orientation, so it may be decoded
    at a reduced scale down to that size (JPEG's DCT scaling; see
    :func:`~hybridcls.data.load_image`'s ``target_side``): a shorter-side resize
    to ``S`` (timm ``center``, open_clip ``shortest``) needs ``S``; a squash or a
    letterbox to ``(h, w)`` needs ``max(h, w)``. The steps of :func:`bound_aspect`
    in front of the resize only cut or reduce the long side of strips, which
    leaves the short side as it is.

    Args:
        transform: The transform (torchvision / timm / open_clip ``Compose``).

    Returns:
        The side in pixels, or None for a transform whose first step (after
        :func:`bound_aspect`'s) is not a resize recognised here: torchvision's
        ``Resize`` or timm's / open_clip's ``ResizeKeepRatio``, without ``max_size``.

    Example:
        >>> from torchvision import transforms
        >>> resize_side(transforms.Compose([transforms.Resize(235), transforms.CenterCrop(224)]))
        235
        >>> resize_side(transforms.Compose([transforms.Resize((224, 320))]))
        320
        >>> resize_side(transforms.Compose([transforms.CenterCrop(224)])) is None
        True
    """
    for step in getattr(transform, "transforms", None) or []:
        if isinstance(step, (CentreCropAspect, ReduceLongSide)):
            continue
        # By name, as in bound_step; a crop or anything else before the resize would see
        # another part of a reduced image, and a random resized crop other pixels of it.
        if type(step).__name__ in ("Resize", "ResizeKeepRatio") and getattr(step, "max_size", None) is None:
            hw = _hw(getattr(step, "size", None))
            return max(hw) if hw is not None else None
        return None
    return None
