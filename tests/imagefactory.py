"""Generate small image files of every awkward kind, for tests.

Each ``make_*`` function writes one file (or folder) into the given folder
and returns its path. :func:`make_all` writes the whole set and returns
:class:`Made` records saying what decoding should give: the RGB colour of a
probe pixel and the size, or the start of the error reason. Other test
modules import this file; it depends only on Pillow and numpy.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     made = make_all(Path(folder))
    >>> made["truncated_jpeg"].reason
    'truncated or corrupt image:'
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BLUE",
    "GREEN",
    "RED",
    "WHITE",
    "Made",
    "make_all",
    "make_bomb_png",
    "make_cmyk_jpeg",
    "make_corrupt_png",
    "make_dir_named_like_image",
    "make_exif_rotated_jpeg",
    "make_gray_ramp_png",
    "make_palette_png",
    "make_plain",
    "make_png16_gradient",
    "make_rgba_png",
    "make_text_as_jpg",
    "make_truncated_jpeg",
    "make_two_frame_gif",
    "make_unreadable_class",
    "make_zero_byte",
    "noise_jpeg_bytes",
]

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Made:
    """A generated file and what decoding it should give.

    Attributes:
        path: The file.
        size: Expected decoded ``(width, height)``, for good images.
        probes: ``((x, y), (r, g, b))`` pixels expected after decoding.
        reason: Expected start of the error reason, for bad inputs.
    """

    path: Path
    size: tuple[int, int] | None = None
    probes: tuple[tuple[tuple[int, int], tuple[int, int, int]], ...] = ()
    reason: str | None = None


def make_plain(folder: Path, fmt: str, name: str | None = None) -> Path:
    """A 24 x 16 image, left half red, right half blue, in ``fmt`` (a Pillow format)."""
    arr = np.zeros((16, 24, 3), np.uint8)
    arr[:, :12] = RED
    arr[:, 12:] = BLUE
    ext = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
    path = folder / (name or f"plain.{ext}")
    options = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(arr).save(path, fmt, **options)
    return path


def make_cmyk_jpeg(folder: Path) -> Path:
    """A 20 x 10 CMYK JPEG: pure cyan left, pure yellow right."""
    img = Image.new("CMYK", (20, 10))
    img.paste((255, 0, 0, 0), (0, 0, 10, 10))
    img.paste((0, 0, 255, 0), (10, 0, 20, 10))
    path = folder / "cmyk.jpg"
    img.save(path, "JPEG", quality=95)
    return path


def make_png16_gradient(folder: Path) -> Path:
    """A 256 x 4 16-bit grayscale PNG; column x holds x * 257 (0 .. 65535)."""
    arr = (np.arange(256, dtype=np.uint16) * 257)[None, :].repeat(4, axis=0)
    path = folder / "gray16.png"
    Image.fromarray(arr).save(path, "PNG")
    return path


def make_rgba_png(folder: Path) -> Path:
    """A 4 x 1 RGBA PNG: opaque red, transparent blue, half-transparent red, opaque green."""
    img = Image.new("RGBA", (4, 1))
    img.putdata([(255, 0, 0, 255), (0, 0, 255, 0), (255, 0, 0, 128), (0, 255, 0, 255)])
    path = folder / "rgba.png"
    img.save(path, "PNG")
    return path


def make_palette_png(folder: Path, *, transparent: bool) -> Path:
    """A 2 x 1 palette PNG: index 0 red, index 1 blue; index 1 transparent if asked."""
    img = Image.new("P", (2, 1))
    img.putpalette([*RED, *BLUE] + [0] * (256 - 2) * 3)
    img.putdata([0, 1])
    path = folder / ("palette_transparent.png" if transparent else "palette.png")
    if transparent:
        img.save(path, "PNG", transparency=1)
    else:
        img.save(path, "PNG")
    return path


def make_exif_rotated_jpeg(folder: Path, orientation: int = 6) -> Path:
    """A JPEG stored sideways with an EXIF orientation tag.

    Displayed upright it is 40 x 20: white, with a red 10 x 10 block in the
    top-left corner and a green one in the bottom-right corner.
    """
    upright = Image.new("RGB", (40, 20), WHITE)
    upright.paste(RED, (0, 0, 10, 10))
    upright.paste(GREEN, (30, 10, 40, 20))
    # Orientation 6 is undone by rotating 270 degrees, 8 by rotating 90: store
    # the upright picture with the opposite rotation.
    stored = upright.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = folder / f"exif{orientation}.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif)
    return path


def noise_jpeg_bytes(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    """A JPEG of random noise (so every byte of the scan matters)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_truncated_jpeg(folder: Path) -> Path:
    """A valid JPEG cut off in the middle of its image data."""
    data = noise_jpeg_bytes()
    path = folder / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def make_corrupt_png(folder: Path) -> Path:
    """A PNG whose compressed pixel data was overwritten with garbage."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), RED).save(out, "PNG")
    data = bytearray(out.getvalue())
    start = data.index(b"IDAT") + 4
    data[start : start + 8] = b"\xff" * 8
    path = folder / "corrupt.png"
    path.write_bytes(bytes(data))
    return path


def make_zero_byte(folder: Path) -> Path:
    """An empty file named like a JPEG."""
    path = folder / "empty.jpg"
    path.write_bytes(b"")
    return path


def make_text_as_jpg(folder: Path) -> Path:
    """A text file named like a JPEG."""
    path = folder / "notes.jpg"
    path.write_text("this is not an image\n", encoding="utf-8")
    return path


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def make_bomb_png(folder: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``width x height`` grayscale pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    path = folder / "bomb.png"
    path.write_bytes(data)
    return path


def make_gray_ramp_png(
    folder: Path, width: int, height: int, *, bit_depth: int = 8, name: str = "ramp.png"
) -> Path:
    """A valid grayscale PNG of any size, written row by row (never held in memory).

    Every row is the same horizontal ramp, column ``x`` holding ``x % 256``
    (8-bit) or ``(x % 256) * 257`` (16-bit, the same grey once rescaled), so
    the file stays small: 1 x 170,000,000 pixels take about 0.4 MB.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth={bit_depth}: 8 or 16")
    grey = np.arange(width, dtype=np.int64) % 256
    pixels = grey.astype(np.uint8) if bit_depth == 8 else (grey * 257).astype(">u2")
    row = b"\x00" + pixels.tobytes()  # filter type 0 (none), then the samples
    rows_per_piece = max(1, (1 << 22) // len(row))
    packer = zlib.compressobj(6)
    path = folder / name
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)))
        for start in range(0, height, rows_per_piece):
            data = packer.compress(row * min(rows_per_piece, height - start))
            if data:
                f.write(_png_chunk(b"IDAT", data))
        f.write(_png_chunk(b"IDAT", packer.flush()))
        f.write(_png_chunk(b"IEND", b""))
    return path


