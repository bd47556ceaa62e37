"""Dataset / loader completeness and order; training-folder scan and split."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from imagefactory import Made, make_all, make_plain, make_unreadable_class
from sklearn.model_selection import train_test_split
from torchvision.transforms import v2

from hybridcls.data import (
    Batch,
    ImageDataset,
    Sample,
    Source,
    collate,
    drop_unreadable,
    expand_inputs,
    find_unreadable,
    make_loader,
    scan_image_folder,
    stratified_split,
    val_split_range,
)
from hybridcls.errors import DatasetError, DataTooSmallError

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
    with pytest.raises(DataTooSmallError) as info:  # a well-formed folder, too small: exit 1
        scan_image_folder(root)
    assert info.value.exit_code == 1
    assert str(info.value) == (
        f"needs at least 2 classes, found 1 in {root} ('cat'): a classifier tells classes "
        "apart; add a subfolder of images for another class"
    )
    _class_folder(root, "dog", 0)
    (root / "dog" / "readme.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match=f"empty class folder: {root / 'dog'} \\(in the training folder\\)"):
        scan_image_folder(root)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DatasetError, match=r"no class subfolders in .*bare \(the support folder\)"):
        scan_image_folder(tmp_path / "bare", role="support folder")
    # the parameter that gave the folder leads the message (the CLI writes it as the flag)
    with pytest.raises(DatasetError, match=r"^support='.*bare': no class subfolders in .*bare \(the support"):
        scan_image_folder(tmp_path / "bare", role="support folder", parameter="support")
    with pytest.raises(DatasetError, match=r"^val_dir='.*nope': validation folder not found: .*nope$"):
        scan_image_folder(tmp_path / "nope", role="validation folder", parameter="val_dir")


def test_images_beside_the_class_folders_are_named_not_dropped_silently(tmp_path):
    from hybridcls.errors import HybridclsWarning

    root = tmp_path / "root"
    _class_folder(root, "cat", 2)
    _class_folder(root, "dog", 2)
    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (root / name).write_bytes(b"x")
    with pytest.warns(HybridclsWarning) as caught:
        index = scan_image_folder(root)
    assert [str(w.message) for w in caught] == [(
        f"{root}: 2 image file(s) directly in the training folder, outside any class subfolder, "
        "are left out: a.PNG, b.jpg")]
    assert len(index.samples) == 4 and not any("a.PNG" in p or "b.jpg" in p for p, _ in index.samples)


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
    classes = ["a", "b"]
    train, val = stratified_split(samples, 0.2, seed=3, classes=classes)
    assert sorted(train + val) == sorted(samples) and not set(train) & set(val)
    assert sum(1 for _, y in val if y == 0) == 2 and sum(1 for _, y in val if y == 1) == 4
    assert train == sorted(train, key=samples.index) and val == sorted(val, key=samples.index)
    assert stratified_split(samples, 0.2, seed=3, classes=classes) == (train, val)
    assert stratified_split(samples, 0.2, seed=4, classes=classes) != (train, val)


def test_stratified_split_errors_name_class_and_parameter() -> None:
    samples = [(f"a{i}", 0) for i in range(10)] + [("b0", 1)]
    with pytest.raises(DataTooSmallError, match=r"class 'bat' has 1 image, .*\(val_split=0\.2\)"):
        stratified_split(samples, 0.2, seed=0, classes=["ant", "bat"])
    with pytest.raises(DatasetError) as info:
        stratified_split(samples, 1.0, seed=0, classes=["ant", "bat"])
    assert str(info.value) == "val_split=1.0: must be between 0 and 1 (exclusive)"


# 3 classes, 2 images each: ceil(0.1 x 6) = 1 image held out cannot show 3 classes, and
# ceil(0.8 x 6) = 5 held out leaves 1 to train on. A split works from just above 2/6 held out
# (0.34: ceil(2.04) = 3) to 3/6 (0.5: 3 on each side).
FEW = [(f"{c}{i}", y) for y, c in enumerate("abc") for i in range(2)]


def test_split_too_small_for_the_classes_names_val_split_and_what_works() -> None:
    with pytest.raises(DataTooSmallError) as info:
        stratified_split(FEW, 0.1, seed=0, classes=["a", "b", "c"])
    assert info.value.exit_code == 1
    assert str(info.value) == (
        "val_split=0.1 holds out 1 of the 6 images, fewer than the 3 classes: the validation "
        "part needs an image of each class; pass val_split=0.34 or more (up to 0.5), or add images"
    )
    with pytest.raises(DataTooSmallError) as info:
        stratified_split(FEW, 0.8, seed=0, classes=["a", "b", "c"])
    assert str(info.value) == (
        "val_split=0.8 leaves 1 of the 6 images for training, fewer than the 3 classes: the "
        "training part needs an image of each class; pass val_split=0.5 or less (down to 0.34), "
        "or add images"
    )
    # the values the messages suggest work, and the next decimals outside them do not
    for fraction in (0.34, 0.5):
        train, val = stratified_split(FEW, fraction, seed=0, classes=["a", "b", "c"])
        assert sorted({y for _, y in train}) == sorted({y for _, y in val}) == [0, 1, 2]
    for fraction in (0.33, 0.51):
        with pytest.raises(DataTooSmallError):
            stratified_split(FEW, fraction, seed=0, classes=["a", "b", "c"])
    # scikit-learn's own rule agrees on either side of both bounds
    labels = [y for _, y in FEW]
    for fraction, ok in ((0.33, False), (0.34, True), (0.5, True), (0.51, False)):
        try:
            train_test_split(list(range(6)), test_size=fraction, random_state=0, stratify=labels)
        except ValueError:
            assert not ok, fraction
        else:
            assert ok, fraction


def test_the_users_two_class_case_gets_the_projects_message() -> None:
    # 2 classes of 2 images: 15% of 4 rounds up to 1 held out (scikit-learn said "The
    # test_size = 1 should be greater or equal to the number of classes = 2").
    two = [("a0", 0), ("a1", 0), ("b0", 1), ("b1", 1)]
    with pytest.raises(DataTooSmallError) as info:
        stratified_split(two, 0.15, seed=0, classes=["a", "b"])
    assert str(info.value) == (
        "val_split=0.15 holds out 1 of the 4 images, fewer than the 2 classes: the validation "
        "part needs an image of each class; pass val_split=0.26 or more (up to 0.5), or add images"
    )
    assert "test_size" not in str(info.value)


@pytest.mark.parametrize(("n_images", "n_classes"), [(4, 2), (6, 2), (6, 3), (7, 3), (40, 9),
                                                     (1001, 500), (9, 2), (100, 50)])
def test_val_split_range_is_the_tightest_that_works(n_images: int, n_classes: int) -> None:
    low, high = val_split_range(n_images, n_classes)

    def works(fraction: float) -> bool:  # both sides of scikit-learn's split hold n_classes
        held_out = math.ceil(fraction * n_images)
        return n_classes <= held_out <= n_images - n_classes

    assert works(low) and works(high) and low <= high
    step = 10 ** -len(repr(low).split(".")[1])  # the next value of as many decimals
    assert not works(low - step)
    step = 10 ** -len(repr(high).split(".")[1])
    assert not works(high + step)
    assert val_split_range(2 * n_classes - 1, n_classes) is None


def test_scan_then_dataset_reports_undecodable_training_files(tmp_path: Path) -> None:
    for name in ["cat", "dog"]:
        (tmp_path / name).mkdir()
        make_plain(tmp_path / name, "PNG", "good.png")
        (tmp_path / name / "bad.jpg").write_bytes(b"")
    index = scan_image_folder(tmp_path)
    ds = ImageDataset([Source(p) for p, _ in index.samples], TRANSFORM)
    assert [ds[i].error for i in range(len(ds))] == ["empty file (0 bytes)", None] * 2


def test_find_unreadable_gives_the_reasons_of_a_full_decode(
    made: dict[str, Made], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [str(m.path) for m in made.values()] + [str(tmp_path / "missing.jpg")]
    found = find_unreadable(paths, progress=True)
    # The reasons the prediction path (ImageDataset: a full decode) gives, file by file.
    ds = ImageDataset([Source(p) for p in paths], TRANSFORM)
    expected = {p: ds[i].error for i, p in enumerate(paths) if ds[i].error is not None}
    assert found == expected
    assert list(found) == [p for p in paths if p in expected]  # in input order
    bad = {str(m.path): m.reason for m in made.values() if m.reason is not None}
    assert set(found) == set(bad) | {str(tmp_path / "missing.jpg")}
    for path, start in bad.items():
        assert found[path].startswith(start), (path, found[path])
    assert "checking images" in capsys.readouterr().err
    # Two worker processes find the same, and progress=False prints nothing.
    assert find_unreadable(paths, workers=2) == expected
    assert capsys.readouterr().err == ""


def test_a_class_folder_with_no_readable_image_is_refused_listing_its_files(
    tmp_path: Path,
) -> None:
    for name in ("blue_square", "red_circle"):
        (tmp_path / name).mkdir()
        make_plain(tmp_path / name, "PNG", "good.png")
    planted = make_unreadable_class(tmp_path / "green_triangle")
    index = scan_image_folder(tmp_path)
    with pytest.raises(DatasetError) as info:
        drop_unreadable(index, find_unreadable([p for p, _ in index.samples]))
    assert info.value.exit_code == 2 and not isinstance(info.value, DataTooSmallError)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        f"class folder {tmp_path / 'green_triangle'} has no readable image (in the training "
        "folder): none of its 5 files decodes:"
    )
    assert lines[1:6] == [f"  {path}: {reason}" for path, reason in planted.items()]
    assert lines[6] == "replace or remove the unreadable files, or remove the class folder"


def test_drop_unreadable_keeps_the_readable_files_and_records_the_others(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        make_plain(tmp_path / name, "PNG", "good.png")
    (tmp_path / "dog" / "bad.jpg").write_bytes(b"")
    index = drop_unreadable(scan_image_folder(tmp_path), {str(tmp_path / "dog" / "bad.jpg"): "r"})
    assert index.samples == [(str(tmp_path / "cat" / "good.png"), 0),
                             (str(tmp_path / "dog" / "good.png"), 1)]
    assert index.unreadable == [(str(tmp_path / "dog" / "bad.jpg"), 1, "r")]


def test_split_errors_count_and_list_a_class_unreadable_files() -> None:
    samples = [(f"a{i}", 0) for i in range(10)] + [("b0", 1)]
    unreadable = [("b1", 1, "empty file (0 bytes)"), ("b2", 1, "not an image (unrecognised format)")]
    with pytest.raises(DataTooSmallError) as info:
        stratified_split(samples, 0.2, seed=0, classes=["ant", "bat"], unreadable=unreadable)
    assert info.value.exit_code == 1
    assert str(info.value).splitlines() == [
        (
            "class 'bat' has 1 readable image and 2 unreadable files, so it cannot have both a "
            "training and a validation image (val_split=0.2); add images, or replace its "
            "unreadable files:"
        ),
        "  b1: empty file (0 bytes)",
        "  b2: not an image (unrecognised format)",
    ]
    # 20, 20 and 2 readable images: a 10% split holds out 5, shared 2.4 / 2.4 / 0.2 by class
    # and rounded, so none of class 'c'.
    skewed = [(f"{c}{i}", y) for y, (c, n) in enumerate([("a", 20), ("b", 20), ("c", 2)])
              for i in range(n)]
    with pytest.raises(DataTooSmallError) as info:
        stratified_split(skewed, 0.1, seed=0, classes=["a", "b", "c"],
                         unreadable=[("c9", 2, "empty file (0 bytes)")])
    assert str(info.value).splitlines()[0] == (
        "class 'c' has 2 readable images and 1 unreadable file, so it would have no validation "
        "image with val_split=0.1; raise it or add images, or replace its unreadable file:"
    )


def test_a_long_list_of_unreadable_files_is_cut_and_the_rest_counted_by_reason(
    tmp_path: Path,
) -> None:
    (tmp_path / "cat").mkdir()
    make_plain(tmp_path / "cat", "PNG", "good.png")
    (tmp_path / "dog").mkdir()
    for i in range(24):
        (tmp_path / "dog" / f"{i:02d}.jpg").write_bytes(b"" if i % 3 else b"<html>")
    index = scan_image_folder(tmp_path)
    with pytest.raises(DatasetError) as info:
        drop_unreadable(index, find_unreadable([p for p, _ in index.samples]))
    lines = str(info.value).splitlines()
    assert lines[0].endswith("none of its 24 files decodes:")
    assert lines[1] == f"  {tmp_path / 'dog' / '00.jpg'}: not an image (unrecognised format)"
    assert lines[20] == f"  {tmp_path / 'dog' / '19.jpg'}: empty file (0 bytes)"
    # 20..23: 21 (a multiple of 3) is not an image, the others are empty.
    assert lines[21] == (
        "  ... and 4 more: 3 x empty file (0 bytes), 1 x not an image (unrecognised format)"
    )
