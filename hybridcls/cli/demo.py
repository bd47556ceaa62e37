"""``hybridcls demo``: the whole pipeline offline on the synthetic open-set world.

Generates the world (40 seen / 10 unseen classes), trains the supervised
branch on the seen classes (a tiny timm model, CPU), calibrates the gate
with no unseen images, predicts the test folder with the hybrid and the
tiny CLIP that ships in the package, writes the predictions, and prints S,
U, H and accuracy for supervised only, zero-shot only, the hybrid, the hybrid
with 5 support images per unseen class (``--support``, no retraining) and the
oracle router. No downloads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["add_parser", "run"]

#: Support images per unseen class in the demo's few-shot row.
_SUPPORT_K = 5


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="run the pipeline offline on the synthetic open-set world",
        description="Generate the synthetic world, train, calibrate, predict and print S/U/H.",
    )
    parser.add_argument("--out", default="hybridcls-demo", metavar="DIR",
                        help="where the world, the run and the predictions go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="decoding workers (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch CPU threads (default: %(default)s; the demo's models are tiny, "
                             "and on a busy machine more threads wait on each other)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # the pipeline (torch, timm, open_clip) is imported when the command runs
    import numpy as np
    import torch

    from hybridcls.bench.quality import labelled_test_set, prepare_world_run, reference_rows
    from hybridcls.gate import BranchOutputs
    from hybridcls.gate.metrics import seen_unseen_accuracy
    from hybridcls.outputs import open_writer
    from hybridcls.synth.support import render_support

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    t0 = time.perf_counter()
    world, clf, seconds = prepare_world_run(out, seed=args.seed, epochs=args.epochs,
                                            workers=args.workers, progress=not args.quiet)
    print(f"world: {len(world.seen_classes)} seen + {len(world.unseen_classes)} unseen classes -> {world.root}")
    print(f"supervised branch trained -> {clf.run_dir_} ({seconds['train']:.0f} s)")
    g = clf.gate_.calibration_
    print(f"gate calibrated without unseen images: {g.score} / {g.mode}, "
          f"threshold {g.threshold:.3f} ({seconds['calibrate']:.0f} s)")

    sources, y = labelled_test_set(world, clf)
    predictions = out / "predictions.csv"
    batches, preds = [], []
    paths = [s.path for s in sources]
    with open_writer(predictions, "csv", topk=3, extra_columns=clf.EXTRA_COLUMNS) as writer:
        # Both towers on every image, so that the comparison rows below come from this one pass.
        for batch, res in clf.iter_predictions(sources, clip="all", progress=not args.quiet):
            writer.write_many(clf.batch_rows(paths, batch, res, topk=3))
            batches.append(batch)
            if res is not None:
                preds.append(res.pred)
    feats = BranchOutputs.concat([b.outputs for b in batches if b.outputs is not None])
    y = y[[i for b in batches for i in b.ok]]  # figures over the decoded images
    print(f"predictions: {writer.n_ok} images ({writer.n_error} errors) -> {predictions}")

    S = clf.n_seen_
    pred = np.concatenate(preds)
    s, u, h = seen_unseen_accuracy(y, pred, S)
    ref = {r.method: r for r in reference_rows(feats, y, S)}
    hybrid_acc = float((pred == y).mean())
    # a few images of each unseen class, rendered apart from the test images, joined at once
    support = out / f"support-k{_SUPPORT_K}"
    if not support.is_dir():
        render_support(world, support, _SUPPORT_K)
    t = time.perf_counter()
    few = clf.add_support(support).predict_features(feats).pred
    print(f"support: {_SUPPORT_K} images per unseen class -> {support} ({time.perf_counter() - t:.0f} s)")
    print(f"\n{'':28s}{'S':>7s}{'U':>7s}{'H':>7s}{'acc':>7s}")
    for name, (rs, ru, rh, ra) in [
        ("supervised only", _f(ref["supervised only"])),
        ("zero-shot only (tiny CLIP)", _f(ref["zero-shot only"])),
        ("hybrid (calibrated gate)", (s, u, h, hybrid_acc)),
        (f"hybrid + {_SUPPORT_K} support/unseen", (*seen_unseen_accuracy(y, few, S), float((few == y).mean()))),
        ("oracle router", _f(ref["oracle router"])),
    ]:
        print(f"{name:28s}{100 * rs:7.1f}{100 * ru:7.1f}{100 * rh:7.1f}{100 * ra:7.1f}")
    print(f"\nS/U: mean per-class accuracy on seen/unseen classes' images; H: their harmonic mean. "
          f"Done in {time.perf_counter() - t0:.0f} s.")
    return 0


def _f(row) -> tuple[float, float, float, float]:
    return row.seen, row.unseen, row.harmonic, row.accuracy
