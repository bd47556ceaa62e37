"""`hybridcls predict` at scale, end to end with the shipped tiny CLIP: SIGKILL + --resume,
--shard + merge, torchrun on 2 CPU processes (gloo), and hostile input names."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybridcls.cli import main
from hybridcls.outputs import read_predictions
from hybridcls.synth import TINY_CLIP_MODEL_ID
from hybridcls.synth.world import CAPTION_TEMPLATES

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 240


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Images of random colours, a prompts file, a warm text cache and the reference output."""
    root = tmp_path_factory.mktemp("scale")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 256, size=(2, 2, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((32, 32)).save(images / f"img_{i:04d}.png")
    prompts = root / "prompts.txt"
    prompts.write_text("red square\nblue circle\ngreen cross\nyellow star\n", encoding="utf-8")
    # The tiny CLIP's own templates: some of the default 80 do not fit its 12-token context.
    templates = root / "templates.txt"
    templates.write_text("".join(f"{t}\n" for t in CAPTION_TEMPLATES), encoding="utf-8")
    common = ["--prompts", str(prompts), "--templates", str(templates), "--clip-model",
              TINY_CLIP_MODEL_ID, "--cache-dir", str(root / "cache"), "--workers", "0",
              "--batch-size", "2", "-q"]
    ref = root / "ref.csv"
    assert main(["predict", str(images), *common, "-o", str(ref)]) == 0
    return {"root": root, "images": images, "common": common, "ref": ref}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _rows(path: Path) -> list[dict]:
    return read_predictions(path)


def _same_predictions(got: list[dict], want: list[dict]) -> None:
    assert [r["path"] for r in got] == [r["path"] for r in want]  # every input once, input order
    assert [r["label"] for r in got] == [r["label"] for r in want]
    for g, w in zip(got, want):
        assert float(g["score"]) == pytest.approx(float(w["score"]), abs=2e-6)


def test_sigkill_then_resume_gives_every_input_once_and_the_same_predictions(setup, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    # The real CLI in a child process, slowed down after each batch so the kill lands mid-run
    # whatever the machine's speed.
    driver = textwrap.dedent("""
        import sys, time
        from hybridcls.outputs import PredictionWriter
        write_many = PredictionWriter.write_many
        def slow(self, rows):
            write_many(self, rows)
            time.sleep(0.02)
        PredictionWriter.write_many = slow
        from hybridcls.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    argv = ["predict", str(setup["images"]), *setup["common"], "-o", str(out)]
    child = subprocess.Popen([sys.executable, "-c", driver, *argv], env=_env(), cwd=tmp_path)
    try:
        while child.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") > 40:  # header + 40 rows or more
                break
            time.sleep(0.01)
        assert child.poll() is None, "the run finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    # A kill during a write leaves half a record: cut the file inside its last row as well.
    data = out.read_bytes()
    out.write_bytes(data[:-9])
    done = out.read_bytes().count(b"\n") - 1  # complete one-line rows (plain names), less the header
    assert 39 <= done < N_IMAGES

    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resumed after {done} rows" in err
    _same_predictions(_rows(out), _rows(setup["ref"]))


def test_resume_refuses_other_settings(setup, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    argv = ["predict", str(setup["images"] / "img_0000.png"), *setup["common"], "-o", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--topk", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    # without --topk, one pair per class of the 4-class prompts file (fewer than the default 5)
    assert f"--resume: cannot continue {out}: " in err and "topk 4 vs 2" in err
    assert main(["predict", str(setup["images"]), *setup["common"], "--resume"]) == 2
    assert "--resume needs --output FILE" in capsys.readouterr().err


def test_shards_merged_equal_one_run(setup, tmp_path, capsys):
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part{i}.csv")
        assert main(["predict", str(setup["images"]), *setup["common"], "--shard", f"{i}/3",
                     "-o", str(parts[-1])]) == 0
    assert [len(_rows(p)) for p in parts] == [80, 80, 80]
    out = tmp_path / "merged.csv"
    assert main(["merge", str(parts[2]), str(parts[0]), str(parts[1]), "--output", str(out)]) == 0
    assert out.read_bytes() == setup["ref"].read_bytes()
    assert main(["merge", str(parts[0]), str(parts[2]), "-o", str(tmp_path / "m2.csv")]) == 2
    assert "inputs #80-#159 (80) missing: no part has them" in capsys.readouterr().err
    assert main(["predict", str(setup["images"]), *setup["common"], "--shard", "3/3",
                 "-o", str(tmp_path / "x.csv")]) == 2
    assert "error: --shard 3/3: I must be between 0 and 2" in capsys.readouterr().err


def test_torchrun_two_cpu_processes_merge_to_the_single_process_output(setup, tmp_path):
    out = tmp_path / "dist.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hybridcls", "predict", str(setup["images"]), *setup["common"], "-o", str(out)]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes() == setup["ref"].read_bytes()
    assert f"{N_IMAGES} images predicted" in proc.stderr
    assert not (tmp_path / "dist.csv.parts").exists()  # rank 0 removed the merged parts


def _hostile_inputs(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """List files and a folder full of awkward names; returns (inputs, expected (path, status))."""
    d = root / "odd"
    d.mkdir()
    good = ["with space.png", 'quote"d.png', "comma,name.png", "élan_猫.png", "new\nline.png",
            "it's ; 'single'.png"]
    for name in good:
        Image.new("RGB", (16, 16), (200, 30, 30)).save(d / name, "PNG")
    (d / "fake.jpg").mkdir()  # a directory named like an image
    os.symlink("loop.png", d / "loop.png")  # a symbolic link to itself
    txt = d / "list.txt"
    listed = ["missing.png", "with space.png", 'quote"d.png', "fake.jpg", "loop.png", "comma,name.png"]
    txt.write_text("".join(f"{name}\n" for name in listed), encoding="utf-8")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows([["path"], ["élan_猫.png"], ["new\nline.png"], ["gone, with \"quotes\".png"]])
    lst = d / "list.csv"
    lst.write_text(buf.getvalue(), encoding="utf-8")
    walk = root / "walk"
    walk.mkdir()
    Image.new("RGB", (16, 16)).save(walk / "it's ; 'single'.png")
    (walk / "x.jpg").mkdir()  # walked as a folder, never a row
    expected = [
        (str(d / "missing.png"), "error"), (str(d / "with space.png"), "ok"),
        (str(d / 'quote"d.png'), "ok"), (str(d / "fake.jpg"), "error"), (str(d / "loop.png"), "error"),
        (str(d / "comma,name.png"), "ok"), (str(d / "élan_猫.png"), "ok"),
        (str(d / "new\nline.png"), "ok"), (str(d / 'gone, with "quotes".png'), "error"),
        (str(walk / "it's ; 'single'.png"), "ok"),
    ]
    return [str(txt), str(lst), str(walk)], expected


def test_hostile_names_each_become_one_well_formed_row(setup, tmp_path):
    inputs, expected = _hostile_inputs(tmp_path)
    csv_out, jsonl_out = tmp_path / "p.csv", tmp_path / "p.jsonl"
    for out in (csv_out, jsonl_out):
        assert main(["predict", *inputs, *setup["common"], "-o", str(out)]) == 1

    records = list(csv.reader(io.StringIO(csv_out.read_text(encoding="utf-8"), newline="")))
    header, body = records[0], records[1:]
    assert all(len(r) == len(header) for r in body)
    got = [(r[header.index("path")], r[header.index("status")]) for r in body]
    assert got == expected

    lines = jsonl_out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(expected)  # one line per input
    got = [(rec["path"], rec["status"]) for rec in map(json.loads, lines[:-1])]
    assert got == expected
    errors = {Path(rec["path"]).name: rec["error"] for rec in map(json.loads, lines[:-1])
              if rec["status"] == "error"}
    assert errors["missing.png"].startswith("no such file (listed in")
    assert errors["fake.jpg"].startswith("is a directory (listed in")
    assert errors["loop.png"].startswith("symbolic link loop (listed in")
    assert errors['gone, with "quotes".png'].endswith("list.csv line 5)")  # the quoted newline: line 3-4


def test_hybrid_cut_file_resumes_and_shards_merge_to_one_run(world_run, tmp_path, capsys):
    """The hybrid (supervised + CLIP + gate, extra columns) through the same resume / merge path."""
    world, clf = world_run
    common = [str(world.test_dir), "--prompts", str(world.prompts_file), "--clip-model",
              TINY_CLIP_MODEL_ID, "--templates", str(world.templates_file), "--checkpoint",
              str(clf.run_dir_), "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
              "--batch-size", "16", "-q"]
    ref = tmp_path / "ref.jsonl"
    assert main(["predict", *common, "-o", str(ref)]) == 0
    lines = ref.read_bytes().split(b"\n")
    assert json.loads(lines[0])["gate_score"] is not None
    cut = tmp_path / "cut.jsonl"
    # 37 complete rows and a third of the 38th, as a kill mid-write leaves it.
    cut.write_bytes(b"\n".join(lines[:37]) + b"\n" + lines[37][: len(lines[37]) // 3])
    (tmp_path / "cut.jsonl.manifest.json").write_bytes((tmp_path / "ref.jsonl.manifest.json").read_bytes())
    assert main(["predict", *common, "-o", str(cut), "--resume"]) == 0
    assert "resumed after 37 rows" in capsys.readouterr().err
    _same_predictions(_rows(cut), _rows(ref))
    parts = [tmp_path / f"p{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        assert main(["predict", *common, "--shard", f"{i}/2", "-o", str(part)]) == 0
    assert main(["merge", *map(str, parts), "-o", str(tmp_path / "m.jsonl")]) == 0
    _same_predictions(_rows(tmp_path / "m.jsonl"), _rows(ref))
