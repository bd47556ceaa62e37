"""``hybridcls report PREDICTIONS --labels LABELS.csv``: one HTML page with the evaluation's figures."""

from __future__ import annotations

import argparse

from hybridcls.cli.evaluate import add_evaluation_arguments, evaluate_from_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="an HTML page of a predictions file's figures (confusion, per-class, gate, reliability)",
        description="Join predictions to labels by path and write one self-contained folder: "
                    "index.html with the headline figures (accuracy, S/U/H, gate AUROC, ECE), the "
                    "confusion matrix, per-class accuracy, gate-score histograms and a reliability "
                    "diagram, plus metrics.json and per_class.csv. Needs matplotlib "
                    "(pip install 'hybridcls[plots]').",
    )
    add_evaluation_arguments(parser, seen_required=False)
    parser.add_argument("--title", default="hybridcls report", help="page title (default: %(default)s)")
    parser.add_argument("-o", "--output", default="report", metavar="DIR",
                        help="folder to write (default: %(default)s)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # the evaluation (scikit-learn, SciPy) is imported when the command runs, as in evaluate
    from hybridcls.eval.html import write_report
    from hybridcls.eval.labels import read_labels
    from hybridcls.eval.plots import require_pyplot
    from hybridcls.eval.report import read_class_list

    require_pyplot("hybridcls report")  # before reading anything: fail fast on a missing extra
    seen = (read_class_list(args.seen_classes) if args.seen_classes
            else sorted(set(read_labels(args.labels).values())))
    ev = evaluate_from_args(args, seen)
    print(ev.summary())
    sources = {"predictions": args.predictions, "labels": args.labels}
    if args.seen_classes:
        sources["seen classes"] = args.seen_classes
    page = write_report(ev, args.output, title=args.title, sources=sources)
    print(f"wrote {page}")
    return 0
