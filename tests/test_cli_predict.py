"""`hybridcls predict` end to end (zero-shot only) on generated good and broken files."""

from __future__ import annotations

import json

import pytest
from imagefactory import (
    make_dir_named_like_image,
    make_plain,
    make_text_as_jpg,
    make_truncated_jpeg,
    make_zero_byte,
)
from tinyclip_factory import make_tiny_clip

from hybridcls.cli import main
from hybridcls.outputs import read_predictions


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('clip') / 'tiny')}"


@pytest.fixture()
def prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    # The description is short enough for the test CLIP's 16-token context with all 80 templates.
    f.write_text("# three classes\nred square\nblue circle: round | blue disc\ngreen cross\n",
                 encoding="utf-8")
    return f


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, fmt in enumerate(["JPEG", "PNG", "WEBP"]):
        make_plain(d, fmt, f"good{i}.{fmt.lower()}")
    make_truncated_jpeg(d)
    make_zero_byte(d)
    make_text_as_jpg(d)
    return d




def test_every_file_gets_one_row_and_exit_1(tmp_path, folder, prompts, tiny_clip, capsys):
    out = tmp_path / "pred.csv"
    code = main(["predict", str(folder), "--prompts", str(prompts), "--clip-model", tiny_clip,
                 "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "--topk", "2", "-q",
                 "--workers", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "3 of 6 inputs failed" in err
    rows = read_predictions(out)
    files = sorted(p.name for p in folder.iterdir())
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == files
    assert len(rows) == 6
    by_status = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    for name in ("good0.jpeg", "good1.png", "good2.webp"):
        r = by_status[name]
        assert r["status"] == "ok" and r["branch"] == "zeroshot"
        assert r["label"] in {"red square", "blue circle", "green cross"}
        assert 0 < float(r["score"]) <= 1 and r["top1"] == r["label"]
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        r = by_status[name]
        assert r["status"] == "error" and r["error"] and r["label"] == ""


def test_all_good_exit_0_jsonl_and_order(tmp_path, prompts, tiny_clip, capsys):
    d = tmp_path / "ok"
    d.mkdir()
    names = [make_plain(d, "PNG", f"{c}.png").name for c in "cab"]
    out = tmp_path / "pred.jsonl"
    code = main(["predict", str(d / "b.png"), str(d), "--prompts", str(prompts), "--clip-model",
                 tiny_clip, "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "-q"])
    assert code == 0
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    # explicit input first, then the folder in sorted order, each file once
    assert [r["path"].rsplit("/", 1)[-1] for r in records] == ["b.png", "a.png", "c.png"]
    assert sorted(names) == ["a.png", "b.png", "c.png"]
    assert all(len(r["topk"]) == 3 for r in records)
    assert abs(sum(t["score"] for t in records[0]["topk"]) - 1) < 1e-4


def test_kaggle_format(tmp_path, prompts, tiny_clip):
    d = tmp_path / "ok"
    d.mkdir()
    make_plain(d, "PNG", "img_001.png")
    out = tmp_path / "sub.csv"
    assert main(["predict", str(d), "--prompts", str(prompts), "--clip-model", tiny_clip,
                 "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "--format", "kaggle", "-q"]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "image_id,class" and lines[1].startswith("img_001.png,")


def test_second_run_does_not_encode_text(tmp_path, prompts, tiny_clip, monkeypatch):
    import open_clip

    d = tmp_path / "ok"
    d.mkdir()
    make_plain(d, "PNG", "x.png")
    calls = []
    original = open_clip.CLIP.encode_text

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(open_clip.CLIP, "encode_text", counting)
    argv = ["predict", str(d), "--prompts", str(prompts), "--clip-model", tiny_clip,
            "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "p.csv"), "-q"]
    assert main(argv) == 0
    first = len(calls)
    assert first > 0
    assert main(argv) == 0
    assert len(calls) == first  # the text encoder did not run again


def test_usage_errors_exit_2(tmp_path, prompts, tiny_clip, capsys):
    d = tmp_path / "ok"
    d.mkdir()
    make_plain(d, "PNG", "x.png")
    bad = tmp_path / "bad_prompts.txt"
    bad.write_text("fox\nwolf\nfox\n", encoding="utf-8")
    assert main(["predict", str(d), "--prompts", str(bad), "--clip-model", tiny_clip, "-q"]) == 2
    assert "bad_prompts.txt:3" in capsys.readouterr().err
    assert main(["predict", str(d), "--prompts", str(prompts), "--clip-model", tiny_clip,
                 "--batch-size", "0", "-q"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(d)])  # --prompts missing: argparse's own usage error
    assert exc.value.code == 2
    assert main(["predict", str(tmp_path / "nothing*.png"), "--prompts", str(prompts),
                 "--clip-model", tiny_clip, "-q"]) == 2


def test_directory_named_like_image_and_missing_file(tmp_path, prompts, tiny_clip):
    d = tmp_path / "mixed"
    d.mkdir()
    make_dir_named_like_image(d)
    out = tmp_path / "p.csv"
    code = main(["predict", str(d), str(tmp_path / "missing.jpg"), "--prompts", str(prompts),
                 "--clip-model", tiny_clip, "--cache-dir", str(tmp_path / "c"), "-o", str(out), "-q"])
    rows = read_predictions(out)
    assert code == 1
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[1]["error"] == "no such file or directory"
