"""Training on small synthetic worlds with test_convnext: accuracy, balancing, early stopping,
resume, corrupt images, metrics, the checkpoint it leaves; bad input; the command; folds."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefactory import make_unreadable_class
from safetensors.torch import load_file

import hybridcls.train.data
from hybridcls.cli import main
from hybridcls.data import load_image
from hybridcls.errors import (
    CheckpointError,
    DatasetError,
    DataTooSmallError,
    InputError,
    ParameterError,
)
from hybridcls.supervised import build_eval_transform, load_checkpoint
from hybridcls.synth import make_world
from hybridcls.train import (
    FOLDS_FILE,
    METRICS_CSV,
    METRICS_JSON,
    REPORT_FILE,
    BalancedSampler,
    TrainConfig,
    Trainer,
    make_folds,
    resolve_training_data,
    train,
    train_folds,
)

# Small, fast and still learnable: test_convnext from scratch on 32 px images.
FAST = {
    "model": "test_convnext",
    "pretrained": False,
    "image_size": 32,
    "workers": 0,
    "progress": False,
}


def _world(factory, seed: int, classes: int, per_class: tuple[int, int]):
    return make_world(
        factory.mktemp("w") / "world",
        seed=seed,
        n_classes=classes + 1,
        n_unseen=1,
        train_per_class=per_class,
        test_per_class=1,
        image_size=32,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 seen classes, 20 to 30 training images each, 32 px."""
    return _world(tmp_path_factory, 0, 8, (20, 30))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """4 seen classes, 8 to 10 training images each, 32 px."""
    return _world(tmp_path_factory, 1, 4, (8, 10))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    # From scratch, so every stage trains (freezing random layers only slows learning).
    return train(
        world.train_dir, run_dir, epochs=8, batch_size=16, lr=3e-3, dropout=0.2, freeze=None, **FAST
    )


def test_short_run_is_clearly_above_chance(trained):
    chance = 1 / len(trained.classes)  # 8 classes: 12.5%
    assert len(trained.classes) == 8
    assert trained.val_accuracy >= 0.4 > 3 * chance  # 63% when written
    assert trained.epochs_run == 8


def test_run_reports_every_epoch(trained):
    run = trained.run_dir
    records = json.loads((run / METRICS_JSON).read_text())["epochs"]
    assert [r["epoch"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"train_loss", "train_acc", "val_loss", "lr", "images_per_sec", "time_s"} <= set(r)
        assert set(r["val_acc_per_class"]) == set(trained.classes)
    # The cosine schedule decays the learning rate over the run.
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(3e-3) and lrs == sorted(lrs, reverse=True)
    with open(run / METRICS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and f"val_acc/{trained.classes[0]}" in rows[0]
    assert float(rows[-1]["val_acc"]) == pytest.approx(records[-1]["val_acc"])
    report = json.loads((run / REPORT_FILE).read_text())
    assert report["best_epoch"] == trained.best_epoch and report["skipped_images"] == []
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_reproduces_the_reported_validation_accuracy(trained, world):
    model, config = load_checkpoint(trained.run_dir)
    assert config["classes"] == trained.classes == sorted(p.name for p in world.train_dir.iterdir())
    assert config["train"]["epochs"] == 8 and config["weights"]["source"] == "none"
    assert config["data_dir"] == str(world.train_dir)
    val = resolve_training_data(world.train_dir, TrainConfig(**FAST)).val
    assert config["split"] == {"method": "val_split", "fraction": 0.15, "seed": 0,
                               "held_out": sorted(Path(p).relative_to(world.train_dir).as_posix()
                                                  for p, _ in val)}
    transform = build_eval_transform(config)
    images = torch.stack([transform(load_image(path)) for path, _ in val])
    with torch.no_grad():
        preds = model(images).argmax(1).tolist()
    accuracy = sum(p == label for p, (_, label) in zip(preds, val)) / len(val)
    best = next(r for r in trained.history if r["epoch"] == trained.best_epoch)
    assert accuracy == pytest.approx(best["val_acc"]) == pytest.approx(trained.val_accuracy)


def test_balanced_sampler_draws_classes_evenly():
    labels = [0] * 300 + [1] * 60 + [2] * 15  # 20:4:1 imbalance
    sampler = BalancedSampler(labels, "sampler", seed=0)
    sampler.set_epoch(0)
    counts = Counter(labels[i] for i in sampler)
    assert sum(counts.values()) == len(labels)
    assert all(abs(counts[c] - 125) <= 25 for c in range(3)), counts  # 125 each, within 20%

    over = BalancedSampler(labels, "oversample", seed=0)
    over.set_epoch(0)
    drawn = list(over)
    assert Counter(labels[i] for i in drawn) == {0: 300, 1: 300, 2: 300}
    assert len({i for i in drawn if labels[i] == 2}) == 15  # every image of the small class used

    plain = BalancedSampler(labels, "none", seed=0)
    plain.set_epoch(0)
    assert sorted(plain) == list(range(len(labels)))

    # The order depends on the epoch (and only on seed + epoch).
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(0)
    again = BalancedSampler(labels, "sampler", seed=0)
    again.set_epoch(1)
    assert first == list(again) != list(sampler)


def test_early_stopping_stops_and_keeps_the_best_epoch(tiny_world, tmp_path, monkeypatch):
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.4, 0.3])
    best_weights = {}
    original = Trainer._validate

    def scripted(self):
        out = original(self)
        out["val_loss"] = next(losses)
        if self.epoch + 1 == 2:
            best_weights.update({k: v.clone() for k, v in self.model.state_dict().items()})
        return out

    monkeypatch.setattr(Trainer, "_validate", scripted)
    result = train(tiny_world.train_dir, tmp_path / "run", epochs=7, batch_size=8, **FAST)
    assert result.stopped_early and result.epochs_run == 5  # patience 3 after the best epoch 2
    assert result.best_epoch == 2 and result.best_val_loss == 0.5
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(saved[k], best_weights[k]) for k in best_weights)


