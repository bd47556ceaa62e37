"""``hybridcls demo``: the whole pipeline offline on the synthetic open-set world.

Generates the world (40 seen / 10 unseen classes), predicts its test folder
with the tiny CLIP that ships in the package, writes the predictions and
prints accuracy on the seen and unseen classes. CPU, no downloads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="run the pipeline offline on the synthetic open-set world",
        description="Generate the synthetic world, predict its test set and print accuracy.",
    )
    parser.add_argument("--out", default="hybridcls-demo", metavar="DIR",
                        help="where the world and the predictions go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="decoding workers (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from hybridcls.cli.predict import write_predictions
    from hybridcls.data import expand_inputs
    from hybridcls.eval import open_set_scores, read_labels
    from hybridcls.outputs import open_writer
    from hybridcls.synth import TINY_CLIP_MODEL_ID, make_world
    from hybridcls.zeroshot import ZeroShotClassifier

    out = Path(args.out)
    t0 = time.perf_counter()
    world = make_world(out / "world", seed=args.seed)
    print(f"world: {len(world.seen_classes)} seen + {len(world.unseen_classes)} unseen classes "
          f"-> {world.root} ({time.perf_counter() - t0:.1f} s)")

    clf = ZeroShotClassifier(
        clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None, prompts=world.prompts_file,
        templates=world.templates_file, device="cpu", workers=args.workers,
        cache_dir=out / "cache",
    ).fit()
    sources = expand_inputs([world.test_dir])
    predictions = out / "predictions.csv"
    with open_writer(predictions, "csv", topk=3) as writer:
        write_predictions(clf, sources, writer, progress=not args.quiet)
    print(f"predictions: {writer.n_ok} images -> {predictions}")

    labels = read_labels(world.labels_csv)
    names = [Path(s.path).name for s in sources]
    from hybridcls.outputs import read_predictions

    predicted = {Path(r["path"]).name: r["label"] for r in read_predictions(predictions)}
    scores = open_set_scores([labels[n] for n in names], [predicted[n] for n in names],
                             seen_classes=world.seen_classes)
    print("zero-shot only (tiny CLIP):")
    print(f"  accuracy {100 * scores.accuracy:.1f}%   seen classes (S) {100 * scores.seen:.1f}%   "
          f"unseen classes (U) {100 * scores.unseen:.1f}%   H {100 * scores.harmonic:.1f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
