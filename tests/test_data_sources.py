"""Input expansion: folders, globs, list files; every input once, in a stable order."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import pytest
from imagefactory import make_dir_named_like_image, make_plain

from hybridcls.data import IMAGE_EXTENSIONS, Source, expand_inputs, walk_images
from hybridcls.errors import HybridclsWarning, InputError

# Names the output must carry through untouched.
AWKWARD = ["with space.jpg", "com,ma.png", 'quo"te.png', "it's.png", "café ü 日本.jpg"]

needs_symlinks = pytest.mark.skipif(
    not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symlinks"
)


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _paths(sources: list[Source], root: Path) -> list[str]:
    return [os.path.relpath(s.path, root) for s in sources]


def test_image_extensions_are_the_documented_set() -> None:
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def test_folder_walk_order_filters_and_hidden(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "b.jpg", "A.JPG", "a/z.png", "a/b/c.TIFF", "a-b.webp", "notes.txt", "model.pt",
        ".hidden.jpg", ".cache/x.jpg", "a/.y.png", "d.Jpeg", "e.gif", "f.bmp", "g.tif",
    )  # fmt: skip
    got = _paths(expand_inputs([tmp_path]), tmp_path)
    # Depth first, names in code-point order: "A.JPG" < "a" < "a-b.webp" < "b.jpg".
    expected = [
        "A.JPG",
        "a/b/c.TIFF",
        "a/z.png",
        "a-b.webp",
        "b.jpg",
        "d.Jpeg",
        "e.gif",
        "f.bmp",
        "g.tif",
    ]
    assert got == [p.replace("/", os.sep) for p in expected]
    assert all(s.error is None for s in expand_inputs([tmp_path]))


def test_folder_walk_is_repeatable_and_keeps_given_order(tmp_path: Path) -> None:
    _touch(tmp_path, "one/2.jpg", "one/1.jpg", "two/0.jpg")
    first = expand_inputs([tmp_path / "two", tmp_path / "one"])
    assert _paths(first, tmp_path) == [
        os.path.join("two", "0.jpg"),
        os.path.join("one", "1.jpg"),
        os.path.join("one", "2.jpg"),
    ]
    assert expand_inputs([tmp_path / "two", tmp_path / "one"]) == first


def test_directories_named_like_images_are_walked_not_returned(tmp_path: Path) -> None:
    folder = make_dir_named_like_image(tmp_path)
    got = expand_inputs([tmp_path])
    assert got == [Source(str(folder / "inside.png"))]


def test_awkward_names_come_through_once(tmp_path: Path) -> None:
    names = AWKWARD + ["new\nline.jpg"]
    _touch(tmp_path, *names)
    got = expand_inputs([tmp_path])
    assert sorted(Path(s.path).name for s in got) == sorted(names)
    assert all(s.error is None for s in got)


def test_glob_sorted_recursive_and_no_match(tmp_path: Path) -> None:
    _touch(tmp_path, "b.png", "a.png", "sub/c.png", "sub/d.jpg")
    (tmp_path / "dir.png").mkdir()
    got = expand_inputs([str(tmp_path / "**" / "*.png")])
    assert _paths(got, tmp_path) == ["a.png", "b.png", os.path.join("sub", "c.png")]
    with pytest.raises(InputError, match=r"glob pattern .*\*\.gif.* matched no files"):
        expand_inputs([str(tmp_path / "*.gif")])


def test_existing_path_with_glob_characters_is_a_file(tmp_path: Path) -> None:
    _touch(tmp_path, "shot[1].jpg", "shot1.jpg")
    got = expand_inputs([str(tmp_path / "shot[1].jpg")])
    assert got == [Source(str(tmp_path / "shot[1].jpg"))]


def test_missing_path_and_other_extensions(tmp_path: Path) -> None:
    _touch(tmp_path, "weird.dat")
    got = expand_inputs([tmp_path / "nope.jpg", tmp_path / "weird.dat"])
    assert got == [
        Source(str(tmp_path / "nope.jpg"), error="no such file or directory"),
        Source(str(tmp_path / "weird.dat")),
    ]


def test_empty_folder_is_an_input_error(tmp_path: Path) -> None:
    _touch(tmp_path, "readme.md")
    with pytest.raises(InputError, match="folder contains no image files"):
        expand_inputs([tmp_path])


def test_txt_list_relative_comments_missing_and_directories(tmp_path: Path) -> None:
    _touch(tmp_path, "imgs/a.jpg", "imgs/b c.jpg", "other/z.png", *[f"imgs/{n}" for n in AWKWARD])
    (tmp_path / "imgs" / "folder.jpg").mkdir()
    absolute = tmp_path / "other" / "z.png"
    lines = [
        "# a comment", "", "a.jpg", "  b c.jpg  ", str(absolute), "missing.jpg",
        "folder.jpg", *AWKWARD,
    ]  # fmt: skip
    listing = tmp_path / "imgs" / "list.txt"
    listing.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    got = expand_inputs([listing])
    base = tmp_path / "imgs"
    assert got[:5] == [
        Source(str(base / "a.jpg")),
        Source(str(base / "b c.jpg")),
        Source(str(absolute)),
        Source(str(base / "missing.jpg"), error=f"no such file (listed in {listing} line 6)"),
        Source(str(base / "folder.jpg"), error=f"is a directory (listed in {listing} line 7)"),
    ]
    assert got[5:] == [Source(str(base / n)) for n in AWKWARD]


def test_csv_list_with_quoted_awkward_names(tmp_path: Path) -> None:
    names = AWKWARD + ["new\nline.jpg"]
    _touch(tmp_path, *names)
    listing = tmp_path / "inputs.csv"
    with listing.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "Image_Path"])
        for name in names:
            writer.writerow(["x", name])
        writer.writerow(["x", "gone.jpg"])
    got = expand_inputs([listing])
    assert got[:-1] == [Source(str(tmp_path / n)) for n in names]
    # The newline name spans lines 7-8, so the missing entry starts on line 9.
    assert got[-1] == Source(
        str(tmp_path / "gone.jpg"), error=f"no such file (listed in {listing} line 9)"
    )


def test_csv_without_path_column_names_file_and_columns(tmp_path: Path) -> None:
    listing = tmp_path / "bad.csv"
    listing.write_text("name,label\na.jpg,cat\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        expand_inputs([listing])
    message = str(info.value)
    assert str(listing) in message and "'name', 'label'" in message and "image_path" in message


def test_unreadable_list_files_are_input_errors(tmp_path: Path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(
        InputError, match=r"latin\.txt: list file is not UTF-8 text \(byte 0xe9 at offset 3\)"
    ):
        expand_inputs([latin])
    empty = tmp_path / "empty.lst"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"empty\.lst: list file lists no paths"):
        expand_inputs([empty])


def test_duplicates_appear_once_at_first_occurrence(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg", "b.jpg")
    listing = tmp_path / "l.txt"
    listing.write_text("b.jpg\na.jpg\n", encoding="utf-8")
    a = tmp_path / "a.jpg"
    b = tmp_path / "b.jpg"
    spelled_differently = os.path.join(tmp_path, ".", "a.jpg")  # (pathlib would drop the ".")
    with pytest.warns(HybridclsWarning) as caught:
        got = expand_inputs([a, tmp_path, spelled_differently, listing, a])
    assert got == [Source(str(a)), Source(str(b))]
    # 7 files reached, 2 rows: the 5 left out are counted, and named in the order reached
    assert [str(w.message) for w in caught] == [
        (f"5 inputs name a file given before and are left out (each file is one row): {a} (again), "
        f"{spelled_differently} (same file as {a}), {b} (again), {a} (again), {a} (again)")]


def test_a_file_given_twice_around_an_image_in_memory_is_one_row(tmp_path: Path) -> None:
    import numpy as np

    from hybridcls.data import as_sources

    _touch(tmp_path, "a.jpg")
    a = str(tmp_path / "a.jpg")
    with pytest.warns(HybridclsWarning) as caught:
        got = as_sources([a, np.zeros((4, 4, 3), np.uint8), Source(a)])
    assert [s.path for s in got] == [a, "<image 1>"]
    assert [str(w.message) for w in caught] == [
        f"1 input names a file given before and is left out (each file is one row): {a} (again)"]


def test_an_input_given_twice_is_named_and_counted_beyond_five(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg")
    listing = tmp_path / "l.txt"
    listing.write_text("a.jpg\n" * 7, encoding="utf-8")  # a list file with one line seven times
    a = str(tmp_path / "a.jpg")
    with pytest.warns(HybridclsWarning) as caught:
        assert expand_inputs([listing]) == [Source(a)]
    assert [str(w.message) for w in caught] == [
        "6 inputs name a file given before and are left out (each file is one row): "
        + ", ".join([f"{a} (again)"] * 5) + " and 1 more"]
    with warnings.catch_warnings():  # each file given once: no warning
        warnings.simplefilter("error")
        assert expand_inputs([a]) == [Source(a)]


@needs_symlinks
def test_symlink_loops_do_not_hang_and_links_are_rows(tmp_path: Path) -> None:
    make_plain(tmp_path, "PNG", "real.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "loop").symlink_to("..", target_is_directory=True)
    (tmp_path / "l1.jpg").symlink_to("l2.jpg")
    (tmp_path / "l2.jpg").symlink_to("l1.jpg")
    (tmp_path / "broken.png").symlink_to("nowhere.png")
    (tmp_path / "zalias.png").symlink_to("real.png")  # same file as real.png
    with pytest.warns(HybridclsWarning, match=r"^1 input names a file given before and is left "
                      r"out \(each file is one row\): .*zalias\.png \(same file as .*real\.png\)$"):
        got = expand_inputs([tmp_path])
    assert got == [
        Source(str(tmp_path / "broken.png"), error="broken symbolic link"),
        Source(str(tmp_path / "l1.jpg"), error="symbolic link loop"),
        Source(str(tmp_path / "l2.jpg"), error="symbolic link loop"),
        Source(str(tmp_path / "real.png")),
    ]
    assert walk_images(tmp_path / "sub") == []


def test_unreadable_subfolder_becomes_an_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(tmp_path, "a.jpg", "locked/b.jpg")
    locked = str(tmp_path / "locked")
    real_scandir = os.scandir

    def scandir(path):  # a permission error, even when the tests run as root
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert expand_inputs([tmp_path]) == [
        Source(str(tmp_path / "a.jpg")),
        Source(locked, error="cannot read folder: Permission denied"),
    ]


def test_what_is_no_input_names_the_parameter(tmp_path: Path) -> None:
    """None, a number, bytes or a mapping are refused by name, not iterated into a TypeError."""
    from hybridcls.data import as_sources
    from hybridcls.errors import ParameterError

    accepted = ("expected paths, folders, globs, list files, PIL images, [H, W, 3] uint8 arrays "
                "or [3, H, W] / [N, 3, H, W] tensors, alone or in a list")
    for value, shown in ((None, "None"), (3, "3"), (b"a.jpg", "'<bytes>'"), ({"a.jpg": 1}, "'<dict>'")):
        with pytest.raises(ParameterError) as exc:
            as_sources(value)
        assert str(exc.value) == f"inputs={shown}: {accepted}"
    with pytest.raises(ParameterError, match=r"^test_inputs=None: expected paths"):
        as_sources(None, parameter="test_inputs")
    with pytest.raises(ParameterError, match=r"^inputs='<NoneType at position 1>': expected paths"):
        as_sources(["a.jpg", None])


def test_expand_inputs_takes_one_path_as_one_input(tmp_path: Path) -> None:
    from hybridcls.errors import ParameterError

    _touch(tmp_path, "a.jpg", "b/c.png")
    # a bare string is one input, not one per character
    assert expand_inputs(str(tmp_path)) == expand_inputs([str(tmp_path)])
    assert _paths(expand_inputs(tmp_path), tmp_path) == ["a.jpg", os.path.join("b", "c.png")]
    with pytest.raises(ParameterError, match=r"^inputs=None: expected paths"):
        expand_inputs(None)
    with pytest.raises(ParameterError, match=r"^inputs='<int at position 1>': expected paths, "
                                             r"folders, globs or list files$"):
        expand_inputs([str(tmp_path), 7])
