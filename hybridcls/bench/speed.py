"""``hybridcls bench speed``: how fast the hybrid runs, from JPEG files to the output file.

In one run, on the same JPEG files it writes (realistic content; 500x375 and
camera-size 4000x3000 by default), with random weights so it runs offline,
every figure timed in turns with the others (so that load from elsewhere on
the machine slows a round of all of them, not one figure):

- the machine's own limit: dense matrix products (``torch.matmul``, 2048 x
  2048) in float32, and in bfloat16 where the CPU computes it natively;
- each tower alone over pre-decoded tensors, per precision (``fp32`` and the
  run's, ``auto`` by default), with its TFLOP/s and its share of the limit of
  the type it computes in; model-only: both towers;
- end-to-end: files -> decode -> both towers -> gate -> CSV, per precision and
  JPEG size, for the full hybrid, float32 with every file decoded whole (the
  behaviour before reduced-scale decoding and reduced precision), and the
  cascade (CLIP on a share of the images; it also searches an AwA2-sized index
  of backbone features, so that its cost is counted);
- pipeline efficiency: end-to-end / model-only;
- the naive baseline a user would write by hand: timm over the folder, then
  open_clip over the folder again, each decoding every file itself;
- zero-shot alone: hybridcls's ``ZeroShotClassifier`` against a plain
  open_clip loop (``create_model_and_transforms``, ``build_zero_shot_classifier``,
  a PIL / ``DataLoader`` loop) and pybioclip's ``CustomLabelsClassifier`` when
  pybioclip is installed (an optional comparison, not a dependency), on the
  same files, with their top-1 agreement;
- the class-text matrix of the 50 classes built by open_clip's
  ``build_zero_shot_classifier`` and by hybridcls (trimmed prompts), and time
  to the first prediction with a cold and with a warm text cache;
- the weights fingerprint hashed, and read back from ``fingerprints.json``;
- GMACs per image (``torch.utils.flop_counter.FlopCounterMode``).

Timings are figures to report, never to assert.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from hybridcls.cache import FINGERPRINT_FILE, atomic_path, atomic_write_json
from hybridcls.data import expand_inputs, load_image
from hybridcls.device import cpu_native_bf16, resolve_device
from hybridcls.engine import InferenceEngine
from hybridcls.gate import Gate, GateCalibration, max_softmax
from hybridcls.hybrid import HybridClassifier
from hybridcls.index import EmbeddingIndex
from hybridcls.outputs import check_topk, open_writer
from hybridcls.runtime import RuntimeSettings
from hybridcls.zeroshot import ZeroShotClassifier
from hybridcls.zeroshot.defaults import MODEL_PREFIXES
from hybridcls.zeroshot.prompts import as_template_set
from hybridcls.zeroshot.text_classifier import build_text_classifier

__all__ = ["DEFAULT_MODELS", "DEFAULT_SIZES", "QUICK_MODELS", "SpeedReport", "run_speed", "write_jpegs"]

DEFAULT_MODELS = ("convnext_tiny", "ViT-B-32")
#: ``--quick``: tiny towers for a CI-sized run (``tiny``: a random 32 px CLIP).
QUICK_MODELS = ("test_convnext", "tiny")
#: JPEG sizes (width, height): a web photo, and a 12-megapixel camera photo.
DEFAULT_SIZES = ((500, 375), (4000, 3000))
_N_CLASSES, _N_SEEN = 50, 40
#: Rows of the cascade's backbone-feature index: about AwA2's 40 seen classes' training split.
_CASCADE_INDEX_ROWS = 26_000
#: Side of the square matrices of the machine's limit (2048: large enough for the CPU's peak),
#: and products per timed call (a timing of about a second on a 2-core CPU, not one of a tenth).
_MATMUL_SIDE = 2048
_MATMUL_PRODUCTS = 4
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


class _Files(Dataset):
    """The plain open_clip loop's dataset: open each file with PIL, open_clip's preprocess."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(Image.open(self.paths[i]).convert("RGB"))


