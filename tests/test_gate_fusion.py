"""Fusion modes on constructed logits, routing, top-k; routing matrix, AUSUC and H."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from hybridcls.errors import InputError
from hybridcls.eval.metrics import open_set_scores
from hybridcls.gate import (
    GateCalibration,
    ausuc,
    fuse,
    route,
    routing_matrix,
    seen_unseen_accuracy,
    topk,
)
from hybridcls.gate.config import MODES
from hybridcls.gate.fusion import soft_decision_score, stacking_probs
from hybridcls.gate.scores import clip_margin_score

# 2 seen classes (columns 0, 1), 2 unseen (columns 2, 3)
SUP = np.array([[4.0, 0.0], [0.0, 4.0], [1.0, 1.2], [0.3, 0.0]])
CLIP = np.array(
    [
        [6.0, 1.0, 2.0, 0.0],
        [0.0, 5.0, 1.0, 0.0],
        [1.0, 0.0, 0.0, 6.0],
        [0.0, 0.0, 7.0, 1.0],
    ]
)
SCORE = np.array([-2.0, -1.0, 1.5, 3.0])  # the last two rows look unseen


def _cal(**kw) -> GateCalibration:
    return GateCalibration(**{"score": "energy", "threshold": 0.0, **kw})


def test_route_is_score_strictly_above_threshold_and_nan_stays() -> None:
    assert route(np.array([-1.0, 0.0, 0.5, np.nan]), _cal()).tolist() == [False, False, True, False]
    with pytest.raises(InputError, match="finalize the calibration"):
        route(SCORE, GateCalibration(score="energy"))
    with pytest.raises(InputError, match="gate mode 'blend': choose from hard, soft, stacking"):
        fuse("blend", sup_logits=SUP, clip_logits=CLIP, gate_score=SCORE, calibration=_cal())


def test_hard_unseen_only_places_each_branch_on_its_columns() -> None:
    r = fuse(
        "hard",
        sup_logits=SUP,
        clip_logits=CLIP,
        gate_score=SCORE,
        calibration=_cal(temperature=2.0),
    )
    np.testing.assert_allclose(r.probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(r.probs[:2, :2], softmax(SUP[:2] / 2.0, axis=1))
    assert (r.probs[:2, 2:] == 0).all() and (r.probs[2:, :2] == 0).all()
    np.testing.assert_allclose(r.probs[2:, 2:], softmax(CLIP[2:, 2:], axis=1))
    assert r.branch.tolist() == ["supervised", "supervised", "zeroshot", "zeroshot"]
    assert r.gate_weight.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert r.pred.tolist() == [0, 1, 3, 2]
    np.testing.assert_array_equal(r.gate_score, SCORE)


def test_hard_over_all_classes_lets_a_routed_image_pick_a_seen_class() -> None:
    r = fuse(
        "hard",
        sup_logits=SUP,
        clip_logits=CLIP,
        gate_score=np.array([1.0, -1, -1, -1]),
        calibration=_cal(unseen_only=False),
    )
    np.testing.assert_allclose(r.probs[0], softmax(CLIP[0]))
    assert r.pred.tolist() == [0, 1, 1, 0]


def test_hard_never_reads_clip_rows_of_images_kept_in_the_supervised_branch() -> None:
    lazy = CLIP.copy()
    lazy[:2] = np.nan  # the zero-shot model did not run on those images
    full = fuse("hard", sup_logits=SUP, clip_logits=CLIP, gate_score=SCORE, calibration=_cal())
    r = fuse("hard", sup_logits=SUP, clip_logits=lazy, gate_score=SCORE, calibration=_cal())
    np.testing.assert_array_equal(r.probs, full.probs)
    assert np.isnan(r.clip_probs[:2]).all() and np.isfinite(r.clip_probs[2:]).all()
    # the routed rows alone, in order, work the same
    routed_only = fuse(
        "hard", sup_logits=SUP, clip_logits=CLIP[2:], gate_score=SCORE, calibration=_cal()
    )
    np.testing.assert_array_equal(routed_only.probs, full.probs)
    # nothing routed: an empty [0, C] block
    none = fuse(
        "hard",
        sup_logits=SUP,
        clip_logits=np.zeros((0, 4)),
        gate_score=SCORE - 10,
        calibration=_cal(),
    )
    assert none.branch.tolist() == ["supervised"] * 4 and none.probs.shape == (4, 4)
    with pytest.raises(InputError, match="expected 4 \\(all images\\) or 2 \\(routed ones\\)"):
        fuse("hard", sup_logits=SUP, clip_logits=CLIP[:3], gate_score=SCORE, calibration=_cal())


def test_soft_mixes_with_a_sigmoid_gate_weight() -> None:
    cal = _cal(threshold=0.5, soft_scale=2.0)
    r = fuse("soft", sup_logits=SUP, clip_logits=CLIP, gate_score=SCORE, calibration=cal)
    g = 1.0 / (1.0 + np.exp(-(SCORE - 0.5) / 2.0))
    np.testing.assert_allclose(r.gate_weight, g)
    expected = np.hstack(
        [(1 - g)[:, None] * softmax(SUP, axis=1), g[:, None] * softmax(CLIP[:, 2:], axis=1)]
    )
    np.testing.assert_allclose(r.probs, expected)
    np.testing.assert_allclose(r.probs.sum(axis=1), 1.0)
    assert set(r.branch) == {"mixed"}
    with pytest.raises(InputError, match="positive soft_scale"):
        fuse("soft", sup_logits=SUP, clip_logits=CLIP, gate_score=SCORE, calibration=_cal())


def test_stacking_subtracts_the_penalty_from_seen_logits() -> None:
    cal = GateCalibration(
        score="clip_margin", mode="stacking", threshold=-3.0, stacking_penalty=3.0
    )
    r = fuse(None, clip_logits=CLIP, calibration=cal, n_seen=2)
    shifted = CLIP - np.array([3.0, 3.0, 0.0, 0.0])
    np.testing.assert_allclose(r.probs, softmax(shifted, axis=1))
    assert r.pred.tolist() == [0, 1, 3, 2]  # row 0: 6 - 3 = 3 still beats 2
    np.testing.assert_array_equal(r.gate_score, CLIP[:, 2:].max(1) - CLIP[:, :2].max(1))
    assert set(r.branch) == {"zeroshot"} and (r.gate_weight == 1).all()
    # without an explicit penalty it is -threshold; a large one sends row 0 to class 2
    big = GateCalibration(score="clip_margin", mode="stacking", threshold=-4.5)
    assert fuse("stacking", clip_logits=CLIP, calibration=big, n_seen=2).pred[0] == 2
    np.testing.assert_allclose(stacking_probs(CLIP, 0.0, 2), softmax(CLIP, axis=1))


# The registry, not a list typed here: a new mode is held to what every mode promises.
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_a_distribution_and_sends_a_clear_image_to_its_side(mode) -> None:
    # row 0: both branches and the gate say seen class 0; row 1: unseen class 3
    sup = np.array([[8.0, 0.0], [0.2, 0.0]])
    clip = np.array([[9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    cal = GateCalibration(score="clip_margin", mode=mode, threshold=0.0, soft_scale=1.0)
    r = fuse(mode, sup_logits=sup, clip_logits=clip, gate_score=clip_margin_score(clip, 2),
             calibration=cal)
    assert r.probs.shape == (2, 4) and (r.probs >= 0).all()
    np.testing.assert_allclose(r.probs.sum(axis=1), 1.0)
    assert r.pred.tolist() == r.probs.argmax(axis=1).tolist() == [0, 3]


def test_unknown_when_no_branch_is_confident() -> None:
    sup = np.array([[5.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    clip = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 9.0, 0.0]])
    cal = _cal(threshold=0.5, soft_scale=1.0, unknown_threshold=0.8)
    score = np.array([-1.0, 1.0, 1.0])
    hard = fuse("hard", sup_logits=sup, clip_logits=clip, gate_score=score, calibration=cal)
    # row 1: supervised 0.52, zero-shot 0.52 over unseen: neither reaches 0.8
    assert hard.branch.tolist() == ["supervised", "unknown", "zeroshot"]
    assert hard.pred.tolist() == [0, -1, 2]
    np.testing.assert_allclose(hard.probs.sum(axis=1), 1.0)  # probabilities kept for the top-k
    soft = fuse("soft", sup_logits=sup, clip_logits=clip, gate_score=score, calibration=cal)
    assert soft.branch.tolist() == ["mixed", "unknown", "mixed"]


def test_topk_orders_best_first_and_marks_rows_without_a_branch() -> None:
    probs = np.array([[0.1, 0.6, 0.3], [np.nan, np.nan, np.nan]])
    idx, vals = topk(probs, 2)
    assert idx.tolist() == [[1, 2], [-1, -1]]
    assert vals[0].tolist() == [0.6, 0.3] and np.isnan(vals[1]).all()


def test_routing_matrix_counts() -> None:
    m = routing_matrix([True, False, True, False, False], [True, True, False, False, False])
    assert m.as_dict() == {
        "seen_to_supervised": 2,
        "seen_to_zeroshot": 1,
        "unseen_to_supervised": 1,
        "unseen_to_zeroshot": 1,
    }


def test_seen_unseen_accuracy_equals_open_set_scores() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(-1, 6, 200))
    s, u, h = seen_unseen_accuracy(y, p, n_seen=4)
    ref = open_set_scores(
        [str(v) for v in y], [str(v) for v in p], seen_classes=["0", "1", "2", "3"]
    )
    assert (s, u, h) == pytest.approx((ref.seen, ref.unseen, ref.harmonic))


# img0 seen, right if seen, flip 1; img1 seen, right, flip 3;
# img2 unseen, right if unseen, flip 2; img3 unseen, wrong either way, flip -1
AUSUC_LOGITS = np.array(
    [
        [3.0, 0.0, 2.0, 0.0],
        [0.0, 4.0, 1.0, 0.0],
        [5.0, 0.0, 3.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
    ]
)
AUSUC_Y = np.array([0, 1, 2, 3])


def test_ausuc_on_a_hand_computed_curve() -> None:
    c = ausuc(AUSUC_LOGITS, AUSUC_Y, n_seen=2)
    assert c.penalties.tolist() == [-1.0, 1.0, 2.0, 3.0, np.inf]
    assert c.seen_accuracy.tolist() == [1.0, 1.0, 0.5, 0.5, 0.0]
    assert c.unseen_accuracy.tolist() == [0.0, 0.0, 0.0, 0.5, 0.5]
    assert c.area == pytest.approx(0.25)


def test_ausuc_curve_matches_stacking_predictions() -> None:
    rng = np.random.default_rng(3)
    logits, y = rng.normal(size=(60, 7)) * 2, rng.integers(0, 7, 60)
    c = ausuc(logits, y, n_seen=4)
    for penalty, s, u in zip(c.penalties, c.seen_accuracy, c.unseen_accuracy, strict=True):
        # just below the break point, where rounding in "seen - penalty" cannot flip the tie
        pred = stacking_probs(logits, penalty - 1e-9, 4).argmax(axis=1)
        assert seen_unseen_accuracy(y, pred, 4)[:2] == pytest.approx((s, u))


def test_route_mask_and_soft_weight_at_the_threshold() -> None:
    from hybridcls.gate.fusion import route_mask, soft_weight

    s = np.array([0.5, np.nextafter(0.5, 1.0), np.nextafter(0.5, 0.0), np.nan, np.inf, -np.inf])
    # a score equal to the threshold stays in the supervised branch
    assert route_mask(s, 0.5).tolist() == [False, True, False, False, True, False]
    assert route(s, _cal(threshold=0.5)).tolist() == route_mask(s, 0.5).tolist()
    np.testing.assert_allclose(soft_weight(s, 0.5, 1.0), [0.5, 0.5, 0.5, 0.0, 1.0, 0.0])


def test_unknown_at_exactly_the_unknown_threshold() -> None:
    # supervised [0, 0] -> top probability exactly 0.5; the row stays in the supervised branch
    sup, clip, score = np.array([[0.0, 0.0]]), np.array([[0.0, 0.0, 0.0, 0.0]]), np.array([-1.0])
    for mode, branch in (("hard", "supervised"), ("soft", "mixed")):
        at = fuse(mode, sup_logits=sup, clip_logits=clip, gate_score=score,
                  calibration=_cal(soft_scale=1.0, unknown_threshold=0.5))
        above = fuse(mode, sup_logits=sup, clip_logits=clip, gate_score=score,
                     calibration=_cal(soft_scale=1.0, unknown_threshold=np.nextafter(0.5, 1.0)))
        assert (at.branch[0], above.branch[0]) == (branch, "unknown"), mode
    # stacking: the stacked distribution's top probability, 0.25 here
    stack = {"score": "clip_margin", "mode": "stacking", "threshold": 0.0}
    assert fuse(None, clip_logits=clip, n_seen=2,
                calibration=GateCalibration(**stack, unknown_threshold=0.25)).branch[0] == "zeroshot"
    assert fuse(None, clip_logits=clip, n_seen=2, calibration=GateCalibration(
        **stack, unknown_threshold=np.nextafter(0.25, 1.0))).branch[0] == "unknown"


INF = np.inf


def test_hard_fusion_on_infinite_logits() -> None:
    # kept: a certain class, every class masked; routed: a masked unseen class, all masked
    sup = np.array([[INF, 0.0], [-INF, -INF], [0.0, 0.0], [0.0, 0.0]])
    clip = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, -INF, 5.0], [-INF] * 4])
    r = fuse("hard", sup_logits=sup, clip_logits=clip, gate_score=np.array([-1.0, -1, 1, 1]),
             calibration=_cal(unknown_threshold=0.5))
    np.testing.assert_array_equal(r.probs, [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 1], [0, 0, 0.5, 0.5]])
    assert r.branch.tolist() == ["supervised", "supervised", "zeroshot", "zeroshot"]
    everywhere = fuse("hard", sup_logits=sup, clip_logits=clip, gate_score=np.ones(4),
                      calibration=_cal(unseen_only=False))
    np.testing.assert_array_equal(everywhere.probs[3], [0.25] * 4)  # all masked: uniform
    lazy = clip.copy()
    lazy[2] = np.nan
    with pytest.raises(InputError, match="clip_logits of a routed image is NaN"):
        fuse("hard", sup_logits=sup, clip_logits=lazy, gate_score=np.array([-1.0, -1, 1, 1]),
             calibration=_cal())


def test_soft_fusion_on_infinite_logits_and_scores() -> None:
    sup = np.array([[INF, 0.0], [0.0, -INF], [0.0, 0.0]])
    clip = np.array([[0, 0, INF, 0], [0, 0, -INF, -INF], [np.nan] * 4])
    # score +inf -> weight 1; -inf -> 0; NaN (nothing measured) -> 0, even without zero-shot logits
    r = fuse("soft", sup_logits=sup, clip_logits=clip, gate_score=np.array([INF, -INF, np.nan]),
             calibration=_cal(soft_scale=1.0))
    np.testing.assert_array_equal(r.gate_weight, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(r.probs, [[0, 0, 1, 0], [1, 0, 0, 0], [0.5, 0.5, 0, 0]])


def test_stacking_on_infinite_logits() -> None:
    clip = np.array([[INF, 0, 0, 0], [-INF] * 4, [0, -INF, 3, -INF], [INF, 0, INF, 0]])
    cal = GateCalibration(score="clip_margin", mode="stacking", threshold=-3.0, stacking_penalty=3.0)
    r = fuse(None, clip_logits=clip, calibration=cal, n_seen=2)
    # [0 - 3, -inf, 3, -inf] -> softmax([-3, 3]) over columns 0 and 2
    np.testing.assert_allclose(r.probs, [[1, 0, 0, 0], [0.25] * 4,
                                         [*softmax([-3.0, 3.0])[:1], 0, softmax([-3.0, 3.0])[1], 0],
                                         [0.5, 0, 0.5, 0]], rtol=1e-12)
    assert r.gate_score.tolist() == [-INF, 0.0, 3.0, 0.0]


def test_soft_answers_are_hard_routing_on_the_soft_decision_score() -> None:
    rng = np.random.default_rng(3)
    S, C, n = 4, 7, 400
    sup, clip = 3 * rng.standard_normal((n, S)), 3 * rng.standard_normal((n, C))
    score = rng.standard_normal(n)
    score[:5] = np.nan
    for threshold, scale, temperature in [(0.0, 1.0, 1.0), (0.4, 0.25, 2.0), (-1.0, 3.0, 0.5)]:
        cal = GateCalibration(score="energy", mode="soft", threshold=threshold, soft_scale=scale,
                              sup_temperature=temperature)
        res = fuse("soft", sup_logits=sup, clip_logits=clip, gate_score=score, calibration=cal)
        decision = soft_decision_score(score, res.sup_probs, softmax(clip[:, S:], axis=1), scale)
        hard = np.where(decision > threshold, S + clip[:, S:].argmax(axis=1), sup.argmax(axis=1))
        np.testing.assert_array_equal(res.pred, hard)
        assert (res.pred >= S).sum() not in (0, n)  # both branches answer somewhere
