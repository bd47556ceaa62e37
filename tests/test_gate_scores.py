"""Gate scores against their published formulas; kNN index, combined score, detection metrics."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from hybridcls.errors import DataTooSmallError, InputError
from hybridcls.gate import (
    SCORES,
    CombinedScore,
    clip_margin_score,
    compute_scores,
    energy_score,
    entropy_score,
    gate_detection,
    knn_distance_score,
    max_logit_score,
    mcm_score,
    msp_score,
    unseen_mass_score,
)
from hybridcls.gate.metrics import ausuc, routing_matrix, seen_unseen_accuracy
from hybridcls.gate.scores import needs_of
from hybridcls.index import EmbeddingIndex

# rows: confident, flat, very confident with large magnitudes
LOGITS = [[2.0, 1.0, 0.1], [0.5, 0.5, 0.5], [30.0, -10.0, 0.0]]


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((x - m) / t) for x in row]
    return [v / sum(e) for v in e]


def _logsumexp(row: list[float]) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(x - m) for x in row))


def test_msp_is_negative_max_softmax() -> None:
    expected = [-max(_softmax(r)) for r in LOGITS]
    np.testing.assert_allclose(msp_score(LOGITS), expected, rtol=1e-12)
    assert msp_score(LOGITS)[1] == pytest.approx(-1 / 3)
    expected_t2 = [-max(_softmax(r, 2.0)) for r in LOGITS]
    np.testing.assert_allclose(msp_score(LOGITS, temperature=2.0), expected_t2, rtol=1e-12)


def test_max_logit_is_negative_max() -> None:
    assert max_logit_score(LOGITS).tolist() == [-2.0, -0.5, -30.0]


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_energy_is_minus_t_logsumexp(t: float) -> None:
    expected = [-t * _logsumexp([x / t for x in r]) for r in LOGITS]
    np.testing.assert_allclose(energy_score(LOGITS, temperature=t), expected, rtol=1e-12)


def test_energy_matches_pytorch_ood_formula_and_stays_finite() -> None:
    x = torch.tensor([[1000.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    expected = (-2.0 * torch.logsumexp(x / 2.0, dim=1)).numpy()
    got = energy_score(x, temperature=2.0)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] == pytest.approx(-1000.0)


def test_entropy_is_minus_sum_p_log_p() -> None:
    expected = [-sum(p * math.log(p) for p in _softmax(r)) for r in LOGITS]
    np.testing.assert_allclose(entropy_score(LOGITS), expected, rtol=1e-9, atol=1e-14)
    assert entropy_score(LOGITS)[1] == pytest.approx(math.log(3))
    # a probability that underflows to 0 contributes 0, not NaN
    assert entropy_score([[1000.0, 0.0]])[0] == pytest.approx(0.0, abs=1e-12)


def test_mcm_is_negative_max_softmax_at_the_given_scale() -> None:
    cos = np.array([[0.30, 0.25, 0.10], [0.20, 0.21, 0.19]])
    scaled = (100 * cos).tolist()  # CLIP's logit scale already applied by the caller
    expected = [-max(_softmax(r)) for r in scaled]
    np.testing.assert_allclose(mcm_score(scaled), expected, rtol=1e-12)
    # Ming et al.'s temperature tau: the same score on cos / tau
    assert mcm_score(cos / 0.01)[0] == pytest.approx(expected[0])
    assert mcm_score(cos, temperature=0.01)[0] == pytest.approx(expected[0])


def test_mcm_at_the_papers_temperature_reads_cosines_through_the_logit_scale() -> None:
    # Ming et al. 2022 and pytorch-ood's MCM: softmax of the cosine similarities at tau = 1
    cos = np.array([[0.30, 0.25, 0.10, 0.28], [0.20, 0.21, 0.19, 0.40]])
    paper = [-max(_softmax(r[:3])) for r in cos.tolist()]
    got = compute_scores(["mcm"], clip_logits=100 * cos, n_seen=3, clip_temperature=1.0,
                         clip_logit_scale=100.0)["mcm"]
    np.testing.assert_allclose(got, paper, rtol=1e-12)
    assert got[0] == pytest.approx(-0.3610, abs=1e-4)  # nearly flat: 3 prompts, close cosines
    # clip_temperature=None: the logits as they are (CLIP's own scale, tau = 1 / 100)
    own = compute_scores(["mcm"], clip_logits=100 * cos, n_seen=3)["mcm"]
    np.testing.assert_allclose(own, [-max(_softmax((100 * r[:3]).tolist())) for r in cos], rtol=1e-12)
    with pytest.raises(InputError, match="clip_temperature=1.0 is in cosine units: it needs "
                                         "clip_logit_scale"):
        compute_scores(["mcm"], clip_logits=cos, n_seen=3, clip_temperature=1.0)


def test_unseen_mass_is_the_softmax_mass_of_the_unseen_prompts() -> None:
    # Fort et al. 2021: the sum of CLIP's softmax over the outlier classes' names
    cos = np.array([[0.30, 0.25, 0.10, 0.28], [0.20, 0.21, 0.19, 0.40]])
    for tau in (1.0, 0.01):
        expected = [sum(_softmax((r / tau).tolist())[3:]) for r in cos]
        np.testing.assert_allclose(unseen_mass_score(cos, 3, tau), expected, rtol=1e-12)
        got = compute_scores(["unseen_mass"], clip_logits=100 * cos, n_seen=3,
                             clip_temperature=tau, clip_logit_scale=100.0)["unseen_mass"]
        np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert unseen_mass_score([[0.0, 0.0, 0.0, 0.0]], 3).tolist() == [0.25]
    with pytest.raises(InputError, match="unseen_mass needs seen and unseen columns: n_seen=4"):
        unseen_mass_score(cos, 4)


def test_backbone_knn_is_the_kth_distance_in_the_backbone_feature_space() -> None:
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    index = EmbeddingIndex("flat").add(train)
    query = np.array([[2.0, 0.0], [-1.0, 0.0]])  # same direction as train[0]; opposite
    got = compute_scores(["backbone_knn"], sup_features=query, backbone_index=index,
                         knn_k=1)["backbone_knn"]
    # Sun et al. 2022 on normalised features: the Euclidean distance sqrt(2 - 2 cos) to the
    # nearest training feature; [-1, 0] is orthogonal to [0, 1], its best match
    np.testing.assert_allclose(got, [0.0, math.sqrt(2)], atol=1e-6)
    with pytest.raises(InputError, match="gate score 'backbone_knn' needs backbone_index"):
        compute_scores(["backbone_knn"], sup_features=query)


def test_clip_margin_is_best_unseen_minus_best_seen() -> None:
    c = [[5.0, 1.0, 2.0, 4.0], [1.0, 0.0, 7.0, 3.0]]
    assert clip_margin_score(c, n_seen=2).tolist() == [-1.0, 6.0]
    with pytest.raises(InputError, match="n_seen=4 of 4 classes"):
        clip_margin_score(c, n_seen=4)


def _seen_and_unseen_looking() -> dict:
    """Every score input for two images: the first looks like the seen classes on each input
    (a confident supervised head, a seen prompt, a training image's embedding), the second not."""
    train = np.eye(4)[:2]
    return {
        "sup_logits": [[8.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
        "sup_features": [train[1], np.eye(4)[2]],
        "clip_logits": [[9.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 9.0, 0.0]],  # 3 seen prompts
        "n_seen": 3,
        "clip_emb": [train[0], np.eye(4)[3]],
        "knn_index": EmbeddingIndex("flat").add(train),
        "backbone_index": EmbeddingIndex("flat").add(train),
        "clip_logit_scale": 10.0,
        "knn_k": 1,
    }


# The registry, not a list typed here: a new score is held to the convention by these tests.
@pytest.mark.parametrize("name", sorted(SCORES))
def test_every_score_is_higher_for_the_unseen_looking_image(name: str) -> None:
    s = compute_scores([name], **_seen_and_unseen_looking())[name]
    assert s.shape == (2,) and s.dtype == np.float64
    assert s[1] > s[0]


@pytest.mark.parametrize("name", sorted(SCORES))
def test_every_score_reads_the_inputs_it_declares_and_no_other(name: str) -> None:
    spec, inputs = SCORES[name], _seen_and_unseen_looking()
    full = compute_scores([name], **inputs)[name]
    for need in spec.needs:
        with pytest.raises(InputError, match=f"gate score '{name}' needs {need}, which was not given"):
            compute_scores([name], **{**inputs, need: None})
    # the inputs it does not declare are not read: leaving them out changes nothing
    unread = {k: None for k in ("sup_logits", "sup_features", "clip_logits", "clip_emb")
              if k not in spec.needs}
    np.testing.assert_array_equal(compute_scores([name], **{**inputs, **unread})[name], full)
    # each temperature axis of the calibration grid is only for the scores that read it
    hot = compute_scores([name], **inputs, temperature=3.0)[name]
    assert (not np.array_equal(hot, full)) == (spec.temperature == "sup")
    hot = compute_scores([name], **inputs, clip_temperature=0.3)[name]
    assert (not np.array_equal(hot, full)) == (spec.temperature == "clip")


def test_torch_inputs_give_float64_numpy() -> None:
    out = msp_score(torch.tensor(LOGITS, dtype=torch.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, msp_score(LOGITS), rtol=1e-6)


def test_registry_says_what_each_score_needs() -> None:
    assert SCORES["energy"].needs == ("sup_logits",)
    assert SCORES["clip_margin"].needs == ("clip_logits",)
    assert SCORES["knn"].needs == ("clip_emb",)
    assert SCORES["energy"].function is energy_score
    # a gate on supervised scores only needs no zero-shot input: lazy zero-shot possible
    assert needs_of(["energy", "msp"]) == {"sup_logits"}
    assert needs_of(["energy", "knn"]) == {"sup_logits", "clip_emb"}


def test_compute_scores_matches_the_functions_and_reports_missing_inputs() -> None:
    sup = np.array(LOGITS)
    clip = np.array([[5.0, 1.0, 2.0, 4.0], [1.0, 0.0, 7.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
    s = compute_scores(
        ["energy", "mcm", "clip_margin"],
        sup_logits=sup,
        clip_logits=clip,
        n_seen=3,
        temperature=2.0,
    )
    assert list(s) == ["energy", "mcm", "clip_margin"]
    np.testing.assert_array_equal(s["energy"], energy_score(sup, 2.0))
    np.testing.assert_array_equal(s["mcm"], mcm_score(clip[:, :3]))
    np.testing.assert_array_equal(s["clip_margin"], clip_margin_score(clip, 3))
    # n_seen defaults to the supervised head's width
    s2 = compute_scores(["clip_margin"], sup_logits=sup, clip_logits=clip)
    np.testing.assert_array_equal(s2["clip_margin"], s["clip_margin"])
    with pytest.raises(InputError, match="gate score 'energy' needs sup_logits"):
        compute_scores(["energy"], clip_logits=clip, n_seen=3)
    with pytest.raises(InputError, match="unknown gate score 'odin'"):
        compute_scores(["odin"], sup_logits=sup)
    with pytest.raises(InputError, match="needs knn_index"):
        compute_scores(["knn"], clip_emb=np.eye(3))


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_distances_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    train, query = _unit(rng, 50, 8), _unit(rng, 7, 8)
    knn = EmbeddingIndex("flat").add(train[:20]).add(train[20:])
    assert knn.ntotal == 50 and knn.dim == 8
    dist = np.linalg.norm(query[:, None, :] - train[None, :, :], axis=2)  # brute force, Euclidean
    expected_k3 = np.sort(dist, axis=1)[:, 2]
    np.testing.assert_allclose(knn.kth_distance(query, 3), expected_k3, atol=1e-5)
    sims, ids = knn.search(query, 2)
    np.testing.assert_array_equal(ids, np.argsort(dist, axis=1, kind="stable")[:, :2])
    np.testing.assert_allclose(sims, (query @ train.T)[np.arange(7)[:, None], ids], atol=1e-6)
    np.testing.assert_allclose(knn_distance_score(query, knn, k=3), expected_k3, atol=1e-5)
    # an image in the index is at distance 0 from its nearest neighbour
    assert knn.kth_distance(train[:1], 1)[0] == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(InputError, match="k=51 neighbours asked of an index holding 50"):
        knn.kth_distance(query, 51)
    with pytest.raises(InputError, match="dimension 4, the index has 8"):
        knn.add(np.ones((2, 4)))


def _separable(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    seen = rng.normal([0.0, 0.0], 1.0, size=(60, 2))
    unseen = rng.normal([3.0, 3.0], 1.0, size=(20, 2))
    return np.vstack([seen, unseen]), np.r_[np.zeros(60, bool), np.ones(20, bool)]


def test_combined_score_is_the_logistic_logit_over_seen_standardised_scores() -> None:
    X, y = _separable(np.random.default_rng(0))
    m = CombinedScore(["energy", "clip_margin"]).fit(X, y)
    np.testing.assert_allclose(m.mean_, X[~y].mean(axis=0))
    np.testing.assert_allclose(m.scale_, X[~y].std(axis=0))
    expected = ((X - m.mean_) / m.scale_) @ m.coef_ + m.intercept_
    np.testing.assert_allclose(m.score(X), expected)
    assert (m.coef_ > 0).all()  # both scores point towards unseen, so both weights are positive
    assert m.score(X)[y].mean() > m.score(X)[~y].mean()


def test_combined_score_json_round_trip_and_anchor() -> None:
    X, y = _separable(np.random.default_rng(0))
    m = CombinedScore(["energy", "clip_margin"]).fit(X, y)
    back = CombinedScore.from_dict(json.loads(json.dumps(m.to_dict())))
    np.testing.assert_array_equal(back.score(X), m.score(X))
    # re-anchoring on seen scores of another scale keeps the weights
    shifted = m.anchored(10 * X[~y] + 5)
    np.testing.assert_array_equal(shifted.coef_, m.coef_)
    np.testing.assert_allclose(shifted.score(10 * X + 5), m.score(X))
    with pytest.raises(InputError, match="2 columns for 3 scores"):
        CombinedScore(["energy", "msp", "mcm"]).fit(X, y)
    with pytest.raises(InputError, match="both seen and unseen rows"):
        CombinedScore(["energy", "mcm"]).fit(X, np.zeros(80, bool))


def test_gate_detection_on_known_arrays() -> None:
    # ascending scores: 0.1 seen, 0.3 unseen, 0.4 seen, 0.9 unseen
    d = gate_detection([0.1, 0.4, 0.3, 0.9], [False, False, True, True])
    assert d.auroc == pytest.approx(3 / 4)  # seen below unseen in 3 of 4 pairs
    # Seen positive, most seen-like first (0.1 S, 0.3 U, 0.4 S, 0.9 U): the PR curve runs through
    # (recall, precision) = (0, 1), (1/2, 1), (1/2, 1/2), (1, 2/3), (1, 1/2).
    # Average precision sums precision at each recall step: (1 + 2/3) / 2 = 5/6.
    assert d.aupr_in_average_precision == pytest.approx((1 + 2 / 3) / 2)
    # The trapezoid rule (OpenOOD, pytorch-ood) joins the points with straight lines:
    # 1/2 * 1 + 1/2 * (1/2 + 2/3) / 2 = 19/24.
    assert d.aupr_in_trapezoid == pytest.approx(19 / 24)
    # unseen positive, most unseen-like first (0.9 U, 0.4 S, 0.3 U, 0.1 S): the same points
    assert d.aupr_out_average_precision == pytest.approx(5 / 6)
    assert d.aupr_out_trapezoid == pytest.approx(19 / 24)


def test_fpr_at_95_tpr_unseen_positive_and_seen_positive() -> None:
    # seen scores 0..19; unseen 5, 6 and 20..37 (20 images)
    seen, unseen = np.arange(20.0), np.r_[5.0, 6.0, np.arange(20.0, 38.0)]
    d = gate_detection(np.r_[seen, unseen], np.r_[np.zeros(20, bool), np.ones(20, bool)])
    # The field's convention (unseen = OOD positive): flagging 95% of unseen images (19 of 20)
    # needs the threshold at 6; the seen images at or above it, 6..19, are 14 of 20 flagged.
    assert d.fpr_at_tpr_unseen_positive == pytest.approx(14 / 20)
    # Seen positive: keeping 95% of seen images (0..18) also keeps the unseen 5 and 6: 2 of 20.
    assert d.fpr_at_tpr_seen_positive == pytest.approx(2 / 20)
    assert d.tpr == 0.95
    pairs = [(s < u) + 0.5 * (s == u) for s in seen for u in unseen]
    assert d.auroc == pytest.approx(np.mean(pairs))
    # at TPR 1 every unseen image is flagged: threshold 5 flags the seen 5..19, 15 of 20
    assert gate_detection(np.r_[seen, unseen], np.r_[np.zeros(20, bool), np.ones(20, bool)],
                          tpr=1.0).fpr_at_tpr_unseen_positive == pytest.approx(15 / 20)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tpr": 95}, r"tpr=95: expected a rate in \(0, 1\]"),
    ({"tpr": 0.0}, r"tpr=0\.0: expected a rate in \(0, 1\]"),
    ({"tpr": float("nan")}, r"tpr=nan: expected a rate"),
    ({"scores": [0.1, np.nan, np.nan, np.nan]}, r"scores contains 3 NaN values"),
    ({"scores": [0.1, np.inf, 0.2, 0.3]}, r"scores contains 1 infinite value$"),
    ({"is_unseen": [False, True]}, r"is_unseen has shape \(2,\) for scores of shape \(4,\)"),
    ({"is_unseen": [True] * 4}, r"is_unseen: all 4 images are unseen; detection needs both"),
])
def test_gate_detection_input_errors_name_the_parameter(kwargs, message) -> None:
    args = {"scores": [0.1, 0.2, 0.3, 0.4], "is_unseen": [False, True, False, True], **kwargs}
    with pytest.raises(InputError, match=message):
        gate_detection(**args)


def test_gate_metric_helpers_refuse_bad_input_with_input_error() -> None:
    with pytest.raises(InputError, match=r"y_true contains 1 negative class indices"):
        seen_unseen_accuracy([0, -1], [0, 1], n_seen=1)
    with pytest.raises(InputError, match=r"y_true has shape \(2,\), y_pred \(1,\)"):
        seen_unseen_accuracy([0, 1], [0], n_seen=1)
    with pytest.raises(InputError, match=r"y_pred contains 1 values below -1"):
        seen_unseen_accuracy([0, 1], [0, -2], n_seen=1)
    assert seen_unseen_accuracy([0, 1], [0, -1], n_seen=1)[:2] == (1.0, 0.0)  # -1 = unknown: wrong
    with pytest.raises(InputError, match=r"clip_logits contains 1 NaN value$"):
        ausuc([[1.0, np.nan, 0.0]], [0], n_seen=1)
    with pytest.raises(InputError, match=r"y_true contains 1 class indices outside 0\.\.2"):
        ausuc([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [0, 3], n_seen=1)
    with pytest.raises(InputError, match=r"to_zeroshot has shape \(2,\), is_unseen \(3,\)"):
        routing_matrix([True, False], [True, False, True])



@pytest.mark.parametrize(("flags", "message"), [
    ([0, 0, 1, 2], " contains 1 value other than True/False (1/0), e.g. 2"),
    ([0, 0, np.nan, 1], " contains 1 NaN value: expected booleans (True/False or 1/0)"),
    ([0.0, 0.5, 1.0, 1.0], " contains 1 value other than True/False (1/0), e.g. 0.5"),
    (["no", "no", "yes", "yes"], " has values of type <U3: expected booleans (True/False or 1/0)"),
    ([False, None, True, True], ": expected booleans (True/False or 1/0), found None"),
])
def test_flags_that_are_not_booleans_are_refused_naming_the_parameter(flags, message) -> None:
    # np.asarray(..., dtype=bool) read 2, NaN and 0.5 as True and "no" as a string: never again
    for call, name in ((lambda: gate_detection([0.1, 0.2, 0.3, 0.4], flags), "is_unseen"),
                       (lambda: routing_matrix([True, False, True, False], flags), "is_unseen"),
                       (lambda: routing_matrix(flags, [True, False, True, False]), "to_zeroshot")):
        with pytest.raises(InputError) as info:
            call()
        assert str(info.value) == name + message


def test_flags_given_as_zero_and_one_count_as_booleans() -> None:
    as_bools = routing_matrix([True, False, True, False], [True, True, False, False])
    assert routing_matrix([1, 0, 1.0, 0.0], np.array([1, 1, 0, 0])) == as_bools
    assert as_bools.as_dict() == {"seen_to_supervised": 1, "seen_to_zeroshot": 1,
                                  "unseen_to_supervised": 1, "unseen_to_zeroshot": 1}
    assert gate_detection([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]).auroc == 1.0


def test_class_indices_that_are_not_whole_numbers_are_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarning for a NaN cast is gone too
        with pytest.raises(InputError) as info:
            seen_unseen_accuracy([0, 1, 1], [0, np.nan, np.nan], n_seen=1)
    assert str(info.value) == "y_pred contains 2 NaN values: expected class indices (whole numbers)"
    with pytest.raises(InputError, match=r"^y_true contains 1 value that is not a whole number, "
                                         r"e\.g\. 1\.5: expected class indices$"):
        seen_unseen_accuracy([0, 1.5], [0, 1], n_seen=1)
    with pytest.raises(InputError, match=r"^y_pred contains 1 infinite value"):
        seen_unseen_accuracy([0, 1], [0, np.inf], n_seen=1)
    with pytest.raises(InputError, match=r"^y_true contains 1 NaN value"):
        ausuc([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [0, np.nan], n_seen=1)
    with pytest.raises(InputError, match=r"^n_seen=1\.5: expected a whole number, 0 or more$"):
        seen_unseen_accuracy([0, 1], [0, 1], n_seen=1.5)
    # whole numbers stored as floats are class indices
    assert seen_unseen_accuracy([0.0, 1.0], [0, 1], n_seen=1) == seen_unseen_accuracy([0, 1], [0, 1], 1)

INF = np.inf
# a masked class, one certain class, two certain classes, every class masked, one class left
INF_ROWS = [[2.0, 1.0, -INF], [INF, 1.0, 0.0], [INF, INF, 0.0], [-INF, -INF, -INF], [-INF, 3.0, -INF]]


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_entropy_of_a_row_with_a_masked_class_is_that_of_the_other_classes() -> None:
    # softmax([2, 1]) = [e, 1] / (e + 1): H = log(e + 1) - e / (e + 1) (in nats) = 0.5822
    e = math.e
    assert _entropy(_softmax([2.0, 1.0])) == pytest.approx(math.log(e + 1) - e / (e + 1), rel=1e-12)
    assert entropy_score([[2.0, 1.0, -INF]])[0] == pytest.approx(0.5822031, abs=1e-7)
    assert entropy_score([[2.0, 1.0, -INF]])[0] == pytest.approx(_entropy(_softmax([2.0, 1.0])), rel=1e-12)


# every registered logit score on INF_ROWS, from the definitions: a -inf class drops out,
# +inf classes share the probability, a row of -inf only is uniform
_M = -max(_softmax([2.0, 1.0]))
EXPECTED_ON_INF_ROWS = {
    "msp": [_M, -1.0, -0.5, -1 / 3, -1.0],
    "max_logit": [-2.0, -INF, -INF, INF, -3.0],
    "energy": [-_logsumexp([2.0, 1.0]), -INF, -INF, INF, -3.0],
    "entropy": [_entropy(_softmax([2.0, 1.0])), 0.0, math.log(2), math.log(3), 0.0],
    "mcm": [_M, -1.0, -0.5, -1 / 3, -1.0],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ON_INF_ROWS))
def test_logit_scores_are_defined_on_infinite_logits(name: str) -> None:
    got = compute_scores([name], sup_logits=INF_ROWS, clip_logits=np.hstack([INF_ROWS, np.zeros((5, 1))]),
                         n_seen=3)[name]
    np.testing.assert_allclose(got, EXPECTED_ON_INF_ROWS[name], rtol=1e-12)
    assert not np.isnan(got).any()


def test_temperature_scores_on_infinite_logits() -> None:
    # T = 2: [2, 1, -inf] / 2 = [1, 0.5, -inf]
    assert msp_score(INF_ROWS, 2.0)[0] == pytest.approx(-max(_softmax([1.0, 0.5])), rel=1e-12)
    assert energy_score(INF_ROWS, 2.0)[0] == pytest.approx(-2 * _logsumexp([1.0, 0.5]), rel=1e-12)
    assert energy_score(INF_ROWS, 2.0)[1:].tolist() == [-INF, -INF, INF, -1.5 * 2]


def test_clip_margin_on_infinite_logits() -> None:
    rows = [[INF, 0, 1, 2], [0, 1, INF, 2], [INF, 0, INF, 0], [-INF] * 4, [-INF, -INF, 1, 0], [3, -INF, -INF, 1]]
    # seen certain; unseen certain; both certain (a tie); all masked (a tie); seen masked; one each
    assert clip_margin_score(rows, n_seen=2).tolist() == [-INF, INF, 0.0, 0.0, INF, -2.0]


def test_knn_score_of_a_non_finite_embedding_is_nan_and_others_stay() -> None:
    knn = EmbeddingIndex("flat").add(np.eye(3))
    got = knn_distance_score(np.array([[INF, 0, 0], [-INF, 1, 0], [1.0, 0, 0]]), knn, k=1)
    assert np.isnan(got[:2]).all() and got[2] == pytest.approx(0.0, abs=1e-6)


def test_combined_score_on_infinite_base_scores() -> None:
    m = CombinedScore.from_dict({"names": ["energy", "mcm"], "mean": [1.0, 0.0], "scale": [2.0, 1.0],
                                 "coef": [2.0, -1.0], "intercept": 0.5})
    rows = [[3.0, 1.0], [INF, 0.0], [-INF, 0.0], [0.0, -INF], [INF, INF], [INF, -INF], [np.nan, 0.0]]
    # (3 - 1) / 2 * 2 - 1 + 0.5 = 1.5; +inf and -inf terms cancel, leaving the intercept
    assert m.score(rows)[:6].tolist() == [1.5, INF, -INF, INF, 0.5, INF]
    assert np.isnan(m.score(rows)[6])
    # a zero weight ignores its score, infinite or not
    zero = CombinedScore.from_dict({**m.to_dict(), "coef": [0.0, 1.0]})
    assert zero.score([[INF, 2.0]]).tolist() == [2.5]
    # fitting and anchoring leave rows with an infinite score out
    X, y = _separable(np.random.default_rng(0))
    fitted = CombinedScore(["energy", "mcm"]).fit(np.vstack([X, [[INF, 0.0]]]), np.r_[y, False])
    np.testing.assert_array_equal(fitted.coef_, CombinedScore(["energy", "mcm"]).fit(X, y).coef_)
    with pytest.raises(DataTooSmallError, match="at least 2 held-out seen images, got 1"):
        fitted.anchored([[1.0, 2.0], [INF, 0.0]])


def test_softmax_rows_on_the_extended_reals() -> None:
    from hybridcls.gate.scores import softmax_rows

    got = softmax_rows(np.array([[2.0, 1.0, -INF], [INF, 1.0, INF], [-INF] * 3, [np.nan, 1.0, INF]]))
    np.testing.assert_allclose(got[0], [*_softmax([2.0, 1.0]), 0.0], rtol=1e-12)
    assert got[1].tolist() == [0.5, 0.0, 0.5]
    np.testing.assert_allclose(got[2], [1 / 3] * 3)
    assert np.isnan(got[3]).all()
