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
* ``decompression bomb: W x H = N pixels exceeds the limit of M (...)``, the
  limit named: ``hybridcls.data.DEFAULT_MAX_PIXELS`` or the caller's ``max_pixels=M``;
* ``side too long: W x H pixels, a side above the limit of M (...)``, the limit
  named: ``hybridcls.data.DEFAULT_MAX_SIDE`` or the caller's ``max_side=M``;
* ``unsupported colour mode ...``.

What comes out: the first frame (GIF, multi-page TIFF), turned upright by its
EXIF orientation, converted to RGB: grayscale, bilevel and palette images
expanded, anything with transparency composited over white, CMYK converted,
16-bit and floating-point grayscale rescaled to 8 bits rather than clipped.

Pillow's process-wide settings are left alone: the pixel and side limits are
checked per call, from the header, before anything is decoded, and truncated
files are refused as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its
default (``False``).

Reduced-scale decoding: given ``target_side``, the side a tower's resize will
bring the image to, a JPEG at least twice that size on both sides is decoded
at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT scaling (Pillow's
``Image.draft``), keeping both sides at least ``2 * target_side`` pixels
(:data:`DRAFT_REDUCING_GAP`): a 12-megapixel photo bound for a 224-pixel model
is never decoded whole. Every step after it (orientation, colour modes,
limits from the header) is the same.

Memory: decoding takes the decoded image and the RGB result (4 bytes a pixel,
as Pillow stores RGB), plus, for 16-bit, 32-bit and float grayscale, a rescale
done in bands of :data:`_BAND_PIXELS` pixels rather than over the whole image
at once. An image already upright is not copied.
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
    "DEFAULT_MAX_SIDE",
    "DRAFT_REDUCING_GAP",
    "SUPPORTED_FORMATS",
    "decode_image_bytes",
    "image_from_memory",
    "load_image",
]

#: Pixel limit per image: Pillow's own refusal point (twice its default
#: ``Image.MAX_IMAGE_PIXELS``), about 13,400 x 13,400; a 100-megapixel camera
#: photo passes, a header claiming gigapixels does not.
DEFAULT_MAX_PIXELS: int = 2 * 89_478_485

#: Side limit per image, in pixels: the largest side a JPEG or a GIF can state
#: (both store it in 16 bits; WebP's limit is 16,383, and libjpeg-turbo refuses
#: a JPEG side above 65,500), so no photo or scan in those formats is refused.
#: PNG, TIFF and BMP allow far longer sides, and Pillow keeps one pointer per
#: row: a 660 KB PNG of 1 x 170,000,000 pixels, within DEFAULT_MAX_PIXELS, took
#: 4.8 GB to decode against 2.2 GB for a 13,000 x 13,000 square. Within this
#: limit the row pointers of an image take at most 0.5 MB.
DEFAULT_MAX_SIDE: int = 65_535

#: Pillow format names tried when opening. Restricting the list keeps Pillow
#: away from formats that shell out (EPS runs Ghostscript) or were not asked
#: for. "JPEG" also opens multi-picture camera JPEGs (Pillow's MPO).
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