class _Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_world, tmp_path):
    # MixUp (NumPy RNG), RandAugment (Python RNG), random erasing and dropout (torch RNG),
    # EMA, warmup and the cosine schedule all have to resume exactly.
    options = dict(
        epochs=3,
        batch_size=8,
        mixup=0.4,
        ema=True,
        ema_decay=0.9,
        warmup_epochs=1,
        randaugment="rand-m9-mstd0.5",
        random_erasing=0.25,
        **FAST,
    )
    straight = train(tiny_world.train_dir, tmp_path / "straight", **options)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(tiny_world.train_dir, tmp_path / "resumed", on_epoch_end=stop_after_first, **options)
    assert json.loads((tmp_path / "resumed" / "train_state.json").read_text())["epoch"] == 1
    resumed = train(tiny_world.train_dir, resume=tmp_path / "resumed", workers=0)

    assert resumed.epochs_run == straight.epochs_run == 3
    for name in ("model.safetensors", "train_state.safetensors"):
        a = load_file(tmp_path / "straight" / name)
        b = load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in straight.history]


def test_every_unreadable_file_is_reported_and_none_is_trained_on(tiny_world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_world.train_dir, data)
    first, second, third = sorted(p for p in data.iterdir())[:3]
    good = next(first.glob("*.png")).read_bytes()
    (first / "truncated.png").write_bytes(good[: len(good) // 2])
    (second / "not_an_image.png").write_text("hello")
    (second / "empty.png").write_bytes(b"")
    for i in range(6):
        (third / f"empty_{i}.png").write_bytes(b"")
    planted = {
        str(first / "truncated.png"): "truncated or corrupt image:",
        str(second / "not_an_image.png"): "not an image (unrecognised format)",
        str(second / "empty.png"): "empty file (0 bytes)",
        **{str(third / f"empty_{i}.png"): "empty file (0 bytes)" for i in range(6)},
    }
    # The default balancing draws with replacement, so an epoch leaves some files undrawn:
    # only the check before training can list every unreadable one.
    result = train(data, tmp_path / "run", epochs=1, batch_size=8, val_split=0.3, **FAST)
    skipped = {s["path"]: s["reason"] for s in result.skipped_images}
    assert set(skipped) == set(planted)
    for path, start in planted.items():
        assert skipped[path].startswith(start), (path, skipped[path])
    report = json.loads((tmp_path / "run" / REPORT_FILE).read_text())
    assert {s["path"]: s["reason"] for s in report["skipped_images"]} == skipped
    n_files = len(list(data.rglob("*.png")))
    assert report["num_train_images"] + report["num_val_images"] == n_files - len(planted)
    assert "9 image(s) skipped" in result.summary()


# ---------------------------------------------------------------- bad input, command, folds

FAST_FLAGS = ["--model=test_convnext", "--no-pretrained", "--image-size=32", "--workers=0", "-q"]


@pytest.fixture(scope="module")
def finished_run(tiny_world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(tiny_world.train_dir, run_dir, epochs=1, **FAST)
    return run_dir


@pytest.fixture
def data(tiny_world, tmp_path):
    """A private copy of the world's training folder, to break."""
    return Path(shutil.copytree(tiny_world.train_dir, tmp_path / "data"))


def _no_run(path: Path) -> bool:
    return not (path / "metrics.json").exists() and not (path / "train_state.json").exists()


def test_empty_class_folder(data, tmp_path):
    (data / "zebra").mkdir()
    with pytest.raises(DatasetError, match="empty class folder: .*zebra"):
        train(data, tmp_path / "out", **FAST)
    assert _no_run(tmp_path / "out")


def test_one_class_is_data_too_small_exit_1(data, tmp_path, capsys):
    for folder in sorted(data.iterdir())[1:]:
        shutil.rmtree(folder)
    with pytest.raises(DataTooSmallError, match="at least 2 classes, found 1 in .*data"):
        train(data, tmp_path / "out", **FAST)
    assert _no_run(tmp_path / "out")
    assert _cli(data, "--output", tmp_path / "out", "--epochs", 1, *FAST_FLAGS) == 1
    assert "needs at least 2 classes, found 1 in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_class_name_that_is_not_a_valid_label(data, tmp_path):
    first = min(data.iterdir())
    first.rename(data / "cat ")
    with pytest.raises(DatasetError, match="'.*cat ' is not a valid label"):
        train(data, tmp_path / "out", **FAST)
    assert _no_run(tmp_path / "out")


def test_validation_split_that_leaves_a_class_without_images(data, tmp_path):
    source = next(data.rglob("*.png"))
    lonely = data / "lonely"
    lonely.mkdir()
    shutil.copy(source, lonely / "only.png")
    with pytest.raises(DataTooSmallError, match=r"class 'lonely' .*\(val_split=0\.15\)"):
        train(data, tmp_path / "out", **FAST)
    assert _no_run(tmp_path / "out")


def test_a_class_folder_with_no_readable_image_is_refused_before_anything_is_written(
    data, tmp_path, capsys
):
    target = sorted(data.iterdir())[1]
    shutil.rmtree(target)
    planted = make_unreadable_class(target)
    out = tmp_path / "out"
    assert _cli(data, "--output", out, "--epochs", 1, *FAST_FLAGS) == 2
    err = capsys.readouterr().err
    # train's DATA_DIR is positional: the message names the folder's role, no parameter or flag
    assert (f"error: class folder {target} has no readable image (in the training folder): none "
            "of its 5 files decodes:\n") in err
    for path, reason in planted.items():
        assert f"\n  {path}: {reason}\n" in err
    assert not out.exists()
    with pytest.raises(DatasetError, match=f"class folder {target} has no readable image"):
        make_folds(data, 2, seed=0)
    with pytest.raises(DatasetError, match=f"class folder {target} has no readable image"):
        train(data, out, val_dir=str(data), **FAST)
    assert not out.exists()


def test_a_validation_class_folder_with_no_readable_image_is_refused(tiny_world, tmp_path):
    val = tmp_path / "val"
    first, second = sorted(tiny_world.train_dir.iterdir())[:2]
    (val / first.name).mkdir(parents=True)
    shutil.copy(next(first.glob("*.png")), val / first.name / "ok.png")
    planted = make_unreadable_class(val / second.name)
    with pytest.raises(DatasetError) as info:
        train(tiny_world.train_dir, tmp_path / "out", val_dir=str(val), **FAST)
    lines = str(info.value).splitlines()
    assert lines[0] == (  # the parameter that gave the folder, and its role
        f"val_dir={str(val)!r}: class folder {val / second.name} has no readable image "
        "(in the validation folder): none of its 5 files decodes:"
    )
    assert lines[1:6] == [f"  {path}: {reason}" for path, reason in planted.items()]
    assert not (tmp_path / "out").exists()


def test_a_class_with_too_few_readable_images_for_the_split_is_refused_with_its_counts(
    data, tmp_path
):
    target = min(data.iterdir())
    files = sorted(target.glob("*.png"))
    for path in files[1:]:
        path.write_bytes(b"")
    with pytest.raises(DataTooSmallError) as info:
        train(data, tmp_path / "out", **FAST)
    assert info.value.exit_code == 1
    lines = str(info.value).splitlines()
    assert lines[0] == (
        f"class {target.name!r} has 1 readable image and {len(files) - 1} unreadable files, so "
        "it cannot have both a training and a validation image (val_split=0.15); add images, "
        "or replace its unreadable files:"
    )
    assert lines[1:] == [f"  {path}: empty file (0 bytes)" for path in files[1:]]
    with pytest.raises(DataTooSmallError, match=r"has 1 readable image .* fewer than the k=2 folds"):
        make_folds(data, 2, seed=0)
    assert not (tmp_path / "out").exists()
    # Two readable images: 15% of them rounds to none held out, which is refused with the counts;
    # the split is made of readable images only, so with 50% one lands on each side.
    files[1].write_bytes(files[0].read_bytes())
    with pytest.raises(
        DataTooSmallError,
        match=rf"class {target.name!r} has 2 readable images and {len(files) - 2} unreadable "
        r"files, so it would have no validation image with val_split=0\.15",
    ):
        resolve_training_data(data, TrainConfig(**FAST))
    split = resolve_training_data(data, TrainConfig(val_split=0.5, **FAST))
    label = split.classes.index(target.name)
    train_side = [p for p, y in split.train if y == label]
    val_side = [p for p, y in split.val if y == label]
    assert len(train_side) == len(val_side) == 1
    assert sorted(train_side + val_side) == [str(files[0]), str(files[1])]
    assert list(split.image_check.unreadable) == [str(p) for p in files[2:]]


def test_resume_reuses_the_image_check_while_the_files_are_unchanged(data, tmp_path, monkeypatch):
    bad = min(data.iterdir()) / "bad.png"
    bad.write_bytes(b"")
    run_dir = tmp_path / "run"
    train(data, run_dir, epochs=1, **FAST)
    checked: list[int] = []
    decode_check = hybridcls.train.data.find_unreadable

    def counting(paths, **kwargs):
        checked.append(len(paths))
        return decode_check(paths, **kwargs)

    monkeypatch.setattr(hybridcls.train.data, "find_unreadable", counting)
    result = train(data, resume=run_dir)
    assert checked == []
    assert result.skipped_images == [{"path": str(bad), "reason": "empty file (0 bytes)"}]
    bad.write_text("<html></html>")  # changed since the check: checked again
    result = train(data, resume=run_dir)
    assert checked == [len(list(data.rglob("*.png")))]
    assert result.skipped_images[0] == {
        "path": str(bad), "reason": "not an image (unrecognised format)"
    }


def test_validation_folder_with_a_class_training_lacks(data, tmp_path):
    val = tmp_path / "val"
    source = next(data.rglob("*.png"))
    for name in ("a_new_class", source.parent.name):
        (val / name).mkdir(parents=True)
        shutil.copy(source, val / name / "x.png")
    with pytest.raises(
        DatasetError, match=r"val_dir=.*'a_new_class' is not a class of the training folder"
    ):
        train(data, tmp_path / "out", val_dir=str(val), **FAST)
    assert _no_run(tmp_path / "out")


def test_option_errors_name_the_option(data, tmp_path):
    with pytest.raises(InputError, match="weights='w.safetensors' and pretrained=False exclude"):
        TrainConfig(weights="w.safetensors", pretrained=False)
    with pytest.raises(InputError, match="balance='smote': must be one of sampler, oversample"):
        train(data, tmp_path / "out", balance="smote", **FAST)
    with pytest.raises(ParameterError, match="trainable_stages=9: ConvNeXt has 4 stages; use 0 to 4"):
        train(data, tmp_path / "out", freeze=9, **FAST)
    with pytest.raises(InputError, match="unknown training option"):
        train(data, tmp_path / "out", epochz=3, **FAST)
    assert _no_run(tmp_path / "out")


def _wrong_type(hint) -> object:
    """A value of the wrong type for a TrainConfig annotation, as a config file might hold it."""
    members = set(typing.get_args(hint)) or {hint}
    if str in members:
        return 3  # a number for a name or a path
    if bool in members:
        return "false"  # a string, and a true one
    if typing.get_origin(hint) is tuple:
        return "0.5,1"
    return "3"  # digits as text for a number


def test_every_option_of_the_wrong_type_is_refused_naming_it():
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        wrong = _wrong_type(hints[f.name])
        with pytest.raises(InputError) as info:  # the project's error, not a bare TypeError
            TrainConfig(**{f.name: wrong})
        assert str(info.value).startswith(f"{f.name}={wrong!r}: expected "), f.name
        assert str(info.value).endswith(f", got {type(wrong).__name__}"), f.name
    assert str(pytest.raises(InputError, TrainConfig, freeze="all").value) == (
        "freeze='all': expected a whole number or None, got str")
    assert str(pytest.raises(InputError, TrainConfig, lr=float("nan")).value) == (
        "lr=nan: expected a finite number, got float")
    assert str(pytest.raises(InputError, TrainConfig, epochs=2.0).value) == (
        "epochs=2.0: expected a whole number, got float")


def test_none_spellings_paths_and_numpy_values_are_accepted(tmp_path):
    # "none" is the command line's spelling of None for freeze and patience
    for spelling in ("none", "None"):
        config = TrainConfig().replace(freeze=spelling, patience=spelling)
        assert (config.freeze, config.patience) == (None, None)
    config = TrainConfig(val_dir=tmp_path / "val", crop_scale=[0.5, 1], epochs=np.int64(3),
                         lr=np.float32(0.5))
    assert config.val_dir == str(tmp_path / "val") and config.crop_scale == (0.5, 1.0)
    assert (type(config.epochs), type(config.lr), config.lr) == (int, float, 0.5)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TrainConfig(device=torch.device("cpu")).device == "cpu"


def test_train_takes_none_spelt_as_the_command_line_does(tiny_world, tmp_path):
    # what HybridClassifier(train_options=dict(freeze="none")) hands to train()
    result = train(tiny_world.train_dir, tmp_path / "run", epochs=1, freeze="none",
                   patience="none", **FAST)
    stored = json.loads((result.run_dir / "config.json").read_text())["train"]
    assert (stored["freeze"], stored["patience"]) == (None, None)


def test_a_run_that_diverges_in_its_first_epoch_leaves_no_folder(data, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        train(data, out, lr=1e30, epochs=2, **FAST)
    message = str(info.value)
    assert message.startswith("training diverged in epoch 1 (train loss ")
    assert message.endswith("; nothing was written. Start again with a lower lr (this run: "
                            "lr=1e+30) or with clip_grad=1.0")
    assert not out.exists()
    assert _cli(data, "--output", out, "--lr", "1e30", "--epochs", 1, *FAST_FLAGS) == 2
    assert "training diverged in epoch 1" in capsys.readouterr().err
    assert not out.exists()


def _val_loss_from_epoch(monkeypatch, epoch: int, value: float) -> None:
    """From ``epoch`` (1-based) on, the validation loss is ``value``."""
    validate = Trainer._validate

    def broken(self):
        record = validate(self)
        return {**record, "val_loss": value} if self.epoch + 1 >= epoch else record

    monkeypatch.setattr(Trainer, "_validate", broken)


def test_a_run_that_diverges_later_keeps_the_epochs_before(data, tmp_path, monkeypatch):
    _val_loss_from_epoch(monkeypatch, 2, float("nan"))
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        train(data, out, epochs=3, **FAST)
    assert f"; {out} keeps epoch 1 and its checkpoint, the best before it diverged." in str(
        info.value)
    assert [r["epoch"] for r in json.loads((out / METRICS_JSON).read_text())["epochs"]] == [1]
    assert load_checkpoint(out)[1]["classes"] == sorted(p.name for p in data.iterdir())


def test_output_that_already_holds_a_run(tiny_world, finished_run):
    with pytest.raises(InputError, match="output=.*already holds a training run.*resume="):
        train(tiny_world.train_dir, finished_run, **FAST)


def test_resume_from_a_different_model_or_class_list(tiny_world, data, finished_run):
    state = (finished_run / "train_state.json").read_bytes()
    with pytest.raises(
        CheckpointError,
        match=r"resume='.*': that run was trained with model='test_convnext', not model='test_resnet'",
    ):
        train(tiny_world.train_dir, resume=finished_run, model="test_resnet")
    shutil.rmtree(min(data.iterdir()))
    with pytest.raises(CheckpointError, match=r"resume='.*': .*4 classes, the folder .*data has 3"):
        train(data, resume=finished_run)
    with pytest.raises(CheckpointError, match=re.escape(f"resume={str(data)!r}: no train_state.json")):
        train(tiny_world.train_dir, resume=data)
    assert (finished_run / "train_state.json").read_bytes() == state


def _cli(*args: object) -> int:
    return main(["train", *map(str, args)])


def test_cli_trains_resumes_and_reports_errors(tiny_world, tmp_path, capsys):
    data, run_dir = tiny_world.train_dir, tmp_path / "run"
    assert _cli(data, "--output", run_dir, "--epochs", 1, *FAST_FLAGS) == 0
    out = capsys.readouterr().out
    assert "epoch  1/1  train loss" in out and "best epoch 1/1" in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["name"] == "test_convnext.r160_in1k"

    assert _cli(tmp_path / "missing", "--output", tmp_path / "o2", *FAST_FLAGS) == 2
    assert "training folder not found" in capsys.readouterr().err
    assert _cli(data, "--resume", run_dir, "--lr", 0.1, "-q") == 2
    assert (f"hybridcls train: error: --resume {run_dir}: that run was trained with --lr 0.001, "
            "not --lr 0.1;") in capsys.readouterr().err
    assert _cli(data, *FAST_FLAGS) == 2
    assert "--output RUN_DIR is required" in capsys.readouterr().err


def test_folds_report_mean_and_spread(tiny_world, tmp_path, capsys):
    out, log = tmp_path / "cv", tmp_path / "log.json"
    assert (
        _cli(tiny_world.train_dir, "--output", out, "--folds", 2, "--epochs", 1, *FAST_FLAGS,
             "--log", log) == 0
    )
    # --log counts as a run's: 2 folds of one epoch each, none resumed
    assert json.loads(log.read_text(encoding="utf-8"))["counts"] == {"folds": 2, "epochs": 2, "resumed": 0}
    summary = json.loads((out / FOLDS_FILE).read_text())
    accuracies = [f["val_accuracy"] for f in summary["folds"]]
    assert summary["k"] == 2 and len(accuracies) == 2
    assert summary["mean_val_accuracy"] == pytest.approx(np.mean(accuracies))
    assert summary["std_val_accuracy"] == pytest.approx(np.std(accuracies))
    assert (out / "fold_1" / "model.safetensors").exists()
    assert (out / "fold_2" / "model.safetensors").exists()
    assert "2 folds: val acc" in capsys.readouterr().out


def test_folds_are_stratified_and_partition_the_images(tiny_world):
    folds = make_folds(tiny_world.train_dir, 3, seed=0)
    all_val = [path for fold in folds for path, _ in fold.val]
    assert len(all_val) == len(set(all_val)) == len(folds[0].train) + len(folds[0].val)
    for fold in folds:
        assert {label for _, label in fold.val} == set(range(len(fold.classes)))
        assert not {p for p, _ in fold.val} & {p for p, _ in fold.train}
    with pytest.raises(DataTooSmallError, match="fewer than the k=20 folds .*; lower it or add"):
        make_folds(tiny_world.train_dir, 20, seed=0)
    for k in (1, 2.5, True):
        with pytest.raises(InputError) as info:
            make_folds(tiny_world.train_dir, k, seed=0)
        assert str(info.value) == f"k={k!r}: the number of folds must be a whole number, at least 2"
    with pytest.raises(InputError, match="val_dir='v' does not apply to folds"):
        train_folds(tiny_world.train_dir, "unused", 2, val_dir="v", **FAST)


# ------------------------------------------------------------------ the held-out files a run records


def _held_out(data) -> list[str]:
    return sorted(Path(p).relative_to(data.root).as_posix() for p, _ in data.val)


def test_a_run_records_its_held_out_files_and_reads_them_back_after_the_folder_changed(
        tiny_world, tmp_path):
    from hybridcls.errors import MissingDataWarning

    folder = tmp_path / "data"
    shutil.copytree(tiny_world.train_dir, folder)
    config = TrainConfig(epochs=1, **FAST)
    drawn = resolve_training_data(folder, config)
    train(folder, tmp_path / "run", config=config)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))["split"]
    assert recorded["held_out"] == _held_out(drawn) and recorded["method"] == "val_split"
    # the folder changes: an image added to every class, one held-out file removed
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        shutil.copy(next(cls.iterdir()), cls / "zz_added.png")
    gone = recorded["held_out"][0]
    (folder / gone).unlink()
    redrawn = resolve_training_data(folder, config)
    assert _held_out(redrawn) != [p for p in recorded["held_out"] if p != gone]  # a new draw moves
    broken = Path(drawn.train[0][0]).relative_to(drawn.root).as_posix()  # a training image breaks
    (folder / broken).write_bytes(b"not an image")
    with pytest.warns(MissingDataWarning) as caught:
        read = resolve_training_data(folder, config, recorded_split=recorded)
    assert [str(w.message) for w in caught] == [
        (f"{folder}: 1 of the {len(recorded['held_out'])} images the run held out are missing or "
         f"unreadable now, and are left out: {gone}"),
        f"{folder}: 1 training image(s) cannot be read and are left out: {broken}"]
    assert _held_out(read) == recorded["held_out"][1:]
    assert len(read.train) == len(drawn.train) + len(read.classes) - 1  # the added ones train
    assert not {p for p, _ in read.train} & {p for p, _ in read.val}


def test_a_fold_run_records_the_folds_held_out_files(tiny_world, tmp_path):
    folds = make_folds(tiny_world.train_dir, 2, seed=0)
    train_folds(tiny_world.train_dir, tmp_path / "cv", 2, epochs=1, **FAST)
    for i, fold in enumerate(folds, start=1):
        split = json.loads((tmp_path / "cv" / f"fold_{i}" / "config.json").read_text(encoding="utf-8"))["split"]
        assert split["method"] == "fold" and split["held_out"] == _held_out(fold)
        # calibrate reads the fold's held-out images, not a val_split draw (part of which trained it)
        read = resolve_training_data(tiny_world.train_dir, TrainConfig(**FAST), recorded_split=split)
        assert _held_out(read) == _held_out(fold)
        # a fold run trained before runs recorded their files: its fold is cut again, the same
        old = {key: value for key, value in split.items() if key != "held_out"}
        read = resolve_training_data(tiny_world.train_dir, TrainConfig(**FAST), recorded_split=old)
        assert _held_out(read) == _held_out(fold) and read.split == old


def test_no_recorded_held_out_image_left_is_too_small_data_not_a_crash(tiny_world, tmp_path):
    recorded = {"method": "val_split", "fraction": 0.15, "seed": 0, "held_out": ["gone/1.png", "gone/2.png"]}
    with pytest.warns(Warning), pytest.raises(DataTooSmallError) as info:
        resolve_training_data(tiny_world.train_dir, TrainConfig(**FAST), recorded_split=recorded)
    assert str(info.value) == (
        f"{tiny_world.train_dir}: none of the 2 images the run held out is in the folder now (or "
        "readable), so no held-out image can set the gate's thresholds; give the folder the run "
        "was trained on")


def test_a_validation_folder_is_recorded_absolute(tiny_world, tmp_path, monkeypatch):
    from hybridcls.train.data import split_record

    first = min(p for p in tiny_world.train_dir.iterdir() if p.is_dir())
    shutil.copytree(first, tmp_path / "val" / first.name)
    monkeypatch.chdir(tmp_path)
    data = resolve_training_data(tiny_world.train_dir, TrainConfig(val_dir="val", **FAST))
    assert split_record(data) == {"method": "val_dir", "val_dir": str(tmp_path / "val")}


def test_a_validation_folder_of_one_training_class_is_accepted(tiny_world, tmp_path):
    first = min(p for p in tiny_world.train_dir.iterdir() if p.is_dir())
    shutil.copytree(first, tmp_path / "val" / first.name)
    data = resolve_training_data(tiny_world.train_dir, TrainConfig(val_dir=tmp_path / "val", **FAST))
    labels = {label for _, label in data.val}
    assert labels == {data.classes.index(first.name)} and len(data.val) == len(list(first.iterdir()))


def test_an_interrupted_run_is_said_on_load_and_the_benches_finish_it(tiny_world, tmp_path):
    """A run stopped after epoch 1 of 2 has the best epoch so far in model.safetensors: loading
    it warns, with the call that finishes it; a bench resumes it instead of reusing it."""
    import os

    from hybridcls.bench.quality import train_once
    from hybridcls.errors import HybridclsWarning
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.synth import TINY_CLIP_MODEL_ID
    from hybridcls.train.state import unfinished_training

    options = dict(epochs=2, batch_size=8, device="cpu", **FAST)
    run = tmp_path / "run"

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(tiny_world.train_dir, run, on_epoch_end=stop_after_first, **options)
    assert (run / "model.safetensors").is_file()
    assert unfinished_training(run) == "epoch 1 of 2"
    clf = HybridClassifier(clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None, device="cpu",
                           templates=tiny_world.templates_file, cache_dir=tmp_path / "cache",
                           progress=False)
    with pytest.warns(HybridclsWarning) as caught:
        clf.load_run(run, tiny_world.prompts_file)
    assert [str(w.message) for w in caught if "interrupted" in str(w.message)] == [
        (f"{run}: its training was interrupted after epoch 1 of 2, so its weights are those of its "
         f"best epoch so far; finish it with train(data_dir={os.path.abspath(tiny_world.train_dir)!r}, "
         f"resume={str(run)!r}), then calibrate it again (the gate holds for the weights it was set on)")]

    clf.calibrate(tiny_world.train_dir)  # on the interrupted weights

    train_once(tiny_world.train_dir, run, **options)  # resumed: the second epoch runs
    state = json.loads((run / "train_state.json").read_text(encoding="utf-8"))
    assert (state["epoch"], state["finished"]) == (2, True)
    assert unfinished_training(run) is None
    # the gate calibrated on the first epoch's weights no longer holds, and says so
    from hybridcls.errors import CheckpointError

    resumed = clf.load_run(run, tiny_world.prompts_file)
    with pytest.raises(CheckpointError, match=r"gate.json: calibrated on other weights of this run "
                                              r"\(\w{12}\.\.\.; model.safetensors is now \w{12}\.\.\.: "
                                              r"resumed or trained again since\), so its thresholds do "
                                              r"not hold; calibrate it again"):
        resumed.predict([tiny_world.test_dir])
    assert len(resumed.calibrate(tiny_world.train_dir).predict([tiny_world.test_dir])) > 0
    before = (run / "model.safetensors").stat().st_mtime_ns
    train_once(tiny_world.train_dir, run, **options)  # finished: reused as it is
    assert (run / "model.safetensors").stat().st_mtime_ns == before
    fresh = tmp_path / "fresh"
    train_once(tiny_world.train_dir, fresh, **{**options, "epochs": 1})
    assert unfinished_training(fresh) is None and (fresh / "model.safetensors").is_file()


def test_train_resume_says_the_gate_no_longer_holds(tiny_world, tmp_path, capsys):
    """After a resume that trained, a gate.json in the run was set on the weights before it."""
    run = tmp_path / "run"

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(tiny_world.train_dir, run, on_epoch_end=stop_after_first, epochs=2, batch_size=8, **FAST)
    (run / "gate.json").write_text("{}", encoding="utf-8")  # stands for a calibration of epoch 1
    capsys.readouterr()
    log = tmp_path / "log.json"
    assert main(["train", str(tiny_world.train_dir), "--resume", str(run), "--workers", "0", "-q",
                 "--log", str(log)]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"hybridcls train: {run}/gate.json was calibrated on the weights before this resume and no "
        f"longer holds: run `hybridcls calibrate {run} --prompts FILE`")
    # the record tells a resumed run: its epochs, the one it was resumed after (the run's
    # record of every resume in train_state.json and report.json)
    assert json.loads(log.read_text(encoding="utf-8"))["counts"] == {"epochs": 2, "resumed": 1}
    assert json.loads((run / "train_state.json").read_text(encoding="utf-8"))["resumed_after"] == [1]
    assert json.loads((run / REPORT_FILE).read_text(encoding="utf-8"))["resumed_after"] == [1]
    # a finished run resumes to nothing: its gate still holds, and nothing is said
    assert main(["train", str(tiny_world.train_dir), "--resume", str(run), "--workers", "0", "-q",
                 "--log", str(log)]) == 0
    assert "gate.json" not in capsys.readouterr().err
    # both epochs came from earlier runs; a resume that trained nothing is no resume of the run
    assert json.loads(log.read_text(encoding="utf-8"))["counts"] == {"epochs": 2, "resumed": 2}
    assert json.loads((run / REPORT_FILE).read_text(encoding="utf-8"))["resumed_after"] == [1]
    fresh = tmp_path / "fresh"
    assert main(["train", str(tiny_world.train_dir), "--output", str(fresh), "--epochs", "1",
                 *FAST_FLAGS, "--log", str(log)]) == 0
    assert json.loads(log.read_text(encoding="utf-8"))["counts"] == {"epochs": 1, "resumed": 0}
    assert json.loads((fresh / REPORT_FILE).read_text(encoding="utf-8"))["resumed_after"] == []


def _nan_loss_from_step_3_of_epoch_2(monkeypatch):
    """From the third training step of epoch 2, the loss is NaN (its gradients too): a run that
    diverges there, whatever the machine's floating point."""
    train_epoch = Trainer._train_epoch

    def diverging(self):
        if self.epoch == 1:
            loss_fn, steps = self.train_loss_fn, []

            def broken(logits, targets):
                steps.append(1)
                loss = loss_fn(logits, targets)
                return loss * float("nan") if len(steps) >= 3 else loss

            self.train_loss_fn = broken
        return train_epoch(self)

    monkeypatch.setattr(Trainer, "_train_epoch", diverging)


def test_a_diverged_run_is_recorded_said_on_load_and_refused_by_resume_calibrate_and_the_benches(
        tiny_world, tmp_path, monkeypatch, capsys):
    """Not an interrupted run: train_state.json records where it diverged; loading says so;
    train --resume and the benches refuse to replay the same epoch into the same divergence, and
    calibrate refuses to set a gate on it (the run is to be replaced: a new one trains)."""
    from hybridcls.bench.quality import train_once
    from hybridcls.errors import HybridclsWarning
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.synth import TINY_CLIP_MODEL_ID
    from hybridcls.train.state import diverged_training, load_train_state, unfinished_training

    options = dict(epochs=3, batch_size=8, device="cpu", **FAST)
    run = tmp_path / "run"
    _nan_loss_from_step_3_of_epoch_2(monkeypatch)
    with pytest.raises(InputError) as info:
        train(tiny_world.train_dir, run, **options)
    state = json.loads((run / "train_state.json").read_text(encoding="utf-8"))
    # the state is epoch 1's (the last finite one), its updates counted before epoch 2 began
    assert (state["epoch"], state["finished"]) == (1, False)
    update = state["num_updates"] + 3
    reason = f"train loss nan, not finite from update {update}; val loss nan"
    assert str(info.value) == (
        f"training diverged in epoch 2 ({reason}); {run} keeps epoch 1 and its checkpoint, the best "
        f"before it diverged. Start again with a lower lr (this run: lr=0.001) or with clip_grad=1.0")
    assert state["diverged"] == {"epoch": 2, "update": update, "train_loss": None,
                                 "val_loss": None, "reason": reason, "best_epoch": 1,
                                 "lr": 0.001, "clip_grad": None}
    assert load_train_state(run).info["epoch"] == 1  # still verified: the hashes were rewritten
    assert unfinished_training(run) is None and diverged_training(run).epoch == 2

    refusal = (f"resume={str(run)!r}: that run diverged in epoch 2 ({reason}); resumed, it would "
               f"train epoch 2 again with the same options and random streams and diverge again, "
               f"so it is not resumed. {run} keeps epoch 1 and its checkpoint, the best before it "
               f"diverged: start a new run in another folder (output=RUN_DIR) with a lower lr (this "
               f"run: lr=0.001) or with clip_grad=1.0")
    for recipe in ({}, {"lr": 1e-4}):  # a lower lr is refused as well: a resume keeps the options
        with pytest.raises(CheckpointError) as info:
            train(tiny_world.train_dir, resume=run, **recipe)
        assert str(info.value) == refusal
    capsys.readouterr()
    assert main(["train", str(tiny_world.train_dir), "--resume", str(run), "-q"]) == 2
    assert capsys.readouterr().err == (
        f"hybridcls train: error: --resume {run}: that run diverged in epoch 2 ({reason}); resumed, "
        f"it would train epoch 2 again with the same options and random streams and diverge again, "
        f"so it is not resumed. {run} keeps epoch 1 and its checkpoint, the best before it "
        f"diverged: start a new run in another folder (--output RUN_DIR) with a lower lr (this run: "
        f"--lr 0.001) or with --clip-grad 1.0\n")
    # training into its folder again: not "continue it with --resume", which is refused
    assert main(["train", str(tiny_world.train_dir), "--output", str(run), "-q"]) == 2
    assert capsys.readouterr().err == (
        f"hybridcls train: error: --output {run} already holds a training run; its training "
        f"diverged in epoch 2 ({reason}) (resumed, it would diverge again): choose another folder, "
        f"or delete it, and start again with a lower lr (this run: --lr 0.001) or with --clip-grad "
        f"1.0\n")
    # calibrate refuses it, before any model loads, as predict does for want of a gate; outside
    # train, the new run is said as the command that trains it (a tenth of the lr, clipping at 1)
    def clip_flags(*extra):
        return ["--prompts", str(tiny_world.prompts_file), "--templates", str(tiny_world.templates_file),
                "--clip-model", TINY_CLIP_MODEL_ID, "--cache-dir", str(tmp_path / "cache"), *extra, "-q"]

    not_calibrated = (
        f"{run}: its training diverged in epoch 2 ({reason}), so its weights are those of epoch 1, "
        f"the best before it, and no resume can finish it (it would diverge again): a gate is not "
        f"calibrated on such a run. Instead, train a new run with a lower lr or gradient clipping, "
        f"such as `hybridcls train DATA_DIR --output NEW_DIR --lr 0.0001` or `hybridcls train "
        f"DATA_DIR --output NEW_DIR --clip-grad 1`, then calibrate that one\n")
    capsys.readouterr()
    assert main(["calibrate", str(run), *clip_flags()]) == 2
    assert capsys.readouterr().err == f"hybridcls calibrate: error: {not_calibrated}"
    assert main(["predict", str(tiny_world.train_dir), "--checkpoint", str(run),
                 *clip_flags("-o", str(tmp_path / "p.csv"))]) == 2
    assert capsys.readouterr().err == f"hybridcls predict: error: {not_calibrated}"
    assert not (run / "gate.json").exists() and not (tmp_path / "p.csv").exists()

    with pytest.raises(CheckpointError) as info:
        train_once(tiny_world.train_dir, run, **options)
    assert str(info.value) == (
        f"{run}: its training diverged in epoch 2 ({reason}); a bench neither reports nor resumes "
        f"such a run (resumed, it would diverge again): train a new run with a lower lr or gradient "
        f"clipping, such as train(data_dir=DATA_DIR, output=NEW_DIR, lr=0.0001) or "
        f"train(data_dir=DATA_DIR, output=NEW_DIR, clip_grad=1), or delete the folder and let the "
        f"bench train it again")

    clf = HybridClassifier(clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None, device="cpu",
                           templates=tiny_world.templates_file, cache_dir=tmp_path / "cache",
                           progress=False)
    with pytest.warns(HybridclsWarning) as caught:
        clf.load_run(run, tiny_world.prompts_file)
    said = [str(w.message) for w in caught if str(w.message).startswith(f"{run}: its training")]
    assert said == [(f"{run}: its training diverged in epoch 2 ({reason}), so its weights are "
                     f"those of epoch 1, the best before it; resuming it would diverge again: train "
                     f"a new run with a lower lr or gradient clipping, such as train(data_dir=DATA_DIR, "
                     f"output=NEW_DIR, lr=0.0001) or train(data_dir=DATA_DIR, output=NEW_DIR, "
                     f"clip_grad=1)")]
    # in Python, loading it for predictions warns; calibrating it is refused, the new run as a call
    with pytest.raises(CheckpointError) as info:
        clf.calibrate(tiny_world.train_dir)
    assert str(info.value) == (
        f"{run}: its training diverged in epoch 2 ({reason}), so its weights are those of epoch 1, "
        f"the best before it, and no resume can finish it (it would diverge again): a gate is not "
        f"calibrated on such a run. Instead, train a new run with a lower lr or gradient clipping, "
        f"such as train(data_dir=DATA_DIR, output=NEW_DIR, lr=0.0001) or train(data_dir=DATA_DIR, "
        f"output=NEW_DIR, clip_grad=1), then calibrate that one")
    assert clf.gate_ is None and not (run / "gate.json").exists()


def test_a_divergence_of_the_validation_loss_alone_names_no_update_and_a_clipped_run_a_lower_clip(
        data, tmp_path, monkeypatch):
    _val_loss_from_epoch(monkeypatch, 3, float("inf"))
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        train(data, out, epochs=3, clip_grad=0.5, lr=0.002, **FAST)
    history = json.loads((out / METRICS_JSON).read_text())["epochs"]
    best = min(history, key=lambda r: r["val_loss"])["epoch"]
    diverged = json.loads((out / "train_state.json").read_text(encoding="utf-8"))["diverged"]
    train_loss = diverged["train_loss"]
    assert diverged == {"epoch": 3, "update": None, "train_loss": train_loss, "val_loss": None,
                        "reason": f"train loss {train_loss}; val loss inf", "best_epoch": best,
                        "lr": 0.002, "clip_grad": 0.5}
    assert str(info.value).endswith(
        f"); {out} keeps epochs 1-2 and the checkpoint of epoch {best}, the best before it "
        f"diverged. Start again with a lower lr (this run: lr=0.002) or a lower clip_grad (this "
        f"run: clip_grad=0.5)")
