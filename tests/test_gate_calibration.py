"""Calibration without unseen images: TPR threshold, leave-classes-out, transductive, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridcls.errors import CheckpointError, DataTooSmallError, InputError
from hybridcls.gate import (
    CACHE_MODES,
    FIT_METHODS,
    BranchOutputs,
    CacheBranch,
    CombinedScore,
    Gate,
    GateCalibration,
    apply_transductive,
    finalize,
    fuse,
    leave_classes_out,
    threshold_at_tpr,
    transductive_threshold,
)
from hybridcls.gate.calibration import MIN_TAIL_IMAGES, TPR_GRID, fit_temperature, usable_tpr_levels
from hybridcls.gate.config import MODES
from hybridcls.gate.scores import SCORES

# The registries, not lists typed here: a new score or mode is a candidate in these tests too.
SUPERVISED_SIDE = {name for name, spec in SCORES.items() if "sup_logits" in spec.needs}
EVERY_CANDIDATE = {*SCORES, "combined"}


def test_threshold_keeps_exactly_the_target_share_of_seen_images() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 101.0))
    t = threshold_at_tpr(scores, 0.95)
    assert t == 95.0
    assert np.sum(scores <= t) == 95
    assert threshold_at_tpr(scores, 1.0) == 100.0
    assert threshold_at_tpr([3.0, np.nan, 1.0, 2.0], 0.5) == 2.0  # NaN scores are ignored
    with pytest.raises(InputError, match="tpr must be in \\(0, 1\\], got 1.5"):
        threshold_at_tpr(scores, 1.5)


def test_transductive_threshold_separates_two_known_gaussians() -> None:
    rng = np.random.default_rng(0)
    equal = np.r_[rng.normal(0.0, 1.0, 2000), rng.normal(8.0, 1.0, 2000)]
    assert transductive_threshold(equal) == pytest.approx(4.0, abs=0.2)
    # weights 0.8 / 0.2, equal spreads: the posteriors cross at 4 + ln(0.8 / 0.2) / 8
    unequal = np.r_[rng.normal(0.0, 1.0, 4000), rng.normal(8.0, 1.0, 1000)]
    assert transductive_threshold(unequal) == pytest.approx(4.0 + np.log(4.0) / 8.0, abs=0.2)
    with pytest.raises(InputError, match="needs distinct test scores: all 5 equal 1"):
        transductive_threshold([1.0, 1.0, 1.0, 1.0, 1.0])
    # too few images is the data's size, not a usage error (exit status 1 in the CLI)
    with pytest.raises(DataTooSmallError, match="at least 4 test images, got 3; pass more test images"):
        transductive_threshold([1.0, 2.0, np.nan, 3.0])


def test_apply_transductive_sets_threshold_and_method() -> None:
    rng = np.random.default_rng(1)
    test_scores = np.r_[rng.normal(0.0, 1.0, 500), rng.normal(8.0, 1.0, 500)]
    cal = apply_transductive(GateCalibration(score="clip_margin", mode="stacking"), test_scores)
    assert cal.method == "transductive"
    assert cal.threshold == transductive_threshold(test_scores)
    assert 2.0 < cal.threshold < 6.0  # between the modes, well clear of both
    assert cal.stacking_penalty == -cal.threshold
    with pytest.raises(InputError, match="finalize the calibration"):
        apply_transductive(GateCalibration(score="energy", mode="soft"), test_scores)


def test_finalize_puts_the_tpr_level_on_the_real_scale() -> None:
    seen = np.arange(20.0)
    cal = finalize(GateCalibration(score="energy", mode="soft", tpr=0.9, soft_scale_std=0.5), seen)
    assert cal.threshold == 17.0  # 18 of 20 scores at or below it
    assert cal.soft_scale == pytest.approx(0.5 * np.std(seen))
    assert cal.stacking_penalty is None and cal.is_final
    stack = finalize(
        GateCalibration(score="clip_margin", mode="stacking", tpr=0.9), {"clip_margin": seen}
    )
    assert stack.stacking_penalty == -17.0


def test_finalize_anchors_a_combined_score_on_the_real_seen_images() -> None:
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (40, 2)), rng.normal(3, 1, (10, 2))])
    model = CombinedScore(["energy", "mcm"]).fit(X, np.r_[np.zeros(40, bool), np.ones(10, bool)])
    cal = GateCalibration(score="combined", combined=model.to_dict(), tpr=0.95)
    real = {"energy": 100 + 5 * X[:40, 0], "mcm": -1 + 0.1 * X[:40, 1]}
    done = finalize(cal, real)
    assert done.combined["mean"] == pytest.approx([np.mean(real["energy"]), np.mean(real["mcm"])])
    assert done.combined["coef"] == model.to_dict()["coef"]
    combined_real = done.combined_score().score(np.column_stack([real["energy"], real["mcm"]]))
    assert done.threshold == threshold_at_tpr(combined_real, 0.95)
    with pytest.raises(InputError, match="needs each base score: energy, mcm"):
        finalize(cal, X[:40, 0])


def test_calibration_json_round_trip(tmp_path) -> None:
    model = CombinedScore(["energy", "clip_margin"]).fit(
        np.array([[0.0, 0.0], [0.1, 0.2], [2.0, 3.0], [2.5, 2.0]]),
        np.array([False, False, True, True]),
    )
    cal = GateCalibration(
        score="combined",
        mode="soft",
        threshold=1.25,
        tpr=0.9,
        temperature=2.0,
        soft_scale=0.3,
        soft_scale_std=0.25,
        combined=model.to_dict(),
        unknown_threshold=0.4,
        method="leave-classes-out",
        candidates=[{"score": "energy", "mode": "hard", "mean_h": 0.5}],
    )
    path = cal.to_json(tmp_path)  # a run directory: gate.json inside
    assert path == tmp_path / "gate.json"
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads(path.read_text())["format_version"] == 1
    assert GateCalibration.from_json(tmp_path) == cal
    path.write_text(json.dumps({**cal.to_dict(), "colour": "red"}))
    with pytest.raises(CheckpointError, match="unknown field\\(s\\): colour"):
        GateCalibration.from_json(path)
    with pytest.raises(CheckpointError, match="gate calibration not found"):
        GateCalibration.from_json(tmp_path / "nope.json")


def test_calibration_validates_its_fields() -> None:
    with pytest.raises(InputError, match="gate mode 'blend'"):
        GateCalibration(mode="blend")
    with pytest.raises(InputError, match="stacking mode works on the 'clip_margin' score"):
        GateCalibration(score="energy", mode="stacking")
    with pytest.raises(InputError, match="needs its fitted model"):
        GateCalibration(score="combined")
    assert GateCalibration(score="energy").needs == {"sup_logits"}
    assert GateCalibration(score="knn").needs == {"clip_emb"}


def _toy_world(seed: int = 0, n_classes: int = 20, per_train: int = 30, per_val: int = 10):
    """Gaussian blobs as backbone features (overlapping: a modest supervised branch) and a
    zero-shot model whose image embeddings sit near their own class's text embedding,
    so that the best-unseen-minus-best-seen margin tells hidden classes apart."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, 32))
    text = rng.normal(size=(n_classes, 16))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    y_train = np.repeat(np.arange(n_classes), per_train)
    y_val = np.repeat(np.arange(n_classes), per_val)

    def embed(y: np.ndarray) -> np.ndarray:
        e = text[y] + 0.3 * rng.normal(size=(y.size, 16))
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    emb_val = embed(y_val)
    return {
        "sup_feat_train": centers[y_train] + 1.8 * rng.normal(size=(y_train.size, 32)),
        "y_train": y_train,
        "sup_feat_val": centers[y_val] + 1.8 * rng.normal(size=(y_val.size, 32)),
        "y_val": y_val,
        "clip_logits_val_seen": 20.0 * emb_val @ text.T,
        "clip_emb_train": embed(y_train),
        "clip_emb_val": emb_val,
    }


