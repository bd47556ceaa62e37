"""``hybridcls bench quality`` (and ``speed``): benchmarks that print figures, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="benchmarks (quality on the synthetic world)",
                                   description="Benchmarks that print figures and write JSON.")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    q = sub.add_parser("quality", help="S / U / H of every branch, gate and mode on the synthetic world")
    q.add_argument("--out", default="hybridcls-bench-quality", metavar="DIR",
                   help="working folder; quality.md and quality.json go here (default: %(default)s)")
    q.add_argument("--seed", type=int, default=0, help="world seed (default: %(default)s)")
    q.add_argument("--epochs", type=int, default=5, help="supervised training epochs (default: %(default)s)")
    q.add_argument("--model", default=None,
                   help="a timm model trained from scratch (default: EfficientNet-Lite0 from the "
                        "[dev] extra's ImageNet weights, else test_convnext from scratch)")
    q.add_argument("--image-size", type=int, default=64, help="supervised input size (default: %(default)s)")
    q.add_argument("--workers", type=int, default=0, metavar="N")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(run=run_quality)
    return parser


def run_quality(args: argparse.Namespace) -> int:
    from hybridcls.bench.quality import run_quality as bench

    report = bench(Path(args.out), seed=args.seed, epochs=args.epochs, model=args.model,
                   image_size=args.image_size, workers=args.workers, progress=not args.quiet)
    print(report.markdown())
    print("\ntimes (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    print(f"wrote {Path(args.out) / 'quality.md'} and quality.json")
    return 0


run = run_quality
