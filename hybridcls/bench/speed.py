"""``hybridcls bench speed``: how fast the hybrid runs, from JPEG files to the output file.

In one run, on the same JPEG files it writes (realistic content and size,
500x375 by default), with random weights so it runs offline:

- model-only: both towers over pre-decoded tensors (the ceiling);
- end-to-end: files -> decode -> both towers -> gate -> CSV, for the full
  hybrid and for the cascade (CLIP on a share of the images; the cascade also
  searches an AwA2-sized index of backbone features, so that its cost is counted);
- pipeline efficiency: end-to-end / model-only;
- the naive baseline a user would write by hand: timm over the folder, then
  open_clip over the folder again, each decoding every file itself;
- GMACs per image (``torch.utils.flop_counter.FlopCounterMode``) and TFLOP/s achieved;
- time to the first prediction with a cold and with a warm text cache.

Timings are figures to report, never to assert.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from hybridcls.cache import atomic_path, atomic_write_json
from hybridcls.data import expand_inputs, load_image
from hybridcls.gate import Gate, GateCalibration, max_softmax
from hybridcls.hybrid import HybridClassifier
from hybridcls.index import EmbeddingIndex
from hybridcls.outputs import open_writer
from hybridcls.zeroshot.defaults import MODEL_PREFIXES

__all__ = ["DEFAULT_MODELS", "QUICK_MODELS", "SpeedReport", "run_speed", "write_jpegs"]

DEFAULT_MODELS = ("convnext_tiny", "ViT-B-32")
#: ``--quick``: tiny towers for a CI-sized run (``tiny``: a random 32 px CLIP).
QUICK_MODELS = ("test_convnext", "tiny")
_N_CLASSES, _N_SEEN = 50, 40
#: Rows of the cascade's backbone-feature index: about AwA2's 40 seen classes' training split.
_CASCADE_INDEX_ROWS = 26_000
# ``tiny``: a 32 px CLIP small enough for a CI run (random weights, like every model here).
_TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_jpegs(folder: str | Path, n: int, *, size: tuple[int, int] = (500, 375), seed: int = 0,
                quality: int = 90) -> list[Path]:
    """Write ``n`` JPEG files that compress like photos: smooth gradients, shapes and noise.

    Example:
        >>> paths = write_jpegs("bench-images", 4)  # doctest: +SKIP
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(0, 255, 3)
        img = c + 120 * (a * (xx[..., None] / w) + b * (yy[..., None] / h))
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(h / 8, h / 3)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 12, img.shape)
        path = folder / f"img_{i:05d}.jpg"
        with atomic_path(path) as tmp:
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=quality)
        paths.append(path)
    return paths


@dataclass
class SpeedReport:
    """Figures of one ``bench speed`` run (images per second unless named otherwise)."""

    rows: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = ["| figure | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in self.rows.items()]
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> None:
        atomic_write_json(path, asdict(self))


def _save_random_clip(name: str, folder: Path) -> str:
    """A random-weights CLIP saved in ``local-dir:`` layout, so the text cache has a fingerprint."""
    import open_clip
    from safetensors.torch import save_file

    if name.startswith(MODEL_PREFIXES):
        return name
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "open_clip_model.safetensors").is_file():
        if name == "tiny":
            model_cfg = dict(_TINY_CLIP)
            model = open_clip.CLIP(**model_cfg)
            preprocess = {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
        else:
            model_cfg = open_clip.get_model_config(name)
            model = open_clip.create_model(name, pretrained=None)
            preprocess = open_clip.get_model_preprocess_cfg(model)
        cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
        atomic_write_json(folder / "open_clip_config.json", cfg, indent=None)
        with atomic_path(folder / "open_clip_model.safetensors") as tmp:
            save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                      str(tmp))
    return f"local-dir:{folder}"


def _save_random_run(model: str, image_size: int, folder: Path) -> Path:
    from hybridcls.supervised import build_model
    from hybridcls.supervised.checkpoint import make_checkpoint_config, save_checkpoint

    if not (folder / "model.safetensors").is_file():
        classes = [f"class {i}" for i in range(_N_SEEN)]
        net, data_cfg = build_model(model, _N_SEEN, head="linear", weights_source="none",
                                     image_size=image_size)
        cfg = make_checkpoint_config(net, model_name=model, classes=classes, data_config=data_cfg,
                                     head="linear", dropout=0.0, hidden_dim=512, weights={"source": "none"})
        save_checkpoint(folder, net, cfg)
    return folder


