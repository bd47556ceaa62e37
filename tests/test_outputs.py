"""Output writers: one well-formed row per input, whatever the file name."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hybridcls.cache import atomic_write_json, json_text
from hybridcls.errors import InputError
from hybridcls.outputs import (
    PredictionRow,
    batch_rows,
    check_unique_keys,
    extra_columns,
    infer_format,
    open_writer,
    read_predictions,
    topk_pairs,
)

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


def test_topk_pairs_are_the_most_probable_first():
    # Sorted by hand, most probable first: b 0.5, c 0.3, a 0.15 (d 0.05 is 4th). Least probable
    # first would give d, a, c: the order is what a reader of the top-k columns relies on.
    names = ["a", "b", "c", "d"]
    assert topk_pairs([0.15, 0.5, 0.3, 0.05], names, 3) == [["b", 0.5], ["c", 0.3], ["a", 0.15]]
    assert topk_pairs([0.15, 0.5, 0.3, 0.05], names, 1) == [["b", 0.5]]
    assert topk_pairs(None, names, 3) == [] and topk_pairs([0.5, float("nan"), 0, 0], names, 2) == []


def test_hybrid_rows_write_each_branch_top_k_best_first(tmp_path):
    """The supervised_topk / zeroshot_topk columns of HybridClassifier.batch_rows, read back."""
    from hybridcls.engine import EngineBatch
    from hybridcls.gate.fusion import FusionResult
    from hybridcls.hybrid import HybridClassifier

    hy = HybridClassifier()
    hy.classes_ = np.array(["fox", "wolf", "moose", "elk"], dtype=object)
    hy.n_seen_ = 2
    sup = np.array([[0.2, 0.8]])  # seen classes only: wolf first
    clip = np.array([[0.1, 0.2, 0.3, 0.4]])  # elk, moose, wolf: the reverse of column order
    res = FusionResult(probs=clip, branch=np.array(["zeroshot"]), gate_weight=np.array([1.0]),
                       gate_score=np.array([2.5]), sup_probs=sup, clip_probs=clip)
    rows = hy.batch_rows(["x.png"], EngineBatch(indices=[0], ok=[0], errors={}), res, topk=3)
    out = tmp_path / "p.jsonl"
    with open_writer(out, topk=3, extra_columns=hy.EXTRA_COLUMNS) as w:
        w.write_many(rows)
    back = read_predictions(out)[0]
    assert back["supervised_topk"] == [["wolf", 0.8], ["fox", 0.2]]
    assert back["zeroshot_topk"] == [["elk", 0.4], ["moose", 0.3], ["wolf", 0.2]]
    assert [t["label"] for t in back["topk"]] == ["elk", "moose", "wolf"] and back["label"] == "elk"


def test_extra_columns_have_one_order():
    # docs/cli.md's table: a hybrid's four columns, then model_version, then one score per class
    # (JSON Lines: one scores object), each only when asked for
    branch = ["gate_score", "gate_weight", "supervised_topk", "zeroshot_topk"]
    assert extra_columns(branch_columns=False) == []
    assert extra_columns("csv", branch_columns=True, model_version=True, score_classes=["elk", "fox"]) == [
        *branch, "model_version", "score:elk", "score:fox"]
    assert extra_columns("jsonl", branch_columns=True, model_version=True, score_classes=["elk", "fox"]) == [
        *branch, "model_version", "scores"]
    assert extra_columns("csv", branch_columns=False, score_classes=["elk"]) == ["score:elk"]
    with pytest.raises(InputError, match="Kaggle submission holds image_id and class only"):
        extra_columns("kaggle", branch_columns=False, score_classes=["elk"])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_model_version_and_all_scores_in_one_file(tmp_path, fmt):
    """batch_rows with both options, written and read back: an error row keeps the version and
    has no scores; a prediction has both, the scores its probabilities in class order."""
    from hybridcls.gate.fusion import FusionResult

    classes = ["fox", "wolf", "elk"]
    probs = np.array([[0.25, 0.125, 0.625]])  # exact in binary and to 6 decimals
    res = FusionResult(probs=probs, branch=np.array(["zeroshot"]), gate_weight=np.array([1.0]),
                       gate_score=np.array([0.0]), sup_probs=None, clip_probs=probs)
    rows = batch_rows(["bad.png", "ok.png"], [0, 1], [1], {0: "not an image"}, res, classes,
                      n_seen=0, topk=1, branch_columns=False, model_version="0123456789ab",
                      all_scores=True)
    out = tmp_path / f"p.{fmt}"
    extra = extra_columns(fmt, branch_columns=False, model_version=True, score_classes=classes)
    with open_writer(out, topk=1, extra_columns=extra) as w:
        w.write_many(rows)
    bad, ok = read_predictions(out)
    if fmt == "csv":
        header = out.read_text(encoding="utf-8").splitlines()[0].split(",")
        assert header == ["path", "label", "score", "branch", "status", "error", "top1", "top1_score",
                          "model_version", "score:fox", "score:wolf", "score:elk"]
        assert (ok["model_version"], ok["score:fox"], ok["score:wolf"], ok["score:elk"]) == (
            "0123456789ab", "0.250000", "0.125000", "0.625000")
        assert bad["model_version"] == "0123456789ab" and bad["error"] == "not an image"
        assert (bad["score:fox"], bad["score:wolf"], bad["score:elk"]) == ("", "", "")
    else:
        assert list(ok) == ["path", "label", "score", "branch", "status", "error", "topk",
                            "model_version", "scores"]
        assert ok["model_version"] == "0123456789ab" and ok["label"] == "elk"
        assert ok["scores"] == {"fox": 0.25, "wolf": 0.125, "elk": 0.625}
        assert (bad["model_version"], bad["scores"], bad["status"]) == ("0123456789ab", None, "error")


def test_topk_is_refused_beyond_the_classes_and_a_short_class_list_ranks_the_others_at_zero():
    """topk: 1 to the number of classes; a row limited to two of four classes (a site's list)
    still fills four columns: its two classes first, then the others at probability 0, in
    class order (the stable sort of equal probabilities)."""
    from hybridcls.errors import ParameterError
    from hybridcls.gate.fusion import FusionResult

    classes = ["fox", "wolf", "elk", "owl"]
    probs = np.array([[0.0, 0.75, 0.0, 0.25]])  # the gate's answer with 'wolf,owl' allowed
    res = FusionResult(probs=probs, branch=np.array(["zeroshot"]), gate_weight=np.array([1.0]),
                       gate_score=np.array([0.0]), sup_probs=None, clip_probs=probs)

    def rows(topk):
        return batch_rows(["a.png"], [0], [0], {}, res, classes, n_seen=0, topk=topk,
                          branch_columns=False)

    (row,) = rows(4)
    assert row.topk == [("wolf", 0.75), ("owl", 0.25), ("fox", 0.0), ("elk", 0.0)]
    # not given: the default (5), or every class when there are fewer
    assert rows(None)[0].topk == row.topk
    for topk, reason in ((5, "more than the 4 classes the classifier ranks; give 1 to 4"),
                         (0, "give a whole number from 1 to 4, the classes the classifier ranks"),
                         (2.0, "give a whole number from 1 to 4")):
        with pytest.raises(ParameterError, match=f"^topk={topk!r}: {reason}") as err:
            rows(topk)
        assert err.value.parameter == "topk"


def test_a_writer_takes_the_rows_topk_and_has_no_default_of_its_own(tmp_path):
    """open_writer cannot guess the rows' topk (5, or every class when fewer): it has no default,
    and given check_topk's default for 3 classes, its header has the 3 pairs each row fills."""
    import inspect

    from hybridcls.outputs import check_topk, open_writer

    assert inspect.signature(open_writer).parameters["topk"].default is inspect.Parameter.empty
    topk = check_topk(None, 3)
    with open_writer(tmp_path / "p.csv", topk=topk) as writer:
        writer.write(PredictionRow("a.png", label="fox", score=0.7, branch="zeroshot",
                                   topk=[("fox", 0.7), ("elk", 0.2), ("owl", 0.1)]))
    header, row = (tmp_path / "p.csv").read_text(encoding="utf-8").splitlines()
    assert [c for c in header.split(",") if c.startswith("top")] == [
        "top1", "top1_score", "top2", "top2_score", "top3", "top3_score"]
    assert row.endswith(",fox,0.700000,elk,0.200000,owl,0.100000")


def test_kaggle_refuses_two_files_of_one_name(tmp_path):
    paths = ["site1/IMG_0001.png", "site2/IMG_0001.png", "site2/IMG_0002.png"]
    with pytest.raises(InputError, match=r"image_id is the file name: 'IMG_0001.png' would stand for "
                                         r"both 'site1/IMG_0001.png' and 'site2/IMG_0001.png'"):
        check_unique_keys(paths, "kaggle")
    check_unique_keys(paths, "csv")  # full paths: three keys
    check_unique_keys(paths, "jsonl")
    check_unique_keys(["a/x.png", "a/x.png"], "kaggle")  # one input listed twice is no collision
    # The writer refuses the second row too, writing nothing of it.
    out = tmp_path / "sub.csv"
    with open_writer(out, "kaggle", topk=1) as w:
        w.write(PredictionRow(paths[0], label="red circle"))
        with pytest.raises(InputError, match=r"'IMG_0001.png' would stand for both"):
            w.write(PredictionRow(paths[1], label="blue square"))
        w.write(PredictionRow(paths[2], label="blue square"))
    assert out.read_text(encoding="utf-8").splitlines() == [
        "image_id,class", "IMG_0001.png,red circle", "IMG_0002.png,blue square"]


def _strict_loads(text):
    def refuse(token):
        raise ValueError(f"bare {token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_every_json_value_is_strict(tmp_path):
    # NaN and infinities anywhere in a record (extra columns, nested lists) become null.
    out = tmp_path / "p.jsonl"
    inf = float("inf")
    with open_writer(out, topk=1, extra_columns=["gate_score", "gate_weight", "zeroshot_topk"]) as w:
        w.write(PredictionRow("a.jpg", label="fox", score=inf, topk=[("fox", 0.5)],
                              extra={"gate_score": -inf, "gate_weight": float("nan"),
                                     "zeroshot_topk": [["fox", float("nan")]]}))
    record = _strict_loads(out.read_text(encoding="utf-8"))
    assert (record["score"], record["gate_score"], record["gate_weight"]) == (None, None, None)
    assert record["zeroshot_topk"] == [["fox", None]]
    # A CSV cell holding a list is JSON too.
    csv_out = tmp_path / "p.csv"
    with open_writer(csv_out, topk=1, extra_columns=["zeroshot_topk"]) as w:
        w.write(PredictionRow("a.jpg", label="fox", score=0.5, topk=[("fox", 0.5)],
                              extra={"zeroshot_topk": [["fox", float("nan")]]}))
    assert _strict_loads(read_predictions(csv_out)[0]["zeroshot_topk"]) == [["fox", None]]


def test_json_text_and_atomic_write_json_write_null_for_nan(tmp_path):
    obj = {"U": float("nan"), "curve": (1.0, float("-inf")), "n": 3, "name": "élan"}
    assert json_text(obj) == '{"U": null, "curve": [1.0, null], "n": 3, "name": "\\u00e9lan"}'
    f = tmp_path / "m.json"
    atomic_write_json(f, obj)
    assert _strict_loads(f.read_text(encoding="utf-8")) == {"U": None, "curve": [1.0, None], "n": 3,
                                                             "name": "élan"}
    assert "élan" in f.read_text(encoding="utf-8")  # readable when it can be
    # An undecodable file name (a lone surrogate) is not UTF-8: escaped, and it reads back unchanged.
    atomic_write_json(f, {"path": "x_\udcff.jpg"})
    assert json.loads(f.read_bytes().decode("ascii")) == {"path": "x_\udcff.jpg"}


def test_read_predictions_errors_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"path": "a.jpg"}\nnot json\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"p\.jsonl:2: not JSON"):
        read_predictions(f)
    # U+2028 and U+0085 in a file name are not line breaks of a JSON Lines file.
    with open_writer(f, topk=1) as w:
        w.write(PredictionRow("a\u2028b\x85.png", label="fox", score=0.5, topk=[("fox", 0.5)]))
    assert [r["path"] for r in read_predictions(f)] == ["a\u2028b\x85.png"]
    with pytest.raises(InputError, match=r"missing\.csv: cannot read predictions"):
        read_predictions(tmp_path / "missing.csv")


