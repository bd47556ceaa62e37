"""``hybridcls evaluate PREDICTIONS --labels LABELS.csv``: accuracy, S / U / H, gate figures, plots."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hybridcls.cli.common import CHECKPOINT_FORMS, add_class_arguments

if TYPE_CHECKING:  # typing only: the CLI imports the evaluation when a command runs
    from hybridcls.eval.report import Evaluation

__all__ = ["add_evaluation_arguments", "add_parser", "evaluate_from_args", "run"]

_JOIN_HELP = ("image_id,label CSV; an image_id is a file name, or a relative or absolute path, "
              "matched to the end of the predicted paths (a file name only when it is unique)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a predictions file against labels (accuracy, S/U/H, gate AUROC)",
        description="Join predictions to labels by path and report the challenge's accuracy, "
                    "the generalised zero-shot S, U and H, and the gate's AUROC, AUPR and FPR at "
                    "95% TPR (unseen images as positives). metrics.json is strict JSON "
                    "(an undefined figure is null).",
    )
    add_evaluation_arguments(parser, seen_required=True)
    parser.add_argument("-o", "--output", metavar="DIR",
                        help="write metrics.json, per_class.csv and PNG plots here")
    parser.set_defaults(run=run)
    return parser


def add_evaluation_arguments(parser: argparse.ArgumentParser, *, seen_required: bool) -> None:
    """PREDICTIONS, ``--labels``, ``--seen-classes``, ``--prompts`` / ``--classes`` and
    ``--allow-missing``."""

    parser.add_argument("predictions", metavar="PREDICTIONS",
                        help="CSV, JSONL or Kaggle CSV from hybridcls predict")
    parser.add_argument("--labels", required=True, metavar="LABELS.csv", help=_JOIN_HELP)
    parser.add_argument("--seen-classes", required=seen_required,
                        metavar="|".join(["FILE", CHECKPOINT_FORMS["run"], CHECKPOINT_FORMS["saved"]]),
                        help="classes with training images: a text file (one per line), a run "
                             "directory or a folder from save_pretrained"
                             + ("" if seen_required else "; without it every class counts as seen (no U, H)"))
    add_class_arguments(parser, required=False,
                        prompts_help="all classes; labels outside it are an error")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score the predicted images when some labelled images have no prediction "
                             "(they are counted, in the summary and metrics.json); by default an error")


def evaluate_from_args(args: argparse.Namespace, seen: Sequence[str]) -> Evaluation:
    """:func:`~hybridcls.eval.report.evaluate_predictions` with the flags of :func:`add_evaluation_arguments`."""
    from hybridcls.eval.report import MissingPredictionsError, evaluate_predictions
    from hybridcls.hierarchy import Hierarchy
    from hybridcls.zeroshot.prompts import read_prompts

    prompts = read_prompts(args.prompts, parameter="prompts") if args.prompts else None
    classes = prompts.names if prompts is not None else args.classes
    # a prompts file with ancestors scores roll-up answers at every rank
    hierarchy = Hierarchy.from_prompts(prompts) if prompts is not None and prompts.has_ancestors else None
    try:
        return evaluate_predictions(args.predictions, args.labels, seen, classes=classes,
                                    allow_missing=args.allow_missing, record=args.run_record,
                                    hierarchy=hierarchy)
    except MissingPredictionsError as err:
        raise err.allowed_by("--allow-missing") from None


def run(args: argparse.Namespace) -> int:
    from hybridcls.eval.report import read_class_list

    ev = evaluate_from_args(args, read_class_list(args.seen_classes))
    print(ev.summary())
    if args.output:
        for path in ev.save(args.output):
            print(f"wrote {path}")
    return 0
