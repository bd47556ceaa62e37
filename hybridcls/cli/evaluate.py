"""``hybridcls evaluate PREDICTIONS --labels LABELS.csv``: accuracy, S / U / H, gate figures, plots."""

from __future__ import annotations

import argparse

__all__ = ["add_evaluation_arguments", "add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a predictions file against labels (accuracy, S/U/H, gate AUROC)",
        description="Join predictions to labels by file name and report the challenge's accuracy, "
                    "the generalised zero-shot S, U and H, and the gate's AUROC / FPR@95.",
    )
    add_evaluation_arguments(parser, seen_required=True)
    parser.add_argument("-o", "--output", metavar="DIR",
                        help="write metrics.json, per_class.csv and PNG plots here")
    parser.set_defaults(run=run)
    return parser


def add_evaluation_arguments(parser: argparse.ArgumentParser, *, seen_required: bool) -> None:
    """PREDICTIONS, ``--labels``, ``--seen-classes`` and ``--prompts``: what every scoring command reads."""
    parser.add_argument("predictions", metavar="PREDICTIONS", help="CSV or JSONL from hybridcls predict")
    parser.add_argument("--labels", required=True, metavar="LABELS.csv", help="image_id,label CSV")
    parser.add_argument("--seen-classes", required=seen_required, metavar="FILE|RUN_DIR",
                        help="classes with training images: a text file (one per line) or a run directory"
                             + ("" if seen_required else "; without it every class counts as seen (no U, H)"))
    parser.add_argument("--prompts", metavar="FILE", help="all classes; labels outside it are an error")


def run(args: argparse.Namespace) -> int:
    from hybridcls.eval.report import evaluate_predictions, read_class_list
    from hybridcls.zeroshot.prompts import read_prompts

    classes = read_prompts(args.prompts).names if args.prompts else None
    ev = evaluate_predictions(args.predictions, args.labels, read_class_list(args.seen_classes),
                              classes=classes)
    print(ev.summary())
    if args.output:
        for path in ev.save(args.output):
            print(f"wrote {path}")
    return 0
