"""Overall accuracy and the generalised zero-shot S / U / H."""

from __future__ import annotations

import math

import pytest

from hybridcls.errors import InputError
from hybridcls.eval import open_set_scores, read_labels
from hybridcls.eval.metrics import harmonic_mean


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
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        open_set_scores(["a", "b"], ["a"], seen_classes=["a"])


def test_read_labels(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("image_id,label\nimg1.png,fox\nsub/img2.png,red circle\n", encoding="utf-8")
    assert read_labels(f) == {"img1.png": "fox", "img2.png": "red circle"}


def test_read_labels_errors(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("name,what\na,b\n", encoding="utf-8")
    with pytest.raises(InputError, match="labels.csv: labels file needs an id column"):
        read_labels(f)
    f.write_text("image_id,label\na.png,x\na.png,y\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"labels.csv:3: image 'a.png' is listed twice"):
        read_labels(f)
    with pytest.raises(InputError, match="cannot read labels file"):
        read_labels(tmp_path / "missing.csv")
