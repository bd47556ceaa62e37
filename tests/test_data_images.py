"""Decoding: every awkward image kind comes out RGB, every bad one with its reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from imagefactory import (
    Made,
    make_all,
    make_bomb_png,
    make_gray_ramp_png,
    make_plain,
    make_png16_gradient,
)
from PIL import Image, ImageFile

import hybridcls.data.images as images_module
from hybridcls.data import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    decode_image_bytes,
    load_image,
)
from hybridcls.errors import ImageDecodeError

TESTS = Path(__file__).resolve().parent

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
        "decompression bomb: 24 x 16 = 384 pixels exceeds the limit of 100 (max_pixels=100)"
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
        "100000000 (max_pixels=100000000)"
    )
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert (
        Image.MAX_IMAGE_PIXELS,
        ImageFile.LOAD_TRUNCATED_IMAGES,
        list(warnings.filters),
    ) == before


def test_default_pixel_limit_is_named_for_python_and_command_line_users(tmp_path: Path) -> None:
    # 13,400 x 13,400 is over the default limit (which Pillow's own check, at open, applies
    # first); the reason names the constant, not a command-line flag.
    path = make_bomb_png(tmp_path, 13_400, 13_400)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.reason == (
        f"decompression bomb: 179560000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS} "
        "(hybridcls.data.DEFAULT_MAX_PIXELS)"
    )
    assert 179_560_000 > DEFAULT_MAX_PIXELS == 178_956_970


@pytest.mark.parametrize("size", [(1, 170_000_000), (170_000_000, 1), (65_536, 2)])
def test_a_side_above_the_limit_is_refused_from_the_header(tmp_path: Path, size) -> None:
    # Headers only: refused before any pixel is read, both orientations, just over the limit.
    path = make_bomb_png(tmp_path, *size)
    width, height = size
    assert width * height <= DEFAULT_MAX_PIXELS  # within the pixel limit: the side refuses it
    expected = (f"side too long: {width} x {height} pixels, a side above the limit of 65535 "
                "(hybridcls.data.DEFAULT_MAX_SIDE)")
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.reason == expected
    with pytest.raises(ImageDecodeError) as info:
        decode_image_bytes(path.read_bytes(), "x.png")
    assert info.value.reason == expected


def test_side_limit_is_a_parameter(tmp_path: Path) -> None:
    path = make_gray_ramp_png(tmp_path, 65_535, 1)  # the longest side a JPEG or a GIF can have
    assert DEFAULT_MAX_SIDE == 65_535 and load_image(path).size == (65_535, 1)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path, max_side=1000)
    assert info.value.reason == (
        "side too long: 65535 x 1 pixels, a side above the limit of 1000 (max_side=1000)"
    )
    assert load_image(path, max_side=None).size == (65_535, 1)


def test_an_upright_image_is_not_copied(tmp_path: Path, monkeypatch) -> None:
    # Pillow's exif_transpose returns a copy when there is nothing to turn; count the copies.
    copies = []
    real_copy = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda im: copies.append(im.size) or real_copy(im))
    assert load_image(make_plain(tmp_path, "JPEG")).size == (24, 16)
    assert copies == []


def test_conversion_leaves_an_image_it_does_not_own_alone(made: dict[str, Made]) -> None:
    # Images given in memory are the caller's: turned and converted into a new image, never
    # in place (decoded files, which are ours, are turned in place).
    with Image.open(made["exif6"].path) as im:
        im.load()
        stored = im.size
        out = images_module._to_rgb(im, "<image 0>")
        assert (stored, out.size) == ((20, 40), (40, 20))
        assert im.size == stored and im.getexif().get(0x0112) == 6
        plain = Image.new("RGB", (3, 2), (1, 2, 3))
        assert images_module._to_rgb(plain, "<image 1>") is not plain


def _rescale_as_before(im: Image.Image) -> np.ndarray:
    """The rescale as it was, over the whole image in float64 (the reference)."""
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
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def test_banded_rescale_equals_the_whole_image_rescale(monkeypatch) -> None:
    # Bands of 7 pixels over 13 x 5 images: bands of one row, the last one short.
    monkeypatch.setattr(images_module, "_BAND_PIXELS", 7)
    rng = np.random.default_rng(0)
    shape = (13, 5)
    arrays = {
        "I;16 full range": rng.integers(0, 65536, shape, dtype=np.uint16),
        "I within 16 bits": rng.integers(0, 65536, shape).astype(np.int32),
        "I signed, stretched": rng.integers(-2**31, 2**31 - 1, shape, dtype=np.int32),
        "F in [0, 1]": rng.random(shape, dtype=np.float32),
        "F stretched": (rng.random(shape) * 1000 - 300).astype(np.float32),
        "I constant": np.full(shape, 7, np.int32),
    }
    for name, array in arrays.items():
        im = Image.fromarray(array)
        got = np.asarray(images_module._grayscale_to_8bit(im))
        assert got.shape == shape and np.array_equal(got, _rescale_as_before(im)), name


# Runs in a fresh interpreter, forking one child per case so that each peak (ru_maxrss, from
# os.wait4) starts from the same imported state; a child may use at most 2 GiB more address space.
_DECODE_PEAK_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    from hybridcls.data import Source
    from hybridcls.data.datasets import ImageDataset

    vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
    peaks = {}
    for name, path in json.loads(sys.argv[1]).items():
        pid = os.fork()
        if pid == 0:
            status = 3
            try:
                resource.setrlimit(resource.RLIMIT_AS, (vm + 2 ** 31, vm + 2 ** 31))
                sample = ImageDataset([Source(path)], transform=lambda im: im.size)[0]
                print(json.dumps({name: [sample.image, sample.error]}), flush=True)
                status = 0
            finally:
                os._exit(status)
        _, status, usage = os.wait4(pid, 0)
        peaks[name] = usage.ru_maxrss if status == 0 else None
    print(json.dumps({"peaks": peaks}))
""")

