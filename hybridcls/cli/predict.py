"""``hybridcls predict``: classify images, zero-shot only or with the hybrid (``--checkpoint``).

Both modes run the same path (:class:`~hybridcls.predictor.Predictor`): a
zero-shot-only run is a hybrid with no seen classes. Every input becomes one
output row, in input order; exit status 0 when all were predicted, 1 when
some failed (a summary goes to stderr), 2 on usage errors. A file output is
flushed per batch and can be continued with ``--resume``; ``--shard I/N``
predicts one share for ``hybridcls merge``; under torchrun each rank predicts
its share and rank 0 merges (see docs/scale.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hybridcls.cli.common import (
    UsageError,
    add_checkpoint_argument,
    add_clip_arguments,
    add_runtime_arguments,
    clip_settings,
    path_fingerprint,
    prompts_from_args,
)
from hybridcls.cli.decision import (
    add_decision_arguments,
    add_revision_argument,
    add_topk_argument,
    check_decision_arguments,
    check_topk_argument,
    classifier_from_args,
    rollup_given,
    saved_folder_hybrid,
    saved_folder_prompts,
    site_classes_from_args,
)
from hybridcls.data import expand_inputs
from hybridcls.outputs import (
    FORMATS,
    check_unique_keys,
    extra_columns,
    infer_format,
    open_writer,
)
from hybridcls.sharding import ShardSpec, predict_to_output
from hybridcls.torchrun import torchrun_world

__all__ = ["add_parser", "classifier_from_args", "prediction_settings", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="classify images (zero-shot over every class in --prompts, or the hybrid)",
        description="Classify images. Inputs may be files, folders (recursive), globs, "
                    "or .txt/.csv files listing paths.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image, folder, glob or list file")
    # a save_pretrained folder carries its prompts: checked in _validate
    add_clip_arguments(parser, prompts_required=False)
    add_runtime_arguments(parser)
    add_decision_arguments(parser)
    hy = parser.add_argument_group("hybrid (with a trained and calibrated supervised branch)")
    add_checkpoint_argument(
        hy, "run", "saved", "hub",
        help="RUN_DIR: a run directory from `hybridcls train` + `hybridcls calibrate`; SAVED_DIR: "
             "a folder from save_pretrained, or ORG/NAME: its Hugging Face Hub repo id (both "
             "carry their prompts: no --prompts); without it, predictions are zero-shot only")
    add_revision_argument(hy)
    out = parser.add_argument_group("output")
    add_topk_argument(out, "top-k labels per row")
    out.add_argument("--all-scores", action="store_true",
                     help="every class's probability per row (they sum to 1): one 'score:<class>' "
                          "column per class in CSV, a 'scores' object in JSON Lines; not with "
                          "--format kaggle")
    out.add_argument("-o", "--output", default="-", metavar="PATH",
                     help="output file ('-' for standard output, the default); a file gets "
                          "PATH.manifest.json beside it, for --resume and `hybridcls merge`")
    out.add_argument("--format", choices=FORMATS, default=None,
                     help="csv, jsonl or kaggle (image_id,class); default: from the extension, else csv")
    out.add_argument("--model-version", action="store_true",
                     help="add a model_version column: a short id of both towers' weights, the gate "
                          "and the class texts, the same in every row (docs/provenance.md)")
    sc = parser.add_argument_group("scale (docs/scale.md)")
    sc.add_argument("--resume", action="store_true",
                    help="keep the rows an interrupted run of the same command wrote to --output and "
                         "predict the rest (starts afresh when the file does not exist)")
    sc.add_argument("--shard", metavar="I/N", default=None,
                    help="predict only shard I of N (counting from 0) of the inputs, e.g. an array "
                         "job's task; join the parts with `hybridcls merge`")
    parser.set_defaults(run=run)
    return parser


def _validate(args: argparse.Namespace) -> None:
    """What only the command line can get wrong; every other value is checked where it is used."""
    # a save_pretrained folder (a Hub repo's: fetched) carries its prompts, and its saved
    # class-text matrix; None: a run directory, with --prompts / --classes
    saved = saved_folder_prompts(args)
    args.saved_folder = saved is not None
    args.prompts = saved or args.prompts
    if isinstance(args.shard, str):
        args.shard = ShardSpec.parse(args.shard)
    check_decision_arguments(args)
    check_topk_argument(args)
    if args.all_scores and infer_format(args.output, args.format) == "kaggle":
        raise UsageError("--all-scores needs CSV or JSON Lines: a Kaggle submission (--format "
                         "kaggle) holds image_id and class only")
    to_stdout = args.output in (None, "-")
    if to_stdout and (args.resume or args.shard is not None):
        raise UsageError(f"{'--resume' if args.resume else '--shard'} needs --output FILE")
    if to_stdout and torchrun_world() is not None:
        raise UsageError("under torchrun, predict needs --output FILE (rank 0 merges the ranks' parts)")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    sources = expand_inputs(args.inputs)
    if not sources:
        raise UsageError("no input images found in " + " ".join(args.inputs))
    fmt = infer_format(args.output, args.format)
    check_unique_keys((s.path for s in sources), fmt)  # before any model loads or byte is written
    sites = site_classes_from_args(args, sources)  # the class lists' files and names, before any model loads
    classes = _class_names(args) if args.all_scores else None
    extra = extra_columns(fmt, branch_columns=bool(args.checkpoint),
                          model_version=args.model_version, score_classes=classes,
                          rollup=rollup_given(args))
    world = torchrun_world()
    rank = world[0] if world else 0
    progress = not args.quiet and rank == 0
    loaded = []  # the classifier, once loaded: its engine says what it applied and what CLIP ran on
    record = args.run_record  # main's; written into the manifest and by --log

    def predict_rows(todo):
        # Loaded only when something is left to predict (a finished --resume loads nothing).
        loaded.append(classifier_from_args(
            args, sites, hybrid=saved_folder_hybrid(args) if args.saved_folder else None))
        if args.all_scores and list(loaded[0].classes_) != classes:  # pragma: no cover
            # the header was written from _class_names: a change of the class order must reach it
            raise RuntimeError(f"bug: the classifier's classes {list(loaded[0].classes_)} are not "
                               f"the --all-scores columns {classes}")
        record.describe(loaded[0])
        yield from loaded[0].rows(todo, topk=args.topk, progress=progress,
                                  model_version=args.model_version, all_scores=args.all_scores)

    if args.output in (None, "-"):
        rows = predict_rows(sources)
        first = next(rows, [])  # the models load (and may fail) before the header is written
        with open_writer(args.output, args.format, topk=args.topk, extra_columns=extra) as writer:
            writer.write_many(first)
            for batch in rows:
                writer.write_many(batch)
        record.finish(predicted=writer.n_ok, failed=writer.n_error, unknown=writer.n_unknown)
        return _finish(writer.n_ok, writer.n_error, args.output, loaded, len(sources))
    summary = predict_to_output(
        predict_rows, sources, args.output, fmt=fmt,
        topk=args.topk, extra_columns=extra, settings=prediction_settings(args),
        shard=args.shard, resume=args.resume, record=record,
    )
    if rank != 0:
        return 0  # rank 0 reports for the merged file
    if summary.resumed:
        print(f"hybridcls predict: resumed after {summary.resumed} rows already in {args.output}",
              file=sys.stderr)
    # under torchrun each rank counts only its part of what CLIP ran on
    return _finish(summary.n_ok, summary.n_error, args.output, [] if world else loaded,
                   len(sources) - summary.resumed)


def _class_names(args: argparse.Namespace) -> list[str]:
    """The classes in ``classes_`` order (seen first, for a hybrid), read before any model loads:
    ``--all-scores`` writes one CSV column per class in the header."""
    from hybridcls.supervised.checkpoint import read_checkpoint_config
    from hybridcls.zeroshot.prompts import align_classes, as_prompt_set

    prompts = as_prompt_set(prompts_from_args(args))
    if args.checkpoint:
        seen = [str(c) for c in read_checkpoint_config(args.checkpoint, parameter="checkpoint")["classes"]]
        prompts = align_classes(seen, prompts)
    return prompts.names


def prediction_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What changes the rows of ``predict``: a resumed file or merged parts must agree on it.

    Files are identified by content (SHA-256), so the parts of an array job
    merge even when each machine keeps the model under another path. Batch
    size, workers, device and compile are left out: they do not change a row
    (the manifest's ``record`` keeps them); precision does (the scores move).
    ``--checkpoint`` is every file loading it reads (:data:`hybridcls.pretrained.RUN_FILES`,
    or ``SAVED_FOLDER_FILES`` for a saved folder).
    """
    # torch and timm come with the pretrained module: imported when a command runs
    from hybridcls.pretrained import RUN_FILES, SAVED_FOLDER_FILES

    settings: dict[str, Any] = {
        **clip_settings(args),
        "prompts": path_fingerprint(args.prompts, args.cache_dir),
        "classes": args.classes,
        "templates": path_fingerprint(args.templates, args.cache_dir),
        "topk": args.topk,
        "precision": args.precision,
        "unknown_threshold": args.unknown_threshold,
        "rollup_threshold": args.rollup_threshold,
        "rollup_precision": args.rollup_precision,
        "truncate_prompts": args.truncate_prompts,
        "allowed_classes": args.allowed_classes,
        "site_classes": path_fingerprint(args.site_classes, args.cache_dir),
        "support": path_fingerprint(args.support, args.cache_dir),
        "checkpoint": None,
    }
    if args.checkpoint:
        folder = Path(args.checkpoint)
        # The files loading it reads (those present): a saved folder's class-text matrix and
        # templates too, which no flag names (it refuses --templates)
        names = SAVED_FOLDER_FILES if args.saved_folder else RUN_FILES
        settings["checkpoint"] = {
            name: path_fingerprint(str(folder / name), args.cache_dir)
            for name in names if (folder / name).exists()
        }
        settings.update(mode=args.mode, cascade=args.cascade)
    return settings


def _finish(n_ok: int, n_error: int, output: str, loaded: list[Any], n_predicted: int) -> int:
    where = "" if output == "-" else f" -> {output}"
    if loaded and loaded[0].engine_.supervised is not None:
        # what lazy zero-shot or --cascade saved
        print(f"hybridcls predict: the CLIP image tower ran on {loaded[0].engine_.clip_images_encoded} "
              f"of {n_predicted} inputs", file=sys.stderr)
    if n_error:
        print(f"hybridcls predict: {n_error} of {n_ok + n_error} inputs failed "
              f"(rows with status=error){where}", file=sys.stderr)
        return 1
    print(f"hybridcls predict: {n_ok} images predicted{where}", file=sys.stderr)
    return 0