@pytest.fixture(scope="module")
def toy_calibration() -> GateCalibration:
    return leave_classes_out(**_toy_world(), rounds=3, seed=0)


def test_leave_classes_out_picks_a_clip_side_score_and_a_tpr_in_range(toy_calibration) -> None:
    cal = toy_calibration
    assert cal.method == "leave-classes-out" and cal.threshold is None
    assert cal.score in EVERY_CANDIDATE - SUPERVISED_SIDE
    assert cal.tpr in TPR_GRID
    table = cal.candidates
    h = [row["mean_h"] for row in table]
    assert h == sorted(h, reverse=True)
    best = table[0]
    assert (best["score"], best["mode"], best["tpr"]) == (cal.score, cal.mode, cal.tpr)
    best_supervised_only = max(r["mean_h"] for r in table if r["score"] in SUPERVISED_SIDE)
    assert best["mean_h"] > best_supervised_only
    # every score, mode and TPR level was tried, the combined score and stacking included
    assert {r["score"] for r in table} == EVERY_CANDIDATE
    assert {r["mode"] for r in table} == set(MODES)
    # every TPR level whose quantile has enough held-out images above it, in every round:
    # each keeps 16 of the 20 classes' 10 held-out images
    n_kept = 16 * 10
    assert {r["tpr"] for r in table} == set(usable_tpr_levels(TPR_GRID, n_kept)) == {
        0.8, 0.85, 0.9, 0.925, 0.95}
    assert all((1 - r["tpr"]) * n_kept >= MIN_TAIL_IMAGES - 1e-9 for r in table)
    assert (cal.rounds, cal.hidden_classes, cal.adapted) == (3, 4, [])
    assert 0.0 <= cal.cascade_seen_share <= 1.0
    assert {r["temperature"] for r in table if r["score"] == "energy"} == {1.0, 2.0, 5.0}


