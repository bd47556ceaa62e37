"""`evaluate`: labels join predictions on paths, never collapsing two images; strict metrics.json."""

from __future__ import annotations

import json
import math

import pytest

from hybridcls.cli import main
from hybridcls.errors import InputError
from hybridcls.eval.labels import join_labels, read_labels
from hybridcls.eval.report import MissingPredictionsError, evaluate_predictions
from hybridcls.outputs import PredictionRow, open_writer

# Two camera folders both hold IMG_0001.png (the layout of the user's report).
CASE = {"site1/IMG_0001.png": "red circle", "site2/IMG_0001.png": "blue square",
        "site2/IMG_0002.png": "blue square"}


def _predictions(path, truth=CASE, fmt=None, wrong=()):
    """A predictions file with every prediction right, except for the paths in ``wrong``."""
    with open_writer(path, fmt, topk=1) as w:
        for p, label in truth.items():
            pred = "green triangle" if p in wrong else label
            w.write(PredictionRow(p, label=pred, score=0.9, branch="zeroshot", topk=[(pred, 0.9)]))
    return path


def _labels(path, rows):
    path.write_text("image_id,label\n" + "".join(f"{i},{lab}\n" for i, lab in rows), encoding="utf-8")
    return path


def _strict_json(path):
    def refuse(token):
        raise ValueError(f"bare {token}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_labels_keyed_by_relative_path_join_each_image(tmp_path):
    pred = _predictions(tmp_path / "pred.csv")
    labels = _labels(tmp_path / "labels.csv", CASE.items())
    ev = evaluate_predictions(pred, labels, ["red circle", "blue square", "green triangle"])
    # every prediction is right, so the accuracy is exactly 1, over 3 images, not 2 or 4
    assert ev.scores.accuracy == 1.0 and ev.scores.n_images == 3
    assert {r["class"]: r["n_images"] for r in ev.per_class} == {"blue square": 2, "red circle": 1}
    # one wrong prediction, in site1 only: 2 of 3 right, and it is red circle that drops
    ev = evaluate_predictions(_predictions(tmp_path / "p2.csv", wrong={"site1/IMG_0001.png"}), labels,
                              ["red circle", "blue square"])
    assert ev.scores.accuracy == pytest.approx(2 / 3)
    assert {r["class"]: r["accuracy"] for r in ev.per_class} == {"blue square": 1.0, "red circle": 0.0}


def test_file_names_join_only_when_unique(tmp_path):
    pred = _predictions(tmp_path / "pred.csv")
    by_name = _labels(tmp_path / "labels.csv", [("IMG_0001.png", "red circle"),
                                                ("IMG_0002.png", "blue square")])
    with pytest.raises(InputError, match=r"labels\.csv:2: 'IMG_0001\.png' matches 2 predicted images, "
                                         r"'site1/IMG_0001\.png' and 'site2/IMG_0001\.png'; key the labels "
                                         r"file by a longer path \(e\.g\. 'site1/IMG_0001\.png'\)"):
        evaluate_predictions(pred, by_name, ["red circle", "blue square"])
    # a unique name joins beside paths: IMG_0002.png names one image only
    mixed = _labels(tmp_path / "mixed.csv", [("site1/IMG_0001.png", "red circle"),
                                             ("site2/IMG_0001.png", "blue square"),
                                             ("IMG_0002.png", "blue square")])
    assert join_labels(list(CASE), mixed).labels == list(CASE.values())


def test_ids_match_whole_path_components_and_absolute_paths(tmp_path):
    paths = [str(tmp_path / "photos" / "xsite1" / "a.png"), "photos/site1/a.png"]
    labels = _labels(tmp_path / "l.csv", [(paths[0], "fox"), ("site1/a.png", "wolf")])
    # 'site1/a.png' is not the end of '.../xsite1/a.png': each id names exactly one image
    assert join_labels(paths, labels).labels == ["fox", "wolf"]
    partial = _labels(tmp_path / "p.csv", [("ite1/a.png", "wolf"), (paths[0], "fox")])
    with pytest.raises(InputError, match=r"1 predicted image\(s\) have no label, e\.g\. 'photos/site1/a\.png'"):
        join_labels(paths, partial)


def test_an_image_named_by_two_ids_is_an_error(tmp_path):
    labels = _labels(tmp_path / "l.csv", [("IMG_0002.png", "blue square"),
                                          ("site2/IMG_0002.png", "red circle")])
    with pytest.raises(InputError, match=r"l\.csv: line 2 \('IMG_0002\.png'\) and line 3 "
                                         r"\('site2/IMG_0002\.png'\) both name the predicted image "
                                         r"'site2/IMG_0002\.png'; keep one"):
        join_labels(["site2/IMG_0002.png"], labels)


def test_kaggle_submission_is_scored_by_file_name(tmp_path):
    truth = {"a/cat1.png": "red circle", "b/dog2.png": "blue square"}
    sub = _predictions(tmp_path / "sub.csv", truth, fmt="kaggle", wrong={"b/dog2.png"})
    labels = _labels(tmp_path / "l.csv", [("cat1.png", "red circle"), ("dog2.png", "blue square")])
    ev = evaluate_predictions(sub, labels, ["red circle", "blue square", "green triangle"])
    assert ev.scores.accuracy == 0.5 and ev.y_pred == ["red circle", "green triangle"]


def test_labelled_images_without_prediction_are_refused_or_counted(tmp_path, capsys):
    part = dict(list(CASE.items())[:2])  # site2/IMG_0002.png was not predicted
    pred = _predictions(tmp_path / "pred.jsonl", part)
    labels = _labels(tmp_path / "labels.csv", CASE.items())
    seen = ["red circle", "blue square"]
    with pytest.raises(MissingPredictionsError, match=r"pred\.jsonl: 1 of 3 labelled images have no "
                                                      r"prediction, e\.g\. 'site2/IMG_0002\.png'; "
                                                      r"allow_missing=True scores"):
        evaluate_predictions(pred, labels, seen)
    ev = evaluate_predictions(pred, labels, seen, allow_missing=True)
    assert (ev.n_missing, ev.scores.n_images, ev.scores.accuracy) == (1, 2, 1.0)
    assert "1 labelled images without a prediction (not scored)" in ev.summary()
    # the command line: refused (exit 2, naming its flag), then counted in metrics.json
    seen_file = tmp_path / "seen.txt"
    seen_file.write_text("red circle\nblue square\n", encoding="utf-8")
    argv = ["evaluate", str(pred), "--labels", str(labels), "--seen-classes", str(seen_file),
            "-o", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1 of 3 labelled images have no prediction" in err and "--allow-missing scores" in err
    assert "allow_missing=True" not in err and not (tmp_path / "m").exists()
    assert main(argv + ["--allow-missing"]) == 0
    metrics = _strict_json(tmp_path / "m" / "metrics.json")
    assert metrics["n_missing_predictions"] == 1 and metrics["scores"]["n_images"] == 2


def test_error_rows_without_a_label_are_counted_not_scored(tmp_path, capsys):
    """An unreadable input is often absent from the labels file: its error row is no prediction,
    so it is left out of every figure and counted; a labelled error row still counts as wrong,
    and an ok row without a label is still refused."""
    pred = tmp_path / "pred.csv"
    with open_writer(pred, None, topk=1) as w:
        for p, label in CASE.items():
            w.write(PredictionRow(p, label=label, score=0.9, branch="zeroshot", topk=[(label, 0.9)]))
        w.write(PredictionRow.failed("bad/broken_in.png", "empty file (0 bytes)"))
        w.write(PredictionRow.failed("site2/IMG_0003.png", "empty file (0 bytes)"))
    labels = _labels(tmp_path / "labels.csv", [*CASE.items(), ("site2/IMG_0003.png", "blue square")])
    seen = ["red circle", "blue square"]
    ev = evaluate_predictions(pred, labels, seen)
    # 3 right + 1 labelled error row (wrong) scored: 3 of 4; the unlabelled error row left out
    assert (ev.scores.n_images, ev.scores.accuracy) == (4, 0.75)
    assert (ev.n_errors, ev.n_errors_unlabelled) == (1, 1)
    assert ev.summary().splitlines()[0] == (
        "accuracy 75.00%  (4 images, 1 errors, 1 error rows without a label (not scored))")
    assert ev.provenance["counts"] == {"images": 4, "errors": 1, "errors_unlabelled": 1, "missing": 0}
    # the command line scores it too, and metrics.json counts it
    seen_file = tmp_path / "seen.txt"
    seen_file.write_text("red circle\nblue square\n", encoding="utf-8")
    assert main(["evaluate", str(pred), "--labels", str(labels), "--seen-classes", str(seen_file),
                 "-o", str(tmp_path / "m")]) == 0
    assert "1 error rows without a label (not scored)" in capsys.readouterr().out
    metrics = _strict_json(tmp_path / "m" / "metrics.json")
    assert (metrics["n_errors"], metrics["n_errors_unlabelled"], metrics["scores"]["n_images"]) == (1, 1, 4)
    # a prediction (status ok) without a label is refused as before
    unlabelled = _labels(tmp_path / "fewer.csv", list(CASE.items())[1:])
    with pytest.raises(InputError, match=r"^.*fewer\.csv: 1 predicted image\(s\) have no label, "
                                         r"e\.g\. 'site1/IMG_0001\.png'$"):
        evaluate_predictions(pred, unlabelled, seen)
    # only unlabelled error rows: nothing to score
    only = tmp_path / "only.csv"
    with open_writer(only, None, topk=1) as w:
        w.write(PredictionRow.failed("bad/broken_in.png", "empty file (0 bytes)"))
    with pytest.raises(MissingPredictionsError, match=r"only\.csv: 4 of 4 labelled images have no "
                                                      r"prediction"):  # the error row is not one of them
        evaluate_predictions(only, labels, seen)
    with pytest.raises(InputError, match=r"only\.csv: no row to score: its 1 row\(s\) are error rows "
                                         r"without a label in .*labels\.csv$"):
        evaluate_predictions(only, labels, seen, allow_missing=True)


def test_metrics_json_is_strict_with_null_for_undefined_figures(tmp_path):
    pred = _predictions(tmp_path / "pred.csv")
    labels = _labels(tmp_path / "labels.csv", CASE.items())
    ev = evaluate_predictions(pred, labels, ["red circle", "blue square"])  # no unseen image
    assert math.isnan(ev.scores.unseen) and math.isnan(ev.scores.harmonic)
    ev.save(tmp_path / "m")
    metrics = _strict_json(tmp_path / "m" / "metrics.json")  # a bare NaN would raise here
    assert metrics["scores"]["unseen"] is None and metrics["scores"]["harmonic"] is None
    assert metrics["scores"]["accuracy"] == 1.0


def test_summary_says_n_a_for_a_group_without_images(tmp_path):
    # every labelled class is seen: U and H have no image behind them and read "n/a", not "nan"
    ev = evaluate_predictions(_predictions(tmp_path / "pred.csv"), _labels(tmp_path / "l.csv", CASE.items()),
                              ["red circle", "blue square"])
    assert math.isnan(ev.scores.unseen)
    assert "seen S 100.00   unseen U n/a   harmonic H n/a" in ev.summary()


def test_ids_written_on_windows_join_with_backslashes_as_separators(tmp_path):
    windows = _labels(tmp_path / "l.csv", [(p.replace("/", "\\"), lab) for p, lab in CASE.items()])
    assert "site1\\IMG_0001.png" in windows.read_text(encoding="utf-8")
    assert join_labels(list(CASE), windows).labels == list(CASE.values())
    # one image however its id is written: both spellings in one file are one id listed twice
    both = _labels(tmp_path / "b.csv", [("site1\\IMG_0001.png", "red circle"),
                                        ("site1/IMG_0001.png", "red circle")])
    with pytest.raises(InputError, match=r"b\.csv:3: image 'site1/IMG_0001\.png' is listed twice "
                                         r"\(first on line 2\)"):
        join_labels(list(CASE), both)


def test_when_nothing_joins_both_sides_are_listed(tmp_path):
    labels = _labels(tmp_path / "l.csv", [("cam1/IMG_0001.png", "red circle"),
                                          ("cam2/IMG_0001.png", "blue square"),
                                          ("cam2/IMG_0002.png", "blue square")])
    with pytest.raises(InputError) as info:
        join_labels(list(CASE), labels)
    assert str(info.value) == (
        f"{labels}: 3 predicted image(s) have no label, e.g. 'site1/IMG_0001.png', "
        "'site2/IMG_0001.png', 'site2/IMG_0002.png'; 3 id(s) of the labels file match no "
        "predicted image, e.g. 'cam1/IMG_0001.png' (line 2), 'cam2/IMG_0001.png' (line 3), "
        "'cam2/IMG_0002.png' (line 4)")


def test_absolute_ids_against_relative_predicted_paths_hint_at_the_current_folder(
        tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    (tmp_path / "elsewhere").mkdir()
    photos.mkdir()
    labels = _labels(tmp_path / "l.csv", [(str(photos / p), lab) for p, lab in CASE.items()])
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(InputError) as info:
        join_labels(list(CASE), labels)
    message = str(info.value)
    assert "; 3 id(s) of the labels file match no predicted image, e.g. " in message
    assert message.endswith(
        f". Relative predicted paths are taken from the current folder ({tmp_path / 'elsewhere'}), "
        f"and an absolute id such as {str(photos / 'site1/IMG_0001.png')!r} names one absolute "
        "path: run from the folder the predictions were made in, or key the labels file by "
        "relative paths (e.g. 'site1/IMG_0001.png')")
    # both remedies work: the folder the predicted paths are relative to, or relative ids
    monkeypatch.chdir(photos)
    assert join_labels(list(CASE), labels).labels == list(CASE.values())
    monkeypatch.chdir(tmp_path / "elsewhere")
    relative = _labels(tmp_path / "r.csv", CASE.items())
    assert join_labels(list(CASE), relative).labels == list(CASE.values())


def test_absolute_ids_of_another_root_hint_at_relative_ids(tmp_path):
    predicted = [str(tmp_path / "new" / p) for p in CASE]
    labels = _labels(tmp_path / "l.csv", [(str(tmp_path / "old" / p), lab) for p, lab in CASE.items()])
    with pytest.raises(InputError) as info:
        join_labels(predicted, labels)
    assert str(info.value).endswith(
        f". An absolute id such as {str(tmp_path / 'old/site1/IMG_0001.png')!r} names that "
        "absolute path only: key the labels file by relative paths (e.g. 'site1/IMG_0001.png') "
        "to match the end of a predicted path")


def test_ids_climbing_out_with_dot_dot_are_taken_from_the_labels_files_folder(tmp_path):
    # labels/labels.csv keys ../case/site1/IMG_0001.png: the image beside the labels folder
    (tmp_path / "labels").mkdir()
    labels = _labels(tmp_path / "labels" / "labels.csv",
                     [("../case/" + p, lab) for p, lab in CASE.items()])
    here = [str(tmp_path / "case" / p) for p in CASE]
    assert join_labels(here, labels).labels == list(CASE.values())
    assert read_labels(labels) == {str(tmp_path / "case" / p): lab for p, lab in CASE.items()}
    # the same relative paths under another folder are other images
    there = [str(tmp_path / "copy" / "case" / p) for p in CASE]
    with pytest.raises(InputError, match=r"3 id\(s\) of the labels file match no predicted image, "
                                         rf"e\.g\. '{tmp_path}/case/site1/IMG_0001\.png' \(line 2\)"):
        join_labels(there, labels)


def _rows_file(path, header, rows):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


HEADER = "path,label,score,branch,status,error,gate_score"


@pytest.mark.parametrize(("cell", "column", "row", "problem"), [
    ("gate_score", "gate_score", "site2/IMG_0001.png,blue square,0.9,zeroshot,ok,,inf",
     "'inf', not a finite number"),
    ("gate_score", "gate_score", "site2/IMG_0001.png,blue square,0.9,zeroshot,ok,,high",
     "'high', not a number"),
    ("score", "score", "site2/IMG_0001.png,blue square,1.5,zeroshot,ok,,0.3",
     "'1.5', outside [0, 1] (the probability of the predicted label)"),
    ("score", "score", "site2/IMG_0001.png,blue square,nan,zeroshot,ok,,0.3",
     "'nan', not a finite number"),
    ("status", "status", "site2/IMG_0001.png,blue square,0.9,zeroshot,OK,,0.3",
     None),
])
def test_evaluate_names_the_file_line_and_column_of_a_bad_value(tmp_path, cell, column, row,
                                                                 problem):
    # line 3 is bad, lines 2 and 4 are as predict writes them
    pred = _rows_file(tmp_path / "pred.csv", HEADER, [
        "site1/IMG_0001.png,red circle,0.8,zeroshot,ok,,0.1", row,
        "site2/IMG_0002.png,blue square,0.7,zeroshot,ok,,0.2"])
    labels = _labels(tmp_path / "l.csv", CASE.items())
    with pytest.raises(InputError) as info:
        evaluate_predictions(pred, labels, ["red circle"])
    if column == "status":
        assert str(info.value) == f"{pred}:3: column status is 'OK'; expected ok or error"
    else:
        assert str(info.value) == f"{pred}:3: column {column} is {problem}"


def test_evaluate_names_the_jsonl_line_and_the_labels_line(tmp_path):
    pred = _predictions(tmp_path / "pred.jsonl")
    lines = pred.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace('"score": 0.9', '"score": "x"')
    assert '"score": "x"' in lines[1]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    labels = _labels(tmp_path / "l.csv", CASE.items())
    with pytest.raises(InputError) as info:
        evaluate_predictions(tmp_path / "bad.jsonl", labels, ["red circle"])
    assert str(info.value) == f"{tmp_path / 'bad.jsonl'}:2: column score is 'x', not a number"
    # a label of a class nobody knows: the labels file's line
    odd = _labels(tmp_path / "odd.csv", [("site1/IMG_0001.png", "red circle"),
                                          ("site2/IMG_0001.png", "purple hexagon"),
                                          ("site2/IMG_0002.png", "blue square")])
    with pytest.raises(InputError) as info:
        evaluate_predictions(pred, odd, ["red circle", "blue square"],
                             classes=["red circle", "blue square"])
    assert str(info.value) == (f"{odd}:3: label 'purple hexagon' is of a class that is neither "
                               "seen nor predictable; 1 such class(es): 'purple hexagon'")
