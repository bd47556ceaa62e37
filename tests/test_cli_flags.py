"""Every flag of ``hybridcls predict`` acts or is refused, in both modes (issue 13).

The test walks the predict parser's own list of flags: a flag added without a
case here fails it. Each case runs ``predict`` once with the flag and checks,
against the same command without it, that the output changed (rows, the file,
the manifest's record of what the engine applied, the text on stderr) or that
the command was refused with exit status 2 and a message naming the flag.
Zero-shot only (no ``--checkpoint``) and the hybrid both run every case.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from hybridcls.cli import build_parser, main
from hybridcls.outputs import read_predictions
from hybridcls.synth import write_hierarchy_prompts
from tests.tinyclip_factory import make_tiny_clip

MODES = ("zeroshot", "hybrid")


@pytest.fixture(scope="module")
def setup(tiny_hybrid, tmp_path_factory):
    """The tiny calibrated hybrid (conftest), prompts and templates to vary, a second tiny CLIP."""
    root = tmp_path_factory.mktemp("flags")
    world = tiny_hybrid["world"]
    long_prompts = root / "long.txt"
    long_prompts.write_text(world.prompts_file.read_text(encoding="utf-8").rstrip("\n")
                            + "\nan extremely long class name that goes on and on well past twelve tokens\n",
                            encoding="utf-8")
    other_templates = root / "other_templates.txt"
    other_templates.write_text("a drawing of a {}.\n", encoding="utf-8")
    extra_prompts = root / "extra.txt"
    extra_prompts.write_text(world.prompts_file.read_text(encoding="utf-8") + "black plain circle\n",
                             encoding="utf-8")
    sites = root / "sites.csv"  # the test folder limited to one seen and one unseen class
    sites.write_text(f"prefix,classes\n{world.test_dir},{world.seen_classes[0]};{world.unseen_classes[0]}\n",
                     encoding="utf-8")
    return {**tiny_hybrid, "sites": sites, "long_prompts": long_prompts,
            "other_templates": other_templates, "extra_prompts": extra_prompts,
            "other_clip": make_tiny_clip(root / "other_clip"),
            "tree_prompts": write_hierarchy_prompts(world, root / "tree.txt")}


def _predict(setup, mode: str, extra: list[str], out: Path, capsys, *, quiet: bool = True) -> dict:
    common = list(setup["common"])
    if "--classes" in extra:  # instead of the prompts file, not beside it
        at = common.index("--prompts")
        del common[at:at + 2]
    argv = ["predict", str(setup["world"].test_dir), *common]
    if mode == "hybrid":
        argv += ["--checkpoint", str(setup["run"])]
    argv += ["-o", str(out), *(["-q"] if quiet else []), *extra]
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    result = {"rc": rc, "stderr": captured.err, "stdout": captured.out, "rows": None, "record": None}
    if out.is_file():
        result["text"] = out.read_text(encoding="utf-8")
        if out.suffix in (".csv", ".jsonl") and "kaggle" not in extra:
            result["rows"] = read_predictions(out)
        manifest = out.with_name(out.name + ".manifest.json")
        if manifest.is_file():
            result["record"] = json.loads(manifest.read_text(encoding="utf-8"))["record"]
    return result


def _refused(res: dict, flag: str) -> bool:
    return res["rc"] == 2 and flag in res["stderr"] and res["rows"] is None


# What each flag must do, per mode: a function (setup, mode, out_dir, capsys, baseline) -> str
# describing the evidence, asserting on the way. ``baseline`` is the run without the flag.
def _rows_change(extra):
    def check(setup, mode, out, capsys, base):
        res = _predict(setup, mode, extra(setup) if callable(extra) else extra, out / "v.jsonl", capsys)
        assert res["rc"] == 0, res["stderr"]
        assert res["rows"] != base["rows"]
        return "rows"
    return check


def _record_changes(key, extra, value):
    def check(setup, mode, out, capsys, base):
        res = _predict(setup, mode, extra, out / "v.jsonl", capsys)
        assert res["rc"] == 0, res["stderr"]
        assert res["record"]["runtime"][key] == value != base["record"]["runtime"][key]
        return "record"
    return check


def _refused_with(extra, flag):
    def check(setup, mode, out, capsys, base):
        res = _predict(setup, mode, extra, out / "v.jsonl", capsys)
        assert _refused(res, flag), res
        assert not (out / "v.jsonl").exists()
        return "refused"
    return check


def _truncate(setup, mode, out, capsys, base):
    # long class text: refused without the flag (naming it), predicted with it
    long = ["--prompts", str(setup["long_prompts"])]
    res = _predict(setup, mode, long, out / "a.jsonl", capsys)
    assert _refused(res, "--truncate-prompts"), res
    res = _predict(setup, mode, [*long, "--truncate-prompts"], out / "b.jsonl", capsys)
    # the library's warning, as one line in the command's words
    # the long class with each of the world's 5 templates; 7 classes in all
    assert res["rc"] == 0 and "hybridcls predict: warning: 5 of 35 class texts" in res["stderr"]
    assert "are cut to the 12-token context" in res["stderr"] and "(--truncate-prompts)" in res["stderr"]
    assert "an extremely long class name that goes on and on well past twelve tokens" in {r["label"] for r in res["rows"]} | {
        t["label"] for r in res["rows"] for t in r["topk"]}
    return "enables"


def _cache_dir(setup, mode, out, capsys, base):
    res = _predict(setup, mode, ["--cache-dir", str(out / "cache2")], out / "v.jsonl", capsys)
    assert res["rc"] == 0 and list((out / "cache2" / "text").glob("*.safetensors"))
    assert res["rows"] == base["rows"]
    return "file"


def _quiet(setup, mode, out, capsys, base):
    res = _predict(setup, mode, [], out / "v.jsonl", capsys, quiet=False)
    assert res["rc"] == 0 and "img/s" in res["stderr"] and "img/s" not in base["stderr"]
    return "stderr"


def _compile(setup, mode, out, capsys, base):
    compiled = []

    def spy(fn, **kw):  # a real compile costs minutes on a CPU: record the call, run eagerly
        compiled.append(getattr(fn, "__name__", str(fn)))
        return fn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", spy)
        res = _record_changes("compile", ["--compile"], True)(setup, mode, out, capsys, base)
    assert compiled == (["forward_with_features", "encode_images"] if mode == "hybrid" else ["encode_images"])
    return res


def _refused_by_the_gate(extra, says, then):
    """Acts on a zero-shot classifier; on the hybrid, whose gate was calibrated with the first
    CLIP and the world's templates, another one is refused, naming the flag and what to do."""
    def check(setup, mode, out, capsys, base):
        other = extra(setup)
        if mode == "zeroshot":
            return _rows_change(other)(setup, mode, out, capsys, base)
        res = _predict(setup, mode, other, out / "v.jsonl", capsys)
        assert res["rc"] == 2 and f"{other[0]} {other[1]}: {says}" in res["stderr"], res["stderr"]
        assert then in res["stderr"] and not (out / "v.jsonl").exists()
        return "refused"
    return check


