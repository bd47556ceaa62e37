"""``hybridcls bench quality``, ``fewshot``, ``rollup`` and ``sites`` (each also over the zoo of worlds:
``--zoo``), ``speed`` and ``memory``: benchmarks that print figures, offline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hybridcls.cache import json_text
from hybridcls.cli.common import (
    UsageError,
    add_checkpoint_argument,
    add_class_arguments,
    prompts_from_args,
)
from hybridcls.runtime import PRECISIONS

__all__ = ["add_parser", "run", "run_fewshot", "run_memory", "run_quality", "run_rollup", "run_sites",
           "run_speed", "run_zoo"]

_QUALITY_OUT = "hybridcls-bench-quality"
_FEWSHOT_OUT = "hybridcls-bench-fewshot"
_ZOO_OUT = "hybridcls-bench-zoo"
_SITES_OUT = "hybridcls-bench-sites"
_RETRAIN_K = "1,5"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="benchmarks (quality on the synthetic world)",
                                   description="Benchmarks that print figures and write JSON.")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    q = sub.add_parser("quality", help="S / U / H of every branch, gate and mode on the synthetic world "
                                       "(or on a zoo of worlds: --zoo)")
    q.add_argument("--out", default=None, metavar="DIR",
                   help="working folder; quality.md and quality.json (zoo.md and zoo.json with --zoo) "
                        f"go here (default: {_QUALITY_OUT}, or {_ZOO_OUT} with --zoo)")
    q.add_argument("--zoo", default=None, metavar="N",
                   help="measure the default gate on the first N worlds of the zoo (1 to 8: other "
                        "class counts, image sizes, nuisances, CLIPs, backbones, imbalance, unseen "
                        "classes close to or far from the seen ones), or 'ci' for two tiny worlds; "
                        "each world's spec sets what --seed, --epochs, --model and --image-size set")
    q.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="with --zoo: where the zoo's tiny CLIPs, converted weights and text "
                        "classifiers are cached (default: the user's hybridcls cache)")
    q.add_argument("--seed", type=int, default=None, help="world seed (default: 0)")
    q.add_argument("--epochs", type=int, default=None, help="supervised training epochs (default: 8)")
    q.add_argument("--model", default=None,
                   help="a timm model trained from scratch (default: EfficientNet-Lite0 from the "
                        "[dev] extra's ImageNet weights, else test_convnext from scratch)")
    q.add_argument("--image-size", type=int, default=None, help="supervised input size (default: 64)")
    q.add_argument("--workers", type=int, default=0, metavar="N")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(run=run_quality)
    fs = sub.add_parser("fewshot", help="k support images per unseen class (--support) against "
                                        "refitting the head on them (a linear probe) and against "
                                        "collecting them and retraining, on the synthetic world")
    fs.add_argument("--out", default=None, metavar="DIR",
                    help="working folder (world, runs, support draws; with --zoo, the zoo's folder and "
                         "worlds); fewshot.md and fewshot.json go here "
                         f"(default: {_FEWSHOT_OUT}, or {_ZOO_OUT} with --zoo)")
    _add_zoo_arguments(fs, "the hybrid + support route only; support images drawn from each world's "
                           "test set, scored on the rest")
    fs.add_argument("--k", default="0,1,2,5,10", metavar="K,K,...",
                    help="support images per unseen class (default: %(default)s)")
    fs.add_argument("--draws", type=int, default=3, help="draws per k (default: %(default)s)")
    fs.add_argument("--retrain-k", default=None, metavar="K,K,...",
                    help="the k of the retrain route, each a training run ('' for none; "
                         f"default: {_RETRAIN_K}; not with --zoo)")
    fs.add_argument("--retrain-draws", type=int, default=None,
                    help="draws per k of the retrain route (default: 1; not with --zoo)")
    fs.add_argument("--seed", type=int, default=None, help="world seed (default: 0)")
    fs.add_argument("--epochs", type=int, default=None, help="supervised training epochs (default: 8)")
    fs.add_argument("--model", default=None, help="as for `bench quality`")
    fs.add_argument("--image-size", type=int, default=None, help="supervised input size (default: 64)")
    fs.add_argument("--workers", type=int, default=0, metavar="N")
    fs.add_argument("-q", "--quiet", action="store_true")
    fs.set_defaults(run=run_fewshot)
    sp = sub.add_parser("speed", help="images per second: end-to-end, each tower against the machine's "
                                      "matmul limit, naive and zero-shot baselines, GMACs, time to first "
                                      "prediction (random weights, offline)")
    sp.add_argument("--out", default="hybridcls-bench-speed", metavar="DIR",
                    help="working folder; speed.json goes here (default: %(default)s)")
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: %(default)s")
    sp.add_argument("--batch-size", type=int, default=32, metavar="N", help="default: %(default)s")
    sp.add_argument("--images", type=int, default=None, metavar="N", help="JPEG files to write and read, "
                    "of each size (default: 64; 16 with --quick)")
    sp.add_argument("--sizes", nargs="+", default=None, metavar="WxH",
                    help="JPEG sizes, the first for pipeline efficiency, the cascade and zero-shot "
                         "(default: 500x375 4000x3000)")
    sp.add_argument("--precisions", nargs="+", default=["fp32", "auto"], choices=PRECISIONS, metavar="P",
                    help="precisions timed side by side, the run's own last (default: %(default)s; "
                         f"choices: {', '.join(PRECISIONS)})")
    sp.add_argument("--models", nargs=2, default=None, metavar=("TIMM", "CLIP"),
                    help="supervised timm model and open_clip model (default: convnext_tiny ViT-B-32; "
                         "'tiny' = the synthetic world's CLIP)")
    sp.add_argument("--image-size", type=int, default=None,
                    help="supervised input size (default: 224; 64 with --quick)")
    sp.add_argument("--workers", type=int, default=2, metavar="N", help="default: %(default)s")
    sp.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    sp.add_argument("--compile", action="store_true", help="torch.compile both towers")
    sp.add_argument("--gpu-decode", action="store_true", help="decode JPEG files on the GPU")
    sp.add_argument("--cascade-share", type=float, default=0.6, metavar="P",
                    help="share of images the cascade sends to CLIP (default: %(default)s)")
    sp.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="timed runs of each throughput figure, taken in turns; the fastest counts "
                         "(default: %(default)s, after one warm-up run each)")
    sp.add_argument("--quick", action="store_true",
                    help="CI-sized: test_convnext + tiny CLIP, 16 images of 160x120 and 640x480, 64 px, "
                         "4 templates (--models, --images, --sizes and --image-size, given, win)")
    sp.set_defaults(run=run_speed)
    si = sub.add_parser("sites", help="accuracy (S / U / H) with and without class lists per site, on "
                                      "the synthetic world split into sites (docs/sites.md; on the "
                                      "zoo's worlds: --zoo)")
    si.add_argument("--out", default=None, metavar="DIR",
                    help="working folder (world, run, cache; an existing one is reused; with --zoo, "
                         "the zoo's folder and worlds); sites.md and sites.json go here "
                         f"(default: {_SITES_OUT}, or {_ZOO_OUT} with --zoo)")
    _add_zoo_arguments(si)
    si.add_argument("--sites", type=int, default=5, metavar="N", help="number of sites (default: %(default)s)")
    si.add_argument("--sites-per-class", type=int, default=2, metavar="K",
                    help="at how many sites each class occurs (default: %(default)s)")
    si.add_argument("--seed", type=int, default=None,
                    help="world and split seed (default: 0; with --zoo, each world's)")
    si.add_argument("--epochs", type=int, default=None, help="supervised training epochs (default: 8)")
    si.add_argument("--workers", type=int, default=0, metavar="N")
    si.add_argument("-q", "--quiet", action="store_true")
    si.set_defaults(run=run_sites)
    me = sub.add_parser("memory", help="peak resident memory of `predict` on N vs 10N small images "
                                       "(fresh process per run, offline)")
    me.add_argument("--out", default="hybridcls-bench-memory", metavar="DIR",
                    help="working folder; memory.json goes here (default: %(default)s)")
    me.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], metavar="N",
                    help="numbers of images, smallest first (default: %(default)s)")
    me.add_argument("--image-size", type=int, default=64, metavar="PX",
                    help="side of the generated JPEG files (default: %(default)s)")
    me.add_argument("--batch-size", type=int, default=64, metavar="N", help="default: %(default)s")
    me.add_argument("--workers", type=int, default=0, metavar="N",
                    help="decoding workers (default: %(default)s, so the measured process decodes)")
    me.add_argument("--clip-model", default=None, metavar="ID", help="default: the shipped tiny CLIP")
    add_checkpoint_argument(me, "run", help="RUN_DIR: a calibrated run directory: measure the "
                                            "full hybrid (needs --prompts)")
    add_class_arguments(me, required=False, prompts_help="prompts file (default: 10 names)")
    me.add_argument("--no-warmup", action="store_true",
                    help="skip the one-image run that fills the text cache (the first run then builds it)")
    me.set_defaults(run=run_memory)
    ru = sub.add_parser("rollup", help="wrong answers without and with roll-up to a coarser label "
                                       "(shape > colour and shape > class) on the synthetic world "
                                       "(or on the zoo's worlds: --zoo)")
    ru.add_argument("--out", default=None, metavar="DIR",
                    help="working folder, shared with `bench quality` (its world and run are reused; "
                         "with --zoo, the zoo's folder and worlds); rollup.md and rollup.json go here "
                         f"(default: {_QUALITY_OUT}, or {_ZOO_OUT} with --zoo)")
    _add_zoo_arguments(ru)
    ru.add_argument("--precisions", type=float, nargs="+", default=None, metavar="P",
                    help="target precisions on the held-out seen images (default: 0.9 0.95 0.98 0.99)")
    ru.add_argument("--seed", type=int, default=None, help="world seed (default: 0)")
    ru.add_argument("--epochs", type=int, default=None,
                    help="supervised training epochs, when the run is not there yet (default: 8)")
    ru.add_argument("--workers", type=int, default=0, metavar="N")
    ru.add_argument("-q", "--quiet", action="store_true")
    ru.set_defaults(run=run_rollup)
    return parser


def _add_zoo_arguments(parser: argparse.ArgumentParser, how: str = "") -> None:
    """``--zoo`` and ``--cache-dir`` of a bench that also runs over the zoo's cached outputs."""
    parser.add_argument("--zoo", default=None, metavar="N",
                        help="on the first N worlds of `bench quality --zoo` (1 to 8; 'ci' for two "
                             "tiny ones), from their cached outputs (worlds not built yet are built)"
                             + (f": {how}" if how else ""))
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="with --zoo: as for `bench quality --zoo`")


