"""Both classifiers keep the scikit-learn contract and take every kind of input (issue 13).

* every hyperparameter, calibration's included, is an ``__init__`` parameter that
  ``get_params`` / ``set_params`` / ``clone`` carry; a clone of a fitted
  configuration, fitted again, predicts the same;
* every fitted attribute is documented, and none holds the training images' features;
* paths, folders, PIL images, ``[H, W, 3]`` arrays and ``[3, H, W]`` / ``[N, 3, H, W]``
  tensors give the same predictions for the same pixels, one row per input, in order.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from hybridcls import HybridClassifier, ZeroShotClassifier
from hybridcls.data import expand_inputs
from hybridcls.runtime import RUNTIME_FIELDS
from hybridcls.synth import TINY_CLIP_MODEL_ID


def _hybrid(tiny_hybrid, **params) -> HybridClassifier:
    world = tiny_hybrid["world"]
    return HybridClassifier(clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None,
                            prompts=str(world.prompts_file), templates=str(world.templates_file),
                            device="cpu", workers=0, cache_dir=tiny_hybrid["root"] / "cache", **params)


@pytest.fixture(scope="module")
def hybrid(tiny_hybrid) -> HybridClassifier:
    return _hybrid(tiny_hybrid).load_run(tiny_hybrid["run"])


@pytest.fixture(scope="module")
def zeroshot(tiny_hybrid) -> ZeroShotClassifier:
    world = tiny_hybrid["world"]
    return ZeroShotClassifier(TINY_CLIP_MODEL_ID, None, prompts=str(world.prompts_file),
                              templates=str(world.templates_file), device="cpu", workers=0,
                              cache_dir=tiny_hybrid["root"] / "cache").fit()


@pytest.mark.parametrize("cls", [HybridClassifier, ZeroShotClassifier])
def test_runtime_parameters_are_the_runtime_settings(cls):
    # declared once: every runtime setting is a parameter, with RuntimeSettings' default
    from hybridcls.runtime import RuntimeSettings

    sig = inspect.signature(cls.__init__).parameters
    defaults = RuntimeSettings()
    for name in RUNTIME_FIELDS:
        assert sig[name].default == getattr(defaults, name), name


def test_calibration_hyperparameters_are_parameters_and_a_clone_predicts_the_same(tiny_hybrid, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_hybrid["run"], run)
    clf = _hybrid(tiny_hybrid, method="tpr", score="energy", tpr=0.9, rounds=3, seed=1,
                  cache_branch="off", mode="hard")
    params = clf.get_params()
    assert {k: params[k] for k in ("method", "score", "tpr", "rounds", "seed", "cache_branch")} == {
        "method": "tpr", "score": "energy", "tpr": 0.9, "rounds": 3, "seed": 1, "cache_branch": "off"}
    clf.load_run(run).calibrate()
    cal = clf.gate_.calibration_
    assert (cal.method, cal.score, cal.tpr, cal.cache_branch) == ("tpr", "energy", 0.9, None)
    # the same configuration, unfitted, then loaded from the run the first one calibrated
    twin = clone(clf)
    assert twin.get_params() == params and not hasattr(twin, "gate_")
    inputs = [tiny_hybrid["world"].test_dir]
    np.testing.assert_array_equal(twin.load_run(run).predict_proba(inputs), clf.predict_proba(inputs))
    # a parameter changed through set_params reaches calibration
    clf.set_params(tpr=0.8).calibrate(save=False)
    assert clf.gate_.calibration_.tpr == 0.8


def test_bad_calibration_parameters_are_refused_before_the_long_passes(tiny_hybrid, tmp_path):
    from hybridcls.errors import ParameterError

    clf = _hybrid(tiny_hybrid, tpr=95, method="tpr").load_run(tiny_hybrid["run"])
    with pytest.raises(ParameterError, match=r"tpr=95: expected a rate in \(0, 1\]"):
        clf.calibrate(save=False)
    with pytest.raises(ParameterError, match="rounds=1: expected an integer >= 2"):
        clf.set_params(method="leave-classes-out", tpr=0.95, rounds=1).calibrate(save=False)


@pytest.mark.parametrize("name", ["hybrid", "zeroshot"])
def test_every_fitted_attribute_is_documented_and_none_holds_training_features(request, name):
    clf = request.getfixturevalue(name)
    fitted = {k for k in vars(clf) if k.endswith("_") and not k.startswith("_")}
    documented = set(re.findall(r"^\s{8}(\w+_):", type(clf).__doc__, flags=re.MULTILINE))
    assert fitted and fitted <= documented, fitted - documented
    # no array of every training image is kept (memory at a million images): the largest array
    # any fitted attribute holds is a model's, never one row per training image
    n_train = sum(1 for _ in expand_inputs([request.getfixturevalue("tiny_hybrid")["world"].train_dir]))
    for key in fitted:
        value = getattr(clf, key)
        if isinstance(value, np.ndarray):
            assert value.shape[0] != n_train, key


@pytest.mark.parametrize("name", ["hybrid", "zeroshot"])
def test_not_fitted_is_sklearns_error(name, tiny_hybrid):
    clf = _hybrid(tiny_hybrid) if name == "hybrid" else ZeroShotClassifier(prompts=["a", "b"])
    with pytest.raises(NotFittedError):
        clf.predict([tiny_hybrid["world"].test_dir])


@pytest.mark.parametrize("name", ["hybrid", "zeroshot"])
def test_no_input_is_a_parameter_error_at_every_entry(request, name):
    """None (or a number) where inputs go, and what is no BranchOutputs where features go, name
    the parameter instead of a TypeError from deep inside."""
    from hybridcls.errors import ParameterError

    clf = request.getfixturevalue(name)
    for call in (clf.predict, clf.predict_proba, clf.decision_function, clf.extract_features,
                 lambda x: list(clf.rows(x)), lambda x: list(clf.iter_predictions(x))):
        with pytest.raises(ParameterError, match=r"^inputs=None: expected paths, folders"):
            call(None)
    with pytest.raises(ParameterError, match=r"^inputs=5: expected paths"):
        clf.predict(5)
    for value, shown in ((None, "None"), ("test/", "'test/'"), ([1.0], "'<list>'")):
        with pytest.raises(ParameterError) as exc:
            clf.predict_features(value)
        assert str(exc.value) == (f"features={shown}: expected the BranchOutputs of "
                                  "extract_features (images and paths go to predict / predict_proba)")
    with pytest.raises(ParameterError, match=r"^outputs=None: expected the BranchOutputs"):
        clf.gate_.predict(None)
    if name == "hybrid":
        with pytest.raises(ParameterError, match=r"^test_inputs=5: expected paths"):
            clf.calibrate(test_inputs=5, save=False)


@pytest.mark.parametrize("name", ["hybrid", "zeroshot"])
def test_every_input_kind_gives_the_same_prediction_in_order(request, name, tiny_hybrid):
    clf = request.getfixturevalue(name)
    paths = [s.path for s in expand_inputs([tiny_hybrid["world"].test_dir])][:3]
    pil = [Image.open(p).convert("RGB") for p in paths]
    arrays = [np.asarray(im) for im in pil]
    chw = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    floats = [t.float() / 255 for t in chw]
    reference = clf.predict_proba(paths)
    for inputs in (pil, arrays, chw, floats, torch.stack(chw), [paths[0], pil[1], arrays[2]]):
        np.testing.assert_allclose(clf.predict_proba(inputs), reference, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(clf.predict(pil), clf.predict(paths))
    # extract_features takes them too, one row per input
    assert len(clf.extract_features([pil[0], paths[1], chw[2]])) == 3
    # a single image is one input
    assert clf.predict_proba(pil[0]).shape == (1, len(clf.classes_))



def test_set_params_names_what_waits_for_the_next_load(tiny_hybrid):
    import warnings

    from hybridcls.errors import HybridclsWarning

    unfitted = _hybrid(tiny_hybrid)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HybridclsWarning)
        unfitted.set_params(templates=["a {}."])  # not built yet: it acts at the load
    clf = _hybrid(tiny_hybrid).load_run(tiny_hybrid["run"])
    before = clf.predict_proba([tiny_hybrid["world"].test_dir])
    with pytest.warns(HybridclsWarning) as caught:
        clf.set_params(templates=["a {}."], clip_model=str(clf.clip_model), mode="hard", batch_size=3)
    assert [str(w.message) for w in caught] == [  # mode acts now
        ("set_params(templates=..., batch_size=...): the fitted classifier keeps the towers and "
         "runtime it was built with; this acts at the next load_run() or fit()")]
    assert clf.get_params()["templates"] == ["a {}."] and clf.tower_.templates != ["a {}."]
    with warnings.catch_warnings():
        warnings.simplefilter("error", HybridclsWarning)
        clf.set_params(mode=None, unknown_threshold=None, method="tpr")  # act now / at calibrate
    np.testing.assert_array_equal(clf.predict_proba([tiny_hybrid["world"].test_dir]), before)
