"""The embedding index (kinds, incremental building, files, provenance check) and the cache branch.

Everything here works on small arrays, except the last test, which reads the
session's calibrated synthetic-world run (the ``world_run`` fixture the hybrid tests share).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybridcls.errors import CheckpointError, InputError
from hybridcls.gate import CacheBranch, GateCalibration, cache_logits, fit_cache_branch
from hybridcls.index import KINDS, EmbeddingIndex, index_meta, load_run_index, run_index_path

#: Each kind must find the exact nearest neighbour of at least this share of queries on
#: 4,000 random 64-d unit vectors: all of them when exact (``auto`` stays exact up to
#: AUTO_EXACT_MAX rows); HNSW measures ~0.99 at M=32, efSearch=64; random vectors have no
#: cluster structure, the hardest case for IVF, which measures ~0.66 at nlist=102, nprobe=16.
RECALL_AT_1 = {"auto": 1.0, "flat": 1.0, "hnsw": 0.95, "ivf": 0.5}


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _meta(**changes):
    return {**index_meta("clip", "tiny-clip", "f" * 64, ["cat", "dog", "fox"]), **changes}


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    return _unit(rng, 4000, 64), _unit(rng, 200, 64)


def test_flat_search_matches_brute_force_and_keeps_labels_and_paths() -> None:
    rng = np.random.default_rng(1)
    train, query = _unit(rng, 50, 8), _unit(rng, 5, 8)
    idx = EmbeddingIndex("flat", meta=_meta())
    idx.add(train[:20], labels=np.arange(20) % 3, paths=[f"t{i}.png" for i in range(20)])
    idx.add(train[20:], labels=np.arange(20, 50) % 3, paths=[f"t{i}.png" for i in range(20, 50)])
    sims, ids = idx.search(query, 4)
    cos = query @ train.T
    np.testing.assert_array_equal(ids, np.argsort(-cos, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(sims, np.take_along_axis(cos, ids, axis=1), atol=1e-6)
    assert sims.dtype == np.float64 and ids.dtype == np.int64
    assert idx.ntotal == 50 and idx.dim == 8 and idx.exact
    assert [idx.paths[i] for i in ids[0]] == [f"t{i}.png" for i in ids[0]]
    np.testing.assert_array_equal(idx.labels[ids], ids % 3)


def test_incremental_add_equals_single_add_for_flat(vectors) -> None:
    train, query = vectors
    train = train[:1000]
    one = EmbeddingIndex("flat").add(train)
    many = EmbeddingIndex("flat")
    for start in range(0, len(train), 137):
        many.add(train[start:start + 137])
    assert many.ntotal == one.ntotal == 1000
    s1, i1 = one.search(query, 10)
    s2, i2 = many.search(query, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_every_index_kind_has_a_recall_bound() -> None:
    assert set(RECALL_AT_1) == set(KINDS)  # a new kind says what it finds


# The registry, not a list typed here: a new kind is built, searched and reloaded here too.
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips_and_finds_the_nearest_neighbours(tmp_path, vectors, kind) -> None:
    train, query = vectors
    exact = EmbeddingIndex("flat").add(train)
    built = EmbeddingIndex(kind, meta=_meta(), ivf_train_size=2000)
    for start in range(0, len(train), 500):  # built in batches; IVF trains on the first 2,000
        built.add(train[start:start + 500], labels=np.arange(start, start + 500) % 3)
    assert built.exact == (RECALL_AT_1[kind] == 1.0) and built.ntotal == len(train)
    assert built.index_kind in KINDS and built.index_kind != "auto"
    _, ids_exact = exact.search(query, 1)
    sims, ids = built.search(query, 10)
    recall = float(np.mean(ids[:, 0] == ids_exact[:, 0]))
    print(f"{kind} recall@1 vs exact: {recall:.3f}")
    assert recall >= RECALL_AT_1[kind]
    built.save(tmp_path)
    loaded = EmbeddingIndex.load(tmp_path / "clip.faiss", expect=_meta())
    assert loaded.index_kind == built.index_kind and loaded.meta == _meta()
    s2, i2 = loaded.search(query, 10)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_array_equal(s2, sims)
    np.testing.assert_array_equal(loaded.labels, np.arange(len(train)) % 3)


def test_flat_round_trip_through_the_run_folder(tmp_path) -> None:
    rng = np.random.default_rng(2)
    train, query = _unit(rng, 30, 6), _unit(rng, 4, 6)
    idx = EmbeddingIndex(meta=_meta()).add(train, labels=np.arange(30) % 3,
                                           paths=[f"img{i}.jpg" for i in range(30)])
    assert load_run_index(tmp_path) is None  # a run without an index has none
    written = idx.save(run_index_path(tmp_path, "clip").parent)
    assert written == tmp_path / "index" / "clip.faiss"
    assert sorted(p.name for p in written.parent.iterdir()) == ["clip.faiss", "clip.json"]
    loaded = load_run_index(tmp_path, expect={"model_id": "tiny-clip"})
    assert loaded is not None
    assert loaded.paths == idx.paths and loaded.ntotal == 30 and loaded.meta == _meta()
    np.testing.assert_array_equal(loaded.search(query, 5)[1], idx.search(query, 5)[1])
    np.testing.assert_array_equal(loaded.kth_distance(query, 5), idx.kth_distance(query, 5))
    # adding to a loaded index goes on from where it stopped
    loaded.add(train[:2], labels=[0, 1])
    assert loaded.ntotal == 32 and loaded.labels[-2:].tolist() == [0, 1]


def test_auto_switches_to_hnsw_above_its_size_threshold(vectors) -> None:
    train, _ = vectors
    idx = EmbeddingIndex("auto", exact_max=1500)
    idx.add(train[:1000])
    assert idx.index_kind == "flat"
    idx.add(train[1000:2000], labels=np.ones(1000))
    assert idx.index_kind == "hnsw" and idx.ntotal == 2000
    assert idx.labels.tolist() == [-1] * 1000 + [1] * 1000
    # the rows kept their numbers through the move
    _, ids = idx.search(train[[5, 1500]], 1)
    assert ids[:, 0].tolist() == [5, 1500]


@pytest.mark.parametrize("field, value, shown", [
    ("model_id", "ViT-B-32", "model_id is 'tiny-clip', expected 'ViT-B-32'"),
    ("fingerprint", "0" * 64, "another fingerprint"),
    ("classes", ["cat", "dog", "wolf"], "classes differs at position 2: 'fox', expected 'wolf'"),
    ("classes", ["cat", "dog"], "classes has 3 entries, expected 2"),
])
def test_load_refuses_an_index_built_otherwise(tmp_path, field, value, shown) -> None:
    EmbeddingIndex(meta=_meta()).add(np.eye(4), labels=[0, 1, 2, 0]).save(tmp_path)
    with pytest.raises(CheckpointError) as err:
        EmbeddingIndex.load(tmp_path, expect={**_meta(), field: value})
    message = str(err.value)
    assert "clip.json" in message and shown in message and "rebuild" in message


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="clip.json: embedding index file not found"):
        EmbeddingIndex.load(tmp_path / "clip.faiss")
    idx = EmbeddingIndex(meta=_meta()).add(np.eye(4), labels=[0, 1, 2, 0])
    idx.save(tmp_path)
    side = tmp_path / "clip.json"
    d = json.loads(side.read_text())
    side.write_text(json.dumps({**d, "labels": [0, 1]}))
    with pytest.raises(CheckpointError, match="holds 4 rows of dimension 4, its sidecar clip.json says 4"):
        EmbeddingIndex.load(tmp_path)
    with pytest.raises(CheckpointError, match="records no weights"):
        side.write_text(json.dumps(d))
        EmbeddingIndex.load(tmp_path, expect={"weights": "x"})


def test_bad_inputs() -> None:
    idx = EmbeddingIndex("flat").add(np.eye(3))
    with pytest.raises(InputError, match="k=4 neighbours asked of an index holding 3"):
        idx.search(np.eye(3), 4)
    with pytest.raises(InputError, match="dimension 2, the index has 3"):
        idx.add(np.ones((1, 2)))
    with pytest.raises(InputError, match="2 labels for 1 embeddings"):
        idx.add(np.ones((1, 3)), labels=[0, 1])
    with pytest.raises(InputError, match="index kind 'lsh'"):
        EmbeddingIndex("lsh")
    with pytest.raises(InputError, match="nothing to save"):
        EmbeddingIndex().save(".")
    # a query CLIP did not encode (NaN row) finds nothing rather than garbage
    sims, ids = idx.search(np.array([[np.nan] * 3, [1.0, 0.0, 0.0]]), 1)
    assert np.isnan(sims[0, 0]) and ids[:, 0].tolist() == [-1, 0]


# ---------------------------------------------------------------------- the cache branch

def _clustered_problem(seed: int = 0, n_query: int = 800):
    """5 classes of clustered unit vectors, an imbalanced cache, queries and noisy logits."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, 16))

    def emb(labels):
        x = centers[labels] + rng.normal(size=(len(labels), 16))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    y_cache = np.repeat(np.arange(5), [60, 30, 40, 50, 20])
    index = EmbeddingIndex("flat").add(emb(y_cache), labels=y_cache)
    y_query = rng.integers(0, 5, n_query)
    return index, emb(y_query), rng.normal(size=(n_query, 5)), rng