def test_leave_classes_out_result_round_trips_and_is_reproducible(
    toy_calibration, tmp_path
) -> None:
    path = toy_calibration.to_json(tmp_path / "gate.json")
    assert GateCalibration.from_json(path) == toy_calibration
    again = leave_classes_out(
        **_toy_world(), rounds=3, seed=0, modes=("hard",), scores=["energy", "clip_margin"]
    )
    assert {r["mode"] for r in again.candidates} == {"hard"}
    same = [
        r
        for r in toy_calibration.candidates
        if r["mode"] == "hard" and r["score"] in {"energy", "clip_margin"}
    ]
    key = lambda r: (r["score"], r["tpr"], r["temperature"], r["unseen_only"])
    # the same rounds give the same figures whatever else is searched
    assert sorted(
        (key(r), r["mean_h"]) for r in again.candidates if r["score"] != "combined"
    ) == sorted((key(r), r["mean_h"]) for r in same)


def test_leave_classes_out_refuses_what_it_cannot_use() -> None:
    world = _toy_world()
    short = {**world, "y_train": world["y_train"] % 19}  # class 19 has no training image
    names = [f"class{i:02d}" for i in range(20)]
    with pytest.raises(DataTooSmallError, match="seen class 'class19' has no training image"):
        leave_classes_out(**short, rounds=1, class_names=names)
    with pytest.raises(DataTooSmallError, match="seen class at index 19 of y_train has no"):
        leave_classes_out(**short, rounds=1)
    with pytest.raises(InputError, match="the knn score needs clip_emb_train"):
        leave_classes_out(**{**world, "clip_emb_val": None}, scores=["knn"], rounds=1)


def test_usable_tpr_levels_need_enough_images_above_the_quantile() -> None:
    assert usable_tpr_levels(TPR_GRID, 1000) == list(TPR_GRID)  # 0.99 leaves 10 above
    assert usable_tpr_levels(TPR_GRID, 100) == [0.8, 0.85, 0.9, 0.925, 0.95]
    assert usable_tpr_levels(TPR_GRID, 10) == [0.8]  # too few for any: the lowest level


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 5))
    true_t = 2.5
    p = np.exp(logits / true_t)
    p /= p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(logits, y) == pytest.approx(true_t, rel=0.1)
    with pytest.raises(InputError, match="labels for"):
        fit_temperature(logits, y[:10])