# json.dumps calls that write no JSON file: the one home of the rule, a message, and the JSON
# header / metadata strings that the safetensors format itself defines (names and numbers only).
_JSON_DUMPS_ALLOWED = {
    ("hybridcls/cache.py", "json_text"), ("hybridcls/cache.py", "stable_hash"),
    ("hybridcls/sharding.py", "_short"),
    ("hybridcls/supervised/checkpoint.py", "safetensors_bytes"),
    ("hybridcls/zeroshot/text_classifier.py", "_save_cached"),
}


def test_json_is_written_only_through_the_strict_helper():
    root = Path(__file__).resolve().parents[1]
    calls = set()
    for path in (root / "hybridcls").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("dump", "dumps")
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"):
                    calls.add((str(path.relative_to(root)), func.name))
    assert calls - _JSON_DUMPS_ALLOWED == set()


def test_manifest_and_run_json_files_are_strict(tmp_path):
    from hybridcls.cache import atomic_write_json, read_json
    from hybridcls.sharding import Manifest, manifest_path

    m = Manifest("csv", ["path"], {"unknown_threshold": float("nan")}, 1, "x", 0, 1, "y")
    m.write(tmp_path / "p.csv")
    assert _strict_loads(manifest_path(tmp_path / "p.csv").read_text(encoding="utf-8"))[
        "settings"] == {"unknown_threshold": None}
    atomic_write_json(tmp_path / "metrics.json", {"epochs": [{"val_loss": float("nan"), "acc": 0.5}]})
    assert read_json(tmp_path / "metrics.json") == {"epochs": [{"val_loss": None, "acc": 0.5}]}
    _strict_loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
