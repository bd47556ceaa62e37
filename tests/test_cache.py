"""cache: atomic writes leave the old file or the new one, with the mode of any new file."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from hybridcls.cache import (
    atomic_copy,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from hybridcls.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


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
        os.chmod(plain, 0o600)
        atomic_copy(plain, tmp_path / "copy.txt")  # the mode of a new file, not the source's
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask  # 0o644 under the usual 022, not mkstemp's 0o600
    written = [tmp_path / n for n in ("a.json", "a.txt", "a.bin", "sub/a.safetensors", "copy.txt")]
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in written} == {
        str(f): oct(expected) for f in written}
    assert (tmp_path / "copy.txt").read_text(encoding="utf-8") == "x"
    # no temporary file left beside them
    assert sorted(f.name for f in tmp_path.rglob("*")) == [
        "a.bin", "a.json", "a.safetensors", "a.txt", "copy.txt", "plain.txt", "sub"]


def test_a_failed_atomic_write_leaves_nothing_and_the_old_file(tmp_path):
    target = tmp_path / "keep.json"
    atomic_write_json(target, {"old": True})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text(encoding="utf-8")) == {"old": True}
    assert [f.name for f in tmp_path.iterdir()] == ["keep.json"]


def test_the_temporary_file_is_hidden_and_keeps_the_suffix_that_picks_the_format(tmp_path):
    # Pillow (and matplotlib) choose the format from the name they are given: the temporary's.
    with atomic_path(tmp_path / "thumb.jpg") as tmp:
        assert tmp.name.startswith(".thumb.jpg.") and tmp.suffix == ".jpg"
        Image.new("RGB", (4, 4)).save(tmp)
    with Image.open(tmp_path / "thumb.jpg") as im:
        assert im.format == "JPEG"


def test_read_json_names_the_file_it_cannot_read(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"config\.json: not readable JSON"):
        read_json(bad)
    with pytest.raises(CheckpointError, match=r"missing\.json: not readable JSON"):
        read_json(tmp_path / "missing.json")


# Calls that write a file, by the name they are called by (the module's own aliases resolved).
# Pillow's Image.save is not among them: its name is shared with our own objects' save().
_WRITERS = {"write_text", "write_bytes", "save_file", "write_index", "savefig", "copyfile",
            "copy2", "copytree", "savez", "savez_compressed", "dump"}
_MODULE_WRITERS = {("torch", "save"), ("np", "save"), ("numpy", "save"), ("shutil", "copy")}
# Files written on purpose without atomic_path: the prediction files, streamed row by row.
_STREAMS = {("hybridcls/outputs.py", "open")}


def _called(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        node = node.func
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)


def _file_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, call)`` of each file write that is neither into an ``atomic_path`` temporary
    nor into a memory buffer."""
    safe = set()  # the names of atomic_path temporaries and of io buffers
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            safe |= {item.optional_vars.id for item in node.items
                     if _called(item.context_expr) == "atomic_path"
                     and isinstance(item.optional_vars, ast.Name)}
        elif isinstance(node, ast.Assign) and _called(node.value) in ("BytesIO", "StringIO"):
            safe |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom):
            aliases |= {a.asname: a.name for a in node.names if a.asname}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = aliases.get(_called(node), _called(node))
        owner = getattr(node.func, "value", None)
        mode = node.args[1] if len(node.args) > 1 else next(
            (k.value for k in node.keywords if k.arg == "mode"), None)
        writes = (name in _WRITERS
                  or (getattr(owner, "id", None), name) in _MODULE_WRITERS
                  or (name == "open" and isinstance(node.func, ast.Name)
                      and not (isinstance(mode, ast.Constant) and set(str(mode.value)) <= set("rbt"))
                      and mode is not None))
        into = {n.id for arg in [*node.args, *(k.value for k in node.keywords)]
                for n in ast.walk(arg) if isinstance(n, ast.Name)}
        if writes and not into & safe:
            found.append((node.lineno, name))
    return found


def test_every_file_written_whole_goes_through_an_atomic_write():
    unsafe, streams = [], set()
    for path in sorted((ROOT / "hybridcls").rglob("*.py")):
        rel = str(path.relative_to(ROOT).as_posix())
        for line, name in _file_writes(ast.parse(path.read_text(encoding="utf-8"))):
            if (rel, name) in _STREAMS:
                streams.add((rel, name))
            else:
                unsafe.append(f"{rel}:{line}: {name}")
    assert streams == _STREAMS  # the scan sees the writes it lets through
    assert unsafe == []


# ------------------------------------------------------------------ weights fingerprints

