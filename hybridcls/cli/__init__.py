"""The ``hybridcls`` command line.

Thin by design: each subcommand module parses its flags, calls the public
API and prints. Exit codes: 0 success, 1 some inputs failed or the data is too
small for the command (:class:`~hybridcls.errors.DataTooSmallError`), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
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
from hybridcls.cli.common import UsageError, add_log_argument, flag_message
from hybridcls.errors import HybridclsError, HybridclsWarning
from hybridcls.provenance import RunRecord
from hybridcls.torchrun import torchrun_world
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
            p.set_defaults(parser_=p, commands_=subparsers.choices)
        for p in nested or [sub]:  # the parsers that run a command
            add_log_argument(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The raw arguments, for a command that re-launches itself (train --nproc).
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # The run's record (docs/provenance.md): commands add what they know (models, counts)
    # and write it beside their outputs; --log writes it with the outcome.
    args.run_record = RunRecord(command=args.command, argv=[parser.prog, *args.argv])
    status: int | None = None
    error: str | None = None
    try:
        _check_log(args)  # before anything runs: a log that cannot be written is not written
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args)
            status = int(args.run(args) or 0)
    except HybridclsError as exc:
        error = flag_message(str(exc), args.parser_, args.commands_)
        print(f"hybridcls {args.command}: error: {error}", file=sys.stderr)
        status = exc.exit_code
    except KeyboardInterrupt:
        error = "interrupted"
        print(error, file=sys.stderr)
        status = 130
    finally:
        logged = _write_log(args, status, error)
    return status if logged or status else 2


def _check_log(args: argparse.Namespace) -> None:
    log = args.log
    if log is None:
        return
    output = getattr(args, "output", None)
    if log in ("", "-"):
        problem = f"--log needs a file name, got {log!r}"
    elif output not in (None, "-") and os.path.realpath(log) == os.path.realpath(output):
        problem = f"--log {log} is the --output file; choose another file for the log"
    else:
        return
    args.log = None  # not written: it would overwrite the output
    raise UsageError(problem)


def _write_log(args: argparse.Namespace, status: int | None, error: str | None) -> bool:
    """``--log FILE``: the run record with the exit status (under torchrun, rank 0's).

    Returns:
        False when the log could not be written (said on stderr).
    """
    if args.log is None or (torchrun_world() or (0,))[0] != 0:
        return True
    record = args.run_record
    if record.finished is None:
        record.finish()
    try:
        record.write_log(args.log, exit_status=status, error=error)
    except OSError as exc:
        print(f"hybridcls {args.command}: error: --log {args.log}: cannot write "
              f"({exc.strerror or exc})", file=sys.stderr)
        return False
    return True


def _warning_printer(args: argparse.Namespace):
    """``warnings.showwarning`` for a command: the package's warnings as one line in its flags' words."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, HybridclsWarning):
            print(f"hybridcls {args.command}: warning: {flag_message(str(message), args.parser_, args.commands_)}",
                  file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
