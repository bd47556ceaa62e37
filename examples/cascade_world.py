"""The cascade on the synthetic world: CLIP only where the supervised branch needs it.

Trains the world's supervised branch once (reused on later runs), calibrates
(which fits both cascade thresholds and writes ``index/backbone.*``), then
predicts the test folder twice through the real engine, from the files:

* the full hybrid (both towers on every image);
* the cascade (``cascade=True``): CLIP only where the supervised maximum
  softmax probability is at or below ``cascade_msp`` or the backbone features
  lie farther than ``cascade_distance`` from the training images'.

It prints, for each: S / U / H, the share of images the CLIP tower encoded
(counted by the engine) and the wall time; then which condition sent the
unseen images to CLIP.

Usage::

    python examples/cascade_world.py runs/cascade

About 4 minutes on 2 idle CPU cores (training 2-3, calibration and the two passes
under 1). One run printed (the wall times depend on the machine's load)::

    cascade thresholds: CLIP where MSP <= 0.902 or distance to the 5th nearest training image > 0.611
    full hybrid: S 97.6 U 87.5 H 92.3; CLIP on 100% of images; ...
    cascade    : S 98.0 U 87.5 H 92.5; CLIP on 71% of images; ...
    unseen test images: 200; sent to CLIP by the MSP: 192, by the feature distance alone: 6, kept in the supervised branch: 2

The world's CLIP is tiny, so here the cascade saves little time; with
ViT-B-32 beside ConvNeXt-Tiny, see ``hybridcls bench speed`` (docs/benchmarks.md).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from hybridcls.bench.quality import labelled_test_set, prepare_world_run
from hybridcls.gate import max_softmax
from hybridcls.gate.metrics import seen_unseen_accuracy


def main(out: Path) -> None:
    world, clf, _ = prepare_world_run(out, seed=0, epochs=4)
    sources, y = labelled_test_set(world, clf)
    S = clf.n_seen_
    index = {c: i for i, c in enumerate(clf.classes_)}
    g = clf.gate_.calibration_
    print(f"cascade thresholds: CLIP where MSP <= {g.cascade_msp:.3f} "
          f"or distance to the {g.cascade_k}th nearest training image > {g.cascade_distance:.3f}")

    for cascade in (False, True):
        clf.set_params(cascade=cascade)
        before = clf.engine_.clip_images_encoded
        t = time.perf_counter()
        pred = np.array([index[c] for c in clf.predict(sources)])
        seconds = time.perf_counter() - t
        share = (clf.engine_.clip_images_encoded - before) / len(sources)
        s, u, h = seen_unseen_accuracy(y, pred, S)
        print(f"{'cascade    ' if cascade else 'full hybrid'}: S {100 * s:.1f} U {100 * u:.1f} H {100 * h:.1f}; "
              f"CLIP on {100 * share:.0f}% of images; {seconds:.1f} s for {len(sources)} images")

    # Which condition sent each unseen image to CLIP: the MSP, or only the feature distance?
    feats = clf.extract_features(sources)
    unsure = max_softmax(feats.sup_logits) <= g.cascade_msp
    to_clip = ~clf.cascade_skips_clip(feats)
    unseen = y >= S
    print(f"unseen test images: {unseen.sum()}; sent to CLIP by the MSP: {(unsure & unseen).sum()}, "
          f"by the feature distance alone: {(to_clip & ~unsure & unseen).sum()}, "
          f"kept in the supervised branch: {(~to_clip & unseen).sum()}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cascade"))