def _output(setup, mode, out, capsys, base):
    res = _predict(setup, mode, [], Path("-"), capsys)
    assert res["rc"] == 0 and res["stdout"].startswith("path,label") and "text" not in res
    return "stdout"


def _format(setup, mode, out, capsys, base):
    res = _predict(setup, mode, ["--format", "kaggle"], out / "v.csv", capsys)
    assert res["rc"] == 0 and res["text"].startswith("image_id,class\n")
    return "file"


def _resume(setup, mode, out, capsys, base):
    target = out / "v.jsonl"
    assert _predict(setup, mode, [], target, capsys)["rc"] == 0
    res = _predict(setup, mode, ["--resume"], target, capsys)
    n = len(base["rows"])
    assert res["rc"] == 0 and f"resumed after {n} rows" in res["stderr"] and res["rows"] == base["rows"]
    return "stderr"


def _shard(setup, mode, out, capsys, base):
    res = _predict(setup, mode, ["--shard", "0/3"], out / "v.jsonl", capsys)
    assert res["rc"] == 0 and 0 < len(res["rows"]) < len(base["rows"])
    assert res["rows"] == base["rows"][: len(res["rows"])]
    return "rows"


def _checkpoint(setup, mode, out, capsys, base):
    # the flag that makes the mode: the two modes' rows differ in their columns and branches
    other = "zeroshot" if mode == "hybrid" else "hybrid"
    res = _predict(setup, other, [], out / "v.jsonl", capsys)
    assert res["rc"] == 0 and set(res["rows"][0]) != set(base["rows"][0])
    return "rows"


