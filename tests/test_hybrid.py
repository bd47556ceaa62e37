"""The hybrid on the synthetic world: it beats both branches, and its API keeps its promises."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridcls.bench.quality import labelled_test_set, reference_rows
from hybridcls.errors import CheckpointError, PromptFileError
from hybridcls.gate.metrics import seen_unseen_accuracy
from hybridcls.hybrid import HybridClassifier, align_classes
from hybridcls.zeroshot.prompts import as_prompt_set, parse_prompts


@pytest.fixture(scope="module")
def test_features(world_run):
    world, clf = world_run
    sources, y = labelled_test_set(world, clf)
    return sources, y, clf.extract_features(sources)


def test_hybrid_beats_both_branches(world_run, test_features):
    _world, clf = world_run
    _, y, feats = test_features
    S = clf.n_seen_
    ref = {r.method: r for r in reference_rows(feats, y, S)}
    res = clf.predict_features(feats)
    s, u, h = seen_unseen_accuracy(y, res.pred, S)
    best_single = max(ref["supervised only"].harmonic, ref["zero-shot only"].harmonic)
    print(f"hybrid S {s:.3f} U {u:.3f} H {h:.3f}; zero-shot H {ref['zero-shot only'].harmonic:.3f}; "
          f"oracle H {ref['oracle router'].harmonic:.3f}")
    assert ref["supervised only"].unseen == 0.0  # it cannot name an unseen class
    assert h >= best_single + 0.02
    assert h >= 0.85 * ref["oracle router"].harmonic


def test_predict_features_matches_predict(world_run, test_features):
    _, clf = world_run
    sources, _, feats = test_features
    some = sources[:48]
    proba = clf.predict_proba(some)
    direct = clf.predict_features(
        type(feats)(feats.sup_logits[:48], feats.sup_features[:48], feats.clip_logits[:48],
                    feats.clip_embeddings[:48]))
    np.testing.assert_allclose(proba, direct.probs, rtol=1e-5, atol=1e-6)
    assert list(clf.predict(some)) == list(clf.classes_[direct.pred])
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert list(clf.classes_[: clf.n_seen_]) == [c.replace("_", " ") for c in clf.seen_folders_]


def test_save_load_round_trip(world_run, test_features, tmp_path):
    _, clf = world_run
    sources = test_features[0][:32]
    saved = clf.save_pretrained(tmp_path / "hybrid")
    assert json.loads((saved / "hybrid.json").read_text())["n_seen"] == clf.n_seen_
    again = HybridClassifier.from_pretrained(saved, device="cpu")
    np.testing.assert_array_equal(again.predict_proba(sources), clf.predict_proba(sources))
    assert again.gate_.calibration_.to_dict() == clf.gate_.calibration_.to_dict()


def test_lazy_zero_shot_skips_clip_for_kept_images(world_run, test_features):
    _, clf = world_run
    sources, _y, _ = test_features
    # the cache branch needs every image's CLIP embedding: a lazy gate goes without it
    lazy = clf.gate_.calibration_.replace(score="energy", mode="hard", combined=None, cache_branch=None)
    from hybridcls.gate import Gate, finalize

    val, _ = clf.held_out_outputs()
    lazy = finalize(lazy, lazy.compute_base_scores(sup_logits=val.sup_logits, n_seen=clf.n_seen_))
    original = clf.gate_
    try:
        clf.gate_ = Gate.from_calibration(lazy, n_seen=clf.n_seen_)
        before = clf.engine_.clip_images_encoded
        rows = [r for batch in clf.rows(sources[:200], topk=2) for r in batch]
        encoded = clf.engine_.clip_images_encoded - before
    finally:
        clf.gate_ = original
    routed = sum(r.branch == "zeroshot" for r in rows)
    assert encoded == routed < 200
    kept = [r for r in rows if r.branch == "supervised"]
    assert kept and all(r.extra["zeroshot_topk"] == [] for r in kept)


def test_uncalibrated_run_is_refused(world_run, tmp_path):
    world, clf = world_run
    bare = HybridClassifier(clip_model=clf.clip_model, clip_pretrained=None,
                            templates=world.templates_file, device="cpu")
    import shutil

    run = tmp_path / "bare"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clf.run_dir_ / name, run / name)
    bare.load_run(run, world.prompts_file)
    with pytest.raises(CheckpointError, match=r"has no gate.json; calibrate it first with "
                                              r"HybridClassifier.calibrate\(\)$"):
        bare.predict([world.test_dir])


def test_check_calibrated_reads_the_folder_only(tmp_path):
    """A run without gate.json is refused from its listing (predict and explain say so before
    loading a model); a folder that is no run is left to load_run, which names what it lacks."""
    from hybridcls.hybrid import check_calibrated

    check_calibrated(tmp_path)  # no config.json: not a run, load_run's to say
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        check_calibrated(tmp_path)
    assert str(err.value) == (f"{tmp_path}: the run has no gate.json; calibrate it first with "
                              "HybridClassifier.calibrate()")
    (tmp_path / "gate.json").write_text("{}", encoding="utf-8")
    check_calibrated(tmp_path)


def test_class_alignment_and_its_errors():
    ps = parse_prompts("fox\ngrizzly bear\npolar bear\nmoose | elk\n", source="p.txt")
    assert align_classes(["polar_bear", "Grizzly+Bear"], ps).names == [
        "polar bear", "grizzly bear", "fox", "moose"]
    with pytest.raises(PromptFileError, match=r"p.txt: 1 training class\(es\) match no line.*'wolf'"):
        align_classes(["wolf", "fox"], ps)
    with pytest.raises(PromptFileError, match="training classes 'moose' and 'elk' both match"):
        align_classes(["moose", "elk"], ps)
    # a list has names, not lines (nor a file to add synonyms to)
    with pytest.raises(PromptFileError) as err:
        align_classes(["wolf", "fox"], as_prompt_set(["fox", "moose"]))
    assert str(err.value) == ("<prompts list>: 1 training class(es) match no name in the list: "
                              "'wolf'; add them")


def test_prompts_missing_a_checkpoint_class(world_run, tmp_path):
    world, clf = world_run
    lines = world.prompts_file.read_text(encoding="utf-8").splitlines()
    seen_line = next(ln for ln in lines if ln.strip() and not ln.startswith("#")
                     and ln.split(":")[0].strip() == clf.classes_[0])
    short = tmp_path / "short.txt"
    short.write_text("\n".join(ln for ln in lines if ln != seen_line) + "\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=f"short.txt: 1 training class.*{clf.seen_folders_[0]}"):
        HybridClassifier(clip_model=clf.clip_model, clip_pretrained=None, device="cpu",
                         templates=world.templates_file).load_run(clf.run_dir_, short)


def test_calibrated_cascade_skips_clip_and_keeps_the_harmonic_mean(world_run, test_features, tmp_path):
    """Calibration fits both cascade thresholds; the cascade then spares CLIP on many images for
    (almost) the full hybrid's H, also once saved with save_pretrained and loaded again."""
    _, clf = world_run
    sources, y, feats = test_features
    g = clf.gate_.calibration_
    assert g.cascade_msp is not None and g.cascade_distance is not None
    assert (clf.run_dir_ / "index" / "backbone.faiss").is_file()
    S = clf.n_seen_
    full = seen_unseen_accuracy(y, clf.predict_features(feats).pred, S)[2]
    again = HybridClassifier.from_pretrained(clf.save_pretrained(tmp_path / "hybrid"), device="cpu", cascade=True)
    before = again.engine_.clip_images_encoded
    pred = again.predict(sources)
    ran = (again.engine_.clip_images_encoded - before) / len(sources)
    index = {c: i for i, c in enumerate(again.classes_)}
    h = seen_unseen_accuracy(y, np.array([index[c] for c in pred]), S)[2]
    print(f"cascade H {h:.3f} vs full {full:.3f}, CLIP on {100 * ran:.0f}% of images")
    assert ran == pytest.approx(1 - again.cascade_skips_clip(feats).mean(), abs=1e-9)
    assert ran < 0.8
    assert h >= full - 0.01


def test_no_input_gives_no_row_through_every_gate_score(world_run):
    # the default gate reads the backbone kNN score: its index checks the features' width even
    # for zero rows (an empty input list once failed there: "dimension 0, the index has 1280")
    _, clf = world_run
    assert "backbone_knn" in clf.gate_.calibration_.base_scores
    assert clf.predict([]).tolist() == []
    assert clf.predict_proba([]).shape == (0, len(clf.classes_))