#: With ``target_side``, a JPEG is decoded at a reduced scale only down to this many times the
#: target side (on both sides), as Pillow's ``Image.thumbnail`` does by default
#: (``reducing_gap=2.0``): the antialiased resize after it then sees at least two source pixels
#: per output pixel. On 4000 x 3000 photos bound for 235 px (ConvNeXt at crop_pct 0.95) the
#: resized pixels are within 0.2 to 0.6 levels of 255 of a full decode on average (at most 4);
#: with a gap of 1 (1/8 scale) 0.4 to 0.8, and up to 2.6 on real 2048 x 1536 photos.
DRAFT_REDUCING_GAP: int = 2

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_PILLOW_BOMB = re.compile(r"\((\d+) pixels\)")
#: Pixels per band of the high-bit-depth grayscale rescale: its float64
#: temporaries take a few times 8 MB, whatever the image's size.
_BAND_PIXELS = 1 << 20


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_side: int | None = DEFAULT_MAX_SIDE,
    draft: bool = False,
    target_side: int | None = None,
) -> Image.Image:
    """Read an image file as a fully loaded, upright RGB image.

    Args:
        path: The file to read. Its extension does not matter; the content does.
        max_pixels: Refuse images whose header claims more pixels than this,
            before decoding them. ``None`` removes this check; Pillow's own
            ``Image.MAX_IMAGE_PIXELS`` ceiling (process-wide, the
            application's to change) still applies.
        max_side: Refuse images whose header claims a width or a height
            above this, before decoding them (see :data:`DEFAULT_MAX_SIDE`);
            ``None`` removes this check.
        draft: Decode at the smallest scale the format offers (Pillow's
            ``Image.draft``: JPEG's DCT scaling, 1/8 of each side), about three
            times faster on camera photos. Every byte is still read and
            entropy-decoded and every other step is the same, so a file fails
            (with the same reason) exactly when it would at full size; for
            checking that files decode, not for looking at them.
        target_side: The side the caller resizes the image to (the shorter side
            of a shorter-side resize, the longer of a squash's two): a JPEG is
            decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both its
            sides at least :data:`DRAFT_REDUCING_GAP` times this; other formats,
            and JPEGs smaller than that, at full size. ``None``: full size.

    Returns:
        A mode ``"RGB"`` image, independent of the file (which is closed);
        smaller than the stored size with ``draft`` or ``target_side`` (JPEG).

    Raises:
        ImageDecodeError: the file is missing, empty, not an image, truncated,
            corrupt or too large; ``reason`` says which.

    Example:
        >>> from hybridcls.data import load_image
        >>> img = load_image("photos/cat.jpg")  # doctest: +SKIP
        >>> img.mode  # doctest: +SKIP
        'RGB'
        >>> load_image("photos/camera_4000x3000.jpg", target_side=224).size  # doctest: +SKIP
        (1000, 750)
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
            return _decode(fp, name, max_pixels, max_side, draft=draft, target_side=target_side)
    except OSError as err:  # only open() can raise it: _decode converts its own errors
        raise ImageDecodeError(name, f"cannot read file: {_describe(err)}") from None


def decode_image_bytes(
    data: bytes,
    name: str,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_side: int | None = DEFAULT_MAX_SIDE,
    target_side: int | None = None,
) -> Image.Image:
    """Decode an encoded image held in memory, exactly as :func:`load_image` would.

    Args:
        data: The encoded file content.
        name: What to call the image in errors (usually its path).
        max_pixels: As for :func:`load_image`.
        max_side: As for :func:`load_image`.
        target_side: As for :func:`load_image`.

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
    return _decode(io.BytesIO(data), str(name), max_pixels, max_side, target_side=target_side)


