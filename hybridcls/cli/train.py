"""``hybridcls train``: fine-tune the supervised branch on an ImageFolder-style folder.

Thin: flags become :class:`~hybridcls.train.TrainConfig` overrides (only the
flags actually given, so ``--resume`` can tell a changed option from a
default), then :func:`hybridcls.train.train` or :func:`~hybridcls.train.train_folds`
runs. Progress bars go to stderr, one line per epoch and the summary to stdout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from hybridcls.errors import InputError

__all__ = ["add_parser", "run"]


def _int_or_none(text: str) -> int | str:
    if text.lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # hybridcls.train (torch, timm) is imported by the functions that use it, not by the module
    from hybridcls.train.config import AMP_MODES, BALANCE_MODES, TrainConfig

    d = {f.name: f.default for f in fields(TrainConfig)}
    p = subparsers.add_parser(
        "train",
        help="fine-tune the supervised branch on a folder of class subfolders",
        description=(
            "Fine-tune a timm backbone with a new head on DATA_DIR (one subfolder per class). "
            "Writes config.json + model.safetensors (best epoch), metrics.csv/json, report.json "
            "and curves.png into the run directory. See docs/training.md."
        ),
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="training folder, one subfolder per class")
    p.add_argument(
        "--output",
        "-o",
        metavar="RUN_DIR",
        help="run directory to create (required unless --resume)",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--model", help=f"timm model name, optionally NAME.TAG (default: {d['model']})"
    )
    weights = model.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained",
        dest="pretrained_tag",
        metavar="TAG",
        help="timm pretrained tag (default: fb_in22k_ft_in1k for convnext_tiny, "
        "else timm's default tag)",
    )
    weights.add_argument(
        "--weights",
        metavar="FILE",
        help="local weights in timm's key layout (.safetensors or a .pth state dict)",
    )
    weights.add_argument("--no-pretrained", action="store_true", help="random initialisation")
    model.add_argument(
        "--head", choices=("mlp", "linear"), help=f"classification head (default: {d['head']})"
    )
    model.add_argument(
        "--dropout", type=float, metavar="P", help=f"head dropout (default: {d['dropout']})"
    )
    model.add_argument(
        "--freeze",
        type=_int_or_none,
        metavar="N|none",
        help=f"train only the head and the last N stages; 'none' trains everything "
        f"(default: {d['freeze']})",
    )
    model.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help="input size instead of the pretrained config's (default: the model's)",
    )
    model.add_argument("--cache-dir", metavar="DIR", help="where timm looks for downloaded weights")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=f"maximum epochs (default: {d['epochs']})")
    opt.add_argument("--batch-size", type=int, help=f"(default: {d['batch_size']})")
    opt.add_argument("--lr", type=float, help=f"AdamW peak learning rate (default: {d['lr']})")
    opt.add_argument("--weight-decay", type=float, help=f"(default: {d['weight_decay']})")
    opt.add_argument(
        "--warmup-epochs", type=float, help=f"linear warmup (default: {d['warmup_epochs']})"
    )
    opt.add_argument("--label-smoothing", type=float, help=f"(default: {d['label_smoothing']})")
    opt.add_argument(
        "--amp", choices=AMP_MODES, help=f"mixed precision on CUDA (default: {d['amp']})"
    )
    opt.add_argument(
        "--clip-grad", type=float, metavar="NORM", help="gradient-norm clipping (default: off)"
    )
    opt.add_argument(
        "--ema",
        action="store_true",
        default=None,  # None, not False: an unset flag must not count as an override on --resume
        help="keep an EMA of the weights (timm ModelEmaV3)",
    )
    opt.add_argument("--ema-decay", type=float, help=f"(default: {d['ema_decay']})")
    opt.add_argument(
        "--patience",
        type=_int_or_none,
        metavar="N|none",
        help=f"early stopping on validation loss (default: {d['patience']})",
    )
    data = p.add_argument_group("data")
    val = data.add_mutually_exclusive_group()
    val.add_argument(
        "--val-split",
        type=float,
        metavar="FRACTION",
        help=f"stratified, seeded validation share (default: {d['val_split']})",
    )
    val.add_argument("--val", dest="val_dir", metavar="DIR", help="explicit validation folder")
    data.add_argument(
        "--balance", choices=BALANCE_MODES, help=f"class balancing (default: {d['balance']})"
    )
    data.add_argument(
        "--hflip",
        type=float,
        metavar="P",
        help=f"horizontal flip probability (default: {d['hflip']})",
    )
    data.add_argument(
        "--rotation", type=float, metavar="DEG", help=f"maximum rotation (default: {d['rotation']})"
    )
    data.add_argument(
        "--color-jitter",
        type=float,
        metavar="S",
        help=f"brightness/contrast/saturation jitter (default: {d['color_jitter']})",
    )
    data.add_argument(
        "--randaugment", metavar="SPEC", help="timm RandAugment, e.g. rand-m9-mstd0.5-inc1"
    )
    data.add_argument(
        "--random-erasing", type=float, metavar="P", help="random erasing probability"
    )
    data.add_argument("--mixup", type=float, metavar="ALPHA", help="MixUp alpha (default: off)")
    data.add_argument("--cutmix", type=float, metavar="ALPHA", help="CutMix alpha (default: off)")
    run_g = p.add_argument_group("run")
    run_g.add_argument("--device", help=f"auto, cpu, cuda, cuda:N (default: {d['device']})")
    run_g.add_argument(
        "--workers", type=int, help=f"data-loading processes (default: {d['workers']})"
    )
    run_g.add_argument("--seed", type=int, help=f"(default: {d['seed']})")
    run_g.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run_g.add_argument(
        "--folds", type=int, metavar="K", help="train K stratified folds; report mean and spread"
    )
    run_g.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes of this machine (one per GPU, or CPU processes) through "
        "torchrun, with DistributedDataParallel; --batch-size stays the total per step. "
        "Multi-node: run torchrun ... -m hybridcls train yourself (docs/scale.md)",
    )
    run_g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig options given on the command line (flags left out stay None)."""
    from hybridcls.train.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    out = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for name in ("freeze", "patience"):
        if out.get(name) == "none":
            out[name] = None
    if args.no_pretrained:
        out["pretrained"] = False
    # progress is a runtime setting, not a training option: always the command line's own
    out["progress"] = not args.quiet
    return out


