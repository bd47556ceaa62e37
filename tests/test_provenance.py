"""Run records (issue 17): every field of the record beside an output is there and true.

Each value is checked against its own source, computed here without the record's code:
versions against the imported packages' ``__version__``, fingerprints against ``hashlib``
over the weights files, counts against the rows the file holds, times against the
clock around the run, the command line against the argv the test ran.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import timm
import torch
import torchvision

import hybridcls
from hybridcls.cli import build_parser, main
from hybridcls.eval.report import evaluate_predictions
from hybridcls.outputs import read_predictions
from hybridcls.synth import TINY_CLIP_DIR
from hybridcls.zeroshot.prompts import read_prompts

RECORD_FIELDS = {"kind", "version", "command", "argv", "call", "versions", "models", "gate", "runtime",
                 "inputs", "started", "finished", "counts"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _time(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    assert t.utcoffset() is not None and t.utcoffset().total_seconds() == 0, text  # UTC, said so
    return t


def _manifest_record(out: Path) -> dict:
    return json.loads(Path(f"{out}.manifest.json").read_text(encoding="utf-8"))["record"]


@pytest.fixture(scope="module")
def inputs(tiny_hybrid, tmp_path_factory) -> dict:
    """The tiny world's test images and one broken file (an error row)."""
    d = tmp_path_factory.mktemp("prov_inputs")
    broken = d / "broken.png"
    broken.write_bytes(b"not a png")
    return {"args": [str(tiny_hybrid["world"].test_dir), str(broken)]}


@pytest.fixture(scope="module")
def hybrid_run(tiny_hybrid, inputs, tmp_path_factory) -> dict:
    """``predict --checkpoint ... -o pred.csv --log log.json --model-version`` on the tiny hybrid."""
    d = tmp_path_factory.mktemp("prov_predict")
    argv = ["predict", *inputs["args"], *tiny_hybrid["common"], "--checkpoint", str(tiny_hybrid["run"]),
            "--unknown-threshold", "0.999", "--model-version", "-o", str(d / "pred.csv"),
            "--log", str(d / "log.json"), "-q"]
    before = datetime.now(timezone.utc)
    rc = main(argv)
    after = datetime.now(timezone.utc)
    return {"rc": rc, "argv": argv, "out": d / "pred.csv", "log": d / "log.json", "before": before,
            "after": after, "rows": read_predictions(d / "pred.csv"), "record": _manifest_record(d / "pred.csv")}


def test_predict_record_fields_are_true(hybrid_run, tiny_hybrid):
    rec, rows, run = hybrid_run["record"], hybrid_run["rows"], tiny_hybrid["run"]
    assert hybrid_run["rc"] == 1  # the broken file
    assert set(rec) == RECORD_FIELDS
    assert rec["kind"] == "hybridcls-run-record" and rec["command"] == "predict"
    assert rec["argv"] == ["hybridcls", *hybrid_run["argv"]] and rec["call"] is None
    assert rec["versions"] == {
        "python": platform.python_version(), "hybridcls": hybridcls.__version__,
        "torch": str(torch.__version__), "torchvision": torchvision.__version__,
        "timm": timm.__version__, "open_clip": open_clip.__version__,
        "huggingface_hub": huggingface_hub.__version__}
    # both towers: ids as configured, fingerprints of the files loaded
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    sup, clip = rec["models"]["supervised"], rec["models"]["clip"]
    assert sup["model_id"] == config["model"]["name"] and sup["fingerprint"] == _sha256(run / "model.safetensors")
    assert clip["model_id"] == f"local-dir:{TINY_CLIP_DIR}"
    assert clip["fingerprint"] == _sha256(Path(TINY_CLIP_DIR) / "open_clip_model.safetensors")
    assert (rec["models"]["n_seen"], rec["models"]["n_classes"]) == (4, 6)
    # the gate as gate.json has it, with the prediction-time option applied
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    for key in ("method", "score", "mode", "threshold", "tpr", "cascade_msp", "cascade_distance"):
        assert rec["gate"][key] == gate[key], key
    assert rec["gate"]["unknown_threshold"] == 0.999 and gate["unknown_threshold"] is None
    assert rec["gate"]["held_out"]["mean_h"] == gate["candidates"][0]["mean_h"]
    assert rec["gate"]["held_out"]["accuracy_with_cache"] == gate["cache_branch"]["val_accuracy"]
    assert rec["gate"]["cache_branch"] == ("on" if gate["cache_branch"]["enabled"] else "off")
    # device and precision applied
    assert rec["runtime"]["device"] == "cpu" and rec["runtime"]["precision"] == "auto"
    assert rec["runtime"]["autocast"] == {"supervised": None, "clip": None}  # auto: fp32 in tests
    assert rec["runtime"]["towers"] == ["supervised", "clip"]
    # times: UTC, in order, inside the run
    started, finished = _time(rec["started"]), _time(rec["finished"])
    assert hybrid_run["before"] <= started <= finished <= hybrid_run["after"]
    # counts: the file's rows
    assert rec["counts"] == {
        "predicted": sum(r["status"] == "ok" for r in rows),
        "failed": sum(r["status"] == "error" for r in rows),
        "unknown": sum(r["label"] == "unknown" for r in rows), "resumed": 0}
    assert rec["counts"]["failed"] == 1 and rec["counts"]["unknown"] > 0
    assert rec["counts"]["predicted"] + rec["counts"]["failed"] == len(rows) == 13


