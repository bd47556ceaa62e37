"""cache: atomic writes leave the old file or the new one, with the mode of any new file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hybridcls.cache import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x", encoding="utf-8")  # what any other file written here gets
        atomic_write_json(tmp_path / "a.json", {"n": 1})
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        with atomic_path(tmp_path / "sub" / "a.safetensors") as tmp:
            tmp.write_bytes(b"x")  # as safetensors / FAISS write through the temporary path
        atomic_write_text(tmp_path / "a.txt", "y")  # replacing a file gives it the same mode
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask  # 0o644 under the usual 022, not mkstemp's 0o600
    assert stat.S_IMODE(plain.stat().st_mode) == expected
    written = [tmp_path / n for n in ("a.json", "a.txt", "a.bin", "sub/a.safetensors")]
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in written} == {
        str(f): oct(expected) for f in written}
    # no temporary file left beside them
    assert sorted(f.name for f in tmp_path.rglob("*")) == [
        "a.bin", "a.json", "a.safetensors", "a.txt", "plain.txt", "sub"]


def test_a_failed_atomic_write_leaves_nothing_and_the_old_file(tmp_path):
    target = tmp_path / "keep.json"
    atomic_write_json(target, {"old": True})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text(encoding="utf-8")) == {"old": True}
    assert [f.name for f in tmp_path.iterdir()] == ["keep.json"]
