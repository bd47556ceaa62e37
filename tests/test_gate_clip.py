"""The CLIP a gate was calibrated with travels with it (hybridcls.zeroshot.gate_clip).

``calibrate`` records the CLIP in ``gate.json``; a run loaded without a CLIP chosen
loads that one, a run loaded with another is refused wherever its gate is used
(naming the parameter, or the flag on the command line), a new calibration
replaces the record, and a ``gate.json`` written before the record loads with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from hybridcls import HybridClassifier
from hybridcls.cli import main
from hybridcls.errors import HybridclsWarning, ParameterError
from hybridcls.synth import TINY_CLIP_DIR, TINY_CLIP_MODEL_ID
from hybridcls.zeroshot.defaults import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from hybridcls.zeroshot.gate_clip import clip_mismatch, clip_to_load
from tests.tinyclip_factory import make_tiny_clip

WEIGHTS = "open_clip_model.safetensors"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hybrid(tiny_hybrid, **params) -> HybridClassifier:
    """The tiny world's classifier, with no CLIP chosen unless ``params`` choose one."""
    world = tiny_hybrid["world"]
    params = {"templates": str(world.templates_file), **params}
    return HybridClassifier(prompts=str(world.prompts_file), device="cpu", workers=0,
                            cache_dir=tiny_hybrid["root"] / "cache", **params)


@pytest.fixture(scope="module")
def calibrated(tiny_hybrid, tmp_path_factory) -> dict:
    """A copy of the tiny run calibrated here with the shipped tiny CLIP given explicitly, and
    another tiny CLIP (random weights) in a local-dir: folder."""
    root = tmp_path_factory.mktemp("gate_clip")
    run = Path(shutil.copytree(tiny_hybrid["run"], root / "run"))
    clf = _hybrid(tiny_hybrid, clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None,
                  method="tpr", cache_branch="off").load_run(run).calibrate()
    other = make_tiny_clip(root / "other_clip", seed=3)
    return {"root": root, "run": run, "clf": clf, "other": Path(other)}


def _copy_run(calibrated, tmp_path) -> Path:
    return Path(shutil.copytree(calibrated["run"], tmp_path / "run"))


def test_calibrate_records_the_clip_it_used_in_gate_json(calibrated):
    gate = json.loads((calibrated["run"] / "gate.json").read_text(encoding="utf-8"))
    # the shipped folder's weights file, hashed here; a local-dir: model takes no pretrained tag
    assert gate["clip"] == {"model_id": TINY_CLIP_MODEL_ID, "fingerprint": _sha256(TINY_CLIP_DIR / WEIGHTS),
                            "pretrained": None, "templates": calibrated["clf"].tower_.templates}
    world_templates = [line for line in calibrated["clf"].tower_.templates]
    assert len(world_templates) >= 2 and all("{}" in x for x in world_templates)


def test_a_run_loaded_without_a_clip_uses_the_recorded_one(calibrated, tiny_hybrid):
    clf = _hybrid(tiny_hybrid).load_run(calibrated["run"])
    assert clf.get_params()["clip_model"] is None  # the parameter as given: clone keeps "not chosen"
    assert clf.tower_.bundle.model_id == TINY_CLIP_MODEL_ID and clf.gate_error_ is None
    assert clf.model_identity()["clip"]["fingerprint"] == _sha256(TINY_CLIP_DIR / WEIGHTS)
    inputs = [tiny_hybrid["world"].test_dir]
    np.testing.assert_array_equal(clf.predict_proba(inputs), calibrated["clf"].predict_proba(inputs))