def test_fusion_uses_the_fitted_supervised_temperature() -> None:
    cal = GateCalibration(score="energy", mode="soft", threshold=0.0, soft_scale=1.0, sup_temperature=4.0)
    sup = np.array([[4.0, 0.0]])
    clip = np.array([[0.0, 0.0, 1.0, 0.0]])
    res = fuse(None, sup_logits=sup, clip_logits=clip, gate_score=np.array([0.0]), calibration=cal)
    expected = 0.5 * np.exp(1.0) / (np.exp(1.0) + 1.0)  # (1 - g) * softmax([4, 0] / 4)[0], g = 0.5
    assert res.probs[0, 0] == pytest.approx(expected)
    assert res.sup_probs[0, 0] == pytest.approx(np.exp(1.0) / (np.exp(1.0) + 1.0))
    assert GateCalibration.from_dict(cal.to_dict()).fusion_temperature == 4.0


def test_the_combined_score_is_preferred_only_within_one_standard_error() -> None:
    from hybridcls.gate.calibration import _prefer_combined

    def row(score, h, sd=0.03):
        return {"score": score, "mode": "soft", "tpr": 0.95, "mean_h": h, "std_h": sd}

    close = [row("energy", 0.966), row("msp", 0.965), row("combined", 0.963)]
    assert [r["score"] for r in _prefer_combined(close, rounds=5)] == ["combined", "energy", "msp"]
    # 0.03 / sqrt(5) = 0.0134: a combined score 0.02 behind is outside the noise
    far = [row("energy", 0.966), row("combined", 0.946)]
    assert _prefer_combined(far, rounds=5) == far
    assert _prefer_combined([row("msp", 0.9)], rounds=5) == [row("msp", 0.9)]


@pytest.mark.parametrize("tpr", [0.05, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.8, 0.9, 0.925, 0.95, 0.99, 1.0])
def test_threshold_is_the_smallest_score_that_keeps_the_share(tpr: float) -> None:
    rng = np.random.default_rng(0)
    for n in range(1, 21):
        for scores in (rng.permutation(n).astype(float), rng.integers(0, 4, n).astype(float)):
            t = threshold_at_tpr(scores, tpr)
            share = {u: np.mean(scores <= u) for u in scores}  # the share kept at each score
            assert t in scores and share[t] >= tpr, (n, scores, t)
            # one order statistic lower would keep less than the asked share
            assert all(share[u] < tpr for u in scores if u < t), (n, scores, t)


def test_threshold_needs_a_held_out_image() -> None:
    with pytest.raises(DataTooSmallError, match="seen_scores is empty: .* at least 1 held-out"):
        threshold_at_tpr(np.zeros(0), 0.95)
    with pytest.raises(InputError, match="none of the 2 seen-image scores is finite"):
        threshold_at_tpr([np.nan, np.inf], 0.95)