def _classes(setup, mode, out, capsys, base):
    # the prompts file's classes and one more, inline: the rows of that prompts file
    names = [*setup["world"].classes, "black plain circle"]  # the classes of extra_prompts
    res = _predict(setup, mode, ["--classes", ",".join(names)], out / "v.jsonl", capsys)
    assert res["rc"] == 0, res["stderr"]
    extra = _predict(setup, mode, ["--prompts", str(setup["extra_prompts"])], out / "p.jsonl", capsys)
    assert res["rows"] == extra["rows"] != base["rows"]
    return "rows"


def _all_scores(setup, mode, out, capsys, base):
    world = setup["world"]
    # classes_ order: prompts-file order; a hybrid's seen classes (sorted folders) first
    order = list(world.classes) if mode == "zeroshot" else [
        *world.seen_classes, *(c for c in world.classes if c not in world.seen_classes)]
    res = _predict(setup, mode, ["--all-scores"], out / "v.jsonl", capsys)
    assert res["rc"] == 0, res["stderr"]
    tolerance = len(order) * 5e-7  # each probability is written to 6 decimals
    for row, plain in zip(res["rows"], base["rows"], strict=True):
        scores = row.pop("scores")
        assert row == plain  # the rows without the flag, plus every class's probability
        assert list(scores) == order and abs(sum(scores.values()) - 1) <= tolerance
        assert all(scores[t["label"]] == t["score"] for t in plain["topk"])
    # CSV: one score:<class> column per class, in the same order, summing to 1 on every row
    csv_res = _predict(setup, mode, ["--all-scores"], out / "v.csv", capsys)
    assert csv_res["rc"] == 0, csv_res["stderr"]
    header = csv_res["text"].split("\n", 1)[0].split(",")
    assert header[-len(order):] == [f"score:{c}" for c in order]
    for row in csv_res["rows"]:
        assert abs(sum(float(row[f"score:{c}"]) for c in order) - 1) <= tolerance
    kaggle = _predict(setup, mode, ["--all-scores", "--format", "kaggle"], out / "k.csv", capsys)
    assert _refused(kaggle, "--all-scores") and "--format kaggle" in kaggle["stderr"]
    return "rows"


def _unknown(setup, mode, out, capsys, base):
    res = _predict(setup, mode, ["--unknown-threshold", "0.999"], out / "v.jsonl", capsys)
    assert res["rc"] == 0
    unknown = [r["label"] == "unknown" for r in res["rows"]]
    assert any(unknown) and not any(r["label"] == "unknown" for r in base["rows"])
    return "rows"


def _rolled_up(setup, mode, out, capsys, base, flag, value):
    """The flag with the world's tree: rows answer ancestors, with rank and leaf; without
    ancestors in the prompts file it is refused."""
    res = _predict(setup, mode, [flag, value], out / "n.jsonl", capsys)
    assert _refused(res, flag) and "needs ancestors in the prompts file" in res["stderr"]
    tree = ["--prompts", str(setup["tree_prompts"])]
    plain = _predict(setup, mode, tree, out / "p.jsonl", capsys)
    res = _predict(setup, mode, [*tree, flag, value], out / "v.jsonl", capsys)
    assert res["rc"] == 0, res["stderr"]
    ancestors = {" ".join(c.split()[0::2]) for c in setup["world"].classes} | {
        c.split()[2] for c in setup["world"].classes}
    rolled = [r for r in res["rows"] if r["rank"] > 0]
    assert rolled and all(r["label"] in ancestors for r in rolled)
    for row, before in zip(res["rows"], plain["rows"], strict=True):
        assert row["topk"] == before["topk"]  # the classes' ranking is the same
        colour, _, shape = row["leaf"].split()
        if row["rank"] == 0:
            assert (row["label"], row["score"]) == (before["label"], before["score"]) == (row["leaf"], row["score"])
        else:  # the leaf's ancestor at that rank; the answer's mass exceeds the best class's
            assert row["label"] == [f"{colour} {shape}", shape][row["rank"] - 1]
            assert row["score"] > before["score"]
    return "rows"