def test_a_run_loaded_without_templates_uses_the_recorded_ones_and_refuses_others(
        calibrated, tiny_hybrid, tmp_path):
    world = tiny_hybrid["world"]
    recorded = calibrated["clf"].tower_.templates
    clf = HybridClassifier(prompts=str(world.prompts_file), device="cpu", workers=0,
                           cache_dir=tiny_hybrid["root"] / "cache").load_run(calibrated["run"])
    assert clf.get_params()["templates"] is None and clf.tower_.templates == recorded
    assert clf.gate_error_ is None
    inputs = [world.test_dir]
    np.testing.assert_array_equal(clf.predict_proba(inputs), calibrated["clf"].predict_proba(inputs))
    # other templates (the first one dropped): refused where the gate is used, naming the first change
    other = tmp_path / "other_templates.txt"
    other.write_text("\n".join(recorded[1:]) + "\n", encoding="utf-8")
    clf = _hybrid(tiny_hybrid, templates=str(other)).load_run(calibrated["run"])
    with pytest.raises(ParameterError) as exc:
        clf.predict(inputs)
    assert exc.value.parameter == "templates" and str(exc.value) == (
        f"templates={str(other)!r}: builds the class texts from {len(recorded) - 1} templates, but "
        f"{calibrated['run'] / 'gate.json'} was calibrated with {len(recorded)} others "
        f"({recorded[0]!r} is missing): its thresholds hold for the scores those "
        "give. Leave the templates unset to use the recorded ones, or calibrate the run again with these")
    # the same templates in another order: the same mean, accepted
    reordered = tmp_path / "reordered.txt"
    reordered.write_text("\n".join(reversed(recorded)) + "\n", encoding="utf-8")
    assert _hybrid(tiny_hybrid, templates=str(reordered)).load_run(calibrated["run"]).gate_error_ is None
    # calibrate takes them and records them
    run = _copy_run(calibrated, tmp_path)
    clf = _hybrid(tiny_hybrid, templates=str(other), method="tpr", cache_branch="off").load_run(run)
    clf.calibrate()
    assert clf.gate_error_ is None
    assert json.loads((run / "gate.json").read_text(encoding="utf-8"))["clip"]["templates"] == recorded[1:]


def test_a_recorded_clip_that_cannot_be_loaded_names_the_gate_not_a_flag(calibrated, tiny_hybrid,
                                                                          tmp_path, capsys):
    from hybridcls.errors import CheckpointError

    run = _copy_run(calibrated, tmp_path)
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    gate["clip"]["model_id"] = f"local-dir:{tmp_path / 'elsewhere'}"  # the run moved, its CLIP not
    (run / "gate.json").write_text(json.dumps(gate), encoding="utf-8")
    with pytest.raises(CheckpointError) as exc:
        _hybrid(tiny_hybrid).load_run(run)
    assert str(exc.value).startswith(
        f"{run / 'gate.json'} records the CLIP it was calibrated with, clip_model="
        f"'local-dir:{tmp_path / 'elsewhere'}' (weights ")
    assert str(exc.value).endswith(f"and it cannot be loaded here (folder {tmp_path / 'elsewhere'} not "
                                   "found); give a copy of the same weights, e.g. clip_model="
                                   "'local-dir:FOLDER' (the weights' fingerprint is checked)")
    rc, err = _cli_predict(tiny_hybrid, run, tmp_path / "a.jsonl", [], capsys)
    assert rc == 2 and "e.g. --clip-model local-dir:FOLDER (the weights' fingerprint" in err
    # a copy of the same weights, given: accepted
    moved = shutil.copytree(TINY_CLIP_DIR, tmp_path / "copy_clip")
    assert _hybrid(tiny_hybrid, clip_model=f"local-dir:{moved}").load_run(run).gate_error_ is None


def test_the_saved_folder_records_the_clip_loaded(calibrated, tiny_hybrid, tmp_path):
    # clip_pretrained left at its default tag: a local-dir: model is loaded, and recorded, without it
    saved = _hybrid(tiny_hybrid).load_run(calibrated["run"]).save_pretrained(tmp_path / "saved")
    meta = json.loads((saved / "hybrid.json").read_text(encoding="utf-8"))
    assert (meta["clip_model"], meta["clip_pretrained"]) == (TINY_CLIP_MODEL_ID, None)
    card = (saved / "README.md").read_text(encoding="utf-8")
    assert f"- CLIP: open_clip `local-dir:{TINY_CLIP_DIR.name}` (weights SHA-256" in card
    assert str(TINY_CLIP_DIR) not in card and DEFAULT_CLIP_PRETRAINED not in card


def test_the_same_weights_in_a_moved_folder_are_the_same_clip(calibrated, tiny_hybrid, tmp_path):
    moved = shutil.copytree(TINY_CLIP_DIR, tmp_path / "moved_clip")
    clf = _hybrid(tiny_hybrid, clip_model=f"local-dir:{moved}", clip_pretrained=None).load_run(calibrated["run"])
    assert clf.gate_error_ is None
    inputs = [tiny_hybrid["world"].test_dir]
    np.testing.assert_array_equal(clf.predict_proba(inputs), calibrated["clf"].predict_proba(inputs))


def _perturbed_copy(tmp_path: Path) -> Path:
    """The shipped tiny CLIP with one weight changed, as a local-dir: folder."""
    folder = Path(shutil.copytree(TINY_CLIP_DIR, tmp_path / "perturbed_clip"))
    state = load_file(folder / WEIGHTS)
    first = min(state)
    state[first] = state[first] + 1
    save_file(state, str(folder / WEIGHTS))
    return folder


