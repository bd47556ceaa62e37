"""`hybridcls bench memory` plumbing at CI size: the runs happen and the report adds up.

The memory figures themselves are recorded in docs/benchmarks.md, never asserted.
"""

from __future__ import annotations

import json

from hybridcls.cli import main


def test_bench_memory_reports_every_run(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "memory", "--out", str(out), "--sizes", "3", "7", "--image-size", "24",
                 "--batch-size", "4", "--no-warmup"]) == 0
    report = json.loads((out / "memory.json").read_text(encoding="utf-8"))
    assert [r["images"] for r in report["runs"]] == [3, 7]
    assert [r["rows"] for r in report["runs"]] == [3, 7]  # every image predicted once
    assert all(r["exit_status"] == 0 and r["peak_rss_mib"] > 0 for r in report["runs"])
    peaks = [r["peak_rss_mib"] for r in report["runs"]]
    assert abs(report["ratio"] - peaks[1] / peaks[0]) < 1e-3
    assert {"command", "machine", "date", "model"} <= set(report["info"])
    assert len(list((out / "images").glob("*.jpg"))) == 7
    assert "peak ratio, 7 vs 3 images" in capsys.readouterr().out


def test_bench_memory_usage_errors(tmp_path, capsys):
    assert main(["bench", "memory", "--out", str(tmp_path), "--sizes", "5"]) == 2
    assert "--sizes needs two or more" in capsys.readouterr().err
    assert main(["bench", "memory", "--out", str(tmp_path), "--checkpoint", "run"]) == 2
    assert "--checkpoint needs --prompts" in capsys.readouterr().err
    # the runs are predict --checkpoint RUN_DIR --prompts FILE: what else it is, said before any run
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "hybrid.json").write_text("{}", encoding="utf-8")
    a_file = tmp_path / "prompts.txt"
    a_file.write_text("fox\nelk\n", encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, what in ((tmp_path / "nowhere", "no such folder"), (a_file, "not a folder"),
                         (saved, "a save_pretrained folder"),
                         (empty, "no config.json: not a training run")):
        assert main(["bench", "memory", "--out", str(tmp_path / "out"), "--checkpoint", str(folder),
                     "--classes", "fox,elk"]) == 2
        assert capsys.readouterr().err == (
            f"hybridcls bench: error: --checkpoint {folder}: {what}; bench memory measures a "
            "calibrated run directory, with --prompts\n")
    # a run without a gate: said here, not by a child predict's traceback
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}", encoding="utf-8")
    assert main(["bench", "memory", "--out", str(tmp_path / "out"), "--checkpoint", str(run),
                 "--classes", "fox,elk"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybridcls bench: error: {run}: the run has no gate.json; calibrate it first")
    # one calibrated before its divergence was recorded: refused as calibrate refuses it
    from hybridcls.train.state import STATE_JSON_FILE, Divergence

    (run / "gate.json").write_text("{}", encoding="utf-8")
    diverged = Divergence(epoch=2, update=6, train_loss=None, val_loss=None, reason="train loss nan",
                          best_epoch=1, lr=3000.0, clip_grad=None)
    (run / STATE_JSON_FILE).write_text(json.dumps({"diverged": diverged.to_dict()}), encoding="utf-8")
    assert main(["bench", "memory", "--out", str(tmp_path / "out"), "--checkpoint", str(run),
                 "--classes", "fox,elk"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybridcls bench: error: {run}: its training diverged in epoch 2 "
                          "(train loss nan), so its weights are those of epoch 1")
    assert "`hybridcls train DATA_DIR --output NEW_DIR --lr 300`" in err
    assert not (tmp_path / "out").exists()
