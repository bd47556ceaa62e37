"""Look inside a hybrid: an HTML report of its test predictions and per-image explanations.

Offline, on a small synthetic world, on a CPU (well under a minute)::

    python examples/look_inside.py --out runs/look-inside

then open ``runs/look-inside/report/index.html`` (confusion matrix, per-class
accuracy, gate-score histograms, reliability diagram, accuracy / S / U / H /
gate AUROC / ECE) and ``runs/look-inside/explain/index.html`` (for each
image: Grad-CAM of the supervised branch, the CLIP similarity map of the
predicted class, the gate's decision with both branches' top-5, and the
nearest training images). The same two steps from the shell::

    hybridcls predict --checkpoint RUN --prompts P TEST/ -o pred.jsonl
    hybridcls report pred.jsonl --labels labels.csv --seen-classes RUN -o report/
    hybridcls explain TEST/ --checkpoint RUN --prompts P -o explain/

Needs the ``[plots]`` and ``[explain]`` extras (matplotlib, grad-cam).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hybridcls.data import expand_inputs
from hybridcls.eval.html import write_report
from hybridcls.eval.report import evaluate_predictions
from hybridcls.explain import explain_images, write_explain_page
from hybridcls.hybrid import HybridClassifier
from hybridcls.outputs import check_topk, open_writer
from hybridcls.synth import TINY_CLIP_MODEL_ID, World, make_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/look-inside"))
    parser.add_argument("--explain", type=int, default=8, help="test images to explain")
    args = parser.parse_args()

    world_dir = args.out / "world"
    world = (World.load(world_dir) if (world_dir / "world.json").is_file()
             else make_world(world_dir, seed=0, n_classes=12, n_unseen=3, train_per_class=(20, 40),
                             test_per_class=10))
    clf = HybridClassifier(model="test_convnext", clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None,
                           prompts=world.prompts_file, templates=world.templates_file, device="cpu",
                           cache_dir=args.out / "cache")
    run = args.out / "run"
    if (run / "model.safetensors").is_file():
        clf.load_run(run)
    else:
        clf.fit(world.train_dir, output=run, pretrained=False, freeze=None, epochs=3, image_size=64)
    clf.calibrate(world.train_dir)

    # 1. predictions of the whole test set, then the report page
    sources = expand_inputs([world.test_dir])
    pred = args.out / "predictions.jsonl"
    topk = check_topk(None, len(clf.classes_))  # the rows' default: 5, or every class when fewer
    with open_writer(pred, None, topk=topk, extra_columns=clf.EXTRA_COLUMNS) as writer:
        for rows in clf.rows(sources, topk=topk):
            writer.write_many(rows)
    ev = evaluate_predictions(pred, world.labels_csv, world.seen_classes)
    print(ev.summary())
    print("report:", write_report(ev, args.out / "report"))

    # 2. explanations of a few test images, seen and unseen classes alike
    step = max(1, len(sources) // args.explain)
    result = explain_images(clf, sources[::step][: args.explain], args.out / "explain")
    print("explanations:", write_explain_page(result))


if __name__ == "__main__":
    main()
