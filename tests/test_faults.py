"""Faults and hostile files: SIGKILL in the middle of an epoch, corrupt checkpoints, failed
writes, a crafted pickle given as weights, a tampered text cache."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinyclip_factory import count_text_encoding
from train_support import REPO_ROOT, small_world, worker_env

from hybridcls.cli import main
from hybridcls.errors import CheckpointError
from hybridcls.supervised import load_checkpoint
from hybridcls.train import METRICS_JSON, train
from hybridcls.train.state import STATE_JSON_FILE, STATE_TENSORS_FILE, load_train_state

# MixUp, EMA, dropout and augmentation all draw random numbers: a resumed run has to
# replay every stream exactly to end on equal weights.
OPTIONS = {
    "model": "test_convnext",
    "pretrained": False,
    "image_size": 32,
    "workers": 0,
    "progress": False,
    "epochs": 3,
    "batch_size": 8,
    "mixup": 0.4,
    "ema": True,
    "ema_decay": 0.9,
}
FLAGS = [
    "--model=test_convnext",
    "--no-pretrained",
    "--image-size=32",
    "--workers=0",
    "--epochs=3",
    "--batch-size=8",
    "--mixup=0.4",
    "--ema",
    "--ema-decay=0.9",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """6 seen classes, 20 to 30 training images each: about 20 steps an epoch."""
    return small_world(tmp_path_factory.mktemp("w"), seed=3, n_seen=6)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """The uninterrupted run."""
    return train(world.train_dir, tmp_path_factory.mktemp("straight") / "run", **OPTIONS)


def _kill_inside_epoch_2(cmd: list[str]) -> None:
    """Start ``cmd``, SIGKILL it as soon as its progress bar shows epoch 2 started."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=worker_env(), cwd=REPO_ROOT
    )
    seen = b""
    deadline = time.monotonic() + 600
    try:
        # The bar of epoch 2 appears after epoch 1's state is saved, before its first step.
        while b"epoch 2/3 train" not in seen:
            assert proc.poll() is None, f"training ended before epoch 2: {seen[-2000:]!r}"
            assert time.monotonic() < deadline, "epoch 2 never started"
            ready, _, _ = select.select([proc.stderr], [], [], 0.5)
            if ready:
                seen += os.read(proc.stderr.fileno(), 65536)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_in_the_middle_of_an_epoch_then_resume_equals_uninterrupted(
    world, straight, tmp_path
):
    run_dir = tmp_path / "run"
    _kill_inside_epoch_2(
        [
            sys.executable,
            "-m",
            "hybridcls",
            "train",
            str(world.train_dir),
            "-o",
            str(run_dir),
            *FLAGS,
        ]
    )
    # Killed inside epoch 2: the last saved state is epoch 1's, complete and loadable.
    assert load_train_state(run_dir).info["epoch"] == 1
    assert len(json.loads((run_dir / METRICS_JSON).read_text())["epochs"]) == 1

    assert main(["train", str(world.train_dir), "--resume", str(run_dir), "-q"]) == 0
    for name in ("model.safetensors", STATE_TENSORS_FILE):
        a, b = load_file(straight.run_dir / name), load_file(run_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    history = json.loads((run_dir / METRICS_JSON).read_text())["epochs"]
    assert [r["val_loss"] for r in history] == [r["val_loss"] for r in straight.history]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _data_offset(path: Path) -> int:
    """An offset inside the tensor data of a safetensors file (past its JSON header)."""
    header = int.from_bytes(path.read_bytes()[:8], "little")
    return 8 + header + (path.stat().st_size - 8 - header) // 2


def _change_a_value(path: Path) -> None:
    info = json.loads(path.read_text())
    info["best_val_loss"] += 1e-9  # one flipped digit: still valid JSON
    path.write_text(json.dumps(info))


@pytest.mark.parametrize(
    ("name", "corrupt", "message"),
    [
        (STATE_TENSORS_FILE, "flip", "train_state.safetensors: corrupt: its SHA-256 differs"),
        (STATE_TENSORS_FILE, "truncate", "train_state.safetensors: not a readable safetensors"),
        (STATE_JSON_FILE, "flip", "train_state.json: corrupt: its content differs"),
        (STATE_JSON_FILE, "truncate", "train_state.json: not readable JSON"),
    ],
)
def test_a_corrupt_resume_state_is_refused_naming_the_file(
    world, straight, tmp_path, name, corrupt, message
):
    run_dir = Path(shutil.copytree(straight.run_dir, tmp_path / "run"))
    path = run_dir / name
    if corrupt == "truncate":
        _truncate(path)
    elif name == STATE_JSON_FILE:
        _change_a_value(path)
    else:
        _flip_byte(path, _data_offset(path))
    with pytest.raises(CheckpointError, match=message):
        load_train_state(run_dir)
    assert main(["train", str(world.train_dir), "--resume", str(run_dir), "-q"]) == 2


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        ("flip", "model.safetensors: corrupt: its SHA-256 differs"),
        ("truncate", "model.safetensors: not a readable safetensors file"),
    ],
)
def test_a_corrupt_model_checkpoint_is_refused_naming_the_file(
    straight, tmp_path, corrupt, message
):
    run_dir = Path(shutil.copytree(straight.run_dir, tmp_path / "run"))
    path = run_dir / "model.safetensors"
    _truncate(path) if corrupt == "truncate" else _flip_byte(path, _data_offset(path))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(run_dir)
    # The untouched copy still loads: the check refuses only what changed.
    load_checkpoint(straight.run_dir)


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(straight, tmp_path, monkeypatch):
    from hybridcls.train.state import save_train_state

    run_dir = Path(shutil.copytree(straight.run_dir, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    state = load_train_state(run_dir)

    def crash(fd):  # the bytes are written, the rename has not happened yet
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="No space left"):
        save_train_state(run_dir, state.tensors, {**state.info, "epoch": 4})
    # Nothing changed, nothing half-written left behind; the run still resumes.
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    monkeypatch.undo()
    assert load_train_state(run_dir).info["epoch"] == 3


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_as_weights_is_refused_and_never_runs(world, tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"stem.0.weight": torch.zeros(1)}, "x": _Payload(marker)}, evil)

    code = main(
        [
            "train",
            str(world.train_dir),
            "-o",
            str(tmp_path / "run"),
            "--model=test_convnext",
            "--weights",
            str(evil),
            "--image-size=32",
            "--workers=0",
            "-q",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"{evil}: refused" in err and "weights_only=True" in err
    assert not marker.exists()
    assert not (tmp_path / "run").exists()

    # The payload is live: plain unpickling, in a throwaway process, does run it.
    script = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run(
        [sys.executable, "-c", script, str(evil)],
        env=worker_env(),
        check=False,
        capture_output=True,
    )
    assert marker.exists()


def test_a_tampered_text_cache_is_rebuilt_not_used(tmp_path, monkeypatch):
    from tinyclip_factory import make_tiny_clip

    from hybridcls.zeroshot import build_text_classifier, load_clip, parse_prompts
    from hybridcls.zeroshot.text_classifier import text_cache_key, text_cache_path

    templates = ["a photo of a {}.", "a drawing of the {}."]
    bundle = load_clip(f"local-dir:{make_tiny_clip(tmp_path / 'clip', seed=0)}")
    fresh = build_text_classifier(bundle, ["cat", "dog"], templates, cache_dir=tmp_path / "c")
    path = text_cache_path(
        tmp_path / "c", text_cache_key(bundle, parse_prompts("cat\ndog"), templates)
    )
    # Change one number of the matrix, keeping the file well formed (header, key, shape).
    _flip_byte(path, _data_offset(path))
    calls = count_text_encoding(monkeypatch)
    again = build_text_classifier(bundle, ["cat", "dog"], templates, cache_dir=tmp_path / "c")
    assert calls, "the tampered cache was used instead of being rebuilt"
    assert torch.equal(again, fresh)
    # The rebuilt file is good again: the next build reads it.
    calls.clear()
    assert torch.equal(
        build_text_classifier(bundle, ["cat", "dog"], templates, cache_dir=tmp_path / "c"), fresh
    )
    assert calls == []


def test_our_files_load_without_any_unpickling(straight, tmp_path, monkeypatch):
    import pickle

    import numpy as np

    from hybridcls.index import EmbeddingIndex

    EmbeddingIndex("flat", meta={"model_id": "m"}).add(
        np.eye(4, dtype=np.float32), labels=[0, 1, 2, 3], paths=list("abcd")).save(tmp_path / "index")

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for target, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(target, name, refuse)
    _model, config = load_checkpoint(straight.run_dir)
    assert config["classes"] == straight.classes
    assert load_train_state(straight.run_dir).info["epoch"] == 3
    index = EmbeddingIndex.load(tmp_path / "index", expect={"model_id": "m"})
    assert index.ntotal == 4 and index.paths == list("abcd")