def make_two_frame_gif(folder: Path) -> Path:
    """An 8 x 8 GIF whose first frame is red and second blue."""
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    path = folder / "two_frames.gif"
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return path


def make_dir_named_like_image(folder: Path) -> Path:
    """A folder called ``folder.jpg``, holding one real image."""
    path = folder / "folder.jpg"
    path.mkdir()
    make_plain(path, "PNG", "inside.png")
    return path


def make_unreadable_class(folder: Path) -> dict[str, str]:
    """Fill ``folder`` as in the reported case: two 0-byte files, three saved HTML pages named .png.

    Returns:
        ``path -> reason`` that decoding each file gives (the reasons
        hybridcls.data.images documents), in name order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    planted = {}
    for i in range(5):
        path = folder / f"00{i}.png"
        if i < 2:
            path.write_bytes(b"")
            planted[str(path)] = "empty file (0 bytes)"
        else:
            path.write_text("<html>404 not found</html>\n", encoding="utf-8")
            planted[str(path)] = "not an image (unrecognised format)"
    return planted


def make_all(folder: Path) -> dict[str, Made]:
    """Write every kind into ``folder`` and say what decoding each should give."""
    folder.mkdir(parents=True, exist_ok=True)
    halves = (((2, 8), RED), ((21, 8), BLUE))
    made = {
        f"plain_{fmt.lower()}": Made(make_plain(folder, fmt), (24, 16), halves)
        for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
    }
    made.update(
        cmyk_jpeg=Made(
            make_cmyk_jpeg(folder), (20, 10), (((2, 5), (0, 255, 255)), ((17, 5), (255, 255, 0)))
        ),
        png16=Made(
            make_png16_gradient(folder),
            (256, 4),
            (((0, 0), (0, 0, 0)), ((255, 0), WHITE), ((128, 0), (128,) * 3)),
        ),
        rgba=Made(
            make_rgba_png(folder),
            (4, 1),
            (((0, 0), RED), ((1, 0), WHITE), ((2, 0), (255, 127, 127)), ((3, 0), GREEN)),
        ),
        palette=Made(
            make_palette_png(folder, transparent=False), (2, 1), (((0, 0), RED), ((1, 0), BLUE))
        ),
        palette_transparent=Made(
            make_palette_png(folder, transparent=True), (2, 1), (((0, 0), RED), ((1, 0), WHITE))
        ),
        exif6=Made(
            make_exif_rotated_jpeg(folder, 6),
            (40, 20),
            (((2, 2), RED), ((37, 17), GREEN), ((37, 2), WHITE)),
        ),
        exif8=Made(
            make_exif_rotated_jpeg(folder, 8),
            (40, 20),
            (((2, 2), RED), ((37, 17), GREEN), ((37, 2), WHITE)),
        ),
        gif_frames=Made(make_two_frame_gif(folder), (8, 8), (((4, 4), RED),)),
        truncated_jpeg=Made(make_truncated_jpeg(folder), reason="truncated or corrupt image:"),
        corrupt_png=Made(make_corrupt_png(folder), reason="truncated or corrupt image:"),
        zero_byte=Made(make_zero_byte(folder), reason="empty file (0 bytes)"),
        text_as_jpg=Made(make_text_as_jpg(folder), reason="not an image (unrecognised format)"),
        bomb=Made(make_bomb_png(folder), reason="decompression bomb:"),
        dir_named_jpg=Made(make_dir_named_like_image(folder), reason="is a directory"),
    )
    return made
