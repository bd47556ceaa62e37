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
from PIL import Image
from tinyclip_factory import make_tiny_clip

from hybridcls.cli import main
from hybridcls.errors import WeightsUnavailableError
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
    from tinyclip_factory import count_text_encoding

    d = tmp_path / "ok"
    d.mkdir()
    make_plain(d, "PNG", "x.png")
    calls = count_text_encoding(monkeypatch)
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
    assert main(["predict", str(d)]) == 2  # --prompts missing (and no save_pretrained folder)
    assert "error: --prompts or --classes is needed" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nothing*.png"), "--prompts", str(prompts),
                 "--clip-model", tiny_clip, "-q"]) == 2


def test_topk_is_at_most_the_classes_the_prompts_name(tmp_path, prompts, tiny_clip, capsys):
    """Three classes: the default top-k is all three (not five columns, two of them empty); a
    larger --topk is refused, naming the prompts file or --classes and their count, before
    anything is written."""
    d = tmp_path / "ok"
    d.mkdir()
    make_plain(d, "PNG", "x.png")
    common = ["--clip-model", tiny_clip, "--cache-dir", str(tmp_path / "cache"), "-q", "--workers", "0"]
    out = tmp_path / "p.csv"
    assert main(["predict", str(d), "--prompts", str(prompts), *common, "-o", str(out)]) == 0
    header = out.read_text(encoding="utf-8").split("\n", 1)[0].split(",")
    assert header[6:] == ["top1", "top1_score", "top2", "top2_score", "top3", "top3_score"]
    (row,) = read_predictions(out)
    assert sorted(row[f"top{i}"] for i in (1, 2, 3)) == ["blue circle", "green cross", "red square"]
    capsys.readouterr()
    refused = tmp_path / "refused.csv"
    for classes, named in ((["--prompts", str(prompts)], str(prompts)),
                           (["--classes", "fox,elk"], "--classes")):
        n = 3 if named != "--classes" else 2
        assert main(["predict", str(d), *classes, *common, "--topk", str(n + 1), "-o", str(refused)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"hybridcls predict: error: --topk {n + 1}: more than the {n} classes that {named} names; "
            f"give 1 to {n}")
    assert not refused.exists()


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


def test_usage_errors_leave_no_output(tmp_path, prompts, tiny_clip, capsys, monkeypatch):
    d = tmp_path / "ok"
    d.mkdir()
    make_plain(d, "PNG", "x.png")
    bad = tmp_path / "bad_prompts.txt"
    bad.write_text("fox\nwolf\nfox\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    common = [str(d), "--clip-model", tiny_clip, "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(["predict", *common, "--prompts", str(bad), "-o", str(out)]) == 2
    assert "bad_prompts.txt:3" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.csv.manifest.json").exists()
    # standard output: not even a header before the error
    assert main(["predict", *common, "--prompts", str(bad)]) == 2
    assert capsys.readouterr().out == ""
    # A file an earlier run left cut short, and a model that now fails to load (weights gone):
    # neither --resume (which would cut the tail) nor a fresh run (which would replace the file)
    # touches it.
    assert main(["predict", *common, "--prompts", str(prompts), "-o", str(out)]) == 0
    out.write_bytes(out.read_bytes()[:-3])
    before = out.read_bytes()
    manifest = (tmp_path / "out.csv.manifest.json").read_bytes()

    def weights_gone(args):
        raise WeightsUnavailableError("weights not in the cache and HF_HUB_OFFLINE=1")

    monkeypatch.setattr("hybridcls.cli.decision.zeroshot_from_args", weights_gone)
    for extra in (["--resume"], []):
        assert main(["predict", *common, "--prompts", str(prompts), "-o", str(out), *extra]) == 2
        assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err
        assert out.read_bytes() == before
        assert (tmp_path / "out.csv.manifest.json").read_bytes() == manifest


def test_kaggle_refuses_two_files_of_one_name(tmp_path, prompts, tiny_clip, capsys):
    for site in ("site1", "site2"):
        (tmp_path / site).mkdir()
        make_plain(tmp_path / site, "PNG", "IMG_0001.png")
    out = tmp_path / "sub.csv"
    argv = ["predict", str(tmp_path / "site1"), str(tmp_path / "site2"), "--prompts", str(prompts),
            "--clip-model", tiny_clip, "--cache-dir", str(tmp_path / "cache"), "-q", "--format", "kaggle"]
    assert main([*argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"'IMG_0001.png' would stand for both '{tmp_path / 'site1' / 'IMG_0001.png'}' and "
            f"'{tmp_path / 'site2' / 'IMG_0001.png'}'") in err
    assert not out.exists() and not (tmp_path / "sub.csv.manifest.json").exists()
    assert main(argv) == 2 and capsys.readouterr().out == ""  # to standard output: nothing either


def test_thin_strips_are_ok_rows_like_a_square_of_their_colour(tmp_path, prompts, tiny_clip):
    # Issue 12: a 1 x 16000 PNG would be resized to 32 x 512,000 for a 32 x 32 crop; it is cut to
    # 16:1 first. A uniform strip's centre crop is uniform too, so it scores as the square does.
    d = tmp_path / "strips"
    d.mkdir()
    for name, size in (("a_square.png", (64, 64)), ("b_tall.png", (1, 16000)), ("c_wide.png", (16000, 1))):
        Image.new("RGB", size, (200, 30, 30)).save(d / name)
    out = tmp_path / "p.jsonl"
    code = main(["predict", str(d), "--prompts", str(prompts), "--clip-model", tiny_clip, "--device", "cpu",
                 "--workers", "0", "--cache-dir", str(tmp_path / "c"), "-o", str(out), "--topk", "3", "-q"])
    rows = read_predictions(out)
    assert code == 0 and [r["status"] for r in rows] == ["ok"] * 3
    square, *strips = rows
    for row in strips:
        assert row["label"] == square["label"]
        assert [t["label"] for t in row["topk"]] == [t["label"] for t in square["topk"]]
        assert [t["score"] for t in row["topk"]] == pytest.approx([t["score"] for t in square["topk"]],
                                                                  abs=1e-6)
