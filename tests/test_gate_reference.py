"""The default gate decides as it did before the one-pipeline refactor (issue 13).

``tests/data/gate_reference`` was written by the code before :class:`hybridcls.gate.Gate`
existed: the synthetic world (seed 0) trained and calibrated with the defaults
(``hybridcls bench quality``), its ``gate.json`` and CLIP index, the two towers'
outputs for 6 test images per class, and the labels, branches and gate scores the
old ``HybridClassifier.predict_features`` gave them. The stored outputs make the
test independent of training's floating-point noise across machines.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from hybridcls.errors import ParameterError
from hybridcls.gate import BranchOutputs, Gate

REFERENCE = Path(__file__).parent / "data" / "gate_reference"


@pytest.fixture(scope="module")
def reference():
    classes = json.loads((REFERENCE / "classes.json").read_text(encoding="utf-8"))
    with open(REFERENCE / "expected.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    outputs = BranchOutputs.load(REFERENCE / "branch_outputs.safetensors")
    return classes, rows, outputs


def test_the_gate_written_before_the_refactor_gives_the_same_labels(reference):
    classes, rows, outputs = reference
    # gate.json and index/ as the old code wrote them: the format is read unchanged
    gate = Gate.load(REFERENCE, n_seen=classes["n_seen"])
    # it records no number of seen classes (later files do): the caller's is needed
    assert gate.calibration_.n_seen is None and gate.n_seen_ == classes["n_seen"]
    with pytest.raises(ParameterError) as info:
        Gate.load(REFERENCE)
    assert str(info.value) == (f"n_seen=None: {REFERENCE / 'gate.json'} does not record its number "
                               f"of seen classes (written before it did); pass the run's")
    assert gate.calibration_.score == "combined" and gate.calibration_.mode == "soft"
    res = gate.predict(outputs)
    names = classes["classes"]
    labels = ["unknown" if p < 0 else names[p] for p in res.pred]
    assert labels == [r["label"] for r in rows]
    assert res.branch.tolist() == [r["branch"] for r in rows]
    np.testing.assert_allclose(res.gate_score, [float(r["gate_score"]) for r in rows], rtol=0, atol=1e-9)
    # the figure the old code reported on these images
    truth = [r["true"] for r in rows]
    assert np.mean(np.array(labels) == np.array(truth)) == pytest.approx(290 / 300)


def test_predict_proba_and_decision_function_agree_with_predict(reference):
    classes, _, outputs = reference
    gate = Gate.load(REFERENCE, n_seen=classes["n_seen"])
    res = gate.predict(outputs)
    np.testing.assert_array_equal(gate.predict_proba(outputs), res.probs)
    np.testing.assert_allclose(gate.decision_function(outputs), res.gate_score)
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0)
