"""Audit a synthetic world with planted problems and score what the audit finds.

    python examples/audit_world.py [OUT_DIR]

Builds a small synthetic world (``hybridcls.synth.make_world``), plants
near-duplicates, mislabels, leaked test images and unreadable files
(``hybridcls.audit.plant_problems``), runs ``audit_dataset`` with the shipped
tiny CLIP, and prints recall and precision of each finding. The report lands
in ``OUT_DIR/world/train-audit/index.html``. Offline, about 20 s on one CPU core.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hybridcls.audit import audit_dataset, plant_problems
from hybridcls.synth import TINY_CLIP_MODEL_ID, make_world


def score(found: set, truth: set) -> str:
    hit = len(found & truth)
    recall = hit / len(truth) if truth else 1.0
    precision = hit / len(found) if found else 1.0
    return f"recall {recall:.2f} ({hit}/{len(truth)}), precision {precision:.2f} ({hit}/{len(found)})"


def main(out: Path) -> None:
    world = make_world(out / "world", seed=0, n_classes=10, n_unseen=2,
                       train_per_class=(30, 60), test_per_class=10)
    truth = plant_problems(world, seed=0, n_duplicates=15, n_mislabels=15, n_leaks=10)
    report = audit_dataset(
        world.train_dir, test_dir=world.test_dir,
        clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None, device="cpu",
        # The tiny CLIP puts different images of one class up to 0.99 apart, so the
        # CLIP-only duplicate test is off here; the pixel test decides (docs/audit.md).
        clip_threshold=None,
    )
    print(report.summary())
    planted = {p for pair in truth.duplicates for p in pair}
    found = {
        "near-duplicates (images in groups)": ({r.path for r in report.duplicates}, planted),
        "leakage": ({r.path for r in report.leaks}, set(truth.leaks)),
        "likely mislabels": ({r.path for r in report.mislabels}, set(truth.mislabels)),
        "unreadable files": ({im.path for im in report.unreadable}, set(truth.unreadable)),
    }
    for name, (got, want) in found.items():
        print(f"{name:36s} {score(got, want)}")

if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="audit-")))