#: Decoding a 16-bit grayscale image may take, beyond decoding the same image in 8 bits, the
#: 16-bit decoded image itself (2 bytes a pixel) and the rescale's bands (a few times 8 MiB):
#: 2 bytes a pixel + 64 MiB, in KiB. Rescaling the whole image in float64 took 24 bytes a pixel
#: more (3.4 GB for 10,000 x 10,000; 460 MiB for the 4,000 x 4,000 image here).
SIXTEEN_BIT_SIDE = 4000
SIXTEEN_BIT_BOUND_KIB = (2 * SIXTEEN_BIT_SIDE**2 + 64 * 2**20) // 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc and ru_maxrss in KiB")
def test_decoding_memory_near_the_limits(tmp_path: Path) -> None:
    files = {
        "small": make_gray_ramp_png(tmp_path, 64, 64, name="small.png"),
        # the user's case: 1 x 170,000,000 (a 0.3 MB file here) peaked at 4.8 GB
        "strip": make_gray_ramp_png(tmp_path, 1, 170_000_000, name="strip.png"),
        "8-bit": make_gray_ramp_png(tmp_path, SIXTEEN_BIT_SIDE, SIXTEEN_BIT_SIDE, name="g8.png"),
        "16-bit": make_gray_ramp_png(tmp_path, SIXTEEN_BIT_SIDE, SIXTEEN_BIT_SIDE, bit_depth=16,
                                     name="g16.png"),
    }
    run = subprocess.run(
        [sys.executable, "-c", _DECODE_PEAK_SCRIPT, json.dumps({k: str(v) for k, v in files.items()})],
        cwd=TESTS.parent, capture_output=True, text=True, check=True, timeout=600,
    )
    lines = [json.loads(line) for line in run.stdout.strip().splitlines()]
    rows = {k: v for line in lines[:-1] for k, v in line.items()}
    peaks = lines[-1]["peaks"]
    side = SIXTEEN_BIT_SIDE
    assert rows == {
        "small": [[64, 64], None],
        "strip": [None, ("side too long: 1 x 170000000 pixels, a side above the limit of 65535 "
                         "(hybridcls.data.DEFAULT_MAX_SIDE)")],
        "8-bit": [[side, side], None],
        "16-bit": [[side, side], None],
    }
    assert None not in peaks.values(), peaks
    # Refused from the header: no more than opening a 64 x 64 image (16 MiB of noise allowed).
    assert peaks["strip"] - peaks["small"] < 16 * 1024, peaks
    assert peaks["16-bit"] - peaks["8-bit"] <= SIXTEEN_BIT_BOUND_KIB, peaks


def test_sixteen_bit_and_eight_bit_ramps_decode_alike(tmp_path: Path) -> None:
    # The factory's 16-bit ramp holds each 8-bit grey times 257: the same picture once rescaled.
    a = load_image(make_gray_ramp_png(tmp_path, 300, 3, name="a.png"))
    b = load_image(make_gray_ramp_png(tmp_path, 300, 3, bit_depth=16, name="b.png"))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a)[0, 255:258, 0].tolist() == [255, 0, 1]


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


# ------------------------------------------------------------------ reduced-scale decoding (issue 15)

