"""The ``hybridcls`` command line.

Thin by design: each subcommand module parses its flags, calls the public
API and prints. Exit codes: 0 success, 1 some inputs failed or the data is too
small for the command (:class:`~hybridcls.errors.DataTooSmallError`), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from hybridcls.cli import audit as _audit
from hybridcls.cli import bench as _bench
from hybridcls.cli import calibrate as _calibrate
from hybridcls.cli import demo as _demo
from hybridcls.cli import embed as _embed
from hybridcls.cli import evaluate as _evaluate
from hybridcls.cli import explain as _explain
from hybridcls.cli import merge as _merge
from hybridcls.cli import models as _models
from hybridcls.cli import predict as _predict
from hybridcls.cli import report as _report
from hybridcls.cli import train as _train
from hybridcls.cli.common import UsageError, flag_message
from hybridcls.errors import HybridclsError, HybridclsWarning
from hybridcls.version import __version__

__all__ = ["UsageError", "build_parser", "main"]

# Subcommand modules, each with ``add_parser(subparsers)`` and ``run(args) -> int``.
_COMMANDS = [_train, _calibrate, _predict, _embed, _merge, _evaluate, _report, _explain, _bench,
             _demo, _audit, _models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridcls",
        description="Open-set image classification: supervised + CLIP zero-shot + a calibrated gate.",
    )
    parser.add_argument("--version", action="version", version=f"hybridcls {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in _COMMANDS:
        sub = module.add_parser(subparsers)
        # errors are told in the words of the subcommand's own flags (flag_message); a nested
        # subcommand's (bench speed) default wins over its parent's
        nested = [p for a in sub._actions if isinstance(a, argparse._SubParsersAction)
                  for p in a.choices.values()]
        for p in (sub, *nested):
            p.set_defaults(parser_=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The raw arguments, for a command that re-launches itself (train --nproc).
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args)
            return int(args.run(args) or 0)
    except HybridclsError as exc:
        print(f"hybridcls {args.command}: error: {flag_message(str(exc), args.parser_)}",
              file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _warning_printer(args: argparse.Namespace):
    """``warnings.showwarning`` for a command: the package's warnings as one line in its flags' words."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, HybridclsWarning):
            print(f"hybridcls {args.command}: warning: {flag_message(str(message), args.parser_)}",
                  file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
