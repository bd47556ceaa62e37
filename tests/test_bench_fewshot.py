"""The few-shot bench's "refit the head" route: a class-balanced linear probe."""

from __future__ import annotations

import numpy as np

from hybridcls.bench.fewshot import linear_probe


def _on_circle(degrees: np.ndarray, radius: float = 1.0) -> np.ndarray:
    angles = np.deg2rad(degrees)
    return radius * np.c_[np.cos(angles), np.sin(angles)]


def test_linear_probe_weighs_a_class_of_three_images_as_one_of_two_hundred():
    """Three support images of a new class against 200 training images of another: balanced,
    the boundary sits between the two directions (a query at 50 degrees, nearer the new class's
    90 than the old one's 0, is the new class), and the features' length does not count."""
    rng = np.random.default_rng(0)
    features = _on_circle(np.r_[rng.normal(0, 15, 200), rng.normal(90, 15, 3)])
    labels = np.r_[np.zeros(200, dtype=np.int64), np.ones(3, dtype=np.int64)]
    queries = _on_circle(np.array([30.0, 50.0, 60.0, 70.0]), radius=3.0)
    assert linear_probe(features, labels, queries).tolist() == [0, 1, 1, 1]
    # unbalanced, the 200 images would pull every query to their class
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    plain = LogisticRegression(max_iter=2000).fit(normalize(features), labels)
    assert plain.predict(normalize(queries)).tolist() == [0, 0, 0, 0]


def test_a_route_of_one_draw_shows_no_spread():
    """The table's ``H (sd)``: a spread over the draws, none ("-") for a single draw."""
    from hybridcls.bench.fewshot import FewShotReport, FewShotRow

    rows = [FewShotRow("collect and retrain", 5, 1, 0.995, 1.0, 0.997, 0.996, 0.0, 1.02, 373.9),
            FewShotRow("hybrid + support", 5, 3, 0.97, 0.968, 0.969, 0.969, 0.001, 0.991, 1.5)]
    table = FewShotReport(rows, {}, {}).markdown().splitlines()
    assert table[2] == "| collect and retrain | 5 | 1 | 99.5 | 100.0 | 99.7 (-) | 99.6 | 102.0% | 373.9 |"
    assert table[3] == "| hybrid + support | 5 | 3 | 97.0 | 96.8 | 96.9 (0.1) | 96.9 | 99.1% | 1.5 |"