def _is_main_process() -> bool:
    # Under torchrun every worker runs the command; rank 0 alone reports.
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace) -> int:
    from hybridcls.gate.config import GATE_FILENAME
    from hybridcls.train import train, train_folds
    from hybridcls.train.metrics import format_epoch
    from hybridcls.train.state import unfinished_training

    if args.nproc is not None:
        from hybridcls.train.distributed import launch, strip_nproc

        # Every worker runs this very command line, minus --nproc, under torchrun.
        return launch(args.nproc, strip_nproc(args.argv))
    overrides = _overrides(args)
    if args.folds is not None:
        if args.resume:
            raise InputError("--folds and --resume exclude each other")
        if args.output is None:
            raise InputError("--output RUN_DIR is required")
        folds = train_folds(
            args.data_dir,
            args.output,
            args.folds,
            on_epoch_end=lambda r: print(
                f"fold {r['fold']}/{args.folds}  {format_epoch(r)}", flush=True
            ),
            **overrides,
        )
        # for --log, as a run's: the folds' epochs (summed), none resumed (folds do not resume)
        args.run_record.finish(folds=len(folds.folds), epochs=sum(r.epochs_run for r in folds.folds),
                               resumed=0)
        if _is_main_process():
            print(folds.summary())
        return 0
    if args.resume is None and args.output is None:
        raise InputError("--output RUN_DIR is required (or --resume RUN_DIR to continue a run)")
    # a gate calibrated on an interrupted run's weights no longer holds once it trains on
    stale_gate = (args.resume is not None and (Path(args.resume) / GATE_FILENAME).is_file()
                  and unfinished_training(args.resume) is not None)
    result = train(
        args.data_dir,
        args.output,
        resume=args.resume,
        on_epoch_end=lambda r: print(format_epoch(r), flush=True),
        **overrides,
    )
    # for --log: the run's epochs, and those an earlier run had trained (0: a new run)
    args.run_record.finish(epochs=result.epochs_run, resumed=result.resumed_from or 0)
    if _is_main_process():
        print(result.summary())
        if stale_gate:  # loading refuses it too (HybridClassifier.gate_error_); said where it happens
            print(f"hybridcls train: {args.resume}/{GATE_FILENAME} was calibrated on the weights before "
                  "this resume and no longer holds: run `hybridcls calibrate "
                  f"{shlex.quote(args.resume)} --prompts FILE`", file=sys.stderr)
    return 0