def test_log_is_the_record_with_the_outcome(hybrid_run):
    log = json.loads(hybrid_run["log"].read_text(encoding="utf-8"))
    assert log == {**hybrid_run["record"], "exit_status": 1, "error": None}


def test_model_version_column_names_the_model(hybrid_run, tiny_hybrid, tmp_path, capsys):
    version = hybrid_run["record"]["models"]["model_version"]
    assert {r["model_version"] for r in hybrid_run["rows"]} == {version}  # error row included
    assert len(version) == 12 and int(version, 16) >= 0
    # another gate is another model version; the same files copied elsewhere are the same one
    run = tmp_path / "run"
    shutil.copytree(tiny_hybrid["run"], run)
    base = ["predict", str(tiny_hybrid["world"].test_dir), *tiny_hybrid["common"], "-q", "--model-version"]
    assert main([*base, "--checkpoint", str(run), "-o", str(tmp_path / "same.csv")]) == 0
    assert {r["model_version"] for r in read_predictions(tmp_path / "same.csv")} == {version}
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    gate["threshold"] += 0.5
    (run / "gate.json").write_text(json.dumps(gate), encoding="utf-8")
    assert main([*base, "--checkpoint", str(run), "-o", str(tmp_path / "other.csv")]) == 0
    other = read_predictions(tmp_path / "other.csv")
    assert {r["model_version"] for r in other} == {_manifest_record(tmp_path / "other.csv")["models"]["model_version"]}
    assert other[0]["model_version"] != version
    # zero-shot only: no supervised tower in the record, and a version of its own
    assert main([*base, "-o", str(tmp_path / "zs.csv")]) == 0
    zs = _manifest_record(tmp_path / "zs.csv")
    assert zs["models"]["supervised"] is None and zs["gate"] == {"zero_shot": True, "unknown_threshold": None}
    assert read_predictions(tmp_path / "zs.csv")[0]["model_version"] == zs["models"]["model_version"] != version


def test_resumed_file_counts_all_its_rows(tiny_hybrid, tmp_path):
    out = tmp_path / "pred.jsonl"
    argv = ["predict", str(tiny_hybrid["world"].test_dir), *tiny_hybrid["common"], "--checkpoint",
            str(tiny_hybrid["run"]), "--unknown-threshold", "0.999", "-o", str(out), "-q"]
    assert main(argv) == 0
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:5]), encoding="utf-8")  # killed after 5 rows
    assert main([*argv, "--resume"]) == 0
    rows = read_predictions(out)
    rec = _manifest_record(out)
    assert rec["argv"][-1] == "--resume" and len(rows) == 12
    assert rec["counts"] == {"predicted": 12, "failed": 0, "resumed": 5,
                             "unknown": sum(r["label"] == "unknown" for r in rows)}
    # nothing left: no model loads, the record keeps the models of the run that wrote the rows
    assert main([*argv, "--resume"]) == 0
    again = _manifest_record(out)
    assert again["counts"]["resumed"] == 12 and again["models"] == rec["models"]
    assert _time(again["started"]) > _time(rec["finished"])


def test_stdout_run_is_recorded_by_log(tiny_hybrid, tmp_path, capsys):
    log = tmp_path / "deep" / "log.json"
    argv = ["predict", str(tiny_hybrid["world"].test_dir), *tiny_hybrid["common"], "-q", "--format", "jsonl",
            "--log", str(log)]
    capsys.readouterr()
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rec = json.loads(log.read_text(encoding="utf-8"))
    assert rec["counts"] == {"predicted": len(rows), "failed": 0, "unknown": 0} and len(rows) == 12
    assert rec["models"]["supervised"] is None and rec["exit_status"] == 0
    assert rec["argv"] == ["hybridcls", *argv]