def _eval_pixels(image: Image.Image) -> np.ndarray:
    """ConvNeXt-Tiny's timm eval view (shorter side to 235 = floor(224 / 0.95), centre crop 224)."""
    from hybridcls.engine import timm_view

    view = timm_view({"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.95,
                      "crop_mode": "center", "mean": (0.5,) * 3, "std": (0.5,) * 3})
    return view.pixels(image).numpy().astype(np.int16)


@pytest.fixture(scope="module")
def camera_jpeg(tmp_path_factory) -> Path:
    """A 4000 x 3000 photo-like JPEG (gradients, a disc, noise), as a 12-megapixel camera writes."""
    from hybridcls.bench.speed import write_jpegs

    return write_jpegs(tmp_path_factory.mktemp("camera"), 1, size=(4000, 3000), seed=3)[0]


@pytest.mark.parametrize(("target", "size"), [
    # the smallest of 1/1, 1/2, 1/4, 1/8 keeping both sides >= 2 * target: 3000 / 4 = 750 >= 470
    (235, (1000, 750)), (100, (500, 375)), (375, (1000, 750)), (376, (2000, 1500)), (751, (4000, 3000)),
    (None, (4000, 3000))])
def test_a_large_jpeg_decodes_at_the_smallest_scale_twice_the_target_side(camera_jpeg, target, size):
    from hybridcls.data import DRAFT_REDUCING_GAP

    assert DRAFT_REDUCING_GAP == 2
    image = load_image(camera_jpeg, target_side=target)
    assert image.mode == "RGB" and image.size == size
    assert decode_image_bytes(camera_jpeg.read_bytes(), "camera.jpg", target_side=target).size == size


def test_a_draft_decoded_camera_jpeg_gives_the_full_decodes_pixels_after_the_resize(camera_jpeg):
    full = _eval_pixels(load_image(camera_jpeg))
    small = _eval_pixels(load_image(camera_jpeg, target_side=235))
    diff = np.abs(small - full)
    # libjpeg's 1/4-scale IDCT averages 4 x 4 blocks; the antialiased bicubic resize that follows
    # still reduces 750 -> 235 (3.2x), so the two differ by a fraction of a level on average.
    assert diff.mean() < 1.0 and diff.max() <= 16, (diff.mean(), diff.max())


def test_reduced_decoding_keeps_orientation_colour_modes_and_leaves_other_formats_whole(tmp_path):
    from imagefactory import make_exif_rotated_jpeg

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees
    big.save(tmp_path / "sideways.jpg", quality=90, exif=exif)
    big.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    big.convert("L").save(tmp_path / "grey.jpg", quality=90)
    big.save(tmp_path / "big.png")
    expected = {"sideways.jpg": (300, 400), "cmyk.jpg": (400, 300), "grey.jpg": (400, 300),
                "big.png": (1600, 1200)}  # 1/4 keeps 300 >= 2 * 150; Pillow scales JPEG only
    for name, size in expected.items():
        full, small = load_image(tmp_path / name), load_image(tmp_path / name, target_side=150)
        assert small.mode == "RGB" and small.size == size, name
        # the same picture, turned and converted alike: compared at a common small size
        a = np.asarray(full.resize((80, 60) if size[0] > size[1] else (60, 80), Image.Resampling.BOX), np.float64)
        b = np.asarray(small.resize(a.shape[1::-1], Image.Resampling.BOX), np.float64)
        assert np.abs(a - b).mean() < 3.0, name
    corner = make_exif_rotated_jpeg(tmp_path)  # 20 px short side < 2 * 11: whole, upright
    assert load_image(corner, target_side=11).size == load_image(corner).size == (40, 20)
    assert load_image(corner, target_side=5).size == (20, 10)  # 1/2 keeps 10 >= 2 * 5, upright


def test_real_photos_decode_at_a_reduced_scale_to_nearly_the_same_view(photos_dir: Path) -> None:
    photos = [p for p in sorted(photos_dir.glob("*.jpg")) if "truncated" not in p.name]
    assert len(photos) >= 10
    reduced = 0
    for path in photos:
        full, small = load_image(path), load_image(path, target_side=235)
        smallest = min(full.size)
        # the largest of 1, 2, 4, 8 that keeps the shorter side >= 470
        scale = max(s for s in (1, 2, 4, 8) if -(-smallest // s) >= 470)
        assert small.size == (-(-full.width // scale), -(-full.height // scale)), path.name
        reduced += scale > 1
        diff = np.abs(_eval_pixels(small) - _eval_pixels(full))
        assert diff.mean() < 1.0 and diff.max() <= 32, (path.name, diff.mean(), diff.max())
    assert reduced >= 8  # the 2048 x 1536 camera-trap photos and the 3072 x 1728 one