def _rollup_threshold(setup, mode, out, capsys, base):
    return _rolled_up(setup, mode, out, capsys, base, "--rollup-threshold", "0.999")


def _rollup_precision(setup, mode, out, capsys, base):
    if mode == "zeroshot":  # no held-out seen images to choose the threshold on
        return _refused_with(["--rollup-precision", "0.9"], "--rollup-precision")(setup, mode, out, capsys, base)
    return _rolled_up(setup, mode, out, capsys, base, "--rollup-precision", "1.0")


def _mode(setup, mode, out, capsys, base):
    if mode == "zeroshot":
        return _refused_with(["--mode", "hard"], "--mode")(setup, mode, out, capsys, base)
    branches = {r["branch"] for r in base["rows"]}
    other = "hard" if "mixed" in branches or "zeroshot" in branches and "supervised" not in branches else "soft"
    return _rows_change(["--mode", other])(setup, mode, out, capsys, base)


def _cascade(setup, mode, out, capsys, base):
    if mode == "zeroshot":
        return _refused_with(["--cascade"], "--cascade")(setup, mode, out, capsys, base)
    n = len(base["rows"])
    assert f"the CLIP image tower ran on {n} of {n} inputs" in base["stderr"]
    # A one-epoch branch is unsure of everything, so its calibrated cascade sends every image to
    # CLIP; a copy of the run whose thresholds keep every image shows the flag at work.
    run = out / "run"
    shutil.copytree(setup["run"], run)
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    gate.update(cascade_msp=0.0, cascade_distance=2.0)  # every MSP above 0, every distance <= 2
    (run / "gate.json").write_text(json.dumps(gate), encoding="utf-8")
    res = _predict({**setup, "run": run}, mode, ["--cascade"], out / "v.jsonl", capsys)
    assert res["rc"] == 0 and f"the CLIP image tower ran on 0 of {n} inputs" in res["stderr"]
    assert all(r["zeroshot_topk"] == [] and r["branch"] == "supervised" for r in res["rows"])
    return "stderr"


def _support(setup, mode, out, capsys, base):
    # support images of the unseen classes: the run record names them, three per class
    from hybridcls.synth.support import render_support

    world = setup["world"]
    folder = render_support(world, out / "support", 3)
    res = _predict(setup, mode, ["--support", str(folder)], out / "v.jsonl", capsys)
    assert res["rc"] == 0, res["stderr"]
    assert "support" not in base["record"]["gate"]
    assert res["record"]["gate"]["support"]["counts"] == {c: 3 for c in world.unseen_classes}
    bad = out / "bad"
    (bad / "purple moon").mkdir(parents=True)
    shutil.copy(folder / world.unseen_classes[0].replace(" ", "_") / "0000.png", bad / "purple moon")
    res = _predict(setup, mode, ["--support", str(bad)], out / "b.jsonl", capsys)
    assert res["rc"] == 2 and "support class folder" in res["stderr"] and "purple moon" in res["stderr"]
    res = _predict(setup, mode, ["--support", str(out / "nosuch")], out / "c.jsonl", capsys)
    assert res["rc"] == 2 and f"--support {out / 'nosuch'}: no such folder" in res["stderr"]
    flat = out / "flat"  # images without class folders: the scanner's error names the flag
    flat.mkdir()
    res = _predict(setup, mode, ["--support", str(flat)], out / "d.jsonl", capsys)
    assert res["rc"] == 2 and (f"--support {flat}: no class subfolders in {flat} (the support folder)"
                               in res["stderr"]), res["stderr"]
    return "record"


