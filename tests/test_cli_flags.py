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
    return {**tiny_hybrid, "long_prompts": long_prompts, "other_templates": other_templates,
            "extra_prompts": extra_prompts, "other_clip": make_tiny_clip(root / "other_clip")}


def _predict(setup, mode: str, extra: list[str], out: Path, capsys, *, quiet: bool = True) -> dict:
    argv = ["predict", str(setup["world"].test_dir), *setup["common"]]
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


def _clip_model(setup, mode, out, capsys, base):
    other = ["--clip-model", f"local-dir:{setup['other_clip']}"]
    if mode == "zeroshot":
        return _rows_change(other)(setup, mode, out, capsys, base)
    # the run's gate and index were made with the first CLIP: another one is refused, with the remedy
    res = _predict(setup, mode, other, out / "v.jsonl", capsys)
    assert res["rc"] == 2 and "built with another fingerprint" in res["stderr"]
    assert "rebuild it (hybridcls calibrate)" in res["stderr"] and not (out / "v.jsonl").exists()
    return "refused"


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


def _unknown(setup, mode, out, capsys, base):
    res = _predict(setup, mode, ["--unknown-threshold", "0.999"], out / "v.jsonl", capsys)
    assert res["rc"] == 0
    unknown = [r["label"] == "unknown" for r in res["rows"]]
    assert any(unknown) and not any(r["label"] == "unknown" for r in base["rows"])
    return "rows"


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


CASES = {
    "inputs": _shard,  # a different share of the inputs gives different rows (and see _shard)
    "prompts": _rows_change(lambda s: ["--prompts", str(s["extra_prompts"])]),
    "templates": _rows_change(lambda s: ["--templates", str(s["other_templates"])]),
    "truncate_prompts": _truncate,
    "clip_model": _clip_model,
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
    "checkpoint": _checkpoint,
    "mode": _mode,
    "cascade": _cascade,
    "topk": _rows_change(["--topk", "1"]),
    "output": _output,
    "format": _format,
    "resume": _resume,
    "shard": _shard,
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
