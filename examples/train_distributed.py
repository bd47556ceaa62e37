"""Distributed training on 2 CPU processes with DistributedDataParallel, through torchrun.

Offline, on a small synthetic world, in about a minute on two free cores::

    python examples/train_distributed.py --out runs/ddp-demo

What it runs is the command line (``--nproc 2`` starts ``torchrun``, which
starts two gloo workers with DistributedDataParallel)::

    hybridcls train WORLD/train -o runs/ddp-demo/run --nproc 2 --device cpu ...

On a GPU machine drop ``--device cpu`` and set ``--nproc`` to the number of
GPUs; see docs/scale.md for several machines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybridcls.cli import main
from hybridcls.synth import make_world


def run(out: Path, nproc: int) -> int:
    """Make the world, train 3 epochs on ``nproc`` workers, print the report."""
    world = make_world(
        out / "world", seed=0, n_classes=6, n_unseen=1, train_per_class=(20, 30), image_size=32
    )
    run_dir = out / "run"
    flags = ["--model=test_convnext", "--no-pretrained", "--image-size=32", "--workers=0"]
    code = main(
        [
            "train",
            str(world.train_dir),
            "-o",
            str(run_dir),
            "--epochs=3",
            "--batch-size=16",
            "--device=cpu",
            "--nproc",
            str(nproc),
            "-q",
            *flags,
        ]
    )
    if code != 0:
        return code
    report = json.loads((run_dir / "report.json").read_text())
    print(
        f"{nproc} workers: val acc {report['val_accuracy']:.3f} after {report['epochs_run']} "
        f"epochs; files (written by rank 0): {sorted(p.name for p in run_dir.iterdir())}"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ddp-demo"))
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    raise SystemExit(run(args.out, args.nproc))
