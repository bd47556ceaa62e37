"""Class lists applied before the gate and the fusion (hybridcls.gate.restriction; issue 16, part 3)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from hybridcls.errors import InputError, ParameterError
from hybridcls.gate import BranchOutputs, CacheBranch, Gate, GateCalibration, compute_scores
from hybridcls.gate.restriction import check_allowed, restrict_outputs
from hybridcls.index import EmbeddingIndex

RNG = np.random.default_rng(0)
S, U, N = 3, 2, 6
SUP = RNG.normal(size=(N, S)) * 3
CLIP = RNG.normal(size=(N, S + U)) * 5
EMB = RNG.normal(size=(N, 8))
EMB /= np.linalg.norm(EMB, axis=1, keepdims=True)
ALLOWED = np.array([
    [1, 1, 1, 1, 1],  # everything
    [1, 0, 1, 0, 1],  # some of each
    [0, 1, 0, 1, 1],  # one seen, both unseen
    [0, 0, 0, 1, 0],  # no seen class: the zero-shot branch
    [1, 1, 0, 0, 0],  # no unseen class: the supervised branch
    [0, 0, 1, 1, 0],
], dtype=bool)


def _gate(mode: str, score: str = "clip_margin", threshold: float = 0.0) -> Gate:
    cal = GateCalibration(score=score, mode=mode, threshold=threshold, method="manual", soft_scale=1.0,
                          sup_temperature=1.5)
    return Gate.from_calibration(cal, n_seen=S)


@pytest.mark.parametrize(("mode", "score"), [("hard", "clip_margin"), ("hard", "msp"), ("soft", "clip_margin"),
                                             ("soft", "msp"), ("stacking", "clip_margin")])
def test_disallowed_classes_get_probability_exactly_zero_and_rows_sum_to_one(mode, score):
    res = _gate(mode, score).predict(BranchOutputs(SUP, None, CLIP, EMB), allowed=ALLOWED)
    assert (res.probs[~ALLOWED] == 0.0).all()
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert ALLOWED[np.arange(N), res.pred].all()
    # no seen class allowed: the zero-shot softmax over the allowed unseen classes, whatever the mode
    assert res.branch[3] == "zeroshot" and res.probs[3].tolist() == [0, 0, 0, 1, 0]
    # no unseen class allowed: the supervised softmax (at its temperature) over the allowed seen ones
    assert res.branch[4] == "supervised"
    np.testing.assert_allclose(res.probs[4, :2], softmax(SUP[4, :2] / 1.5), rtol=1e-12)
    # the supervised branch has no answer where no seen class is allowed
    assert np.isnan(res.sup_probs[3]).all()


def test_without_a_restriction_every_row_is_as_before():
    out = BranchOutputs(SUP, None, CLIP, EMB)
    for mode in ("hard", "soft", "stacking"):
        plain = _gate(mode).predict(out)
        full = _gate(mode).predict(out, allowed=np.ones(S + U, dtype=bool))
        np.testing.assert_array_equal(plain.probs, full.probs)
        assert plain.branch.tolist() == full.branch.tolist()


@pytest.mark.parametrize("score", ["clip_margin", "msp"])
def test_the_gate_score_is_read_on_every_class_as_calibrated(score):
    out = BranchOutputs(SUP, None, CLIP, EMB)
    plain = _gate("hard", score).predict(out)
    listed = _gate("hard", score).predict(out, allowed=ALLOWED)
    np.testing.assert_array_equal(listed.gate_score, plain.gate_score)
    # rows not forced to a branch are routed as without a list: the same branch
    free = np.array([0, 1, 2, 5])
    assert listed.branch[free].tolist() == plain.branch[free].tolist()


def test_scores_on_masked_columns_are_the_scores_of_the_allowed_classes():
    # row 1 allows seen {0, 2} and unseen {4}: each score equals its value on those columns alone
    out = restrict_outputs(BranchOutputs(SUP, None, CLIP, EMB), ALLOWED, S)
    seen, cols = [0, 2], [0, 2, 4]
    masked = compute_scores(["msp", "energy", "entropy", "max_logit", "mcm", "unseen_mass", "clip_margin"],
                            sup_logits=out.sup_logits[1:2], clip_logits=out.clip_logits[1:2], n_seen=S)
    alone = compute_scores(["msp", "energy", "entropy", "max_logit", "mcm", "unseen_mass", "clip_margin"],
                           sup_logits=SUP[1:2, seen], clip_logits=CLIP[1:2, cols], n_seen=2)
    for name, value in alone.items():
        np.testing.assert_allclose(masked[name], value, rtol=1e-12, err_msg=name)
    # the kNN scores read the embeddings and features, which a class list leaves as they are
    assert out.clip_embeddings is EMB and out.sup_features is None


def test_the_cache_branch_keeps_masked_classes_out_and_allowed_ones_unchanged():
    index = EmbeddingIndex(name="clip").add(EMB, labels=np.array([0, 1, 2, 0, 1, 2]))
    branch = CacheBranch(alpha=2.0, beta=3.0, k=4)
    out = restrict_outputs(BranchOutputs(SUP, None, CLIP, EMB), ALLOWED, S)
    plain = branch.apply(SUP, EMB, index)
    masked = branch.apply(out.sup_logits, EMB, index)
    seen_allowed = ALLOWED[:, :S]
    assert np.isneginf(masked[~seen_allowed]).all()
    np.testing.assert_array_equal(masked[seen_allowed], plain[seen_allowed])


def test_zero_shot_restriction_is_the_softmax_over_the_allowed_classes_alone():
    gate = Gate.zero_shot()
    res = gate.predict(BranchOutputs(clip_logits=CLIP), allowed=ALLOWED)
    for i in range(N):
        alone = gate.predict(BranchOutputs(clip_logits=CLIP[i:i + 1, ALLOWED[i]]))
        np.testing.assert_allclose(res.probs[i, ALLOWED[i]], alone.probs[0], rtol=1e-13, atol=0)
    assert (res.probs[~ALLOWED] == 0).all()


def test_a_row_with_no_class_and_a_mask_of_another_shape_are_refused():
    bad = ALLOWED.copy()
    bad[2] = False
    with pytest.raises(ParameterError, match=r"row\(s\) 2 allow no class"):
        _gate("hard").predict(BranchOutputs(SUP, None, CLIP, EMB), allowed=bad)
    with pytest.raises(ParameterError, match=r"expected \[5\] or \[6, 5\]"):
        check_allowed(ALLOWED[:, :4], N, S + U)
    with pytest.raises(ParameterError, match="expected booleans"):
        check_allowed(ALLOWED.astype(int), N, S + U)
    assert check_allowed(ALLOWED[1], N, S + U).tolist() == [ALLOWED[1].tolist()] * N


def test_no_seen_class_where_clip_did_not_run_cannot_be_answered():
    out = BranchOutputs(SUP, None, CLIP, EMB).without_clip(np.arange(N) == 3)
    with pytest.raises(InputError, match="row 3 allows no seen class but the CLIP tower did not run"):
        _gate("hard").predict(out, allowed=ALLOWED)
    # a skipped row that allows seen classes keeps the supervised answer over them
    res = _gate("hard").predict(out.rows(slice(0, 3)), allowed=ALLOWED[:3])
    assert res.branch[0] in ("supervised", "zeroshot") and (res.probs[~ALLOWED[:3]] == 0).all()