def _model_version(setup, mode, out, capsys, base):
    res = _predict(setup, mode, ["--model-version"], out / "v.jsonl", capsys)
    assert res["rc"] == 0 and "model_version" not in base["rows"][0]
    version = res["record"]["models"]["model_version"]
    assert [r["model_version"] for r in res["rows"]] == [version] * len(base["rows"])
    return "rows"


def _log(setup, mode, out, capsys, base):
    res = _predict(setup, mode, ["--log", str(out / "log.json")], out / "v.jsonl", capsys)
    log = json.loads((out / "log.json").read_text(encoding="utf-8"))
    assert res["rc"] == 0 and log == {**res["record"], "exit_status": 0, "error": None}
    assert log["counts"]["predicted"] == len(res["rows"]) and log["argv"][-2:] == ["--log", str(out / "log.json")]
    return "file"


CASES = {
    "inputs": _shard,  # a different share of the inputs gives different rows (and see _shard)
    "prompts": _rows_change(lambda s: ["--prompts", str(s["extra_prompts"])]),
    "classes": _classes,
    "templates": _refused_by_the_gate(lambda s: ["--templates", str(s["other_templates"])],
                                      "builds the class texts from 1 templates",
                                      "calibrate the run again with these"),
    "truncate_prompts": _truncate,
    "clip_model": _refused_by_the_gate(lambda s: ["--clip-model", f"local-dir:{s['other_clip']}"],
                                       "loads CLIP", "calibrate the run again with this one"),
    "clip_pretrained": _refused_with(["--clip-pretrained", "laion400m_e32"], "--clip-pretrained"),
    "cache_dir": _cache_dir,
    "device": _refused_with(["--device", "cuda:7"], "--device cuda:7"),
    "batch_size": _record_changes("batch_size", ["--batch-size", "3"], 3),
    "workers": _record_changes("workers", ["--workers", "1"], 1),
    "quiet": _quiet,
    "precision": _record_changes("precision", ["--precision", "bf16"], "bf16"),
    "compile": _compile,
    "gpu_decode": _refused_with(["--gpu-decode"], "--gpu-decode"),
    "full_decode": _record_changes("draft_target_side", ["--full-decode"], None),
    "unknown_threshold": _unknown,
    "rollup_threshold": _rollup_threshold,
    "rollup_precision": _rollup_precision,
    "allowed_classes": _rows_change(lambda s: ["--allowed-classes", s["world"].classes[0]]),
    "site_classes": _rows_change(lambda s: ["--site-classes", str(s["sites"])]),
    "support": _support,
    "checkpoint": _checkpoint,
    # a version of a Hub repo id as --checkpoint (acts: test_hub.py); a run directory or none: refused
    "revision": _refused_with(["--revision", "v1"], "--revision v1"),
    "mode": _mode,
    "cascade": _cascade,
    "topk": _rows_change(["--topk", "1"]),
    "all_scores": _all_scores,
    "output": _output,
    "format": _format,
    "resume": _resume,
    "shard": _shard,
    "model_version": _model_version,
    "log": _log,
}


def _predict_flags() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["predict"]
    return {a.dest for a in sub._actions if not isinstance(a, argparse._HelpAction)}


