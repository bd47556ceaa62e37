"""``hybridcls explain INPUTS --checkpoint RUN_DIR|SAVED_DIR|ORG/NAME``: maps, decision and
nearest training images, as HTML."""

from __future__ import annotations

import argparse
import sys

from hybridcls.cli.common import (
    UsageError,
    add_checkpoint_argument,
    add_clip_arguments,
    add_runtime_arguments,
)
from hybridcls.cli.decision import (
    add_decision_arguments,
    add_revision_argument,
    add_topk_argument,
    check_decision_arguments,
    check_topk_argument,
    classifier_from_args,
    saved_folder_hybrid,
    saved_folder_prompts,
    site_classes_from_args,
)
from hybridcls.explain.explainer import DEFAULT_NEIGHBOURS

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
    add_checkpoint_argument(
        parser, "run", "saved", "hub", required=True,
        help="RUN_DIR: a calibrated run directory; SAVED_DIR: a folder from save_pretrained, or "
             "ORG/NAME: its Hugging Face Hub repo id (both carry their prompts: no --prompts)")
    add_revision_argument(parser)
    # A save_pretrained folder carries its prompts; a bare run directory needs them.
    add_clip_arguments(parser, prompts_required=False)
    # predict's decision flags, so that the page shows the decision predict makes with them
    add_decision_arguments(parser)
    add_topk_argument(parser, "classes listed per branch")
    parser.add_argument("--neighbours", type=int, default=None, metavar="K",
                        help="nearest training images per input, 0 for none, at most as many as the "
                             f"run's embedding index holds (default: {DEFAULT_NEIGHBOURS}, or every "
                             "indexed image when there are fewer)")
    parser.add_argument("-o", "--output", default="explain", metavar="DIR",
                        help="folder to write (default: %(default)s)")
    add_runtime_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from hybridcls.data import expand_inputs
    from hybridcls.explain import explain_images, require_grad_cam, write_explain_page

    if args.neighbours is not None and args.neighbours < 0:
        raise UsageError(f"--neighbours must be at least 0, got {args.neighbours}")
    # a save_pretrained folder (a Hub repo's: fetched) carries its prompts, and its saved
    # class-text matrix; None: a run directory, with --prompts / --classes
    prompts = saved_folder_prompts(args)
    check_decision_arguments(args, prompts)
    check_topk_argument(args, prompts)
    require_grad_cam()  # before loading models: fail fast on a missing extra
    sources = expand_inputs(args.inputs)
    if not sources:
        raise UsageError("no input images found in " + " ".join(args.inputs))
    sites = site_classes_from_args(args, sources, prompts)  # its problems, before any model loads
    clf = classifier_from_args(args, sites, hybrid=None if prompts is None else saved_folder_hybrid(args))
    result = explain_images(clf, sources, args.output, topk=args.topk, neighbours=args.neighbours,
                            progress=not args.quiet)
    page = write_explain_page(result)
    n, bad = len(result.explanations), result.n_errors
    args.run_record.describe(clf).finish(explained=n - bad, failed=bad)
    print(f"hybridcls explain: {n - bad} of {n} inputs explained -> {page}", file=sys.stderr)
    return 1 if bad else 0
