"""Embedding files: every input's CLIP (and backbone) embedding with its path, for numpy and pandas.

:func:`embedding_rows` runs the inference engine (the one path ``predict``
and the classifiers' ``extract_features`` run) with the CLIP tower on every
image and keeps, per input, the engine's L2-normalised CLIP embedding
(``BranchOutputs.clip_embeddings``) and, with a trained run, the backbone's
pooled features (``BranchOutputs.sup_features``). :func:`write_embeddings`
writes them to a file that numpy and pandas read without unpickling:

``.npz`` (``np.load(path, allow_pickle=False)``)
    ``path`` ``[N]`` fixed-width unicode, ``error`` ``[N]`` unicode (``""`` for an
    embedded input), ``clip_embedding`` ``[N, D]`` float32 and, with a run,
    ``backbone_embedding`` ``[N, F]`` float32.
``.parquet`` (``pandas.read_parquet``; needs pyarrow, ``pip install 'hybridcls[parquet]'``)
    the same columns: ``path`` and ``error`` strings (``error`` null for an
    embedded input), the embeddings fixed-size lists of float32.

Every input has exactly one row, in input order; an input that cannot be read
keeps its row, with the reason in ``error`` and NaN embeddings. When no input
at all could be read, the embedding arrays have width 0.

Streaming and resumable through the prediction files' own machinery
(:func:`hybridcls.sharding.predict_to_output`): the rows go, flushed per
batch, into a JSON Lines file beside the output (:func:`partial_path`, the
embeddings base64-encoded little-endian float32, so they come back exactly)
with its manifest, which ``resume=True`` continues after a crash and which
torchrun ranks write their parts of. Once every input has its row, that file
is converted in one pass into the output (written atomically) and removed;
its manifest stays beside the output (``out.npz.manifest.json``), with the run's
record (:mod:`hybridcls.provenance`; :func:`embedding_models` names the towers).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from hybridcls.cache import atomic_path
from hybridcls.errors import MissingExtraError, ParameterError
from hybridcls.outputs import PredictionRow, output_key
from hybridcls.provenance import RunRecord
from hybridcls.sharding import Manifest, manifest_path, predict_to_output

if TYPE_CHECKING:  # typing only: writing a file needs no model
    from hybridcls.data.sources import Source
    from hybridcls.engine import InferenceEngine
    from hybridcls.runtime import RuntimeSettings

__all__ = [
    "BACKBONE_EMBEDDING",
    "CLIP_EMBEDDING",
    "EMBEDDING_FORMATS",
    "ERROR",
    "PATH",
    "EmbedSummary",
    "embedding_columns",
    "embedding_engine",
    "embedding_format",
    "embedding_models",
    "embedding_rows",
    "partial_path",
    "write_embeddings",
]

EMBEDDING_FORMATS = ("npz", "parquet")
#: The arrays (npz) and columns (Parquet) of an embedding file.
PATH, ERROR, CLIP_EMBEDDING, BACKBONE_EMBEDDING = "path", "error", "clip_embedding", "backbone_embedding"
#: Beside ``out.npz`` while it is being written: ``out.npz.partial.jsonl`` (and its manifest).
PARTIAL_SUFFIX = ".partial.jsonl"
#: Rows per chunk when the partial file is converted (bounded memory whatever N is).
_CHUNK = 8192
_FLOAT = np.dtype("<f4")


def embedding_format(output: str | os.PathLike[str]) -> str:
    """``"npz"`` or ``"parquet"``, from the output's extension.

    Raises:
        ParameterError: Another extension (names ``output``).

    Example:
        >>> embedding_format("emb/photos.parquet")
        'parquet'
    """
    suffix = Path(output).suffix.lower().lstrip(".")
    if suffix not in EMBEDDING_FORMATS:
        raise ParameterError("output", os.fspath(output),
                             "expected a file ending in .npz (numpy) or .parquet (pandas, pyarrow)")
    return suffix


def partial_path(output: str | os.PathLike[str]) -> Path:
    """Where the rows of ``output`` stream to until every input has one (``out.npz.partial.jsonl``)."""
    return Path(os.fspath(output) + PARTIAL_SUFFIX)


def embedding_columns(backbone: bool) -> tuple[str, ...]:
    """The embedding columns of a file: CLIP's, and the backbone's with a trained run."""
    return (CLIP_EMBEDDING, BACKBONE_EMBEDDING) if backbone else (CLIP_EMBEDDING,)


def _require_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # the submodule the writer uses
    except ImportError:
        raise MissingExtraError("a .parquet embedding file (or write .npz, which needs nothing more)",
                                "pyarrow", "parquet") from None
    return pyarrow


def _encode(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype=_FLOAT).tobytes()).decode("ascii")


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=_FLOAT)


def embedding_engine(clip_model: str, clip_pretrained: str | None,
                     checkpoint: str | os.PathLike[str] | None = None, *,
                     settings: RuntimeSettings | None = None) -> InferenceEngine:
    """The inference engine over the CLIP image tower and, with a run, its supervised model.

    The towers are those :class:`~hybridcls.HybridClassifier` loads (the run's
    checkpoint with timm's view of its data config; the CLIP model as
    :class:`~hybridcls.zeroshot.ClipTower` loads it, offline first), without
    prompts or gate: their embeddings are the classifiers' ``extract_features``.

    Args:
        clip_model: A built-in open_clip name, ``hf-hub:ORG/REPO`` or ``local-dir:DIR``.
        clip_pretrained: Its pretrained tag or weights file (``None``: random weights).
        checkpoint: A run directory from ``hybridcls train`` (``None``: CLIP only).
        settings: Device, batch size, workers, precision... (default: the defaults).

    Raises:
        WeightsUnavailableError: The CLIP weights cannot be had offline.
        CheckpointError: A missing or corrupt run.
    """
    # the models (torch, timm, open_clip) are imported when an engine is built
    from hybridcls.device import resolve_device
    from hybridcls.engine import InferenceEngine, timm_view
    from hybridcls.runtime import RuntimeSettings
    from hybridcls.supervised.checkpoint import load_checkpoint
    from hybridcls.zeroshot.tower import ClipTower

    settings = settings or RuntimeSettings()
    device = resolve_device(settings.device)
    model = config = None
    if checkpoint is not None:
        model, config = load_checkpoint(checkpoint, device, parameter="checkpoint")
    tower = ClipTower.image_only(clip_model, clip_pretrained, device=device,
                                 cache_dir=settings.cache_dir)
    return InferenceEngine(supervised=model, sup_view=None if config is None else
                           timm_view(config["data_config"]), clip=tower, settings=settings)


def embedding_models(engine: InferenceEngine, checkpoint: str | os.PathLike[str] | None = None
                     ) -> dict[str, Any]:
    """Which models embed, as a run record's ``models`` names them.

    Args:
        engine: An engine from :func:`embedding_engine`.
        checkpoint: The run directory its supervised tower came from (``None``: CLIP only).

    Returns:
        ``{"supervised": {"model_id", "fingerprint", "weights"} or None, "clip": {"model_id",
        "fingerprint", "pretrained"}}``, as in :meth:`~hybridcls.predictor.Predictor.model_identity`
        (no gate, no class texts: an embedding has neither).
    """
    from hybridcls.supervised.checkpoint import checkpoint_identity, read_checkpoint_config

    supervised = None if checkpoint is None else checkpoint_identity(
        checkpoint, read_checkpoint_config(checkpoint, parameter="checkpoint"))
    return {"supervised": supervised, "clip": engine.clip.bundle.identity()}


def embedding_rows(engine: InferenceEngine, sources: Sequence[Source], *,
                   progress: bool | None = None) -> Iterator[list[PredictionRow]]:
    """The engine's embeddings of ``sources`` as rows of a partial file, one list per batch.

    Args:
        engine: An :class:`~hybridcls.engine.InferenceEngine` with a CLIP tower (and, for
            backbone embeddings, a supervised tower).
        sources: The inputs, in order.
        progress: Show a progress bar (default: the engine's settings).

    Yields:
        One row per input of the batch, in order: ``extra`` holds the base64 float32
        embeddings (:func:`embedding_columns`); an input that cannot be read is an error row.
    """
    paths = [s.path for s in sources]
    for batch in engine.iter_batches(sources, clip="all", progress=progress, desc="embed"):
        pos = {idx: j for j, idx in enumerate(batch.ok)}
        out = batch.outputs
        rows = []
        for idx in batch.indices:
            if idx not in pos:
                rows.append(PredictionRow.failed(paths[idx], batch.errors.get(idx, "not embedded")))
                continue
            j = pos[idx]
            extra = {CLIP_EMBEDDING: _encode(out.clip_embeddings[j])}
            if out.sup_features is not None:
                extra[BACKBONE_EMBEDDING] = _encode(out.sup_features[j])
            rows.append(PredictionRow(paths[idx], extra=extra))
        yield rows


@dataclass
class EmbedSummary:
    """What :func:`write_embeddings` wrote: counts of embedded inputs and error rows."""

    n_ok: int
    n_error: int
    resumed: int
    rank: int = 0


def write_embeddings(
    embed_rows: Callable[[Sequence[Source]], Iterable[Sequence[PredictionRow]]],
    sources: Sequence[Source],
    output: str | os.PathLike[str],
    *,
    backbone: bool,
    settings: dict[str, Any],
    resume: bool = False,
    record: RunRecord | None = None,
) -> EmbedSummary:
    """Stream the rows of ``sources`` into the partial file, then convert it into ``output``.

    Args:
        embed_rows: Sources -> rows per batch (:func:`embedding_rows` with a loaded engine);
            called only when something is left to embed, so a finished partial file
            loads no model.
        sources: Every input, in order.
        output: A ``.npz`` or ``.parquet`` file.
        backbone: Whether the rows carry backbone embeddings.
        settings: What changes the rows (models, weights' fingerprints, precision); a
            resumed partial file must have been written with the same.
        resume: Keep the rows of an interrupted run's partial file and embed the rest.
        record: The run's :class:`~hybridcls.provenance.RunRecord` (``models`` and ``runtime``
            set by ``embed_rows`` once the engine loads: :func:`embedding_models`), written
            into the partial file's manifest like ``predict``'s, then finished with the
            counts (``embedded``, ``failed``, ``resumed``) into the manifest that stays
            beside ``output``.

    Returns:
        The counts; ``resumed`` rows were already in the partial file.

    Raises:
        ParameterError: ``output`` is neither ``.npz`` nor ``.parquet``.
        MissingExtraError: ``.parquet`` without pyarrow (before anything is computed).
        InputError: ``resume=True`` on a partial file of other settings or inputs.

    Example:
        >>> write_embeddings(lambda todo: embedding_rows(engine, todo), sources,  # doctest: +SKIP
        ...                  "emb.npz", backbone=False, settings={"clip_model": "ViT-B-32"})
    """
    fmt = embedding_format(output)
    if fmt == "parquet":
        _require_pyarrow()
    partial = partial_path(output)
    summary = predict_to_output(embed_rows, sources, partial, fmt="jsonl", topk=0,
                                extra_columns=embedding_columns(backbone), settings=settings,
                                resume=resume, record=record)
    if summary.rank != 0:
        return EmbedSummary(summary.n_ok, summary.n_error, summary.resumed, summary.rank)
    columns = embedding_columns(backbone)
    if fmt == "npz":
        _partial_to_npz(partial, output, columns)
    else:
        _partial_to_parquet(partial, output, columns)
    done = Manifest.read(partial)  # under torchrun, with the ranks' records (``parts``)
    if record is not None:
        record.finish(embedded=summary.n_ok, failed=summary.n_error, resumed=summary.resumed)
        done.record = {**done.record, **record.as_dict()}
    dataclasses.replace(done, format=fmt, columns=[PATH, ERROR, *columns]).write(output)
    partial.unlink()
    manifest_path(partial).unlink(missing_ok=True)
    return EmbedSummary(summary.n_ok, summary.n_error, summary.resumed)


# ---------------------------------------------------------------------------- conversion


def _records(partial: Path) -> Iterator[dict[str, Any]]:
    # split on "\n" only (newline=""): a path may hold U+2028, which JSON writes unescaped
    with open(partial, encoding="utf-8", newline="") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _widths(partial: Path, columns: Sequence[str]) -> dict[str, int]:
    """Each embedding column's width: the first embedded row's (0 when no input was embedded)."""
    for rec in _records(partial):
        if rec.get("status") == "ok":
            return {c: _decode(rec[c]).size for c in columns}
    return dict.fromkeys(columns, 0)


def _row_vectors(rec: dict[str, Any], columns: Sequence[str], widths: dict[str, int]
                 ) -> dict[str, np.ndarray]:
    if rec.get("status") == "ok":
        return {c: _decode(rec[c]) for c in columns}
    return {c: np.full(widths[c], np.nan, dtype=_FLOAT) for c in columns}


def _npy_header(fh: IO[bytes], dtype: np.dtype, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})


def _partial_to_npz(partial: Path, output: str | os.PathLike[str], columns: Sequence[str]) -> None:
    """One pass over the partial file: paths and errors kept (as the input list is), each
    embedding column streamed to a scratch file, then every array written into the zip
    as ``.npy`` (what ``np.savez`` writes), header first, in chunks."""
    widths = _widths(partial, columns)
    paths: list[str] = []
    errors: list[str] = []
    with ExitStack() as stack:
        scratch = {c: stack.enter_context(tempfile.TemporaryFile(dir=Path(output).parent or None))
                   for c in columns}
        for rec in _records(partial):
            paths.append(rec["path"])
            errors.append(rec.get("error") or "")
            for c, vector in _row_vectors(rec, columns, widths).items():
                scratch[c].write(vector.tobytes())
        n = len(paths)
        with atomic_path(output) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED,
                                                         allowZip64=True) as zf:
            for name, texts in ((PATH, paths), (ERROR, errors)):
                dtype = np.dtype(f"<U{max([1, *map(len, texts)])}")
                with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    _npy_header(fh, dtype, (n,))
                    for i in range(0, n, _CHUNK):
                        fh.write(np.asarray(texts[i:i + _CHUNK], dtype=dtype).tobytes())
            for c in columns:
                with zf.open(f"{c}.npy", "w", force_zip64=True) as fh:
                    _npy_header(fh, _FLOAT, (n, widths[c]))
                    scratch[c].seek(0)
                    shutil.copyfileobj(scratch[c], fh, 1 << 20)


def _partial_to_parquet(partial: Path, output: str | os.PathLike[str], columns: Sequence[str]) -> None:
    """One pass over the partial file, one Parquet row group per chunk of rows."""
    pa = _require_pyarrow()
    import pyarrow.parquet as pq

    widths = _widths(partial, columns)
    schema = pa.schema([(PATH, pa.string()), (ERROR, pa.string()),
                        *((c, pa.list_(pa.float32(), widths[c])) for c in columns)])

    def table(chunk: list[dict[str, Any]]) -> Any:
        # Parquet strings are UTF-8: an undecodable file name's bytes are written as
        # backslash escapes, as CSV predictions write them
        vectors = [_row_vectors(rec, columns, widths) for rec in chunk]
        arrays = [pa.array([output_key(rec["path"], "csv") for rec in chunk], pa.string()),
                  pa.array([output_key(rec["error"], "csv") if rec.get("error") else None
                            for rec in chunk], pa.string())]
        for c in columns:
            flat = np.concatenate([v[c] for v in vectors]) if chunk else np.zeros(0, _FLOAT)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), widths[c]))
        return pa.Table.from_arrays(arrays, schema=schema)

    with atomic_path(output) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        chunk: list[dict[str, Any]] = []
        wrote = False
        for rec in _records(partial):
            chunk.append(rec)
            if len(chunk) == _CHUNK:
                writer.write_table(table(chunk))
                chunk, wrote = [], True
        if chunk or not wrote:
            writer.write_table(table(chunk))
