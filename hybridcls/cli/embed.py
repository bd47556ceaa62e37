"""``hybridcls embed INPUTS -o FILE.npz|FILE.parquet``: CLIP (and backbone) embeddings with their paths.

The engine ``predict`` runs, with the CLIP tower on every image; with
``--checkpoint RUN_DIR|SAVED_DIR`` (a run directory, or a ``save_pretrained`` folder) its
backbone features too. Every input has one row, in input order (an unreadable one with its
reason and NaN embeddings);
exit status 0 when all were embedded, 1 when some failed, 2 on usage errors.
The rows stream to ``FILE.partial.jsonl`` (flushed per batch) and ``--resume``
continues it after a crash; the finished file replaces it, and its manifest
stays beside it with the run record (:mod:`hybridcls.embeddings`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hybridcls.cache import file_fingerprint
from hybridcls.cli.common import (
    UsageError,
    add_checkpoint_argument,
    add_clip_model_arguments,
    add_runtime_arguments,
    clip_from_args,
    clip_settings,
    runtime_from_args,
)
from hybridcls.data import expand_inputs
from hybridcls.embeddings import embedding_format
from hybridcls.torchrun import torchrun_world

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "embed",
        help="write CLIP (and, with --checkpoint, backbone) embeddings with their paths (.npz, .parquet)",
        description="Embed images with the CLIP image tower (and a trained run's backbone) and write "
                    "the L2-normalised CLIP embeddings and the backbone's pooled features with every "
                    "input's path to .npz (np.load(..., allow_pickle=False)) or .parquet (pandas; "
                    "needs pyarrow). Inputs may be files, folders (recursive), globs, or .txt/.csv "
                    "files listing paths; an unreadable input keeps its row, with its error and NaN "
                    "embeddings.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image, folder, glob or list file")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="FILE.npz or FILE.parquet; the rows stream to FILE.partial.jsonl "
                             "until every input has one")
    g = parser.add_argument_group("models")
    add_checkpoint_argument(
        g, "run", "saved",
        help="RUN_DIR: a run directory from `hybridcls train`, or SAVED_DIR: a folder from "
             "save_pretrained: its backbone's features as well")
    add_clip_model_arguments(g)
    add_runtime_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows an interrupted run of the same command wrote to "
                             "FILE.partial.jsonl and embed the rest (starts afresh without it)")
    parser.set_defaults(run=run)
    return parser


def _engine(args: argparse.Namespace) -> Any:
    # torch, timm and open_clip are imported when the command runs
    from hybridcls.embeddings import embedding_engine

    return embedding_engine(*clip_from_args(args), args.checkpoint, settings=runtime_from_args(args))


def embed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What changes the rows: a resumed partial file must agree on it (files by content)."""
    from hybridcls.supervised.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    checkpoint = None
    if args.checkpoint:
        run_dir = Path(args.checkpoint)
        checkpoint = {name: file_fingerprint(run_dir / name, cache_dir=args.cache_dir)
                      for name in (CONFIG_FILE, WEIGHTS_FILE)
                      if (run_dir / name).is_file()}
    return {**clip_settings(args), "checkpoint": checkpoint, "precision": args.precision}


def run(args: argparse.Namespace) -> int:
    from hybridcls.embeddings import embedding_models, embedding_rows, write_embeddings

    embedding_format(args.output)  # a wrong extension before anything loads
    sources = expand_inputs(args.inputs)
    if not sources:
        raise UsageError("no input images found in " + " ".join(args.inputs))
    world = torchrun_world()
    rank = world[0] if world else 0
    loaded = []
    record = args.run_record  # main's; written into the manifest and by --log

    def rows(todo):
        # Loaded only when something is left to embed (a finished --resume loads nothing).
        loaded.append(_engine(args))
        record.models = embedding_models(loaded[0], args.checkpoint)
        record.runtime = dict(loaded[0].applied)
        yield from embedding_rows(loaded[0], todo, progress=not args.quiet and rank == 0)

    summary = write_embeddings(rows, sources, args.output, backbone=bool(args.checkpoint),
                               settings=embed_settings(args), resume=args.resume,
                               record=record)
    if rank != 0:
        return 0  # rank 0 reports for the whole file
    if summary.resumed:
        print(f"hybridcls embed: resumed after {summary.resumed} rows already embedded",
              file=sys.stderr)
    if summary.n_error:
        print(f"hybridcls embed: {summary.n_error} of {summary.n_ok + summary.n_error} inputs failed "
              f"(rows with an error and NaN embeddings) -> {args.output}", file=sys.stderr)
        return 1
    print(f"hybridcls embed: {summary.n_ok} images embedded -> {args.output}", file=sys.stderr)
    return 0