def test_every_predict_flag_has_a_case():
    assert _predict_flags() == set(CASES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", sorted(CASES))
def test_each_flag_acts_or_is_refused(setup, mode, flag, tmp_path, capsys):
    if flag == "device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    base = _predict(setup, mode, [], tmp_path / "base.jsonl", capsys)
    assert base["rc"] == 0, base["stderr"]
    evidence = CASES[flag](setup, mode, tmp_path, capsys, base)
    assert evidence in {"rows", "record", "refused", "enables", "file", "stderr", "stdout"}


def test_the_two_modes_share_one_row_builder(setup, tmp_path, capsys):
    zs = _predict(setup, "zeroshot", [], tmp_path / "z.jsonl", capsys)
    hy = _predict(setup, "hybrid", [], tmp_path / "h.jsonl", capsys)
    assert [r["path"] for r in zs["rows"]] == [r["path"] for r in hy["rows"]]
    assert {r["branch"] for r in zs["rows"]} == {"zeroshot"}
    assert set(hy["rows"][0]) - set(zs["rows"][0]) == {"gate_score", "gate_weight", "supervised_topk",
                                                       "zeroshot_topk"}


@pytest.mark.parametrize("mode", MODES)
def test_all_scores_and_model_version_together(setup, mode, tmp_path, capsys):
    """--all-scores with --model-version: both in one file, in CSV and JSON Lines, in the
    documented column order (docs/cli.md), each value what the flag alone writes; an error row
    keeps its model_version and has no scores; the record counts the file's rows."""
    world = setup["world"]
    order = list(world.classes) if mode == "zeroshot" else [
        *world.seen_classes, *(c for c in world.classes if c not in world.seen_classes)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    argv = ["predict", str(world.test_dir), str(broken), *setup["common"], "-q",
            *(["--checkpoint", str(setup["run"])] if mode == "hybrid" else [])]
    scores_only = tmp_path / "s.jsonl"
    assert main([*argv, "--all-scores", "-o", str(scores_only)]) == 1  # the broken file
    alone = {r["path"]: r for r in read_predictions(scores_only)}
    branch = ["gate_score", "gate_weight", "supervised_topk", "zeroshot_topk"] if mode == "hybrid" else []
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"both.{fmt}"
        assert main([*argv, "--all-scores", "--model-version", "-o", str(out)]) == 1
        capsys.readouterr()
        rows = read_predictions(out)
        record = json.loads(out.with_name(out.name + ".manifest.json").read_text(encoding="utf-8"))["record"]
        version = record["models"]["model_version"]
        assert len(version) == 12 and int(version, 16) >= 0
        assert [r["model_version"] for r in rows] == [version] * len(alone)
        topk = [f"top{i}{s}" for i in range(1, 6) for s in ("", "_score")]
        if fmt == "csv":
            header = out.read_text(encoding="utf-8").split("\n", 1)[0].split(",")
            assert header == ["path", "label", "score", "branch", "status", "error", *topk, *branch,
                              "model_version", *(f"score:{c}" for c in order)]
            for row in rows:
                scores = alone[row["path"]]["scores"]
                if scores is None:
                    assert row["status"] == "error" and all(row[f"score:{c}"] == "" for c in order)
                else:
                    assert [float(row[f"score:{c}"]) for c in order] == [scores[c] for c in order]
        else:
            for row in rows:
                assert list(row)[-2:] == ["model_version", "scores"]
                assert {k: v for k, v in row.items() if k != "model_version"} == alone[row["path"]]
        assert sum(r["status"] == "error" and r["path"] == str(broken) for r in rows) == 1
        # the record's counts are the file's, with every class's score in it
        assert record["counts"] == {
            "predicted": len(rows) - 1, "failed": 1, "resumed": 0,
            "unknown": sum(r["label"] == "unknown" for r in rows)}


@pytest.mark.parametrize(("extra", "message"), [
    (["--score", "energy"], ("--score energy: only --method tpr reads it (leave-classes-out chooses "
                            "the score itself); give --method tpr, or leave --score out")),
    (["--tpr", "0.9"], ("--tpr 0.9: only --method tpr reads it (leave-classes-out chooses the "
                       "threshold itself); give --method tpr, or leave --tpr out")),
    (["--method", "tpr", "--rounds", "3"], ("--rounds 3: only --method leave-classes-out reads it "
                                           "(--method tpr searches nothing); give --method "
                                           "leave-classes-out, or leave --rounds out")),
])
def test_calibrate_refuses_a_flag_its_method_does_not_read(tiny_hybrid, extra, message, capsys):
    """``calibrate --score`` / ``--tpr`` set ``--method tpr``'s gate and ``--rounds``
    leave-classes-out's search; with the other method they would change nothing."""
    gate = (tiny_hybrid["run"] / "gate.json").read_bytes()
    capsys.readouterr()
    assert main(["calibrate", str(tiny_hybrid["run"]), *tiny_hybrid["common"], "-q", *extra]) == 2
    assert capsys.readouterr().err.strip() == f"hybridcls calibrate: error: {message}"
    assert (tiny_hybrid["run"] / "gate.json").read_bytes() == gate