def _plain_open_clip(model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                     classifier: torch.Tensor, paths: Sequence[Path], batch_size: int, workers: int,
                     device: torch.device) -> np.ndarray:
    """Zero-shot as a user writes it by hand with open_clip: top-1 class indices of ``paths``."""
    loader = DataLoader(_Files(paths, preprocess), batch_size=batch_size, num_workers=workers)
    top1 = []
    with torch.no_grad():
        for x in loader:
            features = torch.nn.functional.normalize(model.encode_image(x.to(device)), dim=-1)
            top1.append((100.0 * features @ classifier).argmax(dim=1).cpu())
    return torch.cat(top1).numpy()


def _bioclip(prompts: list[str], clip_id: str, device: torch.device) -> tuple[Any, str]:
    """pybioclip's ``CustomLabelsClassifier`` on the same model, or None and why not."""
    try:
        from bioclip import CustomLabelsClassifier
    except ImportError:
        return None, "not installed (pip install pybioclip)"
    try:
        return CustomLabelsClassifier(prompts, model_str=clip_id, device=device), ""
    except Exception as exc:  # noqa: BLE001 - an optional comparison: any failure is reported, not fatal
        return None, f"could not load the model: {type(exc).__name__}: {exc}"


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


def _matmul(dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """:data:`_MATMUL_PRODUCTS` ``_MATMUL_SIDE``-square matrix products in ``dtype`` (2 n^3 operations each)."""
    a, b = (torch.randn(_MATMUL_SIDE, _MATMUL_SIDE, device=device).to(dtype) for _ in range(2))

    def run() -> None:
        for _ in range(_MATMUL_PRODUCTS):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def _limit_dtypes(device: torch.device) -> dict[str, torch.dtype]:
    """The types whose matrix-product limit is measured: float32, and bfloat16 where native."""
    native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
              else device.type == "cpu" and cpu_native_bf16())
    return {"fp32": torch.float32, **({"bf16": torch.bfloat16} if native else {})}


def _tower_type(engine: InferenceEngine, tower: str) -> str | None:
    """The type a tower of ``engine`` multiplies in, as a key of :func:`_limit_dtypes` (None: int8)."""
    weights, autocast = engine.applied["weights"][tower], engine.applied["autocast"][tower]
    if weights == "int8 linear":
        return None
    if weights == "bfloat16" or autocast == "bfloat16":
        return "bf16"
    return "fp32" if autocast is None else autocast


def _fingerprint_seconds(path: str, cache_dir: str) -> float:
    """Seconds :func:`~hybridcls.cache.file_fingerprint` takes in a new process (no memo)."""
    code = ("import sys, time; from hybridcls.cache import file_fingerprint; t = time.perf_counter(); "
            "file_fingerprint(sys.argv[1], cache_dir=sys.argv[2]); print(time.perf_counter() - t)")
    # The child imports this hybridcls, wherever it was imported from.
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, path, cache_dir], capture_output=True, text=True,
                          check=True, env=env)
    return float(done.stdout.strip())


