"""Where hybridcls keeps what it can rebuild, and how files get there safely.

Small, generic tools shared by everything that writes to disk:

* :func:`default_cache_dir` resolves the cache root (``HYBRIDCLS_CACHE_DIR``,
  else ``$XDG_CACHE_HOME/hybridcls``, else ``~/.cache/hybridcls``);
* :func:`atomic_path` / :func:`atomic_write_bytes` / :func:`atomic_write_text` /
  :func:`atomic_copy` write through a temporary file in the destination
  folder and ``os.replace`` it into place, so a reader (or a second process)
  never sees half a file. Every file hybridcls writes as a whole goes through
  them (safetensors, FAISS indexes, images and plots through
  :func:`atomic_path`); only the prediction files, written and flushed row by
  row (:mod:`hybridcls.outputs`), are streams;
* :func:`json_text` / :func:`atomic_write_json` / :func:`read_json`: the one
  rule for the JSON hybridcls writes: strict JSON, a value that is not a
  finite number (NaN, infinity) written as ``null``;
* :func:`file_fingerprint` and :func:`stable_hash` give content hashes used
  as cache keys; the fingerprints of large files (weights) are kept in
  ``<cache dir>/fingerprints.json``, so that a weights file is hashed once,
  not on every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hybridcls.errors import CheckpointError, ResourceUseWarning

__all__ = [
    "CACHE_DIR_ENV",
    "FINGERPRINT_FILE",
    "FINGERPRINT_PERSIST_BYTES",
    "atomic_copy",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "default_cache_dir",
    "file_fingerprint",
    "json_text",
    "read_json",
    "resolve_cache_dir",
    "stable_hash",
]

CACHE_DIR_ENV = "HYBRIDCLS_CACHE_DIR"

_HASH_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """The folder hybridcls caches into when no ``--cache-dir`` is given.

    Returns:
        ``$HYBRIDCLS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/hybridcls``,
        else ``~/.cache/hybridcls``. The folder is not created here.

    Example:
        >>> default_cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/hybridcls')
    """
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "hybridcls"
    return Path.home() / ".cache" / "hybridcls"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` as a :class:`Path`, or :func:`default_cache_dir` when it is None."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the destination folder (created if needed) so
    the final ``os.replace`` is a rename on one file system, which is atomic:
    readers see the old file or the new one, never a torn write. On an
    exception the temporary file is removed and ``path`` is left untouched.
    The file gets the mode any new file gets (``0o666`` less the umask, so
    ``0o644`` under the usual umask ``022``), not ``tempfile.mkstemp``'s
    ``0o600``, which would leave run files unreadable to the rest of a team.
    Its name is hidden (a leading dot: folder scans skip it) and ends with the
    destination's suffix, so that a writer which picks its format by the name
    (Pillow's ``Image.save``, matplotlib's ``savefig``) picks the right one.

    Args:
        path: Final destination.

    Yields:
        A path in the same folder that the caller writes (e.g. with
        ``safetensors.torch.save_file``).

    Example:
        >>> import pathlib, tempfile
        >>> dest = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_path(dest) as tmp:
        ...     _ = tmp.write_text("hello")
        >>> dest.read_text()
        'hello'
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(dest.parent, f".{dest.name}.", f".tmp{dest.suffix}")
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty file of a fresh name in ``folder``, as ``tempfile.mkstemp`` does, but
    with the mode of any new file: ``os.open`` applies the umask to ``0o666`` itself (reading
    the umask would mean setting it, which races with other threads)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        name = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(name, flags, 0o666))
        except FileExistsError:
            continue
        return name


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        # Without fsync a crash right after the rename can leave an empty file
        # under the final name on some file systems.
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copy the content of file ``src`` to ``dest`` atomically (the mode of a new file, not ``src``'s).

    Raises:
        OSError: ``src`` cannot be read (``dest`` is left as it was).
    """
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _finite(obj: Any) -> Any:
    """``obj`` with every float that is not finite replaced by None (containers copied)."""
    if isinstance(obj, float):  # numpy's float64 included: it subclasses float
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """``obj`` as strict JSON text: NaN and infinities become ``null``.

    Python's ``json`` writes NaN as a bare ``NaN`` token, which strict JSON
    parsers (JavaScript's ``JSON.parse``, ``jq``, most other languages)
    reject; a figure that is not defined (U without unseen images, a gate
    score the cascade skipped) is written as ``null`` instead. Every JSON
    file and line hybridcls writes goes through here.

    Args:
        obj: Dicts, lists, tuples, strings, numbers, booleans and None.
        **kwargs: Passed to :func:`json.dumps` (``indent``, ``ensure_ascii``, ...).

    Raises:
        TypeError: A value JSON cannot represent.

    Example:
        >>> json_text({"U": float("nan"), "S": 0.5})
        '{"U": null, "S": 0.5}'
    """
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` to ``path`` as strict JSON (:func:`json_text`), UTF-8, atomically.

    Text is written as itself (a class name ``élan`` stays readable) unless it
    holds a lone surrogate (the undecodable bytes of a file name), which UTF-8
    cannot encode: then every non-ASCII character is written as a ``\\u``
    escape, which reads back unchanged.
    """
    try:
        data = (json_text(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        data = (json_text(obj, indent=indent) + "\n").encode("ascii")
    atomic_write_bytes(path, data)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file we wrote (:func:`atomic_write_json`).

    Raises:
        CheckpointError: The file is unreadable or not JSON (names the file).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc


#: The file, in the cache folder, that keeps weights files' fingerprints across runs.
FINGERPRINT_FILE = "fingerprints.json"
#: Files at least this large have their fingerprint kept in :data:`FINGERPRINT_FILE`: hashing a
#: smaller one (a prompts file, a config) costs less than reading and writing that file.
FINGERPRINT_PERSIST_BYTES = 16 << 20
# Entries kept in FINGERPRINT_FILE (the most recent): a few models' worth, and a bounded file.
_FINGERPRINT_MAX_ENTRIES = 256
_FINGERPRINT_FORMAT = 1

# (realpath, size, mtime_ns, inode, ctime_ns) -> sha256 hex, per process. Weights files run to
# hundreds of MB and every model load needs their fingerprint for cache keys; hashing once per
# process keeps repeated loads (tests, notebooks, several classifiers) cheap.
_FINGERPRINTS: dict[tuple[str, int, int, int, int], str] = {}
_FINGERPRINT_LOCK = threading.Lock()


def _stat_key(real: str) -> tuple[str, int, int, int, int]:
    """What identifies a file's content without reading it: its path and its stat.

    Size and modification time change when a file is rewritten in place; the
    inode when another file is renamed onto the path (a download, ``rsync``);
    the change time (``ctime``, which no tool can set back) when either
    happens, even through ``cp -p`` or ``touch -r``, which copy a modification time.
    """
    st = os.stat(real)
    return (real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_fingerprints(path: Path) -> list[dict[str, Any]]:
    """The entries of a fingerprint file; an unreadable or foreign one counts as empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(data, dict) or data.get("format") != _FINGERPRINT_FORMAT \
            or not isinstance(data.get("files"), list):
        return []
    return [e for e in data["files"] if isinstance(e, dict)]


def _entry_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(entry.get(k) for k in ("path", "size", "mtime_ns", "inode", "ctime_ns"))


def file_fingerprint(path: str | os.PathLike[str], *,
                     cache_dir: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 of a file's content, as hex; remembered per process and, for large files, on disk.

    Content (not path or mtime) is what identifies weights: the same file
    copied elsewhere keeps its fingerprint, so caches keyed on it survive a
    move, while any change to the bytes changes it. Hashing a 600 MB weights
    file takes seconds, so a file of at least :data:`FINGERPRINT_PERSIST_BYTES`
    has its fingerprint kept in ``<cache_dir>/fingerprints.json`` (strict JSON),
    keyed by its resolved path, size, modification time, inode and change
    time: a later run reads it instead of the file, and a file that was
    rewritten, replaced or touched is hashed again. The file is read only when
    none of these is known; it is hashed between two equal ``stat`` calls, or its
    fingerprint is not kept.

    Args:
        path: File to hash.
        cache_dir: Cache root (None = :func:`default_cache_dir`). An unwritable
            one costs a hash per run, with a warning, never the result.

    Returns:
        64 hex characters.

    Raises:
        OSError: The file cannot be read.

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = f.write_bytes(b"abc")
        >>> file_fingerprint(f)[:16]
        'ba7816bf8f01cfea'
    """
    real = os.path.realpath(path)
    key = _stat_key(real)
    with _FINGERPRINT_LOCK:
        cached = _FINGERPRINTS.get(key)
    if cached is not None:
        return cached
    store = resolve_cache_dir(cache_dir) / FINGERPRINT_FILE if key[1] >= FINGERPRINT_PERSIST_BYTES else None
    entries = _read_fingerprints(store) if store is not None else []
    value = next((e.get("sha256") for e in entries if _entry_key(e) == key), None)
    if not isinstance(value, str) or len(value) != 64:
        value = _sha256_file(real)
        if store is not None and _stat_key(real) == key:
            entry = dict(zip(("path", "size", "mtime_ns", "inode", "ctime_ns"), key), sha256=value)
            # The newest last; a later run's entry for the same file replaces this one.
            kept = [e for e in entries if e.get("path") != real][-(_FINGERPRINT_MAX_ENTRIES - 1):]
            try:
                atomic_write_json(store, {"format": _FINGERPRINT_FORMAT, "files": [*kept, entry]})
            except OSError as exc:
                warnings.warn(f"could not write the fingerprint cache {store}: {exc}",
                              ResourceUseWarning, stacklevel=2)
    with _FINGERPRINT_LOCK:
        _FINGERPRINTS[key] = value
    return value


def stable_hash(obj: Any) -> str:
    """SHA-256 hex of ``obj`` serialised as canonical JSON (sorted keys, no spaces).

    Used for cache keys: equal content gives equal keys across processes and
    Python versions, unlike ``hash()``.

    Example:
        >>> stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
        True
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
