"""``hybridcls embed``: the engine's embeddings with their paths, in files numpy and pyarrow read
without unpickling; one row per input (error rows kept), resumable (issue 17)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hybridcls.cli import main
from hybridcls.data import expand_inputs
from hybridcls.embeddings import (
    BACKBONE_EMBEDDING,
    CLIP_EMBEDDING,
    embedding_engine,
    embedding_rows,
    partial_path,
    write_embeddings,
)
from hybridcls.errors import InputError
from hybridcls.hybrid import HybridClassifier
from hybridcls.provenance import RunRecord
from hybridcls.runtime import RuntimeSettings
from hybridcls.sharding import read_record
from hybridcls.synth import TINY_CLIP_DIR, TINY_CLIP_MODEL_ID
from hybridcls.zeroshot import ZeroShotClassifier

BROKEN = "zz broken.jpg"  # sorts after the world's images: the readable ones form the same batch


@pytest.fixture(scope="module")
def inputs(tiny_hybrid, tmp_path_factory):
    """A list file: the tiny world's test images with an unreadable file in their middle."""
    root = tmp_path_factory.mktemp("embed_inputs")
    good = sorted(str(p) for p in tiny_hybrid["world"].test_dir.glob("*.png"))
    broken = root / BROKEN
    broken.write_bytes(b"not an image")
    listed = [*good[:3], str(broken), *good[3:]]
    lst = root / "inputs.txt"
    lst.write_text("".join(f"{p}\n" for p in listed), encoding="utf-8")
    return {"list": lst, "paths": listed, "good": good, "broken": 3}


def _embed(tiny_hybrid, inputs, out, *extra):
    argv = ["embed", str(inputs["list"]), "-o", str(out), "--clip-model", TINY_CLIP_MODEL_ID,
            "--cache-dir", str(tiny_hybrid["root"] / "cache"), "--device", "cpu", "--workers", "0",
            "-q", *extra]
    return main(argv)


def _check_rows(data, inputs, columns):
    """Every input once, in order; the broken one with its reason and NaN embeddings."""
    assert list(data["path"]) == inputs["paths"]
    errors = list(data["error"])
    assert [bool(e) for e in errors] == [i == inputs["broken"] for i in range(len(errors))]
    assert "not an image" in errors[inputs["broken"]] or "unrecognised" in errors[inputs["broken"]]
    for c in columns:
        assert np.isnan(data[c][inputs["broken"]]).all()
        assert not np.isnan(np.delete(data[c], inputs["broken"], axis=0)).any()


def test_zero_shot_embeddings_are_the_classifiers(tiny_hybrid, inputs, tmp_path):
    out = tmp_path / "clip.npz"
    assert _embed(tiny_hybrid, inputs, out) == 1  # one input failed
    data = np.load(out, allow_pickle=False)  # no object arrays: every array loads without pickle
    assert sorted(data.files) == ["clip_embedding", "error", "path"]
    assert data["path"].dtype.kind == "U" and data["clip_embedding"].dtype == np.float32
    _check_rows(data, inputs, [CLIP_EMBEDDING])
    world = tiny_hybrid["world"]
    clf = ZeroShotClassifier(clip_model=TINY_CLIP_MODEL_ID, prompts=world.prompts_file,
                             templates=world.templates_file, device="cpu", workers=0,
                             cache_dir=tiny_hybrid["root"] / "cache", progress=False).fit()
    feats = clf.extract_features(inputs["good"])
    ok = np.delete(data["clip_embedding"], inputs["broken"], axis=0)
    np.testing.assert_array_equal(ok, feats.clip_embeddings)
    assert not partial_path(out).exists() and not (tmp_path / "clip.npz.partial.jsonl.manifest.json").exists()


