"""Decoding: every awkward image kind comes out RGB, every bad one with its reason."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from imagefactory import Made, make_all, make_bomb_png, make_plain, make_png16_gradient
from PIL import Image, ImageFile

from hybridcls.data import decode_image_bytes, load_image
from hybridcls.errors import ImageDecodeError

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"
# JPEG is lossy; a pure colour may come back a few levels off.
JPEG_TOLERANCE = 8


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    return make_all(tmp_path_factory.mktemp("images"))


GOOD = [
    "plain_jpeg", "plain_png", "plain_webp", "plain_bmp", "plain_tiff", "plain_gif",
    "cmyk_jpeg", "png16", "rgba", "palette", "palette_transparent", "exif6", "exif8",
    "gif_frames",
]  # fmt: skip
BAD = ["truncated_jpeg", "corrupt_png", "zero_byte", "text_as_jpg", "bomb", "dir_named_jpg"]


def _assert_matches(img: Image.Image, expected: Made) -> None:
    assert img.mode == "RGB"
    assert img.size == expected.size
    for xy, colour in expected.probes:
        got = img.getpixel(xy)
        assert max(abs(g - c) for g, c in zip(got, colour, strict=True)) <= JPEG_TOLERANCE, (
            xy,
            got,
            colour,
        )


@pytest.mark.parametrize("kind", GOOD)
def test_good_kinds_decode_to_expected_rgb(made: dict[str, Made], kind: str) -> None:
    _assert_matches(load_image(made[kind].path), made[kind])


@pytest.mark.parametrize("kind", GOOD)
def test_bytes_decode_like_files(made: dict[str, Made], kind: str) -> None:
    path = made[kind].path
    from_bytes = decode_image_bytes(path.read_bytes(), str(path))
    assert np.array_equal(np.asarray(from_bytes), np.asarray(load_image(path)))


@pytest.mark.parametrize("kind", BAD)
def test_bad_kinds_raise_with_reason(made: dict[str, Made], kind: str) -> None:
    path = made[kind].path
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.reason.startswith(made[kind].reason), info.value.reason
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", [k for k in BAD if k != "dir_named_jpg"])
def test_bad_bytes_raise_with_same_reason(made: dict[str, Made], kind: str) -> None:
    path = made[kind].path
    with pytest.raises(ImageDecodeError) as info:
        decode_image_bytes(path.read_bytes(), "upload-7")
    assert info.value.reason.startswith(made[kind].reason)
    assert info.value.path == "upload-7"


def test_exact_reasons(made: dict[str, Made], tmp_path: Path) -> None:
    def reason(path: Path | str) -> str:
        with pytest.raises(ImageDecodeError) as info:
            load_image(path)
        return info.value.reason

    assert reason(made["zero_byte"].path) == "empty file (0 bytes)"
    assert reason(made["text_as_jpg"].path) == "not an image (unrecognised format)"
    assert reason(made["dir_named_jpg"].path) == "is a directory"
    assert reason(tmp_path / "missing.jpg") == "no such file"
    assert "truncated" in reason(made["truncated_jpeg"].path)


def test_sixteen_bit_is_rescaled_not_clipped(made: dict[str, Made]) -> None:
    gray = np.asarray(load_image(made["png16"].path))[0, :, 0].astype(int)
    # Column x held x * 257, i.e. exactly x in 8 bits; clipping would give 255 from x = 1.
    assert gray.min() == 0 and gray.max() == 255
    assert np.array_equal(gray, np.arange(256))


@pytest.mark.parametrize("mode", ["I;16B", "I", "F"])
def test_other_high_depth_modes_span_the_range(tmp_path: Path, mode: str) -> None:
    ramp = np.linspace(0, 1, 64)[None, :].repeat(2, axis=0)
    if mode == "I;16B":
        img = Image.frombytes(mode, (64, 2), (ramp * 65535).round().astype(">u2").tobytes())
    elif mode == "I":
        img = Image.fromarray((ramp * 65535).round().astype(np.int32))
    else:
        img = Image.fromarray(ramp.astype(np.float32))
    path = tmp_path / "deep.tif"
    img.save(path, "TIFF")
    assert Image.open(path).mode == mode
    row = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(set(row)) > 32


def test_small_max_pixels_refuses_with_size(made: dict[str, Made]) -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_image(made["plain_png"].path, max_pixels=100)
    assert info.value.reason == (
        "decompression bomb: 24 x 16 = 384 pixels exceeds the limit of 100 (see max_pixels)"
    )
    assert load_image(made["plain_png"].path, max_pixels=384).size == (24, 16)


def test_bomb_header_is_refused_before_decoding(made: dict[str, Made]) -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_image(made["bomb"].path)
    assert info.value.reason.startswith("decompression bomb: 10000000000 pixels exceeds")


def test_pixel_limit_is_per_call_and_leaves_pillow_alone(tmp_path: Path) -> None:
    # 12000 x 12000 sits between Pillow's warning and error thresholds.
    path = make_bomb_png(tmp_path, 12_000, 12_000)
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError) as info:
            load_image(path, max_pixels=100_000_000)
    assert info.value.reason == (
        "decompression bomb: 12000 x 12000 = 144000000 pixels exceeds the limit of "
        "100000000 (see max_pixels)"
    )
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert (
        Image.MAX_IMAGE_PIXELS,
        ImageFile.LOAD_TRUNCATED_IMAGES,
        list(warnings.filters),
    ) == before


def test_result_is_detached_from_the_file(tmp_path: Path) -> None:
    path = make_plain(tmp_path, "PNG")
    img = load_image(path)
    path.unlink()
    assert img.getpixel((0, 0)) == (255, 0, 0)


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (3, 2), 77).save(gray)
    assert load_image(gray).getpixel((1, 1)) == (77, 77, 77)
    bilevel = tmp_path / "bilevel.png"
    Image.new("1", (3, 2), 1).save(bilevel)
    assert load_image(bilevel).getpixel((0, 0)) == (255, 255, 255)
    la = tmp_path / "la.png"
    Image.new("LA", (3, 2), (0, 0)).save(la)
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_png_survives_bytes_path(tmp_path: Path) -> None:
    path = make_png16_gradient(tmp_path)
    assert decode_image_bytes(path.read_bytes(), "x").getpixel((255, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- real photos

needs_photos = pytest.mark.skipif(
    not PHOTOS.is_dir(), reason=f"real photos not present at ../shared/data/photos ({PHOTOS})"
)


def _small(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((64, 48), Image.Resampling.BOX), dtype=np.float32)


@needs_photos
def test_real_photos_decode_except_the_truncated_one() -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert len(photos) >= 5
    for path in photos:
        if "truncated" in path.name:
            with pytest.raises(ImageDecodeError) as info:
                load_image(path)
            assert info.value.reason.startswith("truncated or corrupt image:")
        else:
            img = load_image(path)
            assert img.mode == "RGB" and min(img.size) > 100, path.name


@needs_photos
def test_real_photo_variants_match_the_plain_one() -> None:
    plain = load_image(PHOTOS / "african_elephants.jpg")
    reference = _small(plain)
    for name, tolerance in [
        ("african_elephants_with_exif_orientation.jpg", 6.0),
        ("african_elephants_cmyk.jpg", 6.0),
        ("african_elephants_bw.jpg", 40.0),
    ]:
        img = load_image(PHOTOS / name)
        assert img.mode == "RGB" and img.size == plain.size, name
        assert np.abs(_small(img) - reference).mean() < tolerance, name
    # The orientation check can fail: the photo turned any other way is far off.
    rotated = load_image(PHOTOS / "african_elephants_with_exif_orientation.jpg").rotate(180)
    assert np.abs(_small(rotated) - reference).mean() > 30


def test_draft_decoding_fails_exactly_when_a_full_decode_does(photos_dir: Path) -> None:
    def outcome(path: Path, draft: bool) -> tuple[str, str]:
        try:
            return ("ok", load_image(path, draft=draft).mode)
        except ImageDecodeError as err:
            return ("error", err.reason)

    photos = sorted(photos_dir.glob("*.jpg"))
    assert any("truncated" in p.name for p in photos)
    for path in photos:
        assert outcome(path, draft=True) == outcome(path, draft=False), path.name
    # A JPEG decodes at 1/8 of each side, upright (EXIF) and in RGB as at full size.
    for name in ("african_elephants.jpg", "african_elephants_with_exif_orientation.jpg"):
        full, small = load_image(photos_dir / name), load_image(photos_dir / name, draft=True)
        assert small.size == (full.width // 8, full.height // 8), name