def test_cache_formula_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(3)
    keys, queries = _unit(rng, 12, 4), _unit(rng, 3, 4)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 2])
    index = EmbeddingIndex("flat").add(keys, labels=labels)
    sup = rng.normal(size=(3, 3))
    branch = CacheBranch(alpha=1.7, beta=5.5)
    # Tip-Adapter's A @ L over the whole cache, each class divided by its number of images
    A = np.exp(-5.5 * (1.0 - queries @ keys.T))
    L = np.eye(3)[labels]
    expected = sup + 1.7 * (A @ L) / L.sum(axis=0)
    np.testing.assert_allclose(branch.apply(sup, queries, index), expected, rtol=1e-6)
    # from an index search directly, and with fewer neighbours: only those count
    sims, ids = index.search(queries, 4)
    near = np.zeros_like(A)
    np.put_along_axis(near, ids, np.take_along_axis(A, ids, axis=1), axis=1)
    np.testing.assert_allclose(cache_logits(sims, ids, labels, 3, 5.5), (near @ L) / L.sum(axis=0),
                               rtol=1e-6)
    # a row CLIP did not encode keeps its supervised logits
    with_nan = np.vstack([queries[:1], np.full((1, 4), np.nan)])
    np.testing.assert_array_equal(branch.apply(sup[:2], with_nan, index)[1], sup[1])
    with pytest.raises(InputError, match="rows without a label"):
        CacheBranch(alpha=1.0, beta=1.0).apply(sup, queries, EmbeddingIndex("flat").add(keys))


