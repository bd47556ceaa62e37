"""``hybridcls predict``: classify images, zero-shot only or with the hybrid (``--checkpoint``).

Every input becomes one output row, in input order; exit status 0 when all
were predicted, 1 when some failed (a summary goes to stderr), 2 on usage errors.
A file output is flushed per batch and can be continued with ``--resume``;
``--shard I/N`` predicts one share for ``hybridcls merge``; under torchrun
each rank predicts its share and rank 0 merges (see docs/scale.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.outputs import (
    FORMATS,
    PredictionRow,
    PredictionWriter,
    check_unique_keys,
    infer_format,
    open_writer,
)

__all__ = [
    "add_clip_arguments",
    "add_clip_model_arguments",
    "add_parser",
    "add_runtime_arguments",
    "hybrid_from_args",
    "prediction_settings",
    "rows_from_batch",
    "run",
    "validate_runtime_arguments",
    "write_predictions",
    "zeroshot_rows",
]


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """The zero-shot branch's flags, shared by every subcommand that runs CLIP."""
    g = parser.add_argument_group("zero-shot branch (open_clip)")
    g.add_argument("--prompts", required=True, metavar="FILE",
                   help="class prompts file: one class per line, 'name: description | synonym'")
    g.add_argument("--templates", metavar="FILE",
                   help="prompt templates with a {} placeholder (default: OpenAI ImageNet templates)")
    g.add_argument("--truncate-prompts", action="store_true",
                   help="let the tokenizer cut class texts longer than the CLIP's context (a warning "
                        "counts them) instead of refusing them (docs/prompts.md)")
    add_clip_model_arguments(g)


def add_clip_model_arguments(g: argparse._ActionsContainer) -> None:
    """The open_clip model flags (--clip-model, --clip-pretrained, --cache-dir), for any CLIP user."""
    g.add_argument("--clip-model", default="ViT-B-32", metavar="ID",
                   help="open_clip model: a built-in name, hf-hub:ORG/REPO or local-dir:DIR "
                        "(default: %(default)s)")
    g.add_argument("--clip-pretrained", default="laion2b_s34b_b79k", metavar="TAG|FILE",
                   help="pretrained tag or local weights file for a built-in name "
                        "(default: %(default)s; ignored for hf-hub: and local-dir:)")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="cache for downloaded weights and text classifiers "
                        "(default: $HYBRIDCLS_CACHE_DIR or ~/.cache/hybridcls)")


