"""Dataset / loader completeness and order; training-folder scan and split."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from imagefactory import Made, make_all, make_plain
from torchvision.transforms import v2

from hybridcls.data import (
    Batch,
    ImageDataset,
    Sample,
    Source,
    collate,
    expand_inputs,
    make_loader,
    scan_image_folder,
    stratified_split,
)
from hybridcls.errors import DatasetError

# Module level, so worker processes can pickle it under any start method.
TRANSFORM = v2.Compose([v2.PILToTensor(), v2.Resize((8, 8), antialias=True)])


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    return make_all(tmp_path_factory.mktemp("mix"))


@pytest.fixture(scope="module")
def mixed_sources(made: dict[str, Made], tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    missing = tmp_path_factory.mktemp("gone") / "missing.jpg"
    paths = [m.path for m in made.values()] + [missing]
    return expand_inputs(paths)


def _expected_errors(made: dict[str, Made], sources: list[Source]) -> dict[int, str]:
    by_path = {str(m.path): m.reason for m in made.values()}
    return {
        i: by_path.get(s.path) or "no such file or directory"
        for i, s in enumerate(sources)
        if by_path.get(s.path) is not None or s.error is not None
    }


def test_dataset_returns_records_not_exceptions(
    made: dict[str, Made], mixed_sources: list[Source]
) -> None:
    ds = ImageDataset(mixed_sources, TRANSFORM)
    assert len(ds) == len(mixed_sources)
    expected = _expected_errors(made, mixed_sources)
    for i in range(len(ds)):
        sample = ds[i]
        assert sample.index == i
        if i in expected:
            assert sample.image is None and sample.error.startswith(expected[i]), (i, sample.error)
        else:
            assert sample.error is None and sample.image.shape == (3, 8, 8)


def test_collate_keeps_every_index() -> None:
    batch = collate(
        [
            Sample(4, None, "empty file (0 bytes)"),
            Sample(5, torch.ones(3, 2, 2)),
            Sample(6, torch.zeros(3, 2, 2)),
        ]
    )
    assert batch.indices == [4, 5, 6] and batch.ok == [5, 6]
    assert batch.errors == {4: "empty file (0 bytes)"}
    assert torch.equal(batch.images, torch.stack([torch.ones(3, 2, 2), torch.zeros(3, 2, 2)]))
    empty = collate([Sample(0, None, "no such file")])
    assert empty.images.shape == (0,) and empty.ok == [] and empty.errors == {0: "no such file"}


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_every_input_once_in_order(
    made: dict[str, Made], mixed_sources: list[Source], workers: int
) -> None:
    expected = _expected_errors(made, mixed_sources)
    seen: list[int] = []
    ok: list[int] = []
    errors: dict[int, str] = {}
    for batch in make_loader(mixed_sources, TRANSFORM, batch_size=3, workers=workers):
        assert isinstance(batch, Batch)
        assert batch.images.shape[0] == len(batch.ok)
        assert sorted(batch.ok + list(batch.errors)) == batch.indices
        seen += batch.indices
        ok += batch.ok
        errors.update(batch.errors)
    assert seen == list(range(len(mixed_sources)))
    assert set(errors) == set(expected)
    assert all(errors[i].startswith(expected[i]) for i in expected), errors
    assert ok == [i for i in seen if i not in expected]
    assert len(expected) == 6 and len(ok) == len(mixed_sources) - 6 == 15


def test_loader_pins_custom_batches() -> None:
    batch = Batch([0], torch.zeros(1, 3, 2, 2), [0], {})
    if not torch.cuda.is_available():
        pytest.skip("pinning needs a CUDA device")
    assert batch.pin_memory().images.is_pinned()


# ------------------------------------------------------------- training folders


def _class_folder(root: Path, name: str, count: int) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i:02d}.jpg").write_bytes(b"not decoded here")


def test_scan_image_folder_classes_and_samples(tmp_path: Path) -> None:
    _class_folder(tmp_path, "zebra", 2)
    _class_folder(tmp_path, "antelope", 1)
    (tmp_path / "antelope" / "more").mkdir()
    (tmp_path / "antelope" / "more" / "x.png").write_bytes(b"")
    (tmp_path / "antelope" / ".thumbs").mkdir()
    (tmp_path / "antelope" / ".thumbs" / "t.jpg").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("ignored", encoding="utf-8")
    index = scan_image_folder(tmp_path)
    assert index.root == str(tmp_path)
    assert index.classes == ["antelope", "zebra"]
    assert index.samples == [
        (str(tmp_path / "antelope" / "00.jpg"), 0),
        (str(tmp_path / "antelope" / "more" / "x.png"), 0),
        (str(tmp_path / "zebra" / "00.jpg"), 1),
        (str(tmp_path / "zebra" / "01.jpg"), 1),
    ]


def test_scan_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"training folder not found: {tmp_path / 'nope'}"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match="not a folder: .*file .expected the training folder"):
        scan_image_folder(tmp_path / "file")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DatasetError, match=f"no class subfolders in {root}"):
        scan_image_folder(root)
    _class_folder(root, "cat", 2)
    with pytest.raises(DatasetError, match=f"needs at least 2 classes, found 1 in {root}"):
        scan_image_folder(root)
    _class_folder(root, "dog", 0)
    (root / "dog" / "readme.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match=f"empty class folder: {root / 'dog'}"):
        scan_image_folder(root)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (".ipynb_checkpoints", "starts with a dot"),
        ("   ", "empty or only whitespace"),
        (" cat", "leading or trailing whitespace"),
        ("two\nlines", "control character '\\n'"),
        ("tab\there", "control character '\\t'"),
    ],
)
def test_invalid_label_folders(tmp_path: Path, name: str, problem: str) -> None:
    _class_folder(tmp_path, "cat", 2)
    _class_folder(tmp_path, name, 2)
    with pytest.raises(DatasetError) as info:
        scan_image_folder(tmp_path)
    assert repr(os.path.join(str(tmp_path), name)) in str(info.value)
    assert problem in str(info.value)


def test_non_ascii_and_punctuated_labels_are_fine(tmp_path: Path) -> None:
    for name in ["chat, tigré", "o'possum", "犬"]:
        _class_folder(tmp_path, name, 1)
    assert scan_image_folder(tmp_path).classes == sorted(["chat, tigré", "o'possum", "犬"])


def test_stratified_split_keeps_class_mix_and_is_seeded() -> None:
    samples = [(f"a{i}", 0) for i in range(10)] + [(f"b{i}", 1) for i in range(20)]
    train, val = stratified_split(samples, 0.2, seed=3)
    assert sorted(train + val) == sorted(samples) and not set(train) & set(val)
    assert sum(1 for _, y in val if y == 0) == 2 and sum(1 for _, y in val if y == 1) == 4
    assert train == sorted(train, key=samples.index) and val == sorted(val, key=samples.index)
    assert stratified_split(samples, 0.2, seed=3) == (train, val)
    assert stratified_split(samples, 0.2, seed=4) != (train, val)


def test_stratified_split_errors_name_class_and_flag() -> None:
    samples = [(f"a{i}", 0) for i in range(10)] + [("b0", 1)]
    with pytest.raises(DatasetError, match=r"class 'bat' has only 1 image.*--val-split 0\.2"):
        stratified_split(samples, 0.2, seed=0, classes=["ant", "bat"])
    with pytest.raises(DatasetError, match=r"--val-split must be between 0 and 1"):
        stratified_split(samples, 1.0, seed=0)
    # 3 classes, 2 images each: a 10% split cannot give every class a validation image.
    few = [(f"{c}{i}", y) for y, c in enumerate("abc") for i in range(2)]
    with pytest.raises(DatasetError, match=r"--val-split 0\.1"):
        stratified_split(few, 0.1, seed=0, classes=["a", "b", "c"])
    # With 2 images per class and 80% held out, training would lose a class.
    with pytest.raises(DatasetError, match=r"--val-split 0\.8"):
        stratified_split(few, 0.8, seed=0, classes=["a", "b", "c"])


def test_scan_then_dataset_reports_undecodable_training_files(tmp_path: Path) -> None:
    for name in ["cat", "dog"]:
        (tmp_path / name).mkdir()
        make_plain(tmp_path / name, "PNG", "good.png")
        (tmp_path / name / "bad.jpg").write_bytes(b"")
    index = scan_image_folder(tmp_path)
    ds = ImageDataset([Source(p) for p, _ in index.samples], TRANSFORM)
    assert [ds[i].error for i in range(len(ds))] == ["empty file (0 bytes)", None] * 2
