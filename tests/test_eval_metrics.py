"""Overall accuracy and the generalised zero-shot S / U / H."""

from __future__ import annotations

import math

import pytest

from hybridcls.errors import InputError
from hybridcls.eval import open_set_scores, read_labels
from hybridcls.eval.metrics import per_class_accuracy, reliability
from hybridcls.gate.metrics import harmonic_mean


def test_per_class_means_not_per_image():
    # seen class "a" has 3 images (2 right), seen "b" 1 image (right): S = mean(2/3, 1) = 5/6,
    # while per-image seen accuracy would be 3/4.
    y_true = ["a", "a", "a", "b", "z", "z"]
    y_pred = ["a", "a", "b", "b", "z", "a"]
    s = open_set_scores(y_true, y_pred, seen_classes=["a", "b"])
    assert s.seen == pytest.approx(5 / 6)
    assert s.unseen == pytest.approx(0.5)
    assert s.harmonic == pytest.approx(2 * (5 / 6) * 0.5 / (5 / 6 + 0.5))
    assert s.accuracy == pytest.approx(4 / 6)
    assert (s.n_seen_images, s.n_unseen_images) == (4, 2)


def test_unknown_counts_as_wrong_and_missing_groups_are_nan():
    s = open_set_scores(["a", "a"], ["a", "unknown"], seen_classes=["a"])
    assert s.seen == 0.5 and math.isnan(s.unseen) and math.isnan(s.harmonic)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_length_mismatch():
    with pytest.raises(InputError, match="y_true has 2 labels but y_pred 1 predictions"):
        open_set_scores(["a", "b"], ["a"], seen_classes=["a"])
    with pytest.raises(InputError, match="y_true has 1 labels but y_pred 2 predictions"):
        per_class_accuracy(["a"], ["a", "b"])


def test_reliability_input_errors_name_the_parameter():
    with pytest.raises(InputError, match=r"n_bins=0: expected a whole number, at least 1"):
        reliability([0.5], [True], n_bins=0)
    with pytest.raises(InputError, match=r"confidence contains 2 values outside \[0, 1\]"):
        reliability([0.5, 1.5, -0.2, float("nan")], [True] * 4)
    with pytest.raises(InputError, match=r"confidence contains 1 value outside"):
        reliability([float("inf")], [True])
    with pytest.raises(InputError, match=r"confidence has shape \(2,\), correct \(1,\)"):
        reliability([0.5, 0.5], [True])
    # a float32 softmax a hair above 1 is a probability of 1
    assert reliability([1 + 1e-7], [True], n_bins=2).counts.tolist() == [0, 1]


def test_read_labels(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("image_id,label\nimg1.png,fox\n./sub//img2.png,red circle\n", encoding="utf-8")
    # ids as written (normalised), not cut to file names: two folders may hold one name
    assert read_labels(f) == {"img1.png": "fox", "sub/img2.png": "red circle"}


def test_read_labels_errors(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("name,what\na,b\n", encoding="utf-8")
    with pytest.raises(InputError, match="labels.csv: labels file needs an id column"):
        read_labels(f)
    f.write_text("image_id,label\na.png,x\na.png,y\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"labels.csv:3: image 'a.png' is listed twice \(first on line 2\)"):
        read_labels(f)
    f.write_text("image_id,label\nd/a.png,x\n./d/a.png,y\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"labels.csv:3: image 'd/a.png' is listed twice"):
        read_labels(f)
    f.write_text("image_id,label\na.png,x\nb.png\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"labels.csv:3: empty label"):
        read_labels(f)
    with pytest.raises(InputError, match="cannot read labels file"):
        read_labels(tmp_path / "missing.csv")


def test_reliability_counts_the_images_without_a_confidence():
    # two NaN confidences (images not predicted) are left out of the bins, and counted
    r = reliability([0.9, float("nan"), 0.9, float("nan"), 0.2], [True, False, False, True, False],
                    n_bins=10)
    assert (r.n_images, r.n_without_confidence) == (3, 2)
    assert r.counts.sum() == 3 and r.counts[8] == 2 and r.counts[1] == 1
    # |0.5 - 0.9| on two images and |0 - 0.2| on one, over the 3 with a confidence
    assert r.ece == pytest.approx((2 * 0.4 + 0.2) / 3)


def test_reliability_refuses_correct_flags_that_are_not_booleans():
    with pytest.raises(InputError) as info:
        reliability([0.5, 0.6, 0.7], [1, 0, 2])
    assert str(info.value) == "correct contains 1 value other than True/False (1/0), e.g. 2"
    assert reliability([0.5, 0.7], [1, 0], n_bins=2).ece == reliability([0.5, 0.7], [True, False],
                                                                         n_bins=2).ece