@pytest.mark.parametrize("which", ["random", "perturbed"])
def test_another_clip_is_refused_wherever_the_gate_is_used(calibrated, tiny_hybrid, tmp_path, which):
    folder = calibrated["other"] if which == "random" else _perturbed_copy(tmp_path)
    model_id = f"local-dir:{folder}"
    clf = _hybrid(tiny_hybrid, clip_model=model_id, clip_pretrained=None).load_run(calibrated["run"])
    expected = (f"clip_model={model_id!r}: loads CLIP {model_id} (weights "
                f"{_sha256(folder / WEIGHTS)[:12]}...), but {calibrated['run'] / 'gate.json'} was "
                f"calibrated with clip_model={TINY_CLIP_MODEL_ID!r} (weights "
                f"{_sha256(TINY_CLIP_DIR / WEIGHTS)[:12]}...): its thresholds hold for that model's "
                "scores only.")
    with pytest.raises(ParameterError) as exc:
        clf.predict([tiny_hybrid["world"].test_dir])
    assert str(exc.value).startswith(expected) and exc.value.parameter == "clip_model"
    with pytest.raises(ParameterError, match="was calibrated with"):
        clf.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_calibrate_accepts_another_clip_and_replaces_the_record(calibrated, tiny_hybrid, tmp_path):
    run = _copy_run(calibrated, tmp_path)
    other = f"local-dir:{calibrated['other']}"
    clf = _hybrid(tiny_hybrid, clip_model=other, clip_pretrained=None, method="tpr",
                  cache_branch="off").load_run(run).calibrate()
    assert clf.gate_error_ is None
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    assert gate["clip"]["fingerprint"] == _sha256(calibrated["other"] / WEIGHTS)
    # the next load without a CLIP chosen follows the new record; the old CLIP is now the other one
    assert _hybrid(tiny_hybrid).load_run(run).tower_.bundle.model_id == other
    old = _hybrid(tiny_hybrid, clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None).load_run(run)
    assert old.gate_error_ is not None and f"calibrated with clip_model={other!r}" in str(old.gate_error_)


def test_a_gate_json_without_the_record_loads_with_a_warning(calibrated, tiny_hybrid, tmp_path):
    run = _copy_run(calibrated, tmp_path)
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    del gate["clip"]  # as written before the record was kept
    (run / "gate.json").write_text(json.dumps(gate), encoding="utf-8")
    with pytest.warns(HybridclsWarning, match="does not record the CLIP it was calibrated with") as caught:
        clf = _hybrid(tiny_hybrid, clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None).load_run(run)
    assert len([w for w in caught if issubclass(w.category, HybridclsWarning)]) == 1
    # no CLIP chosen: the warning says which one loads, before it loads (a download may fail)
    from hybridcls.errors import WeightsUnavailableError

    # the default CLIP's weights are not on this machine
    with pytest.warns(HybridclsWarning, match=rf"cannot be checked, and the default one is loaded "
                                              rf"\({DEFAULT_CLIP_MODEL}\); calibrate again"), \
            pytest.raises(WeightsUnavailableError):
        _hybrid(tiny_hybrid).load_run(run)
    assert clf.gate_error_ is None
    inputs = [tiny_hybrid["world"].test_dir]
    np.testing.assert_array_equal(clf.predict_proba(inputs), calibrated["clf"].predict_proba(inputs))


def test_a_record_without_templates_warns_that_they_go_unchecked(calibrated, tiny_hybrid, tmp_path):
    run = _copy_run(calibrated, tmp_path)
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    del gate["clip"]["templates"]  # as written by the version that recorded the CLIP only
    (run / "gate.json").write_text(json.dumps(gate), encoding="utf-8")
    with pytest.warns(HybridclsWarning) as caught:
        clf = _hybrid(tiny_hybrid).load_run(run)
    assert [str(w.message) for w in caught if issubclass(w.category, HybridclsWarning)] == [
        (f"{run / 'gate.json'} does not record the prompt templates it was calibrated with (written "
         "before hybridcls recorded them): templates other than those move every score unchecked; "
         "calibrate again to record them")]
    assert clf.gate_error_ is None


def test_clip_to_load_follows_the_record_only_when_no_clip_is_chosen():
    record = {"model_id": "ViT-B-16", "pretrained": "openai", "fingerprint": "f" * 64}
    assert clip_to_load(None, DEFAULT_CLIP_PRETRAINED, record) == ("ViT-B-16", "openai")
    # weights kept elsewhere on this machine: the recorded model with them
    assert clip_to_load(None, "/w/b16.safetensors", record) == ("ViT-B-16", "/w/b16.safetensors")
    assert clip_to_load("ViT-L-14", DEFAULT_CLIP_PRETRAINED, record) == ("ViT-L-14", DEFAULT_CLIP_PRETRAINED)
    assert clip_to_load(None, DEFAULT_CLIP_PRETRAINED, None) == (DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED)
    # a model whose weights come with it is recorded, and loaded, without the default tag
    assert clip_to_load("local-dir:c", DEFAULT_CLIP_PRETRAINED, None) == ("local-dir:c", None)


