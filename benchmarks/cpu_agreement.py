"""Do reduced precision and reduced-scale JPEG decoding change the answers? (issue 15)

Three measurements, each against the float32 / full-size reference of the same run:

1. precision: the calibrated hybrid of the synthetic world (EfficientNet-Lite0
   fine-tuned from the ``[dev]`` extra's ImageNet weights + the shipped tiny
   CLIP, ``hybridcls.bench.quality.prepare_world_run``; built once in
   ``--out``, calibrated in float32) predicts the world's 1,000 test images with
   ``precision`` fp32, auto (what the default runs on this machine), bf16 and
   int8: top-1 agreement of the hybrid and of each branch with fp32,
   S / U / H, and the seconds of each pass (timed in turns, best of two);
2. reduced-scale decoding on the world: its test images written as
   1024 x 1024 JPEG files (quality 90), predicted with every file decoded whole
   (``draft=False``) and at a reduced scale (the default);
3. reduced-scale decoding on real photos (``--photos``: the camera-trap photos
   shared beside the repository, read in place; crops of them are re-encoded in
   memory, nothing is written): ImageNet top-1 of EfficientNet-Lite0 with real
   weights, decoded whole and at a reduced scale, beside what a 1-pixel shift
   and a quality-95 re-encode of the same images do to it (how fragile that
   top-1 is on these photos).

Usage (from the repository root, with the dev extra installed):
    python -m benchmarks.cpu_agreement --out runs/cpu-agreement --photos ../shared/data/photos

docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from hybridcls.bench.quality import labelled_test_set, prepare_world_run
from hybridcls.data import decode_image_bytes, expand_inputs, resize_side
from hybridcls.engine import InferenceEngine, timm_view
from hybridcls.gate.metrics import seen_unseen_accuracy
from hybridcls.hybrid import HybridClassifier
from hybridcls.runtime import RuntimeSettings
from hybridcls.supervised.packaged import LITE0_MODEL, packaged_lite0_weights

__all__ = ["main"]


def _agreement(clf: Any, y: np.ndarray, srcs: list, configs: dict[str, RuntimeSettings]) -> list[dict]:
    """Each setting's outputs on ``srcs`` against the first's (its reference), timed in turns."""
    engines = {k: InferenceEngine(supervised=clf.supervised_, sup_view=clf.engine_.views[0], clip=clf.tower_,
                                  settings=s) for k, s in configs.items()}
    feats: dict[str, Any] = {}
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(2):
        for k, engine in engines.items():
            t = time.perf_counter()
            feats[k], errors = engine.extract(srcs)
            seconds[k].append(time.perf_counter() - t)
            if errors:
                raise RuntimeError(f"{len(errors)} images failed: {errors}")
    ref = next(iter(configs))
    preds = {k: clf.gate_.predict(f).probs.argmax(axis=1) for k, f in feats.items()}
    rows = []
    for k, engine in engines.items():
        s, u, h = seen_unseen_accuracy(y, preds[k], clf.n_seen_)
        rows.append({
            "setting": k, "weights": engine.applied["weights"], "autocast": engine.applied["autocast"],
            "draft_target_side": engine.applied["draft_target_side"],
            "S": 100 * s, "U": 100 * u, "H": 100 * h,
            "top-1 agreement, hybrid": 100 * float(np.mean(preds[k] == preds[ref])),
            "top-1 agreement, supervised": 100 * float(np.mean(
                feats[k].sup_logits.argmax(1) == feats[ref].sup_logits.argmax(1))),
            "top-1 agreement, zero-shot": 100 * float(np.mean(
                feats[k].clip_logits.argmax(1) == feats[ref].clip_logits.argmax(1))),
            "seconds (best of 2)": min(seconds[k]),
            "speed-up": min(seconds[ref]) / min(seconds[k]),
        })
    return rows


def _photo_variants(photos: Path, seed: int = 0) -> list[tuple[str, bytes]]:
    """Each readable photo's JPEG bytes and 7 crops of it (60-95% of each side), re-encoded in memory."""
    rng = np.random.default_rng(seed)
    out = []
    for path in sorted(photos.glob("*.jpg")):
        if "truncated" in path.name:
            continue
        data = path.read_bytes()
        out.append((path.name, data))
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
        w, h = im.size
        for k in range(7):
            f = rng.uniform(0.6, 0.95)
            cw, ch = int(w * f), int(h * f)
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            buf = io.BytesIO()
            im.crop((x, y, x + cw, y + ch)).save(buf, "JPEG", quality=90)
            out.append((f"{path.name}#crop{k}", buf.getvalue()))
    return out


