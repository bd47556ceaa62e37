"""Decode one image file (or its bytes) into an upright 8-bit RGB picture.

Both entry points, :func:`load_image` for a path and
:func:`decode_image_bytes` for bytes already read, go through the same
decoding and colour conversion, and fail only with
:class:`~hybridcls.errors.ImageDecodeError`, whose ``reason`` is short enough
for an output row:

* ``no such file``, ``is a directory``, ``not a regular file``,
  ``cannot read file: ...``;
* ``empty file (0 bytes)``;
* ``not an image (unrecognised format)``;
* ``truncated or corrupt image: ...``;
* ``decompression bomb: W x H = N pixels exceeds the limit of M (see max_pixels)``;
* ``unsupported colour mode ...``.

What comes out: the first frame (GIF, multi-page TIFF), turned upright by its
EXIF orientation, converted to RGB: grayscale, bilevel and palette images
expanded, anything with transparency composited over white, CMYK converted,
16-bit and floating-point grayscale rescaled to 8 bits rather than clipped.

Pillow's process-wide settings are left alone: the pixel limit is checked per
call, and truncated files are refused as long as
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default (``False``).
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hybridcls.errors import ImageDecodeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "decode_image_bytes",
    "image_from_memory",
    "load_image",
]

#: Pixel limit per image: Pillow's own refusal point (twice its default
#: ``Image.MAX_IMAGE_PIXELS``), about 13,400 x 13,400; a 100-megapixel camera
#: photo passes, a header claiming gigapixels does not.
DEFAULT_MAX_PIXELS: int = 2 * 89_478_485

#: Pillow format names tried when opening. Restricting the list keeps Pillow
#: away from formats that shell out (EPS runs Ghostscript) or were not asked
#: for. "JPEG" also opens multi-picture camera JPEGs (Pillow's MPO).
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_PILLOW_BOMB = re.compile(r"\((\d+) pixels\)")


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: bool = False,
) -> Image.Image:
    """Read an image file as a fully loaded, upright RGB image.

    Args:
        path: The file to read. Its extension does not matter; the content does.
        max_pixels: Refuse images whose header claims more pixels than this,
            before decoding them. ``None`` removes this check; Pillow's own
            ``Image.MAX_IMAGE_PIXELS`` ceiling (process-wide, the
            application's to change) still applies.
        draft: Decode at the smallest scale the format offers (Pillow's
            ``Image.draft``: JPEG's DCT scaling, 1/8 of each side), about three
            times faster on camera photos. Every byte is still read and
            entropy-decoded and every other step is the same, so a file fails
            (with the same reason) exactly when it would at full size; for
            checking that files decode, not for looking at them.

    Returns:
        A mode ``"RGB"`` image, independent of the file (which is closed);
        smaller than the stored size with ``draft`` (JPEG).

    Raises:
        ImageDecodeError: the file is missing, empty, not an image, truncated,
            corrupt or too large; ``reason`` says which.

    Example:
        >>> from hybridcls.data import load_image
        >>> img = load_image("photos/cat.jpg")  # doctest: +SKIP
        >>> img.mode  # doctest: +SKIP
        'RGB'
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise ImageDecodeError(name, "no such file") from None
    except (OSError, ValueError) as err:
        raise ImageDecodeError(name, f"cannot read file: {_describe(err)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(name, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO or a device would block or read forever.
        raise ImageDecodeError(name, "not a regular file")
    try:
        with open(name, "rb") as fp:
            return _decode(fp, name, max_pixels, draft=draft)
    except OSError as err:  # only open() can raise it: _decode converts its own errors
        raise ImageDecodeError(name, f"cannot read file: {_describe(err)}") from None


def decode_image_bytes(
    data: bytes, name: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an encoded image held in memory, exactly as :func:`load_image` would.

    Args:
        data: The encoded file content.
        name: What to call the image in errors (usually its path).
        max_pixels: As for :func:`load_image`.

    Returns:
        A mode ``"RGB"`` image.

    Raises:
        ImageDecodeError: as for :func:`load_image`.

    Example:
        >>> from pathlib import Path
        >>> data = Path("photos/cat.jpg").read_bytes()  # doctest: +SKIP
        >>> decode_image_bytes(data, "photos/cat.jpg").size  # doctest: +SKIP
        (640, 480)
    """
    return _decode(io.BytesIO(data), str(name), max_pixels)


def _decode(
    fp: BinaryIO, name: str, max_pixels: int | None, *, draft: bool = False
) -> Image.Image:
    """The one decoding path: open, check size, (draft,) load, convert."""
    if fp.seek(0, io.SEEK_END) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    fp.seek(0)
    try:
        # Our own limit decides, so Pillow's warning for sizes between its
        # two thresholds is noise; catch_warnings restores the filters after.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=SUPPORTED_FORMATS) as im:
                _check_pixels(im.size, name, max_pixels)
                if draft:
                    # Mode None: scale only; the colour conversion stays _to_rgb's.
                    im.draft(None, (1, 1))
                im.load()
                return _to_rgb(im, name)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(name, _pillow_bomb_reason(err, max_pixels)) from None
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise many types on bad data
        raise ImageDecodeError(name, f"truncated or corrupt image: {_describe(err)}") from None


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageDecodeError(
            name,
            f"decompression bomb: {width} x {height} = {pixels} pixels exceeds "
            f"the limit of {max_pixels} (see max_pixels)",
        )


def _pillow_bomb_reason(err: Exception, max_pixels: int | None) -> str:
    """Reason for a refusal by Pillow's own (process-wide) limit, hit before ours."""
    match = _PILLOW_BOMB.search(str(err))
    claimed = f"{match.group(1)} pixels" if match else "the image size"
    ceiling = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if max_pixels is not None and (ceiling is None or max_pixels <= ceiling):
        return f"decompression bomb: {claimed} exceeds the limit of {max_pixels} (see max_pixels)"
    return (
        f"decompression bomb: {claimed} exceeds Pillow's limit of {ceiling} "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Upright 8-bit RGB copy of a loaded image (first frame only)."""
    # Orientation first: TIFF keeps it in tags that a mode conversion drops.
    im = ImageOps.exif_transpose(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        return _over_white(im)
    if im.mode.startswith("I") or im.mode == "F":
        return _grayscale_to_8bit(im).convert("RGB")
    if im.mode == "RGB":
        return im  # exif_transpose already returned a copy detached from the file
    try:
        return im.convert("RGB")
    except ValueError:
        raise ImageDecodeError(name, f"unsupported colour mode {im.mode}") from None


def _over_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _grayscale_to_8bit(im: Image.Image) -> Image.Image:
    """Rescale 16-bit, 32-bit integer or float grayscale to mode L.

    Pillow's own conversion clips values above 255, which turns a 16-bit
    photo white. 16-bit data maps its full range (0..65535) linearly; 32-bit
    integers in that range are treated as 16-bit (Pillow's older way of
    opening 16-bit PNGs); floats in [0, 1] scale by 255; anything else is
    stretched from its minimum to its maximum.
    """
    values = np.asarray(im, dtype=np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = values / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    return text or type(err).__name__


def image_from_memory(image: Any, name: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
                      ) -> Image.Image:
    """An image given in memory as an upright RGB PIL image, like a decoded file.

    Args:
        image: A PIL image (any mode: converted like a decoded file), a ``uint8`` array
            of shape ``[H, W, 3]``, ``[H, W, 4]`` (alpha over white) or ``[H, W]``
            (grey), or a tensor of shape ``[3, H, W]``: ``uint8``, or floats in
            ``[0, 1]`` (torchvision's convention).
        name: What to call it in errors (``<image K>``).
        max_pixels: As for :func:`load_image`.

    Returns:
        A mode ``"RGB"`` image.

    Raises:
        ImageDecodeError: Another type or shape, floats outside ``[0, 1]``, too many pixels.

    Example:
        >>> import numpy as np
        >>> image_from_memory(np.zeros((2, 3, 3), np.uint8), "<image 0>").size
        (3, 2)
    """
    if isinstance(image, Image.Image):
        _check_pixels(image.size, name, max_pixels)
        return _to_rgb(image, name)
    if hasattr(image, "detach"):  # a torch tensor, CHW; duck-typed so that this module needs no torch
        array = image.detach().cpu().numpy()
        if array.ndim != 3 or array.shape[0] != 3:
            raise ImageDecodeError(name, f"an image tensor has shape [3, H, W], got {list(array.shape)}")
        array = np.moveaxis(array, 0, -1)
    else:
        array = np.asarray(image)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ImageDecodeError(name, f"expected uint8 or floats in [0, 1], got {array.dtype}")
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ImageDecodeError(name, "floating-point pixels must lie in [0, 1]")
        array = np.rint(array * 255.0).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageDecodeError(name, f"an image array has shape [H, W, 3], [H, W, 4] or [H, W], "
                                     f"got {list(array.shape)}")
    _check_pixels((array.shape[1], array.shape[0]), name, max_pixels)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)), name)