def test_grid_search_scores_the_gate_that_fuse_runs_ties_included() -> None:
    from hybridcls.gate.calibration import _grid_search, _Round
    from hybridcls.gate.config import MODES
    from hybridcls.gate.fusion import hard_probs
    from hybridcls.gate.metrics import seen_unseen_accuracy
    from hybridcls.gate.scores import clip_margin_score

    # kept classes 0, 1 (5 held-out images), hidden classes 2, 3 (3 images)
    y = np.array([0, 1, 0, 1, 0, 2, 3, 2])
    is_unseen = y >= 2
    sup = np.array([[2, 0], [0, 2], [1, 0], [0, 1], [0, 1], [1, 0], [0, 1], [1, 1]], float)
    # seen margins -2, 0, 0, 0, 1 and unseen 0, 0, 2: at TPR 0.8 the threshold is 0, tied by 5 rows
    clip = np.array([[3, 0, 1, 0], [0, 2, 2, 1], [2, 1, 0, 2], [1, 3, 3, 0], [1, 0, 2, 0],
                     [2, 0, 2, 1], [0, 1, 0, 1], [1, 0, 3, 0]], float)
    # energy-like score: threshold 1 at TPR 0.8, tied by 3 seen and 2 unseen images
    energy = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 3.0])
    scores = {("energy", 1.0, None): energy, ("clip_margin", 1.0, None): clip_margin_score(clip, 2)}
    problem = _Round(y=y, n_seen=2, is_unseen=is_unseen, sup_logits=sup, sup_temperature=1.5,
                     clip_logits=clip, scores=scores)
    table = _grid_search([problem], list(scores), MODES, [0.8], [0.5, 1.0])
    assert {(r["score"], r["mode"]) for r in table} == {
        ("energy", "hard"), ("energy", "soft"), ("clip_margin", "hard"), ("clip_margin", "soft"),
        ("clip_margin", "stacking")}
    for row in table:
        s = scores[(row["score"], 1.0, None)]
        t = threshold_at_tpr(s[~is_unseen], 0.8)
        assert t == {"energy": 1.0, "clip_margin": 0.0}[row["score"]]
        params = {"hard": {"unseen_only": row["unseen_only"]},
                  "soft": {"soft_scale": (row["soft_scale_std"] or 0) * np.std(s[~is_unseen])},
                  "stacking": {"stacking_penalty": -t}}[row["mode"]]
        cal = GateCalibration(score=row["score"], mode=row["mode"], threshold=t, tpr=0.8,
                              sup_temperature=1.5, **params)
        res = fuse(None, sup_logits=sup, clip_logits=clip, gate_score=s, calibration=cal)
        assert row["mean_h"] == round(seen_unseen_accuracy(y, res.pred, 2)[2], 4), row
    # the ties decide: routing them the other way would change H
    hard = next(r for r in table if (r["score"], r["mode"], r["unseen_only"]) == ("energy", "hard", True))
    to_zs = energy >= 1.0
    flipped = hard_probs(sup, clip[to_zs], to_zs, temperature=1.5).argmax(axis=1)
    assert round(seen_unseen_accuracy(y, flipped, 2)[2], 4) != hard["mean_h"]


def test_a_two_class_light_head_gives_two_logits_with_the_model_s_probabilities() -> None:
    from scipy.special import softmax
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from hybridcls.gate.calibration import _light_head_logits

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), np.repeat([0, 1], 6)
    x[y == 1] += 1.0
    logits = _light_head_logits(x, y, x[:4], C=1.0, max_iter=100)
    assert logits.shape == (4, 2)
    np.testing.assert_allclose(logits.sum(axis=1), 0.0, atol=1e-12)  # [-d/2, d/2]
    scaler = StandardScaler().fit(x)
    proba = LogisticRegression(C=1.0, max_iter=100).fit(scaler.transform(x), y).predict_proba(
        scaler.transform(x[:4]))
    np.testing.assert_allclose(softmax(logits, axis=1), proba, rtol=1e-6)
    # one class: one constant logit
    assert _light_head_logits(x, np.zeros(12, int), x[:3], C=1.0, max_iter=100).tolist() == [[0.0]] * 3


def _small_world(n_classes: int, per_train: int, per_val: int) -> dict:
    return _toy_world(n_classes=n_classes, per_train=per_train, per_val=per_val)


def test_three_seen_classes_hide_one_and_keep_a_two_class_light_head() -> None:
    names = ["cat", "dog", "fox"]
    cal = leave_classes_out(**_small_world(3, 3, 1), class_names=names)
    # each problem hides 1 of 3; 3 distinct problems exist, so 3 of the 5 rounds run
    assert (cal.rounds, cal.hidden_classes) == (3, 1)
    assert {r["score"] for r in cal.candidates} == EVERY_CANDIDATE
    assert {r["mode"] for r in cal.candidates} == set(MODES)
    assert cal.knn_k == 3  # every class has 3 training images
    assert cal.adapted == [
        "the knn score's k 10 -> 3: the smallest seen class ('cat') has 3 training images",
        "rounds=5 -> 3: only 3 distinct sets of 1 hidden class among the 3 with held-out images",
    ]
    # 2 kept held-out images per problem: only the lowest TPR level
    assert {r["tpr"] for r in cal.candidates} == {0.8}


