"""Calibration on the smallest data ``train`` accepts: 2 to 4 seen classes, 2 to 5 images each.

Every class count and images-per-class count calibrates with every method
(leave-classes-out, TPR, transductive), every score and every mode; settings
that depend on the data's size adapt and are recorded in ``gate.json``; data
too small for a method stops with :class:`~hybridcls.errors.DataTooSmallError`
(exit status 1). One tiny run per size (test_convnext, 32 px, 1 epoch, the
shipped tiny CLIP) is trained once and shared by the tests of this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybridcls.cli import main
from hybridcls.errors import DataTooSmallError
from hybridcls.gate import MODES, SCORES, GateCalibration, finalize, from_candidate, fuse
from hybridcls.gate.cache_branch import DEFAULT_CACHE_K
from hybridcls.gate.calibration import transductive_threshold
from hybridcls.gate.cascade import CASCADE_KNN_K
from hybridcls.gate.scores import DEFAULT_KNN_K
from hybridcls.hybrid import HybridClassifier
from hybridcls.synth import TINY_CLIP_DIR

NAMES = ("red circle", "blue square", "green triangle", "yellow star", "purple ring")
TINY_CLIP = f"local-dir:{TINY_CLIP_DIR}"
#: The options of a tiny run, as the command line's flags and as train()'s parameters.
TRAIN_FLAGS = ["--model", "test_convnext", "--no-pretrained", "--freeze", "none", "--image-size",
               "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "-q"]
TRAIN_OPTIONS = {"model": "test_convnext", "pretrained": False, "freeze": None, "image_size": 32,
                 "epochs": 1, "batch_size": 4, "workers": 0, "device": "cpu", "seed": 0,
                 "progress": False}
GRID = [(c, n) for c in (2, 3, 4) for n in (2, 3, 4, 5)]
SUPERVISED_SIDE = {"msp", "max_logit", "energy", "entropy"}


def _folder(root: Path, n_classes: int, per_class: int) -> Path:
    """``n_classes`` folders named after the prompts, of ``per_class`` 32 px noise images each."""
    rng = np.random.default_rng(n_classes * 10 + per_class)
    for name in NAMES[:n_classes]:
        d = root / name.replace(" ", "_")
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small_data")
    (root / "prompts.txt").write_text("\n".join(NAMES) + "\n", encoding="utf-8")
    (root / "templates.txt").write_text("a photo of the {}.\n", encoding="utf-8")
    return {"root": root, "prompts": root / "prompts.txt", "templates": root / "templates.txt",
            "cache": root / "cache"}


@pytest.fixture(scope="module")
def tiny_run(files):
    """``(n_classes, per_class) -> (classifier, training folder)``, each trained once.

    One image per class is held out (``val_split = 1 / (per_class + 0.5)``: C of the
    ``C * per_class`` images, stratified), the fewest ``train`` accepts, so each
    class trains on ``per_class - 1``.
    """
    from hybridcls.train import train

    runs: dict[tuple[int, int], tuple[HybridClassifier, Path]] = {}

    def get(n_classes: int, per_class: int) -> tuple[HybridClassifier, Path]:
        if (n_classes, per_class) not in runs:
            name = f"{n_classes}x{per_class}"
            data = _folder(files["root"] / f"data_{name}", n_classes, per_class)
            run = files["root"] / f"run_{name}"
            train(data, run, val_split=1 / (per_class + 0.5), **TRAIN_OPTIONS)
            clf = HybridClassifier(clip_model=TINY_CLIP, clip_pretrained=None,
                                   templates=str(files["templates"]), device="cpu", batch_size=8,
                                   cache_dir=files["cache"]).load_run(run, str(files["prompts"]))
            runs[(n_classes, per_class)] = (clf, data)
        clf, data = runs[(n_classes, per_class)]
        return clf.set_params(mode=None), data

    return get


def _val_inputs(clf: HybridClassifier) -> dict:
    val, _ = clf.held_out_outputs()
    return {"sup_logits": clf.seen_logits(val), "sup_features": val.sup_features,
            "clip_logits": val.clip_logits, "n_seen": clf.n_seen_, "clip_emb": val.clip_embeddings,
            "knn_index": clf.gate_.clip_index_, "backbone_index": clf.gate_._backbone()}


def _check_gate(cal: GateCalibration, inputs: dict) -> None:
    """The promises of a finalised gate on the held-out seen images it was set on."""
    scores = cal.compute_score(**inputs)
    assert np.mean(scores <= cal.threshold) >= cal.tpr, (cal.score, cal.mode)
    res = fuse(None, sup_logits=inputs["sup_logits"], clip_logits=inputs["clip_logits"],
               gate_score=scores, calibration=cal, n_seen=inputs["n_seen"])
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, err_msg=f"{cal.score} {cal.mode}")


@pytest.mark.parametrize("n_classes, per_class", GRID)
def test_leave_classes_out_then_transductive_on_every_small_size(tiny_run, n_classes, per_class):
    clf, data = tiny_run(n_classes, per_class)
    clf.set_params(method="leave-classes-out").calibrate(test_inputs=[str(data)])
    g = clf.gate_.calibration_
    n_train = per_class - 1
    # every distinct stand-in problem (1 class hidden of C) instead of 5 rounds
    assert (g.rounds, g.hidden_classes) == (n_classes, 1)
    # neighbour counts bounded by the smallest class's training images, recorded for prediction
    assert (g.knn_k, g.cascade_k) == (min(DEFAULT_KNN_K, n_train), min(CASCADE_KNN_K, n_train))
    assert g.cache_branch["k"] == min(DEFAULT_CACHE_K, n_classes * n_train)
    assert f"the knn score's k {DEFAULT_KNN_K} -> {n_train}: the smallest seen class" in g.adapted[0]
    candidates = {r["score"] for r in g.candidates}
    if n_classes == 2:
        # a one-class light head: the CLIP-side scores only; 1 held-out seen image per problem,
        # too few to standardise a combined score on
        assert candidates == {"unseen_mass", "clip_margin", "knn", "backbone_knn"}
    else:
        assert candidates == set(SCORES) | {"combined"}
    # transductive: the threshold comes from the test images' own scores
    assert g.method == "transductive"
    feats = clf.extract_features([str(data)])
    test_scores = g.compute_score(sup_logits=clf.seen_logits(feats), clip_logits=feats.clip_logits,
                                  n_seen=n_classes, clip_emb=feats.clip_embeddings,
                                  knn_index=clf.gate_.clip_index_, sup_features=feats.sup_features,
                                  backbone_index=clf.gate_._backbone())
    assert g.threshold == transductive_threshold(test_scores, seed=0)
    assert GateCalibration.from_json(clf.run_dir_) == g
    # every candidate score and mode (the best row of each) finalises and fuses on the real
    # held-out images
    inputs = _val_inputs(clf)
    best = {}
    for row in g.candidates:
        best.setdefault((row["score"], row["mode"], row["temperature"], row["clip_temperature"]), row)
    assert {key[1] for key in best} == set(MODES)
    for row in best.values():
        cal = from_candidate(row, combined=g.combined, knn_k=g.knn_k).replace(
            sup_temperature=g.sup_temperature, cache_branch=g.cache_branch,
            clip_logit_scale=g.clip_logit_scale)
        _check_gate(finalize(cal, cal.compute_base_scores(**inputs)), inputs)


@pytest.mark.parametrize("n_classes, per_class", GRID)
def test_tpr_with_every_score_and_mode_on_every_small_size(tiny_run, n_classes, per_class):
    clf, _ = tiny_run(n_classes, per_class)
    clf.set_params(method="tpr", score="knn").calibrate()
    g = clf.gate_.calibration_
    assert (g.method, g.score, g.knn_k, g.rounds) == ("tpr", "knn", min(DEFAULT_KNN_K, per_class - 1), None)
    inputs = _val_inputs(clf)
    _check_gate(g, inputs)
    for name in SCORES:
        for mode in MODES if name == "clip_margin" else ("hard", "soft"):
            cal = GateCalibration(score=name, mode=mode, tpr=0.95, knn_k=g.knn_k,
                                  sup_temperature=g.sup_temperature, cache_branch=g.cache_branch)
            _check_gate(finalize(cal, cal.compute_base_scores(**inputs)), inputs)
    # the modes a user picks at prediction over a calibrated clip_margin gate
    clf.set_params(method="tpr", score="clip_margin").calibrate()
    val, _ = clf.held_out_outputs()
    for mode in MODES:
        res = clf.set_params(mode=mode).predict_features(val)
        np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, err_msg=mode)


def test_unreadable_test_images_of_the_transductive_step_are_named(tiny_run, tmp_path):
    from hybridcls.errors import HybridclsWarning, InputError

    clf, data = tiny_run(2, 2)
    good = sorted(str(p) for p in data.rglob("*.png"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.warns(HybridclsWarning, match=r"^calibrate: test: 1 of .* images could not be read "
                                              r"and are left out: .*broken\.png: "):
        clf.set_params(method="tpr").calibrate(test_inputs=[*good, str(bad)], save=False)
    with pytest.raises(InputError, match=r"^calibrate: test: none of the 1 images could be decoded: "
                                         r".*broken\.png: "):
        clf.calibrate(test_inputs=[str(bad)], save=False)


def _zs_flags(files) -> list[str]:
    return ["--prompts", str(files["prompts"]), "--templates", str(files["templates"]),
            "--clip-model", TINY_CLIP, "--cache-dir", str(files["cache"]), "--device", "cpu",
            "--workers", "0", "-q"]


def test_too_few_test_images_for_the_transductive_step_exit_1(tiny_run, files, capsys):
    clf, data = tiny_run(2, 2)
    three = sorted(data.rglob("*.png"))[:3]
    with pytest.raises(DataTooSmallError):
        clf.set_params(method="tpr").calibrate(test_inputs=[str(p) for p in three])
    rc = main(["calibrate", str(clf.run_dir_), *_zs_flags(files),
               "--transductive", *[str(p) for p in three]])
    assert rc == 1
    assert capsys.readouterr().err.strip() == (
        "hybridcls calibrate: error: too few test images for the transductive threshold: it "
        "needs the finite gate scores of at least 4 test images, got 3; pass more test images, "
        "or calibrate without the transductive step")


@pytest.mark.parametrize("case, n_classes, per_class, split, adapted", [
    # the 3-class run whose leave-classes-out light heads have 2 classes
    # the library's rounds=5 (tests/test_gate_calibration.py) in calibrate's flag
    ("three_classes", 3, 12, [], "--rounds 5 -> 3: only 3 distinct sets of 1 hidden class"),
    # 4 classes x 4 images, a quarter held out: 3 training images per class
    ("few_images", 4, 4, ["--val-split", "0.25"],
     "the knn score's k 10 -> 3: the smallest seen class ('blue_square') has 3 training images"),
])
def test_the_reported_cases_calibrate_with_exit_0(files, capsys, case, n_classes, per_class,
                                                  split, adapted):
    data = _folder(files["root"] / f"case_{case}", n_classes, per_class)
    run = files["root"] / f"case_{case}_run"
    assert main(["train", str(data), "-o", str(run), *TRAIN_FLAGS, *split]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(run), *_zs_flags(files)]) == 0
    out = capsys.readouterr().out
    assert f"adapted to the data's size: {adapted}" in out
    assert GateCalibration.from_json(run).threshold is not None