def test_run_embeddings_are_the_hybrids_extract_features(tiny_hybrid, inputs, tmp_path):
    out = tmp_path / "run.npz"
    assert _embed(tiny_hybrid, inputs, out, "--checkpoint", str(tiny_hybrid["run"])) == 1
    data = np.load(out, allow_pickle=False)
    assert sorted(data.files) == ["backbone_embedding", "clip_embedding", "error", "path"]
    _check_rows(data, inputs, [CLIP_EMBEDDING, BACKBONE_EMBEDDING])
    world = tiny_hybrid["world"]
    clf = HybridClassifier(clip_model=TINY_CLIP_MODEL_ID, templates=world.templates_file,
                           device="cpu", workers=0, cache_dir=tiny_hybrid["root"] / "cache",
                           progress=False).load_run(tiny_hybrid["run"], world.prompts_file)
    feats = clf.extract_features(inputs["good"])
    np.testing.assert_array_equal(np.delete(data["clip_embedding"], inputs["broken"], axis=0),
                                  feats.clip_embeddings)
    np.testing.assert_array_equal(np.delete(data["backbone_embedding"], inputs["broken"], axis=0),
                                  feats.sup_features)
    assert data["backbone_embedding"].shape == (len(inputs["paths"]), clf.supervised_.num_features)


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_embed_leaves_its_run_record_beside_the_file_and_in_the_log(tiny_hybrid, inputs, tmp_path):
    """The manifest beside the .npz keeps the run record (docs/provenance.md): both towers as
    loaded (fingerprints: hashlib over the weights files), the engine's runtime, the command
    line, the file's counts; --log holds the same record with the exit status."""
    out, log = tmp_path / "run.npz", tmp_path / "log.json"
    assert _embed(tiny_hybrid, inputs, out, "--checkpoint", str(tiny_hybrid["run"]), "--log", str(log)) == 1
    manifest = json.loads((tmp_path / "run.npz.manifest.json").read_text(encoding="utf-8"))
    assert manifest["format"] == "npz"
    assert manifest["columns"] == ["path", "error", "clip_embedding", "backbone_embedding"]
    rec = read_record(out)
    assert rec == manifest["record"] and rec["command"] == "embed" and rec["argv"][:2] == ["hybridcls", "embed"]
    run = tiny_hybrid["run"]
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert rec["models"]["supervised"] == {"model_id": config["model"]["name"],
                                           "fingerprint": _sha256(run / "model.safetensors"),
                                           "weights": config.get("weights")}
    assert rec["models"]["clip"]["model_id"] == TINY_CLIP_MODEL_ID
    assert rec["models"]["clip"]["fingerprint"] == _sha256(TINY_CLIP_DIR / "open_clip_model.safetensors")
    assert rec["runtime"]["towers"] == ["supervised", "clip"] and rec["runtime"]["device"] == "cpu"
    data = np.load(out, allow_pickle=False)
    n_error = sum(bool(e) for e in data["error"])
    assert rec["counts"] == {"embedded": len(data["path"]) - n_error, "failed": n_error, "resumed": 0}
    assert n_error == 1 and rec["finished"] is not None
    assert json.loads(log.read_text(encoding="utf-8")) == {**rec, "exit_status": 1, "error": None}


def test_parquet_holds_the_same_rows(tiny_hybrid, inputs, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    assert _embed(tiny_hybrid, inputs, tmp_path / "e.npz") == 1
    assert _embed(tiny_hybrid, inputs, tmp_path / "e.parquet") == 1
    npz = np.load(tmp_path / "e.npz", allow_pickle=False)
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column_names == ["path", "error", "clip_embedding"]
    assert table.column("path").to_pylist() == inputs["paths"]
    errors = table.column("error").to_pylist()
    assert [e is not None for e in errors] == [bool(e) for e in npz["error"]]
    vectors = np.array(table.column("clip_embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(vectors, npz["clip_embedding"])


def test_parquet_without_pyarrow_is_refused_before_anything_runs(tiny_hybrid, inputs, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    out = tmp_path / "e.parquet"
    assert _embed(tiny_hybrid, inputs, out) == 2
    err = capsys.readouterr().err
    assert "pyarrow" in err and "pip install 'hybridcls[parquet]'" in err and ".npz" in err
    assert not out.exists() and not partial_path(out).exists()


def test_other_extension_is_refused_naming_the_flag(tiny_hybrid, inputs, tmp_path, capsys):
    assert _embed(tiny_hybrid, inputs, tmp_path / "e.csv") == 2
    assert f"--output {tmp_path / 'e.csv'}: expected a file ending in .npz" in capsys.readouterr().err


def test_an_interrupted_run_resumes_where_it_stopped(tiny_hybrid, inputs, tmp_path):
    sources = expand_inputs([str(inputs["list"])])
    settings = RuntimeSettings(device="cpu", workers=0, batch_size=4, progress=False,
                               cache_dir=str(tiny_hybrid["root"] / "cache"))
    engine = embedding_engine(TINY_CLIP_MODEL_ID, None, tiny_hybrid["run"], settings=settings)
    meta = {"clip_model": "tiny", "checkpoint": "run"}
    whole = tmp_path / "whole.npz"
    write_embeddings(lambda todo: embedding_rows(engine, todo), sources, whole, backbone=True,
                     settings=meta)

    class Killed(Exception):
        pass

    def two_batches_then_crash(todo):
        for i, rows in enumerate(embedding_rows(engine, todo)):
            if i == 2:
                raise Killed
            yield rows

    out = tmp_path / "cut.npz"
    with pytest.raises(Killed):
        write_embeddings(two_batches_then_crash, sources, out, backbone=True, settings=meta)
    assert not out.exists() and partial_path(out).is_file()  # 8 rows written, flushed
    asked = []

    def rest(todo):
        asked.append([s.path for s in todo])
        yield from embedding_rows(engine, todo)

    with pytest.raises(InputError, match="other settings"):
        write_embeddings(rest, sources, out, backbone=True, settings={**meta, "precision": "bf16"},
                         resume=True)
    record = RunRecord.for_call("test")
    summary = write_embeddings(rest, sources, out, backbone=True, settings=meta, resume=True,
                               record=record)
    assert asked == [inputs["paths"][8:]]  # only what the crash left
    assert (summary.resumed, summary.n_ok, summary.n_error) == (8, len(inputs["paths"]) - 1, 1)
    # the file's whole counts, as the rows say (the broken input is row 3, among the kept ones)
    assert read_record(out)["counts"] == {"embedded": len(inputs["paths"]) - 1, "failed": 1, "resumed": 8}
    done, ref = np.load(out, allow_pickle=False), np.load(whole, allow_pickle=False)
    assert done.files == ref.files
    for name in ref.files:
        np.testing.assert_array_equal(done[name], ref[name])
