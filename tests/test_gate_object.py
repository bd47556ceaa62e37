"""The Gate as one object: fitted from public calls alone, saved and loaded back whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hybridcls.errors import CheckpointError, InputError, ParameterError
from hybridcls.gate import BranchOutputs, Gate


def _outputs(rng: np.random.Generator, y: np.ndarray, n_seen: int, n_classes: int) -> BranchOutputs:
    """Clustered towers' outputs: class c's features and embeddings near axis c."""
    n = len(y)
    feat = np.eye(n_classes)[y] + 0.3 * rng.standard_normal((n, n_classes))
    emb = feat / np.linalg.norm(feat, axis=1, keepdims=True)
    sup = 4 * feat[:, :n_seen]
    clip = 10 * emb
    return BranchOutputs(sup.astype(np.float32), feat.astype(np.float32),
                         clip.astype(np.float32), emb.astype(np.float32))


@pytest.fixture(scope="module")
def data() -> dict:
    rng = np.random.default_rng(0)
    S, C = 3, 5
    y_tr, y_va = np.repeat(np.arange(S), 12), np.repeat(np.arange(S), 6)
    y_te = np.repeat(np.arange(C), 6)
    return {"train": _outputs(rng, y_tr, S, C), "y_train": y_tr, "val": _outputs(rng, y_va, S, C),
            "y_val": y_va, "test": _outputs(rng, y_te, S, C), "names": ["a", "b", "c"], "S": S}


@pytest.mark.parametrize("gate", [Gate(method="tpr", score="knn", tpr=0.9, cache_branch="on"),
                                  Gate(rounds=3, cache_branch="on")], ids=["tpr-knn", "leave-classes-out"])
def test_a_gate_fitted_without_index_meta_saves_and_loads_whole(data: dict, gate: Gate,
                                                                 tmp_path: Path) -> None:
    gate.fit(data["train"], data["y_train"], data["val"], data["y_val"], class_names=data["names"])
    before = gate.predict(data["test"])
    gate.save(tmp_path)
    # one file per index, named by its role (not both written over "index.*")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "backbone.faiss", "backbone.json", "clip.faiss", "clip.json"]
    loaded = Gate.load(tmp_path, n_seen=data["S"])
    after = loaded.predict(data["test"])
    np.testing.assert_array_equal(after.probs, before.probs)
    assert after.branch.tolist() == before.branch.tolist()
    # the cascade reads the backbone index back too
    np.testing.assert_array_equal(loaded.cascade_keep(data["test"]), gate.cascade_keep(data["test"]))


def test_an_unfitted_gate_refuses_to_predict(data: dict) -> None:
    for call in (Gate().predict, Gate().decision_function):
        with pytest.raises(InputError, match="the gate is not fitted: call Gate.fit"):
            call(data["test"])
    with pytest.raises(InputError, match="the gate is not fitted"):
        Gate().clip_policy()
    # a zero-shot gate has nothing to fit: it decides by CLIP alone
    zs = Gate.zero_shot().predict(BranchOutputs(clip_logits=np.array([[0.0, 2.0]])))
    assert zs.pred.tolist() == [1] and zs.branch.tolist() == ["zeroshot"]


def test_gate_json_records_its_number_of_seen_classes_and_load_checks_it(data: dict,
                                                                          tmp_path: Path) -> None:
    gate = Gate(method="tpr", score="energy", cache_branch="off")
    gate.fit(data["train"], data["y_train"], data["val"], data["y_val"], class_names=data["names"])
    gate.save(tmp_path)
    assert json.loads((tmp_path / "gate.json").read_text(encoding="utf-8"))["n_seen"] == data["S"]
    # n_seen is optional: the file's number is used, and the gate decides as with it given
    loaded = Gate.load(tmp_path)
    assert loaded.n_seen_ == data["S"]
    np.testing.assert_array_equal(loaded.predict(data["test"]).probs,
                                  Gate.load(tmp_path, n_seen=data["S"]).predict(data["test"]).probs)
    with pytest.raises(CheckpointError) as info:
        Gate.load(tmp_path, n_seen=4)
    assert str(info.value) == (f"{tmp_path / 'gate.json'}: calibrated for 3 seen classes, not the 4 "
                               f"of n_seen=4: it belongs to another run; calibrate this run "
                               f"again, which replaces it")
    # a gate set by hand records the number it is given, and refuses another than its own
    manual = Gate.from_calibration(gate.calibration_.replace(n_seen=None), n_seen=3)
    assert manual.calibration_.n_seen == 3
    with pytest.raises(ParameterError) as info:
        Gate.from_calibration(gate.calibration_, n_seen=2)
    assert str(info.value) == "n_seen=2: the calibration records 3 seen classes"


def test_a_gate_json_written_before_n_seen_keeps_its_model_version(data: dict, tmp_path: Path) -> None:
    """``model_version`` hashes the calibration's dict: one read from a file that does not record
    ``n_seen`` must give back that file's dict, not one with ``"n_seen": null`` added."""
    from hybridcls.cache import json_text

    gate = Gate(method="tpr", score="energy", cache_branch="off")
    gate.fit(data["train"], data["y_train"], data["val"], data["y_val"], class_names=data["names"])
    gate.save(tmp_path)
    path = tmp_path / "gate.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    del record["n_seen"]  # as written before gate.json recorded it
    path.write_text(json.dumps(record), encoding="utf-8")
    old = Gate.load(tmp_path, n_seen=data["S"])
    # what Predictor.model_identity hashes for the gate
    assert old.calibration_.n_seen is None
    assert json.loads(json_text(old.calibration_.to_dict())) == record
    assert gate.calibration_.to_dict()["n_seen"] == data["S"]


@pytest.mark.parametrize("gate", [Gate(rounds=3), Gate(method="tpr", score="knn", tpr=0.9)],
                         ids=["combined", "single"])
def test_base_scores_are_what_the_gate_score_is_made_of(data: dict, gate: Gate) -> None:
    gate.fit(data["train"], data["y_train"], data["val"], data["y_val"], class_names=data["names"])
    cal = gate.calibration_
    base = gate.base_scores(data["test"])
    assert sorted(base) == sorted(cal.base_scores)
    assert all(v.shape == (len(data["test"]),) for v in base.values())
    np.testing.assert_array_equal(cal.score_from(base), gate.decision_function(data["test"]))


def test_base_scores_refused_without_a_gate_score(data: dict) -> None:
    with pytest.raises(InputError, match="the gate is not fitted"):
        Gate().base_scores(data["test"])
    with pytest.raises(InputError, match="a zero-shot gate has no gate score"):
        Gate.zero_shot().base_scores(data["test"])
