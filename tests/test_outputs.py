"""Output writers: one well-formed row per input, whatever the file name."""

from __future__ import annotations

import json
import math

import pytest

from hybridcls.outputs import PredictionRow, infer_format, open_writer, read_predictions

ODD_NAMES = ["plain.jpg", "with space.jpg", 'quote"d.jpg', "comma,name.jpg", "new\nline.jpg", "élan_猫.jpg"]


def _rows():
    rows = [
        PredictionRow(path=f"dir/{n}", label="fox", score=0.75, branch="zeroshot",
                      topk=[("fox", 0.75), ("wolf", 0.2)])
        for n in ODD_NAMES
    ]
    rows.insert(2, PredictionRow.failed("dir/broken.jpg", "truncated or corrupt image"))
    return rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_round_trip_keeps_every_row_in_order(tmp_path, suffix):
    out = tmp_path / f"pred{suffix}"
    rows = _rows()
    with open_writer(out, topk=2) as w:
        w.write_many(rows)
    back = read_predictions(out)
    assert [r["path"] for r in back] == [r.path for r in rows]
    assert [r["status"] for r in back] == ["ok", "ok", "error"] + ["ok"] * (len(rows) - 3)
    assert w.n_ok == len(rows) - 1 and w.n_error == 1
    err = back[2]
    assert err["error"] == "truncated or corrupt image"
    assert err["label"] in ("", None)


def test_csv_columns_and_topk_padding(tmp_path):
    out = tmp_path / "p.csv"
    with open_writer(out, topk=3) as w:
        w.write(PredictionRow("a.jpg", label="fox", score=0.5, branch="zeroshot", topk=[("fox", 0.5)]))
    back = read_predictions(out)
    assert list(back[0]) == ["path", "label", "score", "branch", "status", "error",
                             "top1", "top1_score", "top2", "top2_score", "top3", "top3_score"]
    assert back[0]["top1"] == "fox" and float(back[0]["top1_score"]) == 0.5
    assert back[0]["top2"] == "" and back[0]["top3_score"] == ""


def test_jsonl_nulls_for_errors(tmp_path):
    out = tmp_path / "p.jsonl"
    with open_writer(out, topk=1) as w:
        w.write(PredictionRow.failed("x.jpg", "empty file (0 bytes)"))
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record == {"path": "x.jpg", "label": None, "score": None, "branch": None,
                      "status": "error", "error": "empty file (0 bytes)", "topk": []}


def test_kaggle_format_is_image_id_and_class(tmp_path):
    out = tmp_path / "sub.csv"
    with open_writer(out, "kaggle", topk=5) as w:
        w.write_many(_rows()[:2])
    assert out.read_text(encoding="utf-8").splitlines() == [
        "image_id,class", "plain.jpg,fox", "with space.jpg,fox"]


def test_extra_columns(tmp_path):
    out = tmp_path / "p.csv"
    with open_writer(out, topk=1, extra_columns=["gate_score"]) as w:
        w.write(PredictionRow("a.jpg", label="fox", score=0.5, topk=[("fox", 0.5)],
                              extra={"gate_score": 1.25}))
    assert float(read_predictions(out)[0]["gate_score"]) == 1.25


def test_jsonl_extra_nan_is_null(tmp_path):
    out = tmp_path / "p.jsonl"
    with open_writer(out, topk=1, extra_columns=["gate_score"]) as w:
        w.write(PredictionRow("a.jpg", label="fox", score=0.5, topk=[("fox", 0.5)],
                              extra={"gate_score": float("nan")}))
    assert json.loads(out.read_text(encoding="utf-8"))["gate_score"] is None


def test_infer_format():
    assert infer_format("x.jsonl", None) == "jsonl"
    assert infer_format("x.csv", None) == "csv"
    assert infer_format("-", None) == "csv"
    assert infer_format("x.csv", "kaggle") == "kaggle"
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        infer_format("x", "xml")
    assert math.isnan(PredictionRow("p").score)