def _label(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def run_speed(out_dir: str | Path, *, device: str = "cpu", batch_size: int = 32, images: int = 64,
              models: Sequence[str] = DEFAULT_MODELS, image_size: int = 224, workers: int = 2,
              sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, precisions: Sequence[str] = ("fp32", "auto"),
              compile: bool = False, gpu_decode: bool = False, cascade_share: float = 0.6,
              templates: Any = None, threads: int | None = None, repeat: int = 1) -> SpeedReport:
    """Measure every figure of the module docstring in one process, on the same files.

    Args:
        out_dir: Working folder (images, random checkpoints, caches, ``speed.json``).
        device: ``cpu`` or ``cuda``.
        batch_size: Images per batch.
        images: How many JPEG files to write and read, of each size.
        models: ``(timm model, open_clip model)``; ``tiny`` = the synthetic world's CLIP.
        image_size: Supervised input size.
        workers: Decoding processes.
        sizes: ``(width, height)`` of the JPEG files, one set per size; the first is the one of
            pipeline efficiency, the cascade and zero-shot.
        precisions: Precisions timed side by side (tower by tower and end to end); the last is
            the run's own (pipeline efficiency, the cascade, zero-shot, the naive baseline's
            comparison); ``fp32`` first gives the float32 figures to compare with.
        compile: ``torch.compile`` both towers.
        gpu_decode: Decode JPEG files on the GPU.
        cascade_share: Share of images the cascade sends to CLIP (random weights
            have no calibrated threshold; report the share calibration gives,
            60% on both synthetic worlds).
        templates: Templates for the text matrices (None = the default 80).
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
    run_dir = _save_random_run(sup_name, image_size, out / f"run_{sup_name}_{image_size}")
    clip_id = _save_random_clip(clip_name, out / f"clip_{clip_name}")
    prompts = [f"class {i}" for i in range(_N_CLASSES)]
    main = precisions[-1]
    dev = resolve_device(device)
    rows: dict[str, float] = {}
    files: dict[str, list] = {}
    for size in sizes:
        folder = out / f"jpeg_{_label(size)}_{images}"
        if not folder.is_dir():
            write_jpegs(folder, images, size=size)
        files[_label(size)] = expand_inputs([folder])
    first = _label(sizes[0])
    sources = files[first]
    n = len(sources)

    def load(cache: Path, **kw: Any) -> HybridClassifier:
        options = {"precision": main, "decode": "device" if gpu_decode else "cpu", **kw}
        return HybridClassifier(clip_model=clip_id, clip_pretrained=None, prompts=prompts, templates=templates,
                                device=device, batch_size=batch_size, workers=workers, cache_dir=cache,
                                compile=compile, **options).load_run(run_dir)

    def manual_gate(clf: HybridClassifier) -> None:
        manual = GateCalibration(score="clip_margin", mode="hard", threshold=0.0, method="manual")
        clf.gate_ = Gate.from_calibration(manual, n_seen=clf.n_seen_)

    cache = out / "cache"
    # Time to the first prediction: load both towers, build (cold: as in a first run, the weights
    # are hashed too) or read (warm) the text matrix and the weights' fingerprint.
    shutil.rmtree(cache / "text", ignore_errors=True)
    (cache / FINGERPRINT_FILE).unlink(missing_ok=True)
    for label in ("cold", "warm"):
        t = time.perf_counter()
        clf = load(cache)
        manual_gate(clf)
        next(iter(clf.rows(sources[:1])))
        rows[f"first prediction, {label} text cache (s)"] = time.perf_counter() - t
    rows["warm-start speed-up (cold / warm)"] = (rows["first prediction, cold text cache (s)"]
                                                 / rows["first prediction, warm text cache (s)"])
    bundle = clf.tower_.bundle
    # The class-text matrix by open_clip's builder (every prompt padded to the context) and by
    # hybridcls's (each batch cut to its longest prompt), on the same 50 classes and templates.
    import open_clip

    template_list = list(as_template_set(templates))
    t = time.perf_counter()
    with torch.no_grad():
        open_clip_text = open_clip.build_zero_shot_classifier(
            bundle.model, bundle.tokenizer, prompts, template_list, device=bundle.device)
    rows["class-text matrix, open_clip build_zero_shot_classifier (s)"] = time.perf_counter() - t
    t = time.perf_counter()
    ours = build_text_classifier(bundle, prompts, template_list, use_cache=False)
    rows["class-text matrix, hybridcls (s)"] = time.perf_counter() - t
    rows["class-text matrix speed-up"] = (rows["class-text matrix, open_clip build_zero_shot_classifier (s)"]
                                          / rows["class-text matrix, hybridcls (s)"])
    rows["class-text matrix, max |difference|"] = float((ours - open_clip_text).abs().max())
    # The weights fingerprint in two new processes: hashed (a first run), then read from
    # fingerprints.json (any later run).
    with tempfile.TemporaryDirectory(dir=out) as fingerprints:
        for label in ("hashed", "read from fingerprints.json"):
            rows[f"weights fingerprint, {label} (s)"] = _fingerprint_seconds(bundle.weights_path, fingerprints)

    clf = load(cache)
    manual_gate(clf)
    engines = {p: InferenceEngine(supervised=clf.supervised_, sup_view=clf.engine_.views[0], clip=clf.tower_,
                                  settings=RuntimeSettings.of(clf).replace(precision=p)) for p in precisions}
    engine = engines[main]
    # Tower by tower, over tensors decoded beforehand.
    views = [engine.decoded_views(load_image(s.path)) for s in sources]
    batches = [tuple(torch.stack(v) for v in zip(*views[i:i + batch_size])) for i in range(0, n, batch_size)]

    def tower(eng: InferenceEngine, which: str) -> Callable[[], None]:
        def run() -> None:
            for b in batches:
                eng.run_supervised(b) if which == "supervised" else eng.run_clip(b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return run

    def end_to_end(hybrid: HybridClassifier, srcs: list, name: str, cascade: bool = False) -> Callable[[], None]:
        def run() -> None:
            hybrid.set_params(cascade=cascade)
            before = hybrid.engine_.clip_images_encoded
            topk = check_topk(None, len(hybrid.classes_))  # the rows' default, in the header too
            with open_writer(out / name, "csv", topk=topk, extra_columns=hybrid.EXTRA_COLUMNS) as writer:
                for r in hybrid.rows(srcs, topk=topk):
                    writer.write_many(r)
            clip_share[name] = (hybrid.engine_.clip_images_encoded - before) / len(srcs)
        return run

    clip_share: dict[str, float] = {}
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
    # One classifier per precision and decoding, sharing the gate; the run's own is ``clf``.
    hybrids = {(main, True): clf}
    for p in precisions:
        for draft in (True, False):
            if (p, draft) not in hybrids and (draft or p == precisions[0]):
                hybrids[(p, draft)] = load(cache, precision=p, draft=draft)
                hybrids[(p, draft)].gate_ = clf.gate_
    dtypes = _limit_dtypes(dev)
    fns: dict[str, Callable[[], None]] = {
        f"matmul {_MATMUL_SIDE}x{_MATMUL_SIDE}, {k} (s)": _matmul(d, dev) for k, d in dtypes.items()}
    for p in precisions:
        for which in ("supervised", "clip"):
            fns[f"{which} tower, {p} (img/s)"] = tower(engines[p], which)
    for size in sizes:
        label = _label(size)
        for (p, draft), hybrid in hybrids.items():
            decode = "" if draft else ", every file decoded whole"
            fns[f"end-to-end, full hybrid, {label}, {p}{decode} (img/s)"] = end_to_end(
                hybrid, files[label], f"full_{label}_{p}_{draft}.csv")
        fns[f"naive baseline, {label} (img/s)"] = lambda label=label: _naive(
            run_dir, clip_id, [Path(s.path) for s in files[label]], batch_size, dev, clf.tower_.text_features)
    fns[f"end-to-end, cascade, {first}, {main} (img/s)"] = end_to_end(clf, sources, "cascade.csv", True)
    # Zero-shot alone on the same files: hybridcls, a plain open_clip loop, pybioclip (if installed).
    zs = ZeroShotClassifier(clip_model=clip_id, clip_pretrained=None, prompts=prompts, templates=templates,
                            device=device, batch_size=batch_size, workers=workers, cache_dir=cache,
                            precision=main, compile=compile).fit()
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(clip_id, device=dev)
    oc_model.eval()
    paths = [Path(s.path) for s in sources]
    top1: dict[str, np.ndarray] = {}
    classes = list(zs.classes_)

    def zero_shot_ours() -> None:
        top1["hybridcls"] = np.array([classes.index(c) for c in zs.predict([str(p) for p in paths])])

    def zero_shot_plain() -> None:
        top1["open_clip"] = _plain_open_clip(oc_model, oc_preprocess, open_clip_text, paths, batch_size,
                                             workers, dev)

    fns[f"zero-shot, hybridcls, {first}, {main} (img/s)"] = zero_shot_ours
    fns[f"zero-shot, plain open_clip loop, {first} (img/s)"] = zero_shot_plain
    bioclip, bioclip_note = _bioclip(prompts, clip_id, dev)
    if bioclip is not None:
        fns[f"zero-shot, pybioclip, {first} (img/s)"] = lambda: bioclip.predict(
            [str(path) for path in paths], k=1, batch_size=batch_size)
    seconds = _best_of(fns, repeat)
    for name, t in seconds.items():
        if name.startswith("matmul"):
            rows[name.replace("(s)", "(TFLOP/s)")] = _MATMUL_PRODUCTS * 2 * _MATMUL_SIDE ** 3 / t / 1e12
        else:
            rows[name] = n / t
    sup_g, clip_g = _gmacs(clf, image_size)
    rows["GMACs per image, supervised"] = sup_g
    rows["GMACs per image, CLIP image tower"] = clip_g
    for p in precisions:
        for which, gmacs in (("supervised", sup_g), ("clip", clip_g)):
            tflops = 2 * gmacs * rows[f"{which} tower, {p} (img/s)"] / 1e3
            rows[f"{which} tower, {p}: TFLOP/s"] = tflops
            kind = _tower_type(engines[p], which)
            limit = rows.get(f"matmul {_MATMUL_SIDE}x{_MATMUL_SIDE}, {kind} (TFLOP/s)")
            if limit:
                rows[f"{which} tower, {p}: share of the {kind} matmul limit"] = tflops / limit
        model_only = 1 / sum(1 / rows[f"{w} tower, {p} (img/s)"] for w in ("supervised", "clip"))
        rows[f"model-only, {p} (img/s)"] = model_only
    rows["achieved TFLOP/s (model-only)"] = 2 * (sup_g + clip_g) * rows[f"model-only, {main} (img/s)"] / 1e3
    full = f"end-to-end, full hybrid, {first}, {main} (img/s)"
    rows["pipeline efficiency (end-to-end / model-only)"] = rows[full] / rows[f"model-only, {main} (img/s)"]
    for size in sizes:
        label = _label(size)
        new = rows[f"end-to-end, full hybrid, {label}, {main} (img/s)"]
        rows[f"speed-up over naive, full hybrid, {label}"] = new / rows[f"naive baseline, {label} (img/s)"]
        before = rows[f"end-to-end, full hybrid, {label}, {precisions[0]}, every file decoded whole (img/s)"]
        rows[f"speed-up over {precisions[0]} with every file decoded whole, {label}"] = new / before
    rows["speed-up over naive, cascade"] = (rows[f"end-to-end, cascade, {first}, {main} (img/s)"]
                                            / rows[f"naive baseline, {first} (img/s)"])
    rows["cascade: share of images CLIP ran on"] = clip_share["cascade.csv"]
    rows["zero-shot speed-up over the plain open_clip loop"] = (
        rows[f"zero-shot, hybridcls, {first}, {main} (img/s)"]
        / rows[f"zero-shot, plain open_clip loop, {first} (img/s)"])
    rows["zero-shot top-1 agreement, hybridcls / plain open_clip loop"] = float(
        np.mean(top1["hybridcls"] == top1["open_clip"]))
    info = {"device": device, "batch_size": batch_size, "images": n, "models": list(models),
            "image_size": image_size, "jpeg_sizes": [list(s) for s in sizes], "workers": workers,
            "precisions": {p: {"autocast": e.applied["autocast"], "weights": e.applied["weights"]}
                           for p, e in engines.items()},
            "cpu_native_bf16": dev.type == "cpu" and cpu_native_bf16(),
            "draft_target_side": clf.engine_.target_side, "compile": compile,
            "gpu_decode": gpu_decode, "threads": torch.get_num_threads(), "cascade_share": cascade_share,
            "repeat": repeat, "templates": "default (80)" if templates is None else len(templates),
            "classes": _N_CLASSES, "pybioclip": bioclip_note or "timed", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "load average": _load_average()}
    report = SpeedReport(rows, info)
    report.to_json(out / "speed.json")
    return report


def _load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (how busy it was), where the OS says."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
