"""``hybridcls explain INPUTS --checkpoint RUN_DIR``: maps, decision and nearest training images, as HTML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybridcls.cli.common import (
    UsageError,
    add_clip_arguments,
    add_runtime_arguments,
    hybrid_from_args,
    prompts_from_args,
    runtime_from_args,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "explain",
        help="explain a hybrid's predictions: Grad-CAM, CLIP maps, decision, nearest training images",
        description="For every input: Grad-CAM of the supervised branch, the CLIP similarity map of "
                    "the predicted class, the decision (branch, gate score, both branches' top-k) "
                    "and the nearest training images from the run's embedding index; PNG overlays "
                    "and one index.html in --output. Needs grad-cam (pip install "
                    "'hybridcls[explain]'). A file that cannot be decoded gets its error on the page.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image, folder, glob or list file")
    parser.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                        help="calibrated run directory, or a folder from save_pretrained")
    # A save_pretrained folder carries its prompts; a bare run directory needs them.
    add_clip_arguments(parser, prompts_required=False)
    parser.add_argument("--mode", choices=["hard", "soft", "stacking"], default=None,
                        help="override the calibrated decision mode")
    parser.add_argument("--topk", type=int, default=5, metavar="K",
                        help="classes listed per branch (default: %(default)s)")
    parser.add_argument("--neighbours", type=int, default=5, metavar="K",
                        help="nearest training images per input, 0 for none (default: %(default)s)")
    parser.add_argument("-o", "--output", default="explain", metavar="DIR",
                        help="folder to write (default: %(default)s)")
    add_runtime_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def _classifier(args: argparse.Namespace):
    # the models (torch, timm, open_clip) are imported when the command runs
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.pretrained import HYBRID_FILE

    params = {"mode": args.mode, "truncate_prompts": args.truncate_prompts,
              **runtime_from_args(args).to_dict()}
    prompts = prompts_from_args(args)
    if (Path(args.checkpoint) / HYBRID_FILE).is_file() and not prompts:
        return HybridClassifier.from_pretrained(args.checkpoint, **params)
    if not prompts:
        raise UsageError(f"--prompts or --classes is needed: {args.checkpoint} is a run directory, "
                         f"not a save_pretrained folder (no {HYBRID_FILE})")
    return hybrid_from_args(args)


def run(args: argparse.Namespace) -> int:
    from hybridcls.data import expand_inputs
    from hybridcls.explain import explain_images, require_grad_cam, write_explain_page

    for flag, value, least in (("--topk", args.topk, 1), ("--neighbours", args.neighbours, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    require_grad_cam()  # before loading models: fail fast on a missing extra
    sources = expand_inputs(args.inputs)
    if not sources:
        raise UsageError("no input images found in " + " ".join(args.inputs))
    clf = _classifier(args)
    result = explain_images(clf, sources, args.output, topk=args.topk, neighbours=args.neighbours,
                            progress=not args.quiet)
    page = write_explain_page(result)
    n, bad = len(result.explanations), result.n_errors
    args.run_record.describe(clf).finish(explained=n - bad, failed=bad)
    print(f"hybridcls explain: {n - bad} of {n} inputs explained -> {page}", file=sys.stderr)
    return 1 if bad else 0