def _count_hashes(monkeypatch) -> list[str]:
    """Replace the hash function by a counting wrapper; returns the list of hashed paths."""
    import hybridcls.cache as cache_mod

    calls: list[str] = []
    real = cache_mod._sha256_file

    def counting(path: str) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(cache_mod, "_sha256_file", counting)
    monkeypatch.setattr(cache_mod, "_FINGERPRINTS", {})  # a fresh process's memo
    return calls


def test_a_large_file_is_hashed_once_across_processes_and_again_when_it_changes(tmp_path, monkeypatch):
    import hashlib

    import hybridcls.cache as cache_mod
    from hybridcls.cache import FINGERPRINT_FILE, file_fingerprint

    monkeypatch.setattr(cache_mod, "FINGERPRINT_PERSIST_BYTES", 1000)
    weights, cache = tmp_path / "weights.safetensors", tmp_path / "cache"
    weights.write_bytes(b"w" * 2000)
    calls = _count_hashes(monkeypatch)
    first = file_fingerprint(weights, cache_dir=cache)
    assert first == hashlib.sha256(b"w" * 2000).hexdigest()
    assert len(calls) == 1
    stored = json.loads((cache / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    assert [e["sha256"] for e in stored["files"]] == [first]
    assert stored["files"][0]["path"] == os.path.realpath(weights)
    assert stored["files"][0]["size"] == 2000

    monkeypatch.setattr(cache_mod, "_FINGERPRINTS", {})  # a second run: a new process
    assert file_fingerprint(weights, cache_dir=cache) == first
    assert len(calls) == 1  # read from fingerprints.json, not from the file

    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes
    monkeypatch.setattr(cache_mod, "_FINGERPRINTS", {})
    assert file_fingerprint(weights, cache_dir=cache) == first
    assert len(calls) == 2
    weights.write_bytes(b"v" * 2001)  # rewritten: another size
    monkeypatch.setattr(cache_mod, "_FINGERPRINTS", {})
    assert file_fingerprint(weights, cache_dir=cache) == hashlib.sha256(b"v" * 2001).hexdigest()
    assert len(calls) == 3
    stored = json.loads((cache / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    assert len(stored["files"]) == 1  # one entry per file: the newest


def test_a_file_with_the_same_size_and_mtime_but_other_bytes_is_hashed_again(tmp_path, monkeypatch):
    import hybridcls.cache as cache_mod
    from hybridcls.cache import file_fingerprint

    monkeypatch.setattr(cache_mod, "FINGERPRINT_PERSIST_BYTES", 10)
    weights, other, cache = tmp_path / "w.bin", tmp_path / "other.bin", tmp_path / "cache"
    weights.write_bytes(b"a" * 100)
    calls = _count_hashes(monkeypatch)
    before = file_fingerprint(weights, cache_dir=cache)
    other.write_bytes(b"b" * 100)
    st = weights.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))  # as rsync -t or cp -p would leave it
    os.replace(other, weights)
    monkeypatch.setattr(cache_mod, "_FINGERPRINTS", {})
    after = file_fingerprint(weights, cache_dir=cache)
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_size == st.st_size
    assert after != before and len(calls) == 2


def test_small_files_and_broken_or_unwritable_stores_never_change_the_fingerprint(tmp_path, monkeypatch):
    import hashlib

    import hybridcls.cache as cache_mod
    from hybridcls.cache import FINGERPRINT_FILE, file_fingerprint
    from hybridcls.errors import ResourceUseWarning

    monkeypatch.setattr(cache_mod, "FINGERPRINT_PERSIST_BYTES", 50)
    small, big = tmp_path / "prompts.txt", tmp_path / "w.bin"
    small.write_bytes(b"s" * 10)
    big.write_bytes(b"b" * 100)
    cache = tmp_path / "cache"
    assert file_fingerprint(small, cache_dir=cache) == hashlib.sha256(b"s" * 10).hexdigest()
    assert not (cache / FINGERPRINT_FILE).exists()  # below the size that is worth keeping
    cache.mkdir()
    (cache / FINGERPRINT_FILE).write_text("{not json", encoding="utf-8")
    calls = _count_hashes(monkeypatch)
    assert file_fingerprint(big, cache_dir=cache) == hashlib.sha256(b"b" * 100).hexdigest()
    assert len(calls) == 1  # the broken store is replaced, not trusted
    assert json.loads((cache / FINGERPRINT_FILE).read_text(encoding="utf-8"))["format"] == 1
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be", encoding="utf-8")
    monkeypatch.setattr(cache_mod, "_FINGERPRINTS", {})
    with pytest.warns(ResourceUseWarning, match="could not write the fingerprint cache"):
        assert file_fingerprint(big, cache_dir=blocked) == hashlib.sha256(b"b" * 100).hexdigest()