def test_two_seen_classes_calibrate_on_the_clip_side_scores_and_say_why() -> None:
    world = _small_world(2, 2, 2)
    cal = leave_classes_out(**world, class_names=["cat", "dog"])
    assert (cal.rounds, cal.hidden_classes, cal.knn_k) == (2, 1, 2)
    # a one-class light head and a single seen prompt: the supervised scores and mcm are
    # constant; the scores that read the hidden class's prompt or the features are not
    assert {r["score"] for r in cal.candidates} == {
        "unseen_mass", "clip_margin", "knn", "backbone_knn", "combined"}
    assert cal.combined["names"] == ["unseen_mass", "clip_margin", "knn", "backbone_knn"]
    assert (
        "not candidates, constant on every stand-in problem (each keeps 1 seen class: one "
        "light-head logit, one seen prompt): msp (T=1), msp (T=2), msp (T=5), max_logit, "
        "energy (T=1), energy (T=2), energy (T=5), entropy, mcm (tau=CLIP scale)"
    ) in cal.adapted
    # 1 held-out image per class: the combined score would be standardised on 1 seen image
    one = leave_classes_out(**_small_world(2, 2, 1))
    assert {r["score"] for r in one.candidates} == {"unseen_mass", "clip_margin", "knn",
                                                    "backbone_knn"} and one.combined is None
    assert "no combined score: standardising it needs 2 seen images, the held-out images give 1" in one.adapted
    with pytest.raises(DataTooSmallError, match="every candidate score \\(msp, energy\\) is constant"):
        leave_classes_out(**world, scores=["msp", "energy"])


def test_leave_classes_out_needs_held_out_images_of_two_classes() -> None:
    world = _small_world(3, 3, 2)
    only_dog = {**world, "y_val": np.ones_like(world["y_val"])}
    with pytest.raises(DataTooSmallError, match=(
            "held-out images of at least 2 seen classes .* 1 of the 3 seen classes have some "
            "\\('dog'\\): hold out images of more classes, or calibrate by the TPR threshold")):
        leave_classes_out(**only_dog, class_names=["cat", "dog", "fox"])
    # a hide fraction that would hide every class with held-out images keeps one
    cal = leave_classes_out(**world, hide_fraction=0.9)
    assert cal.hidden_classes == 2
    assert "hidden classes 3 -> 2: 3 seen classes have held-out images, and one must be kept" in cal.adapted


def test_hidden_sets_are_distinct_and_all_of_them_when_few() -> None:
    from hybridcls.gate.calibration import _hidden_sets

    rng = np.random.default_rng(0)
    assert [h.tolist() for h in _hidden_sets(rng, np.arange(3), 1, 5)] == [[0], [1], [2]]
    drawn = _hidden_sets(rng, np.arange(6), 2, 14)  # 15 possible
    assert len({tuple(h) for h in drawn}) == 14


def test_fit_temperature_on_one_column_or_no_image() -> None:
    assert fit_temperature(np.array([[3.0], [-1.0]]), np.array([0, 0])) == 1.0
    with pytest.raises(DataTooSmallError, match="at least 1 held-out image, got none"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, int))


