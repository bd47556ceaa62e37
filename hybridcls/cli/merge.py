"""``hybridcls merge``: join the part files of a sharded prediction into one file, in input order.

Example:
    hybridcls predict photos/ --prompts p.txt --shard 0/2 -o part0.csv
    hybridcls predict photos/ --prompts p.txt --shard 1/2 -o part1.csv
    hybridcls merge part0.csv part1.csv --output pred.csv
"""

from __future__ import annotations

import argparse
import sys

from hybridcls.sharding import merge_parts

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help="merge the parts of `predict --shard I/N` into one file, in input order",
        description="Merge prediction parts written by `hybridcls predict --shard I/N --output PART`. "
                    "Checks that the parts come from one run (same settings and inputs) and hold "
                    "every input exactly once; writes the merged file atomically, in input order.",
    )
    parser.add_argument("parts", nargs="+", metavar="PART", help="part files, in any order")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="merged file (the parts' format: CSV, JSON Lines or Kaggle CSV)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # the merged manifest's record: this merge's, with each part's
    result = merge_parts(args.parts, args.output, record=args.run_record)
    failed = f", {result.n_error} of them error rows" if result.n_error else ""
    print(f"hybridcls merge: {result.rows} rows from {result.parts} parts{failed} -> {result.output}",
          file=sys.stderr)
    return 0