def _photos(photos: Path, cache: Path) -> list[dict]:
    model = timm.create_model(LITE0_MODEL, pretrained=False)
    model.load_state_dict(load_file(str(packaged_lite0_weights(cache))))
    model.eval()
    view = timm_view(timm.data.resolve_data_config({}, model=model))
    target = resize_side(view.geometry)

    def logits(image: Image.Image) -> torch.Tensor:
        with torch.inference_mode():
            return model(view.normalise(view.pixels(image)[None]))[0]

    def reencoded(image: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=95)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    items = _photo_variants(photos)
    full = [decode_image_bytes(data, name) for name, data in items]
    ref = [logits(im) for im in full]
    variants = {
        "reduced-scale decoding (default)": [decode_image_bytes(d, n, target_side=target) for n, d in items],
        "full decoding, shifted by 1 pixel": [im.crop((1, 1, im.width, im.height)) for im in full],
        "full decoding, re-encoded at quality 95": [reencoded(im) for im in full],
    }
    rows = []
    for name, images in variants.items():
        out = [logits(im) for im in images]
        diffs = [float((o.softmax(-1) - r.softmax(-1)).abs().max()) for o, r in zip(out, ref)]
        rows.append({"variant": name, "images": len(items),
                     "reduced": sum(a.size != b.size for a, b in zip(images, full)) if "reduced" in name else 0,
                     "top-1 agreement": 100 * float(np.mean([int(o.argmax()) == int(r.argmax())
                                                             for o, r in zip(out, ref)])),
                     "max |probability difference|": max(diffs),
                     "median |probability difference|": float(np.median(diffs))})
    margins = [float(r.softmax(-1).topk(2).values.diff().abs()) for r in ref]
    rows.append({"variant": "full decoding: share of images whose top-2 probabilities are within 0.05",
                 "value": 100 * float(np.mean(np.array(margins) < 0.05))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cpu-agreement"))
    parser.add_argument("--photos", type=Path, default=Path(os.environ.get("HYBRIDCLS_PHOTOS", "../shared/data/photos")))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    world, clf, _ = prepare_world_run(args.out / "world_run", seed=0)
    # The reference: the same run calibrated in float32 (prepare_world_run's classifier runs in
    # the default precision, which on a CPU with native bfloat16 is not float32 for the CNN).
    clf = HybridClassifier(clip_model=clf.clip_model, clip_pretrained=None, templates=world.templates_file,
                           seed=0, device="cpu", workers=0, cache_dir=clf.cache_dir, precision="fp32",
                           ).load_run(clf.run_dir_, world.prompts_file)
    clf.calibrate(world.train_dir)
    sources, y = labelled_test_set(world, clf)
    base = RuntimeSettings(device="cpu", batch_size=50, workers=0, precision="fp32")
    # auto: what the default runs on this machine (engine.applied in the results says what)
    results: dict[str, Any] = {"precision": _agreement(clf, y, sources, {
        "fp32": base, "auto": base.replace(precision="auto"), "bf16": base.replace(precision="bf16"),
        "int8": base.replace(precision="int8")})}
    big = args.out / "world_test_1024px_jpeg"
    if not big.is_dir():
        big.mkdir(parents=True)
        for s in sources:
            with Image.open(s.path) as im:
                im.convert("RGB").resize((1024, 1024), Image.Resampling.BICUBIC).save(
                    big / (Path(s.path).stem + ".jpg"), quality=90)
    jpegs = expand_inputs([str(big / (Path(s.path).stem + ".jpg")) for s in sources])
    results["decoding, synthetic world"] = _agreement(clf, y, jpegs, {
        "full decoding": base.replace(draft=False), "reduced-scale decoding": base})
    if args.photos.is_dir():
        results["decoding, real photos"] = _photos(args.photos, args.out / "world_run" / "cache")
    results["machine"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "load average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d")}
    (args.out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    for part, rows in results.items():
        print(f"\n## {part}\n")
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
