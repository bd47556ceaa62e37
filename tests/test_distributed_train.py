"""Distributed training: 2 CPU workers on gloo under torchrun against one process.

The runs switch off every source of per-rank randomness (augmentation, dropout)
and BatchNorm (a linear head on test_convnext, which uses LayerNorm): then the
gradient DDP averages over two 8-image halves is the gradient of the 16-image
batch one process takes, and the two runs differ only by float rounding.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from imagefactory import make_unreadable_class
from safetensors.torch import load_file
from train_support import small_world, worker_env

from hybridcls.train import (
    METRICS_JSON,
    REPORT_FILE,
    BalancedSampler,
    TrainConfig,
    resolve_training_data,
    train,
)
from hybridcls.train.config import BALANCE_MODES
from hybridcls.train.distributed import DistributedBalancedSampler, strip_nproc

# Deterministic apart from rounding: no augmentation, no dropout, no BatchNorm.
OPTIONS = {
    "model": "test_convnext",
    "pretrained": False,
    "image_size": 32,
    "workers": 0,
    "progress": False,
    "epochs": 3,
    "batch_size": 16,
    "lr": 3e-3,
    "dropout": 0.0,
    "head": "linear",
    "freeze": None,
    "hflip": 0.0,
    "rotation": 0.0,
    "color_jitter": 0.0,
}
FLAGS = [
    "--model=test_convnext",
    "--no-pretrained",
    "--image-size=32",
    "--workers=0",
    "-q",
    "--epochs=3",
    "--batch-size=16",
    "--lr=3e-3",
    "--dropout=0",
    "--head=linear",
    "--freeze=none",
    "--hflip=0",
    "--rotation=0",
    "--color-jitter=0",
]
RUN_FILES = {
    "config.json",
    "model.safetensors",
    "train_state.json",
    "train_state.safetensors",
    "metrics.csv",
    "metrics.json",
    "report.json",
    "curves.png",
}


def _run(args: list[str], returncode: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=600,
    )
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """5 seen classes, 20 to 30 training images each, 32 px (84 training, 15 validation)."""
    return small_world(tmp_path_factory.mktemp("w"), seed=2, n_seen=5)


@pytest.fixture(scope="module")
def single(world, tmp_path_factory):
    return train(world.train_dir, tmp_path_factory.mktemp("single") / "run", **OPTIONS)


def _max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def test_two_gloo_workers_train_like_one_process(world, single, tmp_path):
    run_dir = tmp_path / "ddp"
    _run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "hybridcls",
            "train",
            str(world.train_dir),
            "--output",
            str(run_dir),
            *FLAGS,
        ]
    )
    report = json.loads((run_dir / REPORT_FILE).read_text())
    n_val = report["num_val_images"]
    assert n_val == len(resolve_training_data(world.train_dir, TrainConfig(**OPTIONS)).val)
    # The band: one validation image. Rounding differences (DDP sums two half-batch
    # gradients) can move a sample that sits on a decision boundary, nothing more.
    assert single.val_accuracy > 1 / 5  # it learned something: 5 classes
    assert abs(report["val_accuracy"] - single.val_accuracy) <= 1 / n_val + 1e-9
    history = json.loads((run_dir / METRICS_JSON).read_text())["epochs"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for ddp, one in zip(history, single.history):
        assert ddp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-3)
        assert ddp["train_loss"] == pytest.approx(one["train_loss"], rel=1e-3)
    assert _max_weight_difference(run_dir, single.run_dir) < 1e-3
    # Rank 0 wrote one set of files; no other rank left a file or a temporary behind.
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]


def test_a_run_interrupted_in_one_process_resumes_on_two(world, single, tmp_path):
    run_dir = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    with pytest.raises(Stop):
        train(world.train_dir, run_dir, on_epoch_end=stop, **OPTIONS)
    proc = _run(
        [
            "-m",
            "hybridcls",
            "train",
            str(world.train_dir),
            "--resume",
            str(run_dir),
            "--nproc",
            "2",
            "-q",
        ]
    )
    # Rank 0 alone prints: one line per resumed epoch, one summary.
    assert proc.stdout.count("best epoch") == 1
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("epoch")] == [
        "2/3",
        "3/3",
    ]
    history = json.loads((run_dir / METRICS_JSON).read_text())["epochs"]
    assert history[0] == single.history[0] | {
        "time_s": history[0]["time_s"],
        "images_per_sec": history[0]["images_per_sec"],
        "train_time_s": history[0]["train_time_s"],
    }
    assert history[-1]["val_loss"] == pytest.approx(single.history[-1]["val_loss"], rel=1e-3)
    assert _max_weight_difference(run_dir, single.run_dir) < 1e-3


def test_a_batch_that_does_not_split_over_the_workers_is_refused(world, tmp_path):
    cmd = ["-m", "hybridcls", "train", str(world.train_dir), "-o", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, *cmd, *FLAGS, "--batch-size=3", "--nproc=2"],
        check=False,
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=600,
    )
    assert proc.returncode == 2
    assert "--batch-size 3: images per step, all processes together, must be a multiple" in (
        proc.stderr
    )
    assert not (tmp_path / "run").exists()


def test_two_workers_share_the_image_check_and_refuse_alike(world, tmp_path):
    data = Path(shutil.copytree(world.train_dir, tmp_path / "data"))
    target = sorted(data.iterdir())[1]
    shutil.rmtree(target)
    planted = make_unreadable_class(target)
    run_dir = tmp_path / "run"
    cmd = ["-m", "hybridcls", "train", str(data), "-o", str(run_dir), *FLAGS, "--nproc=2"]
    proc = _run(cmd, returncode=2)
    # Each worker decoded every other file, so each found some of the five unreadable; both
    # learnt of all five from the other and refused alike, before writing anything.
    header = (f"class folder {target} has no readable image (in the training folder): none of "
              "its 5 files decodes:")
    assert proc.stderr.count(header) == 2
    for path, reason in planted.items():
        assert proc.stderr.count(f"  {path}: {reason}\n") == 2
    assert not run_dir.exists()


def test_two_workers_report_every_unreadable_file(world, tmp_path):
    data = Path(shutil.copytree(world.train_dir, tmp_path / "data"))
    first, third = sorted(data.iterdir())[0:3:2]
    planted = {}
    for i in range(4):
        (first / f"empty_{i}.png").write_bytes(b"")
        planted[str(first / f"empty_{i}.png")] = "empty file (0 bytes)"
    (third / "page.png").write_text("<html>404 not found</html>")
    planted[str(third / "page.png")] = "not an image (unrecognised format)"
    run_dir = tmp_path / "run"
    _run(["-m", "hybridcls", "train", str(data), "-o", str(run_dir), *FLAGS, "--epochs=1",
          "--nproc=2"])
    report = json.loads((run_dir / REPORT_FILE).read_text())
    assert {s["path"]: s["reason"] for s in report["skipped_images"]} == planted
    n_files = len(list(data.rglob("*.png")))
    assert report["num_train_images"] + report["num_val_images"] == n_files - len(planted)


@pytest.mark.parametrize("mode", BALANCE_MODES)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_out_the_single_process_draw(mode, world_size):
    labels = [0] * 7 + [1] * 3 + [2] * 5  # 15 samples, unbalanced
    whole = BalancedSampler(labels, mode, seed=4)
    shares = [DistributedBalancedSampler(labels, mode, 4, r, world_size) for r in range(world_size)]
    for epoch in (0, 1):
        whole.set_epoch(epoch)
        for share in shares:
            share.set_epoch(epoch)
        order = list(whole)
        drawn = [list(share) for share in shares]
        assert len({len(d) for d in drawn}) == 1 == len({len(s) for s in shares})
        assert len(drawn[0]) == len(shares[0])
        # Rank r holds positions r, r+N, ...: interleaved, they give back the one-process
        # draw, padded with its own first indices up to a multiple of N.
        interleaved = [d[i] for i in range(len(drawn[0])) for d in drawn]
        padding = len(interleaved) - len(order)
        assert 0 <= padding < world_size
        assert interleaved == order + order[:padding]
    shares[0].set_epoch(0)
    first = list(shares[0])
    shares[0].set_epoch(1)
    assert list(shares[0]) != first


def test_workers_run_the_command_line_without_nproc():
    assert strip_nproc(["train", "d", "--nproc", "4", "--nproc=2", "-q"]) == ["train", "d", "-q"]
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        DistributedBalancedSampler([0, 1], "none", 0, 2, 2)