@pytest.mark.parametrize("alpha_rel, beta", [(4.0, 5.5), (1.0, 2.0), (8.0, 10.0)])
def test_fit_recovers_alpha_and_beta_where_the_cache_helps(alpha_rel, beta) -> None:
    index, queries, sup, _ = _clustered_problem()
    # the truth: labels decided by the fused logits at (alpha_rel, beta)
    sims, ids = index.search(queries, index.ntotal)
    y = np.argmax(sup + alpha_rel * sup.std() * cache_logits(sims, ids, index.labels, 5, beta), axis=1)
    branch = fit_cache_branch(sup, y, queries, index)
    assert (branch.alpha_rel, branch.beta) == (alpha_rel, beta)
    assert branch.alpha == pytest.approx(alpha_rel * sup.std())
    assert branch.val_accuracy == 1.0 > branch.val_accuracy_plain
    assert branch.enabled and branch.n_val == len(y)
    # stored with the gate, it comes back the same
    gate = GateCalibration(cache_branch=branch.to_dict())
    again = GateCalibration.from_dict(json.loads(json.dumps(gate.to_dict())))
    assert CacheBranch.from_dict(again.cache_branch) == branch


def test_auto_leaves_the_cache_off_where_it_does_not_help() -> None:
    index, queries, sup, rng = _clustered_problem(seed=1)
    # labels follow the supervised logits, with 20% noise the embeddings know nothing of
    y = sup.argmax(axis=1)
    flip = rng.random(len(y)) < 0.2
    y[flip] = rng.integers(0, 5, flip.sum())
    auto = fit_cache_branch(sup, y, queries, index, mode="auto")
    assert auto.val_accuracy <= auto.val_accuracy_plain and not auto.enabled
    forced = fit_cache_branch(sup, y, queries, index, mode="on")
    assert forced.enabled and (forced.alpha, forced.beta) == (auto.alpha, auto.beta)
    with pytest.raises(InputError, match="cannot be fitted"):
        fit_cache_branch(sup, y, queries, index, mode="off")