def test_failed_run_logs_its_error(tiny_hybrid, tmp_path, capsys):
    log = tmp_path / "log.json"
    rc = main(["predict", str(tiny_hybrid["world"].test_dir), *tiny_hybrid["common"], "--checkpoint",
               str(tmp_path / "missing"), "-o", str(tmp_path / "p.csv"), "--log", str(log)])
    rec = json.loads(log.read_text(encoding="utf-8"))
    assert rc == 2 and rec["exit_status"] == 2 and "missing" in rec["error"]
    assert rec["error"] in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    assert rec["models"] is None and rec["counts"] == {}


def test_log_that_would_overwrite_the_output_is_refused(tiny_hybrid, tmp_path, capsys):
    out = tmp_path / "p.csv"
    rc = main(["predict", str(tiny_hybrid["world"].test_dir), *tiny_hybrid["common"], "-o", str(out),
               "--log", str(out)])
    assert rc == 2 and f"--log {out} is the --output file" in capsys.readouterr().err
    assert not out.exists()


def test_every_command_takes_log():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    leaves = []
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        leaves += [(f"{name} {n}", q) for a in nested for n, q in a.choices.items()] or [(name, p)]
    missing = [name for name, p in leaves if "log" not in {a.dest for a in p._actions}]
    assert len(leaves) >= 12 and missing == []


def test_evaluate_copies_the_record_of_the_predictions(hybrid_run, tiny_hybrid, tmp_path):
    labels = tiny_hybrid["world"].labels_csv
    labels_with_broken = tmp_path / "labels.csv"
    labels_with_broken.write_text(labels.read_text(encoding="utf-8") + "broken.png,red dotted star\n",
                                  encoding="utf-8")
    argv = ["evaluate", str(hybrid_run["out"]), "--labels", str(labels_with_broken), "--seen-classes",
            str(tiny_hybrid["run"]), "--prompts", str(tiny_hybrid["world"].prompts_file), "-o", str(tmp_path / "ev"), "--log", str(tmp_path / "log.json")]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text(encoding="utf-8"))
    rec = metrics["provenance"]
    assert set(rec) == RECORD_FIELDS and rec["argv"] == ["hybridcls", *argv] and rec["command"] == "evaluate"
    made = rec["inputs"]["predictions"]
    assert made["record"] == hybrid_run["record"]  # copied as the manifest has it
    assert made["sha256"] == _sha256(hybrid_run["out"]) and made["path"] == str(hybrid_run["out"])
    assert rec["inputs"]["labels"]["sha256"] == _sha256(labels_with_broken)
    assert rec["counts"] == {"images": 13, "errors": 1, "missing": 0, "errors_unlabelled": 0} == {
        "images": metrics["scores"]["n_images"], "errors": metrics["n_errors"],
        "missing": metrics["n_missing_predictions"], "errors_unlabelled": metrics["n_errors_unlabelled"]}
    log = json.loads((tmp_path / "log.json").read_text(encoding="utf-8"))
    assert log == {**rec, "exit_status": 0, "error": None}


def test_evaluate_from_python_records_the_call(hybrid_run, tiny_hybrid, tmp_path):
    pred = tmp_path / "copy.csv"  # no manifest beside it
    shutil.copyfile(hybrid_run["out"], pred)
    labels = tmp_path / "labels.csv"
    labels.write_text((tiny_hybrid["world"].labels_csv).read_text(encoding="utf-8")
                      + "broken.png,red dotted star\n", encoding="utf-8")
    seen = ["green checkered heart", "orange striped heart", "purple striped triangle", "red dotted star"]
    classes = read_prompts(tiny_hybrid["world"].prompts_file).names
    ev = evaluate_predictions(pred, labels, iter(seen), classes=classes)
    rec = ev.provenance
    assert rec["argv"] is None and rec["command"] == "hybridcls.eval.report.evaluate_predictions"
    assert rec["call"] == {"function": "hybridcls.eval.report.evaluate_predictions", "parameters": {
        "predictions": str(pred), "labels": str(labels), "seen_classes": seen, "classes": list(classes),
        "allow_missing": False}}
    assert rec["inputs"]["predictions"]["record"] is None and ev.predictions_record is None
    assert ev.scores.n_images == 13  # the iterator of seen classes was read once, for the figures too
    assert ev.scores.n_seen_images == 9  # 2 test images of each of 4 seen classes, and broken.png


