"""The animal challenge end to end: 40 seen classes, a 50-class test set, a Kaggle CSV.

With the data and a GPU (Animals with Attributes 2 folders, ConvNeXt-Tiny and
ViT-B-32 weights downloaded once, or local copies)::

    python examples/animal_challenge.py --train data/train --test data/test \\
        --prompts prompts/animals.txt --out runs/awa2 --classes-txt data/classes.txt

Offline, on the synthetic world, on a CPU (a couple of minutes)::

    python examples/animal_challenge.py --synthetic --out runs/synthetic

Steps: train the supervised branch on the seen folders, calibrate the gate
on seen images only (leave-classes-out), predict every test image with the
hybrid, and write ``submission.csv`` (``image_id,class``). With
``--classes-txt`` (the dataset's own classes.txt, e.g. ``grizzly+bear``),
the submission uses the dataset's spelling instead of the prompts file's.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from hybridcls.data import expand_inputs
from hybridcls.hybrid import HybridClassifier
from hybridcls.outputs import open_writer
from hybridcls.zeroshot.prompts import normalize_label


def dataset_spelling(classes_txt: Path) -> dict[str, str]:
    """Prompts spelling (normalised) -> the dataset's own spelling, from its classes.txt."""
    names = [line.split()[-1] for line in classes_txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {normalize_label(n): n for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true", help="run on the offline synthetic world")
    parser.add_argument("--train", type=Path, help="folder with one subfolder per seen class")
    parser.add_argument("--test", type=Path, help="folder of test images (all classes)")
    parser.add_argument("--prompts", type=Path, default=Path("prompts/animals.txt"))
    parser.add_argument("--classes-txt", type=Path, help="dataset's classes.txt for the CSV's spelling")
    parser.add_argument("--out", type=Path, default=Path("runs/animal-challenge"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    if args.synthetic:
        from hybridcls.bench.quality import load_or_make_world
        from hybridcls.supervised.packaged import LITE0_MODEL, packaged_lite0_weights
        from hybridcls.synth import TINY_CLIP_MODEL_ID

        world = load_or_make_world(args.out / "world")
        train_dir, test_dir, prompts = world.train_dir, world.test_dir, world.prompts_file
        weights = packaged_lite0_weights(args.out / "cache")
        backbone = ({"model": LITE0_MODEL, "weights": str(weights)} if weights
                    else {"model": "test_convnext", "pretrained": False, "freeze": None})
        clf = HybridClassifier(clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None, prompts=prompts,
                               templates=world.templates_file, device="cpu",
                               cache_dir=args.out / "cache", progress=True)
        options = {**backbone, "image_size": 64, "epochs": min(args.epochs, 5)}
    else:
        if not (args.train and args.test):
            parser.error("--train and --test are required (or use --synthetic)")
        train_dir, test_dir, prompts = args.train, args.test, args.prompts
        clf = HybridClassifier(prompts=prompts, device=args.device, workers=4, progress=True)
        options = {"epochs": args.epochs}

    run_dir = args.out / "run"
    if (run_dir / "model.safetensors").is_file():
        clf.load_run(run_dir)
    else:
        clf.fit(train_dir, output=run_dir, **options)
    clf.calibrate(train_dir)
    g = clf.gate_.calibration_
    print(f"gate: {g.score} / {g.mode}")

    spelling = dataset_spelling(args.classes_txt) if args.classes_txt else {}
    sources = expand_inputs([test_dir])
    predictions = args.out / "predictions.csv"
    submission = args.out / "submission.csv"
    with open_writer(predictions, topk=3, extra_columns=clf.EXTRA_COLUMNS) as writer, \
            open(submission, "w", encoding="utf-8", newline="") as f:
        kaggle = csv.writer(f, lineterminator="\n")
        kaggle.writerow(["image_id", "class"])
        for rows in clf.rows(sources, topk=3):
            writer.write_many(rows)
            for r in rows:
                kaggle.writerow([Path(r.path).name, spelling.get(normalize_label(r.label), r.label)])
    print(f"{writer.n_ok} predicted, {writer.n_error} errors -> {predictions}, {submission}")
    if args.synthetic:
        from hybridcls.eval.report import evaluate_predictions

        print(evaluate_predictions(predictions, world.labels_csv, world.seen_classes).summary())


if __name__ == "__main__":
    main()
