"""Calibration without unseen images: TPR threshold, leave-classes-out, transductive, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridcls.errors import CheckpointError, InputError
from hybridcls.gate import (
    CombinedScore,
    GateCalibration,
    apply_transductive,
    finalize,
    fuse,
    leave_classes_out,
    threshold_at_tpr,
    transductive_threshold,
)
from hybridcls.gate.calibration import MIN_TAIL_IMAGES, TPR_GRID, fit_temperature, usable_tpr_levels


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
    with pytest.raises(InputError, match="at least 4 distinct test scores"):
        transductive_threshold([1.0, 1.0, 1.0, 1.0, 1.0])


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
    assert cal.score in {"clip_margin", "mcm", "knn", "combined"}
    assert cal.tpr in TPR_GRID
    table = cal.candidates
    h = [row["mean_h"] for row in table]
    assert h == sorted(h, reverse=True)
    best = table[0]
    assert (best["score"], best["mode"], best["tpr"]) == (cal.score, cal.mode, cal.tpr)
    best_supervised_only = max(
        r["mean_h"] for r in table if r["score"] in {"msp", "max_logit", "energy", "entropy"}
    )
    assert best["mean_h"] > best_supervised_only
    # every score, mode and TPR level was tried, the combined score and stacking included
    assert {r["score"] for r in table} == {
        "msp",
        "max_logit",
        "energy",
        "entropy",
        "mcm",
        "clip_margin",
        "knn",
        "combined",
    }
    assert {r["mode"] for r in table} == {"hard", "soft", "stacking"}
    # every TPR level whose quantile has enough held-out images above it
    n_val = len(_toy_world()["y_val"])
    assert {r["tpr"] for r in table} == set(usable_tpr_levels(TPR_GRID, n_val))
    assert all((1 - r["tpr"]) * n_val >= MIN_TAIL_IMAGES - 1e-9 for r in table)
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
    with pytest.raises(InputError, match="seen class 19 has no training image"):
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