def _toy_outputs(seed: int = 0, n_seen: int = 6, n_unseen: int = 2, per_train: int = 12,
                 per_val: int = 6):
    """Both towers' outputs for a toy run: ``(train, y_train, val, y_val)``; the CLIP logits cover
    the seen and unseen classes, the supervised ones (distances to class centres) the seen."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_seen, 16))
    text = rng.normal(size=(n_seen + n_unseen, 8))
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def outputs(y: np.ndarray) -> BranchOutputs:
        feat = centers[y] + 1.5 * rng.normal(size=(y.size, 16))
        emb = text[y] + 0.3 * rng.normal(size=(y.size, 8))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        sup = -((feat[:, None, :] - centers[None]) ** 2).sum(-1) / 16
        return BranchOutputs(sup_logits=sup, sup_features=feat, clip_logits=20.0 * emb @ text.T,
                             clip_embeddings=emb)

    y_train, y_val = np.repeat(np.arange(n_seen), per_train), np.repeat(np.arange(n_seen), per_val)
    return outputs(y_train), y_train, outputs(y_val), y_val


# What each cache-branch mode promises of the fitted gate's branch; a new mode says its promise.
CACHE_BRANCH_PROMISE = {
    "off": lambda branch: branch is None,
    "on": lambda branch: branch is not None and branch.enabled,
    "auto": lambda branch: branch is not None and branch.mode == "auto",
}


def test_every_cache_branch_mode_has_a_promise() -> None:
    assert set(CACHE_BRANCH_PROMISE) == set(CACHE_MODES)


# The registries, not lists typed here: a new fit method or cache mode fits a gate here too.
@pytest.mark.parametrize("cache_branch", CACHE_MODES)
@pytest.mark.parametrize("method", FIT_METHODS)
def test_every_fit_method_and_cache_mode_fit_a_gate(method, cache_branch) -> None:
    train, y_train, val, y_val = _toy_outputs()
    gate = Gate(method=method, cache_branch=cache_branch, rounds=2, seed=0).fit(
        train, y_train, val, y_val, class_names=[f"c{i}" for i in range(6)])
    cal = gate.calibration_
    assert cal.method == method and cal.is_final
    branch = None if cal.cache_branch is None else CacheBranch.from_dict(cal.cache_branch)
    assert CACHE_BRANCH_PROMISE[cache_branch](branch)
    r = gate.predict(val)
    assert r.probs.shape == (len(y_val), 8)
    np.testing.assert_allclose(r.probs.sum(axis=1), 1.0)


def test_projected_stand_ins_lose_exactly_the_hidden_classes_own_directions() -> None:
    from hybridcls.gate.calibration import _without_hidden_directions

    rng = np.random.default_rng(0)
    n_classes, dim = 8, 24
    y = np.repeat(np.arange(n_classes), 20)
    # a fine-tuned backbone's features: one direction per class, plus noise
    means = 4.0 * rng.normal(size=(n_classes, dim))
    feats = means[y] + rng.normal(size=(y.size, dim))
    kept, hidden = np.arange(6), np.array([6, 7])
    train, val = _without_hidden_directions(feats, y, kept, hidden, feats[:5])
    np.testing.assert_allclose(val, train[:5])
    mu = feats[np.isin(y, kept)].mean(axis=0)
    kept_means = np.stack([train[y == c].mean(axis=0) for c in kept]) - mu
    q = np.linalg.svd(kept_means.T, full_matrices=False)[0][:, :5]  # 6 centred means: rank 5
    for c in hidden:
        m = train[y == c].mean(axis=0) - mu
        # what is left of a hidden class's mean lies in the kept classes' span: nothing of its own
        assert np.linalg.norm(m - q @ (q.T @ m)) < 1e-9 * np.linalg.norm(m)
        before = feats[y == c].mean(axis=0) - mu
        # ... and what it shared with them is kept
        np.testing.assert_allclose(q.T @ m, q.T @ before, atol=1e-9)
    # two directions removed, and only those: the rank of the centred features drops by 2
    assert np.linalg.matrix_rank(train - mu) == dim - 2
    again, _ = _without_hidden_directions(train, y, kept, hidden, train[:1])
    np.testing.assert_allclose(again, train, atol=1e-9)


def test_the_stand_in_kind_is_a_checked_recorded_parameter(toy_calibration) -> None:
    from hybridcls.errors import ParameterError
    from hybridcls.gate import Gate

    assert toy_calibration.standin == "project"
    plain = leave_classes_out(**_toy_world(), rounds=3, seed=0, standin="plain",
                              scores=["energy", "clip_margin"], modes=("hard",))
    assert plain.standin == "plain"
    with pytest.raises(InputError, match="standin='projected': choose from project, plain"):
        leave_classes_out(**_toy_world(), rounds=3, standin="projected")
    with pytest.raises(ParameterError, match="standin"):
        Gate(standin="projected").check_params()
