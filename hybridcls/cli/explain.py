"""``hybridcls explain INPUTS --checkpoint RUN_DIR``: maps, decision and nearest training images, as HTML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybridcls.cli.common import (
    UsageError,
    add_clip_arguments,
    add_runtime_arguments,
    hybrid_parameters,
)
from hybridcls.cli.decision import (
    add_decision_arguments,
    add_revision_argument,
    check_decision_arguments,
    classifier_from_args,
    saved_folder_prompts,
    site_classes_from_args,
)
from hybridcls.gate.config import MODES

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
                        help="calibrated run directory, or a folder from save_pretrained or its "
                             "Hugging Face Hub repo id, ORG/NAME")
    add_revision_argument(parser)
    # A save_pretrained folder carries its prompts; a bare run directory needs them.
    add_clip_arguments(parser, prompts_required=False)
    # predict's decision flags, so that the page shows the decision predict makes with them
    dec = add_decision_arguments(parser)
    dec.add_argument("--mode", choices=MODES, default=None,
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


def _saved_folder(args: argparse.Namespace) -> Path | None:
    """``--checkpoint`` as a ``save_pretrained`` folder (a Hub repo's: its snapshot), which carries
    its prompts; None: a run directory, read with ``--prompts`` / ``--classes``."""
    # refuses a run directory without prompts, and the flags a saved folder fixes
    return None if saved_folder_prompts(args) is None else Path(args.checkpoint)


def _classifier(args: argparse.Namespace, site_classes: object, folder: Path | None):
    """The hybrid ``predict --checkpoint`` builds from the same flags (a saved folder: loaded
    with them; the CLIP flags given are passed on, and refused there, as the folder fixes its
    CLIP model and templates)."""
    if folder is None:
        return classifier_from_args(args, site_classes)
    # the models (torch, timm, open_clip) are imported when the command runs
    from hybridcls.hybrid import HybridClassifier

    given = {name: getattr(args, name) for name in ("clip_model", "clip_pretrained", "templates")
             if getattr(args, name) is not None}
    hybrid = HybridClassifier.from_pretrained(folder, **given, **hybrid_parameters(args))
    return classifier_from_args(args, site_classes, hybrid=hybrid)


def run(args: argparse.Namespace) -> int:
    from hybridcls.data import expand_inputs
    from hybridcls.explain import explain_images, require_grad_cam, write_explain_page
    from hybridcls.pretrained import PROMPTS_FILE

    for flag, value, least in (("--topk", args.topk, 1), ("--neighbours", args.neighbours, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    folder = _saved_folder(args)
    prompts = None if folder is None else str(folder / PROMPTS_FILE)  # default: --prompts
    check_decision_arguments(args, prompts)
    require_grad_cam()  # before loading models: fail fast on a missing extra
    sources = expand_inputs(args.inputs)
    if not sources:
        raise UsageError("no input images found in " + " ".join(args.inputs))
    sites = site_classes_from_args(args, sources, prompts)  # its problems, before any model loads
    clf = _classifier(args, sites, folder)
    result = explain_images(clf, sources, args.output, topk=args.topk, neighbours=args.neighbours,
                            progress=not args.quiet)
    page = write_explain_page(result)
    n, bad = len(result.explanations), result.n_errors
    args.run_record.describe(clf).finish(explained=n - bad, failed=bad)
    print(f"hybridcls explain: {n - bad} of {n} inputs explained -> {page}", file=sys.stderr)
    return 1 if bad else 0