def add_runtime_arguments(parser: argparse.ArgumentParser, *, engine_options: bool = True) -> None:
    """--batch-size, --workers, --device, -q; with ``engine_options`` also --compile and --gpu-decode."""
    g = parser.add_argument_group("runtime")
    g.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch (default: %(default)s)")
    g.add_argument("--workers", type=int, default=2, metavar="N",
                   help="image-decoding worker processes (default: %(default)s)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    if engine_options:
        g.add_argument("--compile", action="store_true",
                       help="torch.compile both towers (fixed batch shapes; pays off on long runs)")
        g.add_argument("--gpu-decode", action="store_true",
                       help="decode JPEG files on the GPU (CUDA only; other files use the CPU decoder)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="classify images (zero-shot over every class in --prompts)",
        description="Classify images. Inputs may be files, folders (recursive), globs, "
                    "or .txt/.csv files listing paths.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image, folder, glob or list file")
    add_clip_arguments(parser)
    add_runtime_arguments(parser)
    hy = parser.add_argument_group("hybrid (with a trained and calibrated supervised branch)")
    hy.add_argument("--checkpoint", metavar="RUN_DIR",
                    help="run directory from `hybridcls train` + `hybridcls calibrate`; "
                         "without it, predictions are zero-shot only")
    hy.add_argument("--mode", choices=["hard", "soft", "stacking"], default=None,
                    help="override the calibrated decision mode")
    hy.add_argument("--cascade", action="store_true",
                    help="run CLIP only where the supervised branch is not already sure "
                         "(threshold fitted by `hybridcls calibrate`)")
    hy.add_argument("--unknown-threshold", type=float, default=None, metavar="P",
                    help="answer 'unknown' when neither branch's top probability reaches P")
    out = parser.add_argument_group("output")
    out.add_argument("--topk", type=int, default=5, metavar="K", help="top-k labels per row (default: %(default)s)")
    out.add_argument("-o", "--output", default="-", metavar="PATH",
                     help="output file ('-' for standard output, the default); a file gets "
                          "PATH.manifest.json beside it, for --resume and `hybridcls merge`")
    out.add_argument("--format", choices=FORMATS, default=None,
                     help="csv, jsonl or kaggle (image_id,class); default: from the extension, else csv")
    sc = parser.add_argument_group("scale (docs/scale.md)")
    sc.add_argument("--resume", action="store_true",
                    help="keep the rows an interrupted run of the same command wrote to --output and "
                         "predict the rest (starts afresh when the file does not exist)")
    sc.add_argument("--shard", metavar="I/N", default=None,
                    help="predict only shard I of N (counting from 0) of the inputs, e.g. an array "
                         "job's task; join the parts with `hybridcls merge`")
    parser.set_defaults(run=run)
    return parser


def rows_from_batch(
    paths: list[str],
    indices: list[int],
    probs: np.ndarray,
    ok: list[int],
    errors: dict[int, str],
    classes: np.ndarray,
    topk: int,
    branch: str,
) -> list[PredictionRow]:
    """Turn one batch of class probabilities into rows, one per index, in order."""
    prob_of = {idx: probs[j] for j, idx in enumerate(ok)}
    rows = []
    for idx in indices:
        if idx in errors or idx not in prob_of:
            rows.append(PredictionRow.failed(paths[idx], errors.get(idx, "not predicted")))
            continue
        p = prob_of[idx]
        order = np.argsort(-p, kind="stable")[: max(topk, 1)]
        best = int(order[0])
        rows.append(PredictionRow(
            path=paths[idx], label=str(classes[best]), score=float(p[best]), branch=branch,
            topk=[(str(classes[k]), float(p[k])) for k in order[:topk]],
        ))
    return rows


def validate_runtime_arguments(args: argparse.Namespace) -> None:
    """Check the flags of :func:`add_runtime_arguments`; raises ``UsageError`` naming the flag."""
    from hybridcls.cli import UsageError

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    if getattr(args, "gpu_decode", False) and args.device != "cuda":
        raise UsageError("--gpu-decode needs --device cuda")
    args.resume = getattr(args, "resume", False)
    args.shard = getattr(args, "shard", None)
    if isinstance(args.shard, str):
        from hybridcls.sharding import ShardSpec

        args.shard = ShardSpec.parse(args.shard)
    to_stdout = args.output in (None, "-")
    if to_stdout and (args.resume or args.shard is not None):
        raise UsageError(f"{'--resume' if args.resume else '--shard'} needs --output FILE")
    from hybridcls.sharding import torchrun_world

    if to_stdout and torchrun_world() is not None:
        raise UsageError("under torchrun, predict needs --output FILE (rank 0 merges the ranks' parts)")


def _validate(args: argparse.Namespace) -> None:
    from hybridcls.cli import UsageError

    validate_runtime_arguments(args)
    if args.topk < 1:
        raise UsageError(f"--topk must be at least 1, got {args.topk}")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    from hybridcls.data import expand_inputs

    sources = expand_inputs(args.inputs)
    if not sources:
        from hybridcls.cli import UsageError

        raise UsageError("no input images found in " + " ".join(args.inputs))
    # Every usage error before the first byte of output: Kaggle ids first (no model needed),
    # then the model (loaded before the writer opens; for a file, in predict_to_output).
    check_unique_keys((s.path for s in sources), infer_format(args.output, args.format))
    if args.output in (None, "-"):
        if args.checkpoint:
            return _run_hybrid(args, sources)
        clf = _zeroshot_from_args(args)
        with open_writer(args.output, args.format, topk=args.topk) as writer:
            write_predictions(clf, sources, writer, progress=not args.quiet)
        return _finish(writer.n_ok, writer.n_error, args.output)
    return _run_to_file(args, sources)


def _zeroshot_from_args(args: argparse.Namespace):
    from hybridcls.zeroshot import ZeroShotClassifier

    return ZeroShotClassifier(
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained or None,
        prompts=args.prompts, templates=args.templates, truncate_prompts=args.truncate_prompts,
        device=args.device, batch_size=args.batch_size, workers=args.workers, cache_dir=args.cache_dir,
    ).fit()


def _run_to_file(args: argparse.Namespace, sources) -> int:
    """File output: resumable, shardable, and merged across torchrun ranks."""
    from hybridcls.sharding import predict_to_output, torchrun_world

    fmt = infer_format(args.output, args.format)
    world = torchrun_world()
    rank = world[0] if world else 0
    progress = not args.quiet and rank == 0
    extra: tuple[str, ...] = ()
    if args.checkpoint:
        from hybridcls.hybrid import HybridClassifier

        extra = tuple(HybridClassifier.EXTRA_COLUMNS)

    loaded = []  # the hybrid, once loaded: its engine counts the images the CLIP tower encoded

    def predict_rows(todo):
        # Loaded only when something is left to predict (a finished --resume loads nothing), and
        # before the output is touched: predict_to_output waits for the first batch.
        if args.checkpoint:
            loaded.append((hybrid_from_args(args), len(todo)))
            yield from loaded[-1][0].rows(todo, topk=args.topk, progress=progress)
        else:
            yield from zeroshot_rows(_zeroshot_from_args(args), todo, args.topk, progress=progress)

    summary = predict_to_output(
        predict_rows, sources, args.output, fmt=fmt, topk=args.topk, extra_columns=extra,
        settings=prediction_settings(args), shard=args.shard, resume=args.resume,
    )
    if rank != 0:
        return 0  # rank 0 reports for the merged file
    if summary.resumed:
        print(f"hybridcls predict: resumed after {summary.resumed} rows already in {args.output}",
              file=sys.stderr)
    if loaded and not world:
        # what lazy zero-shot or --cascade saved (under torchrun each rank counts only its part)
        clf, n = loaded[-1]
        print(f"hybridcls predict: the CLIP image tower ran on {clf.engine_.clip_images_encoded} of "
              f"{n} inputs", file=sys.stderr)
    return _finish(summary.n_ok, summary.n_error, args.output)


def prediction_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What changes the rows of ``predict``: a resumed file or merged parts must agree on it.

    Files are identified by content (SHA-256), so the parts of an array job
    merge even when each machine keeps the model under another path.
    Batch size, workers and device are left out: they do not change a row.
    """
    from hybridcls.cache import file_fingerprint
    from hybridcls.hybrid import GATE_FILE, INDEX_DIR
    from hybridcls.supervised.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    def fingerprint(path: str | None) -> Any:
        if not path:
            return None
        p = Path(path)
        if p.is_dir():
            return {f.name: file_fingerprint(f) for f in sorted(p.iterdir()) if f.is_file()}
        return file_fingerprint(p) if p.is_file() else path

    clip = args.clip_model
    settings: dict[str, Any] = {
        "clip_model": fingerprint(clip[len("local-dir:"):]) if clip.startswith("local-dir:") else clip,
        "clip_pretrained": None if clip.startswith(("local-dir:", "hf-hub:"))
        else fingerprint(args.clip_pretrained),
        "prompts": fingerprint(args.prompts),
        "templates": fingerprint(args.templates),
        "topk": args.topk,
        "checkpoint": None,
    }
    if args.checkpoint:
        run_dir = Path(args.checkpoint)
        # The files load_run reads: weights and config, gate, embedding index (when present).
        settings["checkpoint"] = {
            name: file_fingerprint(run_dir / name)
            for name in (CONFIG_FILE, WEIGHTS_FILE, GATE_FILE)
            if (run_dir / name).is_file()
        }
        if (run_dir / INDEX_DIR).is_dir():
            settings["checkpoint"][INDEX_DIR] = fingerprint(run_dir / INDEX_DIR)
        settings.update(mode=args.mode, cascade=args.cascade, unknown_threshold=args.unknown_threshold)
    return settings


def hybrid_from_args(args: argparse.Namespace):
    """A :class:`~hybridcls.hybrid.HybridClassifier` loaded from ``--checkpoint`` and the CLIP flags."""
    from hybridcls.hybrid import HybridClassifier

    return HybridClassifier(
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained or None,
        templates=args.templates, truncate_prompts=args.truncate_prompts,
        mode=getattr(args, "mode", None),
        unknown_threshold=getattr(args, "unknown_threshold", None),
        cascade=getattr(args, "cascade", False), compile=getattr(args, "compile", False),
        decode="device" if getattr(args, "gpu_decode", False) else "cpu", device=args.device,
        batch_size=args.batch_size, workers=args.workers, cache_dir=args.cache_dir,
        progress=not args.quiet,
    ).load_run(args.checkpoint, args.prompts)


def _run_hybrid(args: argparse.Namespace, sources) -> int:
    clf = hybrid_from_args(args)
    with open_writer(args.output, args.format, topk=args.topk,
                     extra_columns=clf.EXTRA_COLUMNS) as writer:
        for rows in clf.rows(sources, topk=args.topk):
            writer.write_many(rows)
    return _finish(writer.n_ok, writer.n_error, args.output)


def zeroshot_rows(clf, sources, topk: int, *, progress: bool = True) -> Iterator[list[PredictionRow]]:
    """A fitted zero-shot classifier's output rows over ``sources``, one list per batch, in order."""
    paths = [s.path for s in sources]
    for batch in clf.iter_predictions(sources, progress=progress):
        yield rows_from_batch(paths, batch.indices, batch.probs, batch.ok, batch.errors,
                              clf.classes_, topk, branch="zeroshot")


def write_predictions(clf, sources, writer: PredictionWriter, *, progress: bool = True) -> None:
    """Stream a fitted classifier's predictions over ``sources`` into ``writer``, batch by batch."""
    for rows in zeroshot_rows(clf, sources, writer.topk, progress=progress):
        writer.write_many(rows)


def _finish(n_ok: int, n_error: int, output: str) -> int:
    where = "" if output == "-" else f" -> {output}"
    if n_error:
        print(f"hybridcls predict: {n_error} of {n_ok + n_error} inputs failed "
              f"(rows with status=error){where}", file=sys.stderr)
        return 1
    print(f"hybridcls predict: {n_ok} images predicted{where}", file=sys.stderr)
    return 0
