"""``hybridcls calibrate RUN_DIR --prompts FILE``: fit the gate without any unseen images.

Runs both towers over the run's training and held-out seen images, searches
gate scores, decision modes and their parameters on stand-in unseen classes
(leave-classes-out), sets the threshold on the real held-out scores, and
saves ``gate.json`` and ``index/clip.*`` (the training images' CLIP
embeddings, labels and paths) in the run directory. ``--cache-branch`` fits
the nearest-neighbour cache branch on the held-out images (``auto``: kept only
when it raises their accuracy). Settings that depend on the data's size (neighbour
counts, leave-classes-out's rounds and hidden classes) adapt to it, and each
change is printed; data too small for the method exits with status 1. A run whose
training diverged is refused (status 2), naming the command that trains a new run.
``--score`` and ``--tpr`` set ``--method tpr``'s gate and ``--rounds`` leave-classes-out's
search: given with the other method, which would not read them, they are refused.
"""

from __future__ import annotations

import argparse
import inspect

from hybridcls.cli.common import (
    UsageError,
    add_clip_arguments,
    add_runtime_arguments,
    flag_message,
    hybrid_from_args,
)
from hybridcls.gate.cache_branch import CACHE_MODES
from hybridcls.gate.config import FIT_METHODS
from hybridcls.gate.gate import Gate
from hybridcls.gate.scores import SCORES

__all__ = ["add_parser", "run"]

# The gate's own defaults (shown in the help; a flag not given is not passed, so they apply).
_DEFAULTS = {name: p.default for name, p in inspect.signature(Gate).parameters.items()}
# The flags one method reads, and why the other does not.
_METHOD_ONLY = {
    "score": ("tpr", "leave-classes-out chooses the score itself"),
    "tpr": ("tpr", "leave-classes-out chooses the threshold itself"),
    "rounds": ("leave-classes-out", "--method tpr searches nothing"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "calibrate",
        help="fit the gate between the branches (no unseen images needed)",
        description="Fit the gate on the run's seen-class images and save gate.json in RUN_DIR.",
    )
    parser.add_argument("checkpoint", metavar="RUN_DIR", help="run directory from `hybridcls train`")
    parser.add_argument("--data", metavar="DIR",
                        help="the training folder (default: the one recorded in the run)")
    parser.add_argument("--method", choices=FIT_METHODS, default=_DEFAULTS["method"],
                        help="leave-classes-out searches scores and modes (default); "
                             "tpr thresholds --score at --tpr")
    parser.add_argument("--score", choices=sorted(SCORES), default=None,
                        help=f"gate score for --method tpr (default: {_DEFAULTS['score']})")
    parser.add_argument("--tpr", type=float, default=None,
                        help="share of held-out seen images kept in the supervised branch "
                             f"(--method tpr; default: {_DEFAULTS['tpr']})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"leave-classes-out repetitions (default: {_DEFAULTS['rounds']})")
    parser.add_argument("--transductive", metavar="TEST_INPUT", nargs="+",
                        help="unlabelled test images: refit the threshold on their score distribution")
    parser.add_argument("--cache-branch", choices=CACHE_MODES, default="auto",
                        help="nearest-neighbour cache branch added to the supervised logits: auto "
                             "(default) keeps it only when it raises held-out seen-class accuracy")
    parser.add_argument("--seed", type=int, default=0)
    add_clip_arguments(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from hybridcls.hybrid import check_not_diverged, check_training_folder

    given = {name: getattr(args, name) for name in _METHOD_ONLY if getattr(args, name) is not None}
    for name, value in given.items():
        method, why = _METHOD_ONLY[name]
        if args.method != method:
            raise UsageError(f"--{name} {value}: only --method {method} reads it ({why}); give "
                             f"--method {method}, or leave --{name} out")
    # before the models load: a run that diverged (no gate is set on it), --data (named as
    # data_dir= by the library), or the folder the run records
    check_not_diverged(args.checkpoint)
    check_training_folder(args.checkpoint, args.data)
    clf = hybrid_from_args(args, recalibrate=True, method=args.method, seed=args.seed,
                           cache_branch=args.cache_branch, **given)
    clf.calibrate(args.data, test_inputs=args.transductive)
    args.run_record.describe(clf)  # the new gate, for --log
    g = clf.gate_.calibration_
    print(f"gate: score={g.score} mode={g.mode} threshold={g.threshold:.4f} "
          f"(keeps at least {100 * g.tpr:.0f}% of held-out seen images) -> {clf.run_dir_ / 'gate.json'}")
    if g.cascade_msp is not None:
        far = "" if g.cascade_distance is None else f" or backbone distance > {g.cascade_distance:.3f}"
        print(f"cascade (--cascade): CLIP runs where supervised MSP <= {g.cascade_msp:.3f}{far}")
    for note in g.adapted:  # library sentences: a parameter they name reads as its flag
        print(f"adapted to the data's size: {flag_message(note, args.parser_, args.commands_)}")
    if g.cache_branch is not None:
        c = g.cache_branch
        print(f"cache branch: {'on' if c['enabled'] else 'off'} (alpha {c['alpha']:.3g}, beta {c['beta']:g}; "
              f"held-out seen accuracy {100 * c['val_accuracy_plain']:.1f}% -> {100 * c['val_accuracy']:.1f}%)")
    return 0
