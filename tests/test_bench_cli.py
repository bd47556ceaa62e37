"""Every bench refuses a bad numeric flag up front: an error naming the flag, exit status 2,
and nothing built (no world, no training: the --out folder is not even made)."""

from __future__ import annotations

import pytest

from hybridcls.cli import main

# (bench, flags, the error after "hybridcls bench: error: ")
CASES = [
    ("rollup", ["--precisions", "0.9", "1.5"],
     ("--precisions 1.5: expected a probability in (0, 1]: the share of answers right at their "
     "rank that the threshold must reach")),
    ("rollup", ["--precisions", "0"],
     ("--precisions 0: expected a probability in (0, 1]: the share of answers right at their "
     "rank that the threshold must reach")),
    ("rollup", ["--epochs", "0"], "--epochs 0: must be >= 1"),
    ("rollup", ["--seed", "-1"], "--seed -1: expected at least 0"),
    ("quality", ["--epochs", "0"], "--epochs 0: must be >= 1"),
    ("quality", ["--image-size", "8"], "--image-size 8: must be >= 16, or None (the model's)"),
    ("quality", ["--workers", "-1"], "--workers -1: must be >= 0"),
    ("fewshot", ["--k", "-1"], "--k '-1': k must be 0 or more"),
    ("fewshot", ["--draws", "0"], "--draws 0: expected at least 1"),
    ("fewshot", ["--retrain-draws", "0"], "--retrain-draws 0: expected at least 1"),
    ("fewshot", ["--image-size", "4"], "--image-size 4: must be >= 16, or None (the model's)"),
    ("sites", ["--sites", "0"], "--sites 0: expected at least 1"),
    ("sites", ["--sites-per-class", "0"], "--sites-per-class 0: expected at least 1"),
    ("sites", ["--sites", "3", "--sites-per-class", "4"],
     ("--sites-per-class 4: expected at most --sites 3 (each class occurs at that many different "
     "sites)")),
    ("sites", ["--epochs", "-2"], "--epochs -2: must be >= 1"),
    ("speed", ["--images", "0"], "--images 0: expected at least 1"),
    ("speed", ["--threads", "0"], "--threads 0: expected at least 1"),
    ("speed", ["--batch-size", "0"], "--batch-size 0: expected at least 1"),
    ("speed", ["--repeat", "0"], "--repeat 0: expected at least 1"),
    ("speed", ["--cascade-share", "1.5"], "--cascade-share 1.5: expected a share from 0 to 1"),
    ("speed", ["--image-size", "8"], "--image-size 8: must be >= 16, or None (the model's)"),
    ("memory", ["--image-size", "0"], "--image-size 0: expected at least 1"),
    ("memory", ["--batch-size", "0"], "--batch-size 0: expected at least 1"),
    ("memory", ["--workers", "-1"], "--workers -1: must be >= 0"),
]


@pytest.mark.parametrize("bench,flags,expected", CASES, ids=[f"{c[0]}{c[1][0]}" for c in CASES])
def test_a_bad_numeric_flag_is_refused_before_any_work(bench, flags, expected, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", bench, "--out", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"hybridcls bench: error: {expected}"
    assert not out.exists()


@pytest.mark.parametrize(("flags", "expected"), [
    # --quick's sizes, where no flag sets them
    (["--quick"], {"images": 16, "image_size": 64, "sizes": [(160, 120), (640, 480)]}),
    # the flags given win over --quick's sizes, each one
    (["--quick", "--images", "3", "--image-size", "32", "--sizes", "80x60"],
     {"images": 3, "image_size": 32, "sizes": [(80, 60)]}),
    (["--quick", "--image-size", "32"], {"images": 16, "image_size": 32, "sizes": [(160, 120), (640, 480)]}),
    # neither: run_speed's own defaults (nothing passed)
    ([], {}),
])
def test_bench_speed_quick_yields_to_the_flags_given(flags, expected, tmp_path, monkeypatch, capsys):
    """``--quick`` used to replace --images and --image-size given with it, without a word."""
    import hybridcls.bench.speed

    seen = {}

    class Report:
        def __init__(self) -> None:
            self.info: dict = {}

        def markdown(self) -> str:
            return ""

    def fake(out_dir, **kwargs):
        seen.update(kwargs)
        return Report()

    monkeypatch.setattr(hybridcls.bench.speed, "run_speed", fake)
    assert main(["bench", "speed", "--out", str(tmp_path / "out"), *flags]) == 0
    assert {name: seen[name] for name in ("images", "image_size", "sizes") if name in seen} == expected
