"""Resizing stays bounded by the towers' input size whatever the aspect ratio (issue 12).

A 1 x 16000 strip, resized "shorter side to 256" by timm's eval transform, would become
256 x 4,096,000 pixels (3.1 GB) for a 224 x 224 crop; a squash to 224 x 224 of a 1 x 16,000,000
strip precomputes 0.5 GB of filter weights. Every eval transform of the package starts with a
step that cuts or box-reduces images longer than 16:1, and leaves ordinary images exactly as
they were.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision import transforms
from torchvision.transforms import Compose

from hybridcls.data import (
    MAX_ASPECT_RATIO,
    CentreCropAspect,
    ReduceLongSide,
    bound_aspect,
    resize_side,
)
from hybridcls.data.aspect import bound_step
from hybridcls.engine import open_clip_view, timm_view
from hybridcls.supervised import build_eval_transform

REPO_ROOT = Path(__file__).resolve().parents[1]  # the subprocess imports this checkout's code
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# A ViT-B-32-like supervised config: resize the shorter side to floor(224 / 0.875) = 256, crop 224.
DATA_CONFIG = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": list(MEAN),
               "std": list(STD), "crop_pct": 0.875, "crop_mode": "center"}


def _timm(**kw):
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875, **kw}
    return timm.data.create_transform(**cfg, is_training=False)


# The eval geometries timm and open_clip build: name -> (untouched transform, (h, w) the shorter
# side is resized to, None for the others).
GEOMETRIES = {
    "timm center": (lambda: _timm(), (256, 256)),
    "timm center 224x320": (lambda: _timm(input_size=(3, 224, 320), crop_pct=1.0), (224, 320)),
    "timm squash": (lambda: _timm(crop_mode="squash"), None),
    "timm border": (lambda: _timm(crop_mode="border"), None),
    "open_clip shortest": (lambda: image_transform(224, is_train=False), (224, 224)),
    "open_clip longest": (lambda: image_transform(224, is_train=False, resize_mode="longest"), None),
    "open_clip squash": (lambda: image_transform(224, is_train=False, resize_mode="squash"), None),
}
SHORTER = [name for name, (_, target) in GEOMETRIES.items() if target is not None]


def _clip_cfg(mode: str) -> dict:
    return {"size": 224, "mode": "RGB", "mean": MEAN, "std": STD, "interpolation": "bicubic",
            "resize_mode": mode, "fill_color": 0}


# The engine's view of each geometry (timm's prefetcher transform, from open_clip's preprocess_cfg
# for CLIP towers): what runs on the device decoder's tensors.
ENGINE_VIEWS = {
    "timm center": lambda: timm_view({**DATA_CONFIG, "crop_mode": "center"}),
    "timm center 224x320": lambda: timm_view({**DATA_CONFIG, "input_size": (3, 224, 320), "crop_pct": 1.0}),
    "open_clip shortest": lambda: open_clip_view(_clip_cfg("shortest")),
}
# Photos, panoramas up to the 16:1 limit itself, both orientations, and a tiny square.
ORDINARY = [(640, 480), (480, 640), (1920, 1080), (1080, 1920), (400, 200), (200, 400),
            (900, 100), (1600, 100), (100, 1600), (33, 33)]
STRIPS = [(1, 16000), (16000, 1)]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _chw(image: Image.Image) -> torch.Tensor:
    """``uint8 [3, H, W]``, as the device decoder hands images to the geometry."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def _geometry_sizes(transform, image) -> list[int]:
    """Pixels of the input and of every image the steps before ``ToTensor`` build."""
    sizes = []
    for step in transform.transforms:
        w, h = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
        sizes.append(w * h)
        if type(step).__name__ in ("ToTensor", "MaybeToTensor", "Normalize"):
            break
        image = step(image)
    return sizes


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("size", ORDINARY, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ordinary_aspect_ratios_give_the_untouched_transforms_tensors(name, size):
    untouched = GEOMETRIES[name][0]()
    image = _noise(*size)
    assert torch.equal(bound_aspect(untouched)(image), untouched(image))


@pytest.mark.parametrize("size", [(640, 480), (100, 1600)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_ordinary_tensors_of_the_device_decoder_are_untouched(size):
    # decode="device" runs the same geometry on uint8 CHW tensors
    geometry = ENGINE_VIEWS["timm center"]().geometry
    assert type(geometry.transforms[0]) is CentreCropAspect
    untouched = Compose(_timm().transforms[:2])  # timm's Resize and CenterCrop alone
    x = _chw(_noise(*size))
    assert torch.equal(geometry(x), untouched(x))


@pytest.mark.parametrize("name", ["timm center", "open_clip shortest"])
@pytest.mark.parametrize("size", [(40, 800), (800, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_20_to_1_strip_shows_the_crop_the_same_source_pixels(name, size):
    # 40 px to 224 (open_clip) is x5.6 and 800 px becomes 4480; the 16:1 cut (640 px, 80 off each end)
    # becomes 3584, so scale and centre are the same; for timm (256) likewise (x6.4, 5120 -> 4096).
    untouched = GEOMETRIES[name][0]()
    image = _gradient(*size)
    assert torch.equal(bound_aspect(untouched)(image), untouched(image))


@pytest.mark.parametrize("name", SHORTER)
@pytest.mark.parametrize("size", STRIPS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["pil", "tensor"])
def test_the_largest_image_a_strip_builds_is_16_times_the_shorter_side_squared(name, size, kind):
    untouched, (th, tw) = GEOMETRIES[name]
    untouched = untouched()
    if kind == "pil":
        image, transform = _gradient(*size), bound_aspect(untouched)
    else:  # as the device decoder hands it, through the engine's geometry
        image = _chw(_gradient(*size))
        transform = ENGINE_VIEWS[name]().geometry
    sizes = _geometry_sizes(transform, image)
    # Cut to 16:1, then the short side to S (tw for a tall strip, th for a wide one): S x 16 S;
    # unbounded it would be S x 16000 S.
    side = tw if size[0] < size[1] else th
    assert max(sizes) == int(MAX_ASPECT_RATIO) * side * side
    out = transform(image)
    assert tuple(out.shape[-2:]) == ((224, 320) if "320" in name else (224, 224))


@pytest.mark.parametrize("name", ["timm squash", "open_clip squash"])
@pytest.mark.parametrize("size", [(3, 16000), (16000, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_squashed_strip_is_box_reduced_first_and_stays_within_3_levels(name, size):
    untouched = GEOMETRIES[name][0]()
    transform = bound_aspect(untouched)
    assert isinstance(transform.transforms[0], ReduceLongSide)
    # 16000 // (16 * 224 or 256) = 4 (open_clip) or 3 (timm): the resize reads 4000 or 5334 px
    long = max(transform.transforms[0](_noise(*size)).size)
    assert long == (5334 if name.startswith("timm") else 4000)
    image = _noise(*size)
    levels = (transform(image) - untouched(image)).abs() * torch.tensor(STD)[:, None, None] * 255
    assert float(levels.max()) <= 3.0 + 1e-4  # of 255, on noise (see hybridcls.data.aspect)


def test_reduce_long_side_is_pillows_box_reduce_on_tensors_too():
    image = _noise(5, 50_000)
    reduce = ReduceLongSide(100)  # k = 50000 // 1600 = 31, a short last box of 50000 - 31 * 1612 = 28
    pil = reduce(image)
    assert pil.size == (5, 1613) and np.array_equal(np.asarray(pil), np.asarray(image.reduce((1, 31))))
    tensor = reduce(_chw(image))
    assert tensor.dtype == torch.uint8
    # Pillow rounds its fixed-point mean; the tensor path rounds the float mean: at most 1 level apart
    assert int((tensor.int() - _chw(pil).int()).abs().max()) <= 1
    assert tuple(reduce(_chw(image).transpose(1, 2)).shape) == (3, 5, 1613)  # the wide strip
    # ordinary images and strips too short to need it come back as they are
    photo = _noise(640, 480)
    assert reduce(photo) is photo and reduce(_noise(3, 3000)).size == (3, 3000)


@pytest.mark.parametrize("name", ["timm border", "open_clip longest"])
@pytest.mark.parametrize("size", STRIPS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_strip_that_would_vanish_in_a_letterbox_is_a_one_pixel_line(name, size):
    untouched = GEOMETRIES[name][0]()
    image = Image.new("RGB", size, (250, 0, 0))
    with pytest.raises(ValueError, match="must be > 0"):  # the strip's short side rounds to 0 px
        untouched(image)
    out = bound_aspect(untouched)(image)
    red = (out[0] > out[1] + 1.0)  # normalised: far more red than green only on the strip
    lines = red.any(dim=0) if size[0] == 1 else red.any(dim=1)
    assert tuple(out.shape) == (3, 224, 224) and int(lines.sum()) == 1


def test_the_step_each_geometry_gets():
    steps = {name: repr(bound_aspect(make()).transforms[0]) for name, (make, _) in GEOMETRIES.items()}
    assert steps == {
        "timm center": "CentreCropAspect(max_aspect=16.0)",
        "timm center 224x320": "CentreCropAspect(max_aspect=16.0)",
        "timm squash": "ReduceLongSide(size=(256, 256))",  # floor(224 / 0.875), then the crop
        # timm fits the longest side to 256: 2 * 256 - 1
        "timm border": "CentreCropAspect(max_aspect=511.0)",
        "open_clip shortest": "CentreCropAspect(max_aspect=16.0)",
        "open_clip longest": "CentreCropAspect(max_aspect=447.0)",
        "open_clip squash": "ReduceLongSide(size=(224, 224))",
    }
    # A crop wider than 10 times the resized short side needs the crop plus two filter reaches.
    assert bound_step(transforms.Resize(10), [transforms.CenterCrop((10, 120))]).max_aspect == 12.0 + 6.0
    # once only; nothing for a resize whose whole output is kept (no crop after it) or with max_size
    twice = bound_aspect(bound_aspect(_timm()))
    assert [type(t) for t in twice.transforms].count(CentreCropAspect) == 1
    assert bound_step(transforms.Resize(10), []) is None
    assert bound_step(transforms.Resize(10, max_size=20), [transforms.CenterCrop(10)]) is None


def test_centre_crop_aspect_cuts_around_the_centre():
    image = _gradient(3, 100)
    cut = CentreCropAspect(16)(image)
    assert cut.size == (3, 48)
    assert np.array_equal(np.asarray(cut), np.asarray(image)[26:74])  # (100 - 48) / 2 = 26
    x = torch.arange(100 * 3).reshape(1, 3, 100)
    assert torch.equal(CentreCropAspect(16)(x), x[..., 26:74])
    with pytest.raises(ValueError, match="max_aspect=0.5"):
        CentreCropAspect(0.5)


def test_every_eval_transform_of_the_package_is_bounded():
    from hybridcls.synth import TINY_CLIP_DIR
    from hybridcls.zeroshot import load_clip

    bundle = load_clip(f"local-dir:{TINY_CLIP_DIR}", device="cpu")
    for transform, side in ((build_eval_transform({"data_config": DATA_CONFIG}), 256), (bundle.preprocess, 32)):
        for size in STRIPS:
            assert max(_geometry_sizes(transform, _gradient(*size))) == 16 * side * side
        assert type(transform.transforms[0]) is CentreCropAspect


# Runs in a fresh interpreter: imports once, then forks one child per case, so every peak
# (``ru_maxrss`` of that child, from os.wait4) starts from the same imported state. Each child
# may use at most 2 GiB more address space, so a regression fails fast instead of taking the host.
_PEAK_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np, timm.data, torch
    from open_clip.transform import image_transform
    from PIL import Image
    from hybridcls.audit.pixels import ThumbnailTransform
    from hybridcls.engine import ViewsTransform, open_clip_view, timm_view
    from hybridcls.explain.overlay import thumbnail
    from hybridcls.supervised import build_eval_transform
    from hybridcls.train.config import TrainConfig
    from hybridcls.train.data import build_train_transform

    data_config = json.loads(sys.argv[1])
    sizes = json.loads(sys.argv[2])
    sup = build_eval_transform({"data_config": data_config})

    def views(sup_mode, clip_mode):  # what the engine decodes for its two towers
        sup = timm_view({**data_config, "crop_mode": sup_mode})
        clip = open_clip_view({"size": 224, "mode": "RGB", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                               "interpolation": "bicubic", "resize_mode": clip_mode, "fill_color": 0})
        return ViewsTransform([sup, clip])

    shorter = views("center", "shortest")  # timm's default and ViT-B-32's
    places = {
        "decoded image only": lambda im: None,
        "engine views, shorter side": shorter,
        "engine views, squash (SigLIP)": views("squash", "squash"),
        "engine views, letterbox": views("border", "longest"),
        "engine views on device tensors":
            lambda im: [v.pixels(torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous())
                        for v in shorter.views],
        "training eval transform": sup,
        "training train transform": build_train_transform(data_config, TrainConfig()),
        "training train transform, crop_scale (0.08, 1)":
            build_train_transform(data_config, TrainConfig(crop_scale=(0.08, 1.0))),
        "audit thumbnail": ThumbnailTransform(),
        "explain thumbnail": lambda im: thumbnail(im, side=96),
    }
    vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
    peaks = {}
    for place, transform in places.items():
        for w, h in sizes:
            if "device" in place and max(w, h) > 65535:
                continue  # a JPEG side is at most 65,535 px: the device decoder never sees more
            pid = os.fork()
            if pid == 0:  # the child: any failure (out of memory, an error) is exit status 3
                status = 3
                try:
                    resource.setrlimit(resource.RLIMIT_AS, (vm + 2 ** 31, vm + 2 ** 31))
                    transform(Image.new("RGB", (w, h), (200, 30, 30)))
                    status = 0
                finally:
                    os._exit(status)
            _, status, usage = os.wait4(pid, 0)
            peaks[f"{place} {w}x{h}"] = usage.ru_maxrss if status == 0 else None
    print(json.dumps(peaks))
""")

#: Strips and the square each is compared with: the case's 1 x 16000 against 64 x 64, and a
#: 1 x 16,000,000 strip against a square of as many pixels, where a squash resize in one step
#: precomputes 0.5 GB of filter weights and the audit's thumbnail 0.1 GB.
PEAK_CASES = {(1, 16000): (64, 64), (16000, 1): (64, 64),
              (1, 16_000_000): (4000, 4000), (16_000_000, 1): (4000, 4000)}
#: How much more a place's work on a strip may take than on its square, beyond decoding each
#: (Pillow keeps a pointer per row, so a tall strip's decoded image alone is about 3 times a
#: square's), in KiB. The bounded pipeline's largest image for a 1 x 16000 strip is 256 x 4096
#: RGB: 3 MiB as PIL uint8, 12 MiB as the float tensor the tensor resize (device decoder) works
#: in, each pass; unbounded it is 256 x 4,096,000 (3 GiB, 12 GiB in float). 64 MiB leaves room
#: for allocator noise.
PEAK_BOUND_KIB = 64 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc and ru_maxrss in KiB")
def test_peak_memory_of_a_strip_stays_near_a_squares():
    sizes = sorted(set(PEAK_CASES) | set(PEAK_CASES.values()))
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, json.dumps(DATA_CONFIG), json.dumps(sizes)],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=600)
    peaks = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(peaks) == 10 * 6 - 2  # ten places, six sizes; the device path skips the two long strips

    def work(place: str, size: tuple[int, int]) -> int | None:
        peak = peaks[f"{place} {size[0]}x{size[1]}"]
        return None if peak is None else peak - peaks[f"decoded image only {size[0]}x{size[1]}"]

    over = {}
    for key in peaks:
        place, size = key.rsplit(" ", 1)
        strip = tuple(int(v) for v in size.split("x"))
        if strip in PEAK_CASES and f"{place} {PEAK_CASES[strip][0]}x{PEAK_CASES[strip][1]}" in peaks:
            mine, square = work(place, strip), work(place, PEAK_CASES[strip])
            if mine is None or mine - square > PEAK_BOUND_KIB:
                over[key] = (mine, square)
    assert over == {}, f"strips over the bound (KiB beyond decoding, strip and square; None: failed): {over}"


def test_real_photos_give_the_untouched_transforms_tensors(photos_dir):
    from hybridcls.data import load_image
    from hybridcls.errors import ImageDecodeError

    checked = 0
    for path in sorted(photos_dir.glob("*.jpg")):
        try:
            image = load_image(path)
        except ImageDecodeError:
            continue  # the broken files of the set
        for name in ("timm center", "timm squash", "open_clip shortest", "open_clip squash"):
            untouched = GEOMETRIES[name][0]()
            assert torch.equal(bound_aspect(untouched)(image), untouched(image)), (path.name, name)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (224, 224), (33, 90)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_engine_view_of_an_open_clip_tower_is_open_clips_preprocess(mode, size):
    # issue 13: the view is built by timm from open_clip's preprocess_cfg, not by taking open_clip's
    # transform apart; normalised, it gives open_clip's own tensor
    view = open_clip_view(_clip_cfg(mode))
    reference = image_transform(224, is_train=False, mean=MEAN, std=STD, resize_mode=mode)
    image = _noise(*size)
    np.testing.assert_allclose(view.normalise(view.pixels(image)).numpy(), reference(image).numpy(),
                               rtol=0, atol=1e-5)


def test_the_engine_view_of_a_timm_model_is_timms_eval_transform():
    view = timm_view(DATA_CONFIG)
    image = _noise(640, 480)
    np.testing.assert_allclose(view.normalise(view.pixels(image)).numpy(), _timm()(image).numpy(),
                               rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the side a resize needs (issue 15)

def test_resize_side_is_the_longest_side_each_eval_resize_makes():
    import math

    import open_clip

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    # timm: shorter side to floor(224 / crop_pct) before the 224 crop (ConvNeXt-Tiny's 0.95: 235)
    assert resize_side(timm_view({**cfg, "crop_pct": 0.95}).geometry) == math.floor(224 / 0.95) == 235
    assert resize_side(timm_view({**cfg, "crop_pct": 0.875, "crop_mode": "squash"}).geometry) == 256
    assert resize_side(timm_view({**cfg, "crop_pct": 1.0, "crop_mode": "border"}).geometry) == 224
    # open_clip's ViT-B-32: shorter side to 224; a squash to (h, w) needs its longer side
    vit = open_clip.get_model_preprocess_cfg(open_clip.create_model("ViT-B-32", pretrained=None))
    assert resize_side(open_clip_view(vit).geometry) == 224
    assert resize_side(transforms.Compose([transforms.Resize((200, 300)), transforms.ToTensor()])) == 300
    # what another step before the resize, or a random crop, would see of a reduced image is unknown
    assert resize_side(transforms.Compose([transforms.CenterCrop(300), transforms.Resize(224)])) is None
    assert resize_side(transforms.Compose([transforms.RandomResizedCrop(224)])) is None
    assert resize_side(transforms.Compose([transforms.Resize(224, max_size=300)])) is None
    assert resize_side(lambda image: image) is None