def _decode(
    fp: BinaryIO,
    name: str,
    max_pixels: int | None,
    max_side: int | None,
    *,
    draft: bool = False,
    target_side: int | None = None,
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
                _check_side(im.size, name, max_side)
                # Mode None: scale only; the colour conversion stays _to_rgb's. Of the formats
                # read here only JPEG decodes at a reduced scale; the others ignore draft().
                if draft:
                    im.draft(None, (1, 1))
                elif target_side is not None:
                    # Both sides: the orientation applied below may swap them.
                    side = DRAFT_REDUCING_GAP * max(1, int(target_side))
                    im.draft(None, (side, side))
                im.load()
                # The image is ours (just opened): turning it in place spares a copy.
                return _to_rgb(im, name, in_place=True)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(name, _pillow_bomb_reason(err, max_pixels)) from None
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise many types on bad data
        raise ImageDecodeError(name, f"truncated or corrupt image: {_describe(err)}") from None


def _limit(value: int, default: int, parameter: str, constant: str) -> str:
    """Where a limit came from, for a reason that Python and command-line users both follow."""
    return f"hybridcls.data.{constant}" if value == default else f"{parameter}={value}"


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    """Refuse, from the header's size, an image of more than ``max_pixels`` pixels."""
    width, height = size
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        limit = _limit(max_pixels, DEFAULT_MAX_PIXELS, "max_pixels", "DEFAULT_MAX_PIXELS")
        raise ImageDecodeError(
            name,
            f"decompression bomb: {width} x {height} = {pixels} pixels exceeds "
            f"the limit of {max_pixels} ({limit})",
        )


def _check_side(size: tuple[int, int], name: str, max_side: int | None) -> None:
    """Refuse, from the header's size, an image with a side longer than ``max_side``."""
    width, height = size
    if max_side is not None and max(width, height) > max_side:
        limit = _limit(max_side, DEFAULT_MAX_SIDE, "max_side", "DEFAULT_MAX_SIDE")
        raise ImageDecodeError(
            name,
            f"side too long: {width} x {height} pixels, a side above the limit of "
            f"{max_side} ({limit})",
        )


def _pillow_bomb_reason(err: Exception, max_pixels: int | None) -> str:
    """Reason for a refusal by Pillow's own (process-wide) limit, hit before ours."""
    match = _PILLOW_BOMB.search(str(err))
    claimed = f"{match.group(1)} pixels" if match else "the image size"
    ceiling = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if max_pixels is not None and (ceiling is None or max_pixels <= ceiling):
        limit = _limit(max_pixels, DEFAULT_MAX_PIXELS, "max_pixels", "DEFAULT_MAX_PIXELS")
        return f"decompression bomb: {claimed} exceeds the limit of {max_pixels} ({limit})"
    return (
        f"decompression bomb: {claimed} exceeds Pillow's limit of {ceiling} "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )


def _to_rgb(im: Image.Image, name: str, *, in_place: bool = False) -> Image.Image:
    """Upright 8-bit RGB copy of a loaded image (first frame only).

    ``in_place``: ``im`` may be changed (an image just decoded, nobody else's), so
    an image already upright is returned as it is, not copied; otherwise ``im`` is
    left alone and the result never shares its pixels.
    """
    # Orientation first: TIFF keeps it in tags that a mode conversion drops.
    if in_place:
        ImageOps.exif_transpose(im, in_place=True)
    else:
        im = ImageOps.exif_transpose(im)  # a copy, even when there is nothing to turn
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        return _over_white(im)
    if im.mode.startswith("I") or im.mode == "F":
        return _grayscale_to_8bit(im).convert("RGB")
    if im.mode == "RGB":
        return im  # a copy, or (in_place) loaded and so detached from the file
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

    The arithmetic is float64, as on the whole array, but done in bands of rows
    (:data:`_BAND_PIXELS` pixels each) written into the 8-bit result: the
    results are the same to the bit, and the memory beyond the decoded image
    and the result is a few times a band's, not 24 bytes a pixel (3.4 GB more
    for a 10,000 x 10,000 16-bit PNG).
    """
    width, height = im.size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    bands = [(y, min(y + rows, height)) for y in range(0, height, rows)]

    def band(y0: int, y1: int) -> np.ndarray:
        return np.asarray(im.crop((0, y0, width, y1)), dtype=np.float64)

    lo, hi = (np.inf, -np.inf) if width and height else (0.0, 0.0)
    for y0, y1 in bands:  # np.minimum / np.maximum keep a NaN, as values.min() would
        values = band(y0, y1)
        lo, hi = float(np.minimum(lo, values.min())), float(np.maximum(hi, values.max()))
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        def scale(values: np.ndarray) -> np.ndarray:
            return values / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        def scale(values: np.ndarray) -> np.ndarray:
            return values * 255.0
    elif hi > lo:
        def scale(values: np.ndarray) -> np.ndarray:
            return (values - lo) * (255.0 / (hi - lo))
    else:
        return Image.new("L", im.size, 0)
    out = np.empty((height, width), dtype=np.uint8)
    for y0, y1 in bands:
        out[y0:y1] = np.clip(np.rint(scale(band(y0, y1))), 0, 255)
    return Image.fromarray(out)


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