def test_clip_mismatch_names_the_pretrained_weights_of_the_same_built_in_model():
    record = {"model_id": "ViT-B-16", "pretrained": "openai", "fingerprint": "a" * 64}
    loaded = {"model_id": "ViT-B-16", "pretrained": "laion2b_s34b_b88k", "fingerprint": "b" * 64}
    err = clip_mismatch(record, loaded, clip_model="ViT-B-16", clip_pretrained="laion2b_s34b_b88k",
                        gate_file="run/gate.json")
    assert err.parameter == "clip_pretrained" and str(err).startswith(
        "clip_pretrained='laion2b_s34b_b88k': loads CLIP ViT-B-16 (weights bbbbbbbbbbbb...), but "
        "run/gate.json was calibrated with clip_model='ViT-B-16' clip_pretrained='openai' "
        "(weights aaaaaaaaaaaa...)")
    # another built-in architecture is another model, whatever file it reads
    err = clip_mismatch(record, {**loaded, "model_id": "ViT-B-16-quickgelu", "fingerprint": "a" * 64},
                        clip_model="ViT-B-16-quickgelu", clip_pretrained=None, gate_file="g")
    assert err.parameter == "clip_model"
    assert clip_mismatch(record, {**record}, clip_model=None, clip_pretrained="openai", gate_file="g") is None
    # a gate calibrated with a local-dir: CLIP, loaded with a built-in one: the model differs
    local = {"model_id": "local-dir:/x/tiny_clip", "pretrained": None, "fingerprint": "a" * 64}
    err = clip_mismatch(local, loaded, clip_model="ViT-B-16", clip_pretrained="laion2b_s34b_b88k",
                        gate_file="g")
    assert err.parameter == "clip_model" and str(err).startswith("clip_model='ViT-B-16': loads CLIP")


def _cli_predict(tiny_hybrid, run: Path, out: Path, extra: list[str], capsys) -> tuple[int, str]:
    common = list(tiny_hybrid["common"])
    at = common.index("--clip-model")
    del common[at:at + 2]  # no CLIP chosen unless extra chooses one
    capsys.readouterr()
    rc = main(["predict", str(tiny_hybrid["world"].test_dir), *common, "--checkpoint", str(run),
               "-o", str(out), "-q", *extra])
    return rc, capsys.readouterr().err


def test_cli_predict_uses_the_recorded_clip_and_refuses_another(calibrated, tiny_hybrid, tmp_path, capsys):
    run = calibrated["run"]
    rc, err = _cli_predict(tiny_hybrid, run, tmp_path / "a.jsonl", [], capsys)
    assert rc == 0, err
    manifest = json.loads((tmp_path / "a.jsonl.manifest.json").read_text(encoding="utf-8"))
    assert manifest["record"]["models"]["clip"]["model_id"] == TINY_CLIP_MODEL_ID
    rc, err = _cli_predict(tiny_hybrid, run, tmp_path / "b.jsonl", ["--clip-model", TINY_CLIP_MODEL_ID], capsys)
    assert rc == 0, err
    assert (tmp_path / "a.jsonl").read_text(encoding="utf-8") == (tmp_path / "b.jsonl").read_text(encoding="utf-8")
    other = f"local-dir:{calibrated['other']}"
    rc, err = _cli_predict(tiny_hybrid, run, tmp_path / "c.jsonl", ["--clip-model", other], capsys)
    assert rc == 2 and not (tmp_path / "c.jsonl").exists()
    assert f"--clip-model {other}: loads CLIP {other}" in err
    assert f"was calibrated with --clip-model {TINY_CLIP_MODEL_ID} (weights" in err
    with warnings.catch_warnings():  # calibrate takes the other CLIP: the record is replaced
        warnings.simplefilter("error", HybridclsWarning)
        copy = _copy_run(calibrated, tmp_path)
        assert main(["calibrate", str(copy), *tiny_hybrid["common"][:4], "--clip-model", other,
                     "--cache-dir", str(tiny_hybrid["root"] / "cache"), "--device", "cpu",
                     "--workers", "0", "--method", "tpr", "-q"]) == 0
    assert json.loads((copy / "gate.json").read_text(encoding="utf-8"))["clip"]["model_id"] == other