def _best_of(fns: dict[str, Callable[[], None]], repeat: int = 1) -> dict[str, float]:
    """Seconds of each function's fastest of ``repeat`` runs, after one warm-up run each.

    The functions take turns (round robin), so that a burst of load from
    elsewhere on the machine slows one round of all of them rather than all
    the runs of one: their ratios (pipeline efficiency, speed-ups) stay fair.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _naive(run_dir: Path, clip_id: str, paths: Sequence[Path], batch_size: int, device: torch.device,
           text: torch.Tensor) -> None:
    """What a user writes by hand: timm over the folder, then open_clip over it again."""
    import open_clip

    from hybridcls.supervised import build_eval_transform, load_checkpoint

    model, config = load_checkpoint(run_dir, device)
    tf = build_eval_transform(config)
    clip, _, preprocess = open_clip.create_model_and_transforms(clip_id, device=device)
    # The supervised model is a timm backbone and ``tf`` is timm's own eval transform.
    model.eval()
    clip.eval()
    for transform, fwd in ((tf, model), (preprocess, lambda x: clip.encode_image(x) @ text)):
        with torch.inference_mode():
            for i in range(0, len(paths), batch_size):
                x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
                fwd(x.to(device))


def _gmacs(clf: HybridClassifier, image_size: int) -> tuple[float, float]:
    """GMACs per image of the supervised tower and of the CLIP image tower."""
    out = []
    clip_size = clf.tower_.bundle.model.visual.image_size
    clip_size = clip_size[0] if isinstance(clip_size, (tuple, list)) else clip_size
    for fn, size in ((clf.supervised_.forward_with_features, image_size),
                     (clf.tower_.bundle.model.encode_image, clip_size)):
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            fn(torch.zeros(1, 3, size, size, device=clf.device_))
        out.append(counter.get_total_flops() / 2e9)
    return out[0], out[1]


def run_speed(out_dir: str | Path, *, device: str = "cpu", batch_size: int = 32, images: int = 64,
              models: Sequence[str] = DEFAULT_MODELS, image_size: int = 224, workers: int = 2,
              size: tuple[int, int] = (500, 375), compile: bool = False, gpu_decode: bool = False,
              cascade_share: float = 0.6, templates: Any = None, threads: int | None = None,
              repeat: int = 1) -> SpeedReport:
    """Measure every figure of the module docstring in one process, on the same files.

    Args:
        out_dir: Working folder (images, random checkpoints, caches, ``speed.json``).
        device: ``cpu`` or ``cuda``.
        batch_size: Images per batch.
        images: How many JPEG files to write and read.
        models: ``(timm model, open_clip model)``; ``tiny`` = the synthetic world's CLIP.
        image_size: Supervised input size.
        workers: Decoding processes.
        size: Width and height of the JPEG files.
        compile: ``torch.compile`` both towers.
        gpu_decode: Decode JPEG files on the GPU.
        cascade_share: Share of images the cascade sends to CLIP (random weights
            have no calibrated threshold; report the share calibration gives,
            60% on both synthetic worlds).
        templates: Templates for the text cache timing (None = the default 80).
        threads: ``torch.set_num_threads`` (None = leave it).
        repeat: Timed runs of each throughput figure (the fastest counts), in
            turns, after one warm-up run each.

    Example:
        >>> print(run_speed("bench-speed", models=QUICK_MODELS, images=16).markdown())  # doctest: +SKIP
    """
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sup_name, clip_name = models
    folder = out / f"jpeg_{size[0]}x{size[1]}_{images}"
    if not folder.is_dir():
        write_jpegs(folder, images, size=size)
    sources = expand_inputs([folder])
    paths = [Path(s.path) for s in sources]
    run_dir = _save_random_run(sup_name, image_size, out / f"run_{sup_name}_{image_size}")
    clip_id = _save_random_clip(clip_name, out / f"clip_{clip_name}")
    prompts = [f"class {i}" for i in range(_N_CLASSES)]
    rows: dict[str, float] = {}

    def load(cache: Path, **kw: Any) -> HybridClassifier:
        return HybridClassifier(clip_model=clip_id, clip_pretrained=None, prompts=prompts, templates=templates,
                                device=device, batch_size=batch_size, workers=workers, cache_dir=cache,
                                compile=compile, decode="device" if gpu_decode else "cpu", **kw
                                ).load_run(run_dir)

    # Time to the first prediction: load both towers, build (cold) or read (warm) the text matrix.
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold", "warm"):
            t = time.perf_counter()
            clf = load(Path(cache))
            manual = GateCalibration(score="clip_margin", mode="hard", threshold=0.0, method="manual")
            clf.gate_ = Gate.from_calibration(manual, n_seen=clf.n_seen_)
            next(iter(clf.rows(sources[:1])))
            rows[f"first prediction, {label} text cache (s)"] = time.perf_counter() - t
    rows["warm-start speed-up (cold / warm)"] = (rows["first prediction, cold text cache (s)"]
                                                 / rows["first prediction, warm text cache (s)"])
    n = len(sources)
    engine = clf.engine_

    # Model-only: both towers over tensors decoded beforehand.
    views = [engine.decoded_views(load_image(p)) for p in paths]
    batches = [tuple(torch.stack(v) for v in zip(*views[i:i + batch_size])) for i in range(0, n, batch_size)]

    def models_only() -> None:
        for b in batches:
            engine.run_supervised(b)
            engine.run_clip(b)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    def end_to_end(cascade: bool, name: str) -> None:
        clf.set_params(cascade=cascade)
        before = engine.clip_images_encoded
        with open_writer(out / name, "csv", topk=5, extra_columns=clf.EXTRA_COLUMNS) as writer:
            for r in clf.rows(sources):
                writer.write_many(r)
        clip_share[cascade] = (engine.clip_images_encoded - before) / n

    clip_share: dict[bool, float] = {}
    # the cascade threshold reads the supervised tower only: no need to run CLIP for it
    sup = [b.outputs for b in engine.iter_batches(sources, clip="none") if b.ok]
    msp = max_softmax(np.concatenate([b.sup_logits for b in sup]))
    # Random weights make feature distances meaningless: the threshold lets every image
    # pass (the MSP alone sets the share), while the search itself runs and is timed.
    dim = sup[0].sup_features.shape[1]
    backbone = EmbeddingIndex().add(
        np.random.default_rng(0).standard_normal((_CASCADE_INDEX_ROWS, dim), dtype=np.float32))
    clf.gate_ = Gate.from_calibration(
        clf.gate_.calibration_.replace(cascade_msp=float(np.quantile(msp, cascade_share)), cascade_distance=2.0),
        n_seen=clf.n_seen_, backbone_index=backbone)
    text = clf.tower_.text_features
    seconds = _best_of({
        "model-only (img/s)": models_only,
        "end-to-end, full hybrid (img/s)": lambda: end_to_end(False, "full.csv"),
        "end-to-end, cascade (img/s)": lambda: end_to_end(True, "cascade.csv"),
        "naive baseline (img/s)": lambda: _naive(run_dir, clip_id, paths, batch_size, clf.device_, text),
    }, repeat)
    rows.update({name: n / t for name, t in seconds.items()})
    rows["pipeline efficiency (end-to-end / model-only)"] = rows["end-to-end, full hybrid (img/s)"] / rows[
        "model-only (img/s)"]
    rows["cascade: share of images CLIP ran on"] = clip_share[True]
    rows["speed-up over naive, full hybrid"] = rows["end-to-end, full hybrid (img/s)"] / rows["naive baseline (img/s)"]
    rows["speed-up over naive, cascade"] = rows["end-to-end, cascade (img/s)"] / rows["naive baseline (img/s)"]
    sup_g, clip_g = _gmacs(clf, image_size)
    rows["GMACs per image, supervised"] = sup_g
    rows["GMACs per image, CLIP image tower"] = clip_g
    rows["achieved TFLOP/s (model-only)"] = 2 * (sup_g + clip_g) * 1e9 * rows["model-only (img/s)"] / 1e12
    info = {"device": device, "batch_size": batch_size, "images": n, "models": list(models),
            "image_size": image_size, "jpeg_size": list(size), "workers": workers, "compile": compile,
            "gpu_decode": gpu_decode, "threads": torch.get_num_threads(), "cascade_share": cascade_share, "repeat": repeat,
            "templates": "default (80)" if templates is None else len(templates),
            "classes": _N_CLASSES, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    report = SpeedReport(rows, info)
    report.to_json(out / "speed.json")
    return report