def test_report_shows_and_keeps_the_record(hybrid_run, tiny_hybrid, tmp_path):
    pytest.importorskip("matplotlib")
    labels = tmp_path / "labels.csv"
    labels.write_text((tiny_hybrid["world"].labels_csv).read_text(encoding="utf-8")
                      + "broken.png,red dotted star\n", encoding="utf-8")
    assert main(["report", str(hybrid_run["out"]), "--labels", str(labels), "--seen-classes",
                 str(tiny_hybrid["run"]), "--prompts", str(tiny_hybrid["world"].prompts_file),
                 "-o", str(tmp_path / "rep")]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["provenance"]["command"] == "report"
    assert metrics["provenance"]["inputs"]["predictions"]["record"] == hybrid_run["record"]
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    rec = hybrid_run["record"]
    assert "Predictions made by" in page and rec["models"]["model_version"] in page
    assert rec["models"]["supervised"]["fingerprint"][:16] in page and rec["started"] in page


def test_merge_keeps_the_parts_records(tiny_hybrid, tmp_path):
    base = ["predict", str(tiny_hybrid["world"].test_dir), *tiny_hybrid["common"], "-q"]
    parts = [tmp_path / f"part{i}.csv" for i in range(2)]
    for i, p in enumerate(parts):
        assert main([*base, "--shard", f"{i}/2", "-o", str(p)]) == 0
    argv = ["merge", *map(str, parts), "-o", str(tmp_path / "all.csv")]
    assert main(argv) == 0
    rec = _manifest_record(tmp_path / "all.csv")
    assert rec["argv"] == ["hybridcls", *argv] and rec["counts"] == {"predicted": 12, "failed": 0, "unknown": 0}
    assert rec["parts"] == [_manifest_record(p) for p in parts]
    assert [p["counts"]["predicted"] for p in rec["parts"]] == [6, 6]


def test_calibrate_log_has_the_new_gate(tiny_hybrid, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_hybrid["run"], run)
    log = tmp_path / "log.json"
    assert main(["calibrate", str(run), *tiny_hybrid["common"], "--method", "tpr", "--tpr", "0.9", "-q",
                 "--log", str(log)]) == 0
    rec = json.loads(log.read_text(encoding="utf-8"))
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    assert rec["gate"]["method"] == gate["method"] == "tpr" and rec["gate"]["tpr"] == 0.9
    assert rec["gate"]["threshold"] == gate["threshold"]
    assert rec["models"]["supervised"]["fingerprint"] == _sha256(run / "model.safetensors")
    assert rec["exit_status"] == 0 and _time(rec["started"]) <= _time(rec["finished"])


def test_audit_log_names_its_clip_and_counts_the_files(tiny_hybrid, tmp_path):
    train = Path(tiny_hybrid["world"].train_dir)
    broken = tmp_path / "train"
    shutil.copytree(train, broken)
    next(broken.iterdir()).joinpath("broken.png").write_bytes(b"not a png")
    common = tiny_hybrid["common"][tiny_hybrid["common"].index("--clip-model"):]  # no prompts
    log = tmp_path / "log.json"
    rc = main(["audit", str(broken), "-o", str(tmp_path / "audit"), *common, "-q", "--log", str(log)])
    rec = json.loads(log.read_text(encoding="utf-8"))
    n_files = sum(1 for p in broken.rglob("*") if p.is_file())
    assert rc == 1 and rec["exit_status"] == 1  # the broken file
    assert rec["counts"] == {"images": n_files, "unreadable": 1}
    assert rec["models"]["clip"]["fingerprint"] == _sha256(Path(TINY_CLIP_DIR) / "open_clip_model.safetensors")


def test_explain_log_counts_the_explained_inputs(tiny_hybrid, inputs, tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    images = sorted(Path(tiny_hybrid["world"].test_dir).glob("*.png"))[:2]
    log = tmp_path / "log.json"
    rc = main(["explain", *map(str, images), inputs["args"][1], "--checkpoint", str(tiny_hybrid["run"]),
               *tiny_hybrid["common"], "-q", "-o", str(tmp_path / "ex"), "--log", str(log)])
    rec = json.loads(log.read_text(encoding="utf-8"))
    assert rc == 1 and rec["counts"] == {"explained": 2, "failed": 1}
    assert rec["models"]["supervised"]["fingerprint"] == _sha256(tiny_hybrid["run"] / "model.safetensors")
    assert rec["runtime"]["device"] == "cpu" and rec["gate"]["method"] == "leave-classes-out"
