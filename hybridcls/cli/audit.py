"""``hybridcls audit``: near-duplicates, leakage, likely mislabels, class counts and unreadable files.

Writes CSV files and ``index.html`` into --output and prints a summary;
exit status 0, or 1 when some files could not be read (they are listed in
``unreadable.csv``), 2 on usage errors.
"""

from __future__ import annotations

import argparse

from hybridcls.audit import (
    CLIP_THRESHOLD,
    MIN_CLASS_IMAGES,
    MISLABEL_AGREEMENT,
    NEIGHBOURS,
    PIXEL_THRESHOLD,
    audit_dataset,
)
from hybridcls.cli.common import (
    UsageError,
    add_clip_model_arguments,
    add_runtime_arguments,
    clip_from_args,
    flag_message,
    runtime_from_args,
)
from hybridcls.provenance import tower_identity

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "audit",
        help="find near-duplicates, leakage, likely mislabels and unreadable files in a training set",
        description="Audit an ImageFolder training set (DATA_DIR/<class>/<image>) and optionally "
                    "its validation and test folders. See docs/audit.md.",
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", help="training folder, one subfolder per class")
    parser.add_argument("--val", metavar="DIR", help="validation images, checked for copies of DATA_DIR images")
    parser.add_argument("--test", metavar="DIR", help="test images, checked for copies of DATA_DIR images")
    parser.add_argument("-o", "--output", metavar="DIR",
                        help="where the CSV files and index.html go (default: DATA_DIR-audit beside DATA_DIR)")
    add_clip_model_arguments(parser.add_argument_group("image embeddings (open_clip)"))
    g = parser.add_argument_group("thresholds (docs/audit.md has their measured separation)")
    g.add_argument("--pixel-threshold", type=float, default=PIXEL_THRESHOLD, metavar="S",
                   help="thumbnail correlation from which two images are copies; above 1 turns "
                        "this test off (default: %(default)s)")
    g.add_argument("--clip-threshold", type=float, default=CLIP_THRESHOLD, metavar="C",
                   help="CLIP cosine from which two images are copies even when their pixels differ; "
                        "above 1 turns this test off (default: %(default)s)")
    g.add_argument("--neighbours", type=int, default=None, metavar="K",
                   help=f"nearest neighbours that vote on labels and are checked for copies, at most "
                        f"the other images in DATA_DIR (default: {NEIGHBOURS}, or all of them when "
                        f"there are fewer)")
    g.add_argument("--mislabel-agreement", type=float, default=MISLABEL_AGREEMENT, metavar="A",
                   help="share of neighbours that must agree on another label (default: %(default)s)")
    g.add_argument("--min-class-images", type=int, default=MIN_CLASS_IMAGES, metavar="N",
                   help="flag classes with fewer readable images (default: %(default)s)")
    add_runtime_arguments(parser, engine_options=False)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    runtime = runtime_from_args(args)
    for flag, value in (("--pixel-threshold", args.pixel_threshold),
                        ("--clip-threshold", args.clip_threshold)):
        if value < -1:
            raise UsageError(f"{flag} must be at least -1, got {value}")
    if not 0 <= args.mislabel_agreement <= 1:
        raise UsageError(f"--mislabel-agreement must be between 0 and 1, got {args.mislabel_agreement}")
    clip_model, clip_pretrained = clip_from_args(args)
    report = audit_dataset(
        args.data_dir, val_dir=args.val, test_dir=args.test, output_dir=args.output,
        clip_model=clip_model, clip_pretrained=clip_pretrained,
        cache_dir=runtime.cache_dir, device=runtime.device, batch_size=runtime.batch_size,
        workers=runtime.workers,
        # A threshold above 1 can never be reached: the test is off.
        pixel_threshold=args.pixel_threshold if args.pixel_threshold <= 1 else None,
        clip_threshold=args.clip_threshold if args.clip_threshold <= 1 else None,
        neighbours=args.neighbours, mislabel_agreement=args.mislabel_agreement,
        min_class_images=args.min_class_images, progress=runtime.progress,
    )
    print(flag_message(report.summary(), args.parser_))  # a parameter it names reads as its flag
    s = report.settings
    args.run_record.models = {"clip": tower_identity(s["clip_model"], s["clip_fingerprint"],
                                                     pretrained=s["clip_pretrained"])}
    args.run_record.finish(images=len(report.images), unreadable=len(report.unreadable))
    return 1 if report.unreadable else 0