def test_world_run_saves_its_index_and_its_cache_branch(world_run, tmp_path) -> None:
    import shutil

    from hybridcls.bench.quality import labelled_test_set
    from hybridcls.hybrid import HybridClassifier

    world, clf = world_run
    data = clf._training_data(None)
    y_train = np.array([y for _, y in data.train])  # the world's images all decode
    index = load_run_index(clf.run_dir_, expect=clf._index_meta("clip"))
    assert index is not None and index.ntotal == len(y_train) and index.exact
    np.testing.assert_array_equal(index.labels, y_train)
    assert all(p and "/train/" in p.replace("\\", "/") for p in index.paths)
    assert index.meta["classes"] == clf.seen_folders_
    # no held-out image is in the cache it was fitted against
    val, y_val = clf.held_out_outputs()
    assert index.search(val.clip_embeddings, 1)[0].max() < 0.9999
    cache = clf.gate_.calibration_.cache_branch
    assert cache is not None and cache["n_val"] == len(y_val)
    assert cache["enabled"] == (cache["val_accuracy"] > cache["val_accuracy_plain"])
    # its effect on the test images of the seen classes
    sources, y = labelled_test_set(world, clf)
    feats = clf.extract_features(sources)
    seen = y < clf.n_seen_
    plain = float(np.mean(feats.sup_logits[seen].argmax(axis=1) == y[seen]))
    fused = float(np.mean(clf.seen_logits(feats)[seen].argmax(axis=1) == y[seen]))
    print(f"world S: supervised {plain:.4f}, with the cache branch {fused:.4f}; {cache}")
    if cache["enabled"]:
        assert fused >= plain
    # a copy of the run whose index was built for another class list is refused where it is used
    run = tmp_path / "run"
    shutil.copytree(clf.run_dir_, run)
    side = run / "index" / "clip.json"
    d = json.loads(side.read_text())
    d["meta"]["classes"] = [*d["meta"]["classes"][:-1], "zebra"]
    side.write_text(json.dumps(d))
    other = HybridClassifier(**clf.get_params()).load_run(run, world.prompts_file)
    assert other.gate_.clip_index_ is None and "classes differs" in str(other.gate_.index_error_)
    if cache["enabled"] or "knn" in clf.gate_.calibration_.base_scores:
        with pytest.raises(CheckpointError, match="clip.json: built with another classes: classes differs"):
            other.predict_features(feats)


def test_class_bounded_k_is_at_most_the_smallest_class() -> None:
    from hybridcls.errors import DataTooSmallError
    from hybridcls.index import class_bounded_k

    assert class_bounded_k(10, [0, 0, 0, 1, 1, 1, 1]) == 3
    assert class_bounded_k(2, [0, 0, 0, 1, 1, 1, 1]) == 2
    assert class_bounded_k(10, [1, 1, -1, 2]) == 1  # unlabelled rows and absent classes not counted
    with pytest.raises(InputError, match="k must be at least 1, got 0"):
        class_bounded_k(0, [0, 1])
    with pytest.raises(DataTooSmallError, match="no labelled training image"):
        class_bounded_k(5, [-1, -1])