def _check_numbers(args: argparse.Namespace, *, model_input: bool = True, **least: int) -> None:
    """Refuse a bad numeric flag before a bench builds a world or trains anything.

    Args:
        args: The bench's parsed flags.
        model_input: ``--image-size`` is the supervised input size (checked as ``train``
            checks it), not the side of generated images (``bench memory``: give ``image_size=1``).
        **least: ``dest=smallest value`` of its whole-number flags (``draws=1``). The
            training flags it has (``--epochs``, ``--image-size``, ``--workers``) are
            checked as ``train`` checks them (:class:`~hybridcls.train.TrainConfig`).

    Raises:
        UsageError: A flag below its smallest value (names it).
        InputError: A training flag out of its range (``epochs=0: ...``; the command line
            names the flag).
    """
    for dest, smallest in least.items():
        value = getattr(args, dest)
        if value is not None and value < smallest:
            raise UsageError(f"--{dest.replace('_', '-')} {value}: expected at least {smallest}")
    from hybridcls.train.config import TrainConfig

    training = ("epochs", "image_size", "workers") if model_input else ("epochs", "workers")
    TrainConfig(**{name: getattr(args, name) for name in training
                   if getattr(args, name, None) is not None})  # validated on creation


def run_rollup(args: argparse.Namespace) -> int:
    from hybridcls.bench.rollup import DEFAULT_PRECISIONS
    from hybridcls.bench.rollup import run_rollup as bench
    from hybridcls.errors import ParameterError
    from hybridcls.hierarchy import check_threshold

    _check_numbers(args, seed=0)
    for precision in args.precisions or ():
        try:
            check_threshold(precision, "rollup_precision")
        except ParameterError as err:  # the rule of HybridClassifier's rollup_precision, this flag's
            raise UsageError(f"--precisions {precision:g}: {err.reason}") from None
    precisions = tuple(args.precisions or DEFAULT_PRECISIONS)
    if args.zoo is not None:
        from hybridcls.bench.rollup import rollup_zoo

        return _run_over_zoo(args, "rollup", rollup_zoo, precisions=precisions)
    _refuse_cache_dir(args)
    out = Path(args.out or _QUALITY_OUT)
    report = bench(out, seed=0 if args.seed is None else args.seed,
                   epochs=8 if args.epochs is None else args.epochs, workers=args.workers,
                   progress=not args.quiet, precisions=precisions)
    print(report.markdown())
    print("\ntimes (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    print(f"wrote {out / 'rollup.md'} and rollup.json")
    return 0


def run_quality(args: argparse.Namespace) -> int:
    if args.zoo is not None:
        return run_zoo(args)  # its worlds set seed, epochs and image size
    # each benchmark (torch, timm, open_clip) is imported when its command runs
    from hybridcls.bench.quality import run_quality as bench

    _refuse_cache_dir(args)
    _check_numbers(args, seed=0)
    out = Path(args.out or _QUALITY_OUT)
    report = bench(out, seed=0 if args.seed is None else args.seed,
                   epochs=8 if args.epochs is None else args.epochs, model=args.model,
                   image_size=64 if args.image_size is None else args.image_size,
                   workers=args.workers, progress=not args.quiet)
    print(report.markdown())
    print("\ntimes (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    print(f"wrote {out / 'quality.md'} and quality.json")
    return 0


def _ks(text: str, flag: str) -> list[int]:
    try:
        ks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected whole numbers separated by commas") from None
    if any(k < 0 for k in ks):
        raise UsageError(f"{flag} {text!r}: k must be 0 or more")
    return ks


def run_fewshot(args: argparse.Namespace) -> int:
    from hybridcls.bench.fewshot import run_fewshot as bench

    ks = _ks(args.k, "--k")
    if args.zoo is not None:
        from hybridcls.bench.fewshot import fewshot_zoo

        # '' is "no retrain route", which --zoo is
        retrain = [flag for flag, value in (("--retrain-k", args.retrain_k or None),
                                            ("--retrain-draws", args.retrain_draws)) if value is not None]
        if retrain:
            raise UsageError(f"{', '.join(retrain)}: the retrain route is not measured with --zoo "
                             "(its support images come from each world's test set; the route "
                             "trains on rendered ones: leave out --zoo)")
        _check_numbers(args, draws=1)
        return _run_over_zoo(args, "fewshot", fewshot_zoo, ks=ks, draws=args.draws)
    _refuse_cache_dir(args)
    retrain = _ks(_RETRAIN_K if args.retrain_k is None else args.retrain_k, "--retrain-k")
    if 0 in retrain:
        raise UsageError("--retrain-k 0: the retrain route needs at least one image per unseen class")
    _check_numbers(args, draws=1, retrain_draws=1, seed=0)
    out = Path(args.out or _FEWSHOT_OUT)
    report = bench(out, seed=0 if args.seed is None else args.seed,
                   epochs=8 if args.epochs is None else args.epochs, ks=ks, draws=args.draws,
                   retrain_ks=retrain, retrain_draws=1 if args.retrain_draws is None else args.retrain_draws,
                   model=args.model, image_size=64 if args.image_size is None else args.image_size,
                   workers=args.workers, progress=not args.quiet)
    print(report.markdown())
    print("\ntimes (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    print(f"wrote {out / 'fewshot.md'} and fewshot.json")
    return 0


def _run_over_zoo(args: argparse.Namespace, name: str, bench: Any, **options: Any) -> int:
    """A bench's ``--zoo`` form: the worlds' flags refused (each world sets its own), ``bench(out,
    n, **options)`` over the zoo's folder, its table printed and ``NAME.md`` / ``.json`` named."""
    world_flags = [(flag, getattr(args, flag[2:].replace("-", "_"), None))
                   for flag in ("--seed", "--epochs", "--model", "--image-size")]
    n = _zoo_worlds(args, tuple(world_flags))
    out = Path(args.out or _ZOO_OUT)
    report = bench(out, n, cache_dir=args.cache_dir, workers=args.workers, progress=not args.quiet,
                   **options)
    print(report.markdown())
    print(f"wrote {out / (name + '.md')} and {out / (name + '.json')}")
    return 0


def _refuse_cache_dir(args: argparse.Namespace) -> None:
    if args.cache_dir is not None:
        raise UsageError("--cache-dir applies to --zoo only (the single world caches in --out)")


def _zoo_worlds(args: argparse.Namespace, world_flags: tuple[tuple[str, object], ...]) -> int | str:
    """``--zoo``'s number of worlds (or ``"ci"``), after refusing the flags each world sets itself.

    Raises:
        UsageError: One of ``world_flags`` (``(flag, value)``) given, or ``--zoo`` out of range.
    """
    from hybridcls.bench.zoo import ZOO

    given = [flag for flag, value in world_flags if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: each world of --zoo sets its own (see docs/synthetic.md)")
    n: int | str = args.zoo
    if n != "ci":
        try:
            n = int(n)
        except ValueError:
            n = 0
        if not 1 <= n <= len(ZOO):
            raise UsageError(f"--zoo takes a number of worlds from 1 to {len(ZOO)}, or 'ci'; got {args.zoo!r}")
    return n


def run_zoo(args: argparse.Namespace) -> int:
    from hybridcls.bench.zoo import run_zoo as bench

    n = _zoo_worlds(args, (("--seed", args.seed), ("--epochs", args.epochs), ("--model", args.model),
                           ("--image-size", args.image_size)))
    out = Path(args.out or _ZOO_OUT)
    report = bench(out, n, cache_dir=args.cache_dir, workers=args.workers, progress=not args.quiet,
                   log=None if args.quiet else print)
    print(report.markdown())
    for name, parts in report.seconds.items():
        print(f"times (s), {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    print(f"wrote {out / 'zoo.md'} and zoo.json; each world's cached outputs are in "
          f"{out}/<world>/features (hybridcls.bench.zoo.evaluate_zoo refits gates on them)")
    return 0


def run_sites(args: argparse.Namespace) -> int:
    from hybridcls.bench.sites import run_sites as bench

    _check_numbers(args, sites=1, sites_per_class=1, seed=0)
    if args.sites_per_class > args.sites:  # make_sites' rule, before the world and the training
        raise UsageError(f"--sites-per-class {args.sites_per_class}: expected at most --sites "
                         f"{args.sites} (each class occurs at that many different sites)")
    if args.zoo is not None:
        from hybridcls.bench.sites import sites_zoo

        return _run_over_zoo(args, "sites", sites_zoo, n_sites=args.sites,
                             sites_per_class=args.sites_per_class)
    _refuse_cache_dir(args)
    out = Path(args.out or _SITES_OUT)
    report = bench(out, seed=0 if args.seed is None else args.seed,
                   epochs=8 if args.epochs is None else args.epochs, n_sites=args.sites,
                   sites_per_class=args.sites_per_class, workers=args.workers, progress=not args.quiet)
    print(report.markdown())
    print("\ntimes (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    print(f"wrote {out / 'sites.md'} and sites.json")
    return 0


def run_speed(args: argparse.Namespace) -> int:
    from hybridcls.bench.speed import DEFAULT_MODELS, QUICK_MODELS
    from hybridcls.bench.speed import run_speed as bench

    _check_numbers(args, batch_size=1, images=1, threads=1, repeat=1)
    if not 0 <= args.cascade_share <= 1:
        raise UsageError(f"--cascade-share {args.cascade_share:g}: expected a share from 0 to 1")
    if args.gpu_decode and args.device != "cuda":
        raise UsageError("--gpu-decode needs --device cuda")
    sizes = [_size(text) for text in args.sizes] if args.sizes else None
    quick = {"images": 16, "sizes": [(160, 120), (640, 480)], "image_size": 64,
             "templates": ["a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}."]
             } if args.quick else {}
    # the flags given win over --quick's sizes; the others keep run_speed's defaults
    given = {"images": args.images, "image_size": args.image_size, "sizes": sizes}
    options = {**quick, **{name: value for name, value in given.items() if value is not None}}
    models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    report = bench(Path(args.out), device=args.device, batch_size=args.batch_size, models=models,
                   workers=args.workers, compile=args.compile, gpu_decode=args.gpu_decode,
                   cascade_share=args.cascade_share, threads=args.threads, repeat=args.repeat,
                   precisions=args.precisions, **options)
    print(report.markdown())
    print(json_text(report.info))
    print(f"wrote {Path(args.out) / 'speed.json'}")
    return 0


def _size(text: str) -> tuple[int, int]:
    """``--sizes``' ``WxH`` as ``(width, height)``."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if width < 1 or height < 1:
        raise UsageError(f"--sizes takes WIDTHxHEIGHT in pixels, such as 4000x3000; got {text!r}")
    return width, height


def run_memory(args: argparse.Namespace) -> int:
    from hybridcls.bench.memory import run_memory as bench
    from hybridcls.hybrid import check_calibrated, check_not_diverged
    from hybridcls.pretrained import is_saved_folder
    from hybridcls.supervised.checkpoint import CONFIG_FILE

    if len(args.sizes) < 2 or min(args.sizes) < 1:
        raise UsageError(f"--sizes needs two or more positive numbers, got {args.sizes}")
    _check_numbers(args, model_input=False, image_size=1, batch_size=1)
    if args.checkpoint and not prompts_from_args(args):
        raise UsageError("--checkpoint needs --prompts or --classes naming the run's classes")
    if args.checkpoint:
        # the runs are `predict --checkpoint RUN_DIR --prompts FILE`: a saved folder refuses --prompts
        folder = Path(args.checkpoint)
        what = ("no such folder" if not folder.exists() else "not a folder" if not folder.is_dir()
                else "a save_pretrained folder" if is_saved_folder(folder)
                else f"no {CONFIG_FILE}: not a training run" if not (folder / CONFIG_FILE).is_file()
                else None)
        if what is not None:
            raise UsageError(f"--checkpoint {folder}: {what}; bench memory measures a calibrated "
                             "run directory, with --prompts")
        # uncalibrated or diverged (calibrated before calibrate refused it): said here, not by a
        # child run
        check_calibrated(folder)
        check_not_diverged(folder)
    report = bench(Path(args.out), args.sizes, image_size=args.image_size, batch_size=args.batch_size,
                   workers=args.workers, clip_model=args.clip_model, checkpoint=args.checkpoint,
                   prompts=prompts_from_args(args), warmup=not args.no_warmup)
    print(report.markdown())
    print(json_text(report.info))
    print(f"wrote {Path(args.out) / 'memory.json'}")
    return 0


run = run_quality
