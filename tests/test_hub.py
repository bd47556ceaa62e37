"""Sharing through the Hugging Face Hub (issue 17), offline: a local folder laid out as the Hub
cache stands for the Hub, and the upload is caught before it leaves the process."""

from __future__ import annotations

import csv
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard, constants
from safetensors.torch import load_file

from hybridcls import HybridClassifier
from hybridcls.errors import CheckpointError, ParameterError, WeightsUnavailableError
from hybridcls.synth import TINY_CLIP_DIR, TINY_CLIP_MODEL_ID

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def clf(tiny_hybrid) -> HybridClassifier:
    world, root = tiny_hybrid["world"], tiny_hybrid["root"]
    return HybridClassifier(clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None,
                            templates=str(world.templates_file), device="cpu", workers=0,
                            cache_dir=str(root / "cache"), progress=False
                            ).load_run(tiny_hybrid["run"], world.prompts_file)


@pytest.fixture(scope="module")
def saved(clf, tmp_path_factory) -> Path:
    return clf.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub uses by default, offline."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _place(folder: Path, cache: Path, repo_id: str) -> Path:
    """Lay ``folder`` out as huggingface_hub caches a download of ``repo_id`` at main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION, encoding="utf-8")
    return repo / "snapshots" / REVISION


def _images(tiny_hybrid) -> list[Path]:
    return sorted(Path(tiny_hybrid["world"].test_dir).glob("*.png"))


def _runtime_flags(tiny_hybrid, *, cache_dir: bool = True) -> list[str]:
    """``tiny_hybrid``'s flags without those a saved folder fixes (CLIP, prompts, templates),
    and without ``--cache-dir`` unless ``cache_dir``."""
    flags = tiny_hybrid["common"]  # pairs of flag and value
    fixed = ("--prompts", "--templates", "--clip-model") + (() if cache_dir else ("--cache-dir",))
    return [a for flag, value in zip(flags[::2], flags[1::2]) if flag not in fixed for a in (flag, value)]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_repo_id_in_the_cache_predicts_as_the_saved_model(clf, saved, hub_cache, tiny_hybrid):
    snapshot = _place(saved, hub_cache, "org/tiny-hybrid")
    again = HybridClassifier.from_pretrained("org/tiny-hybrid", device="cpu", workers=0, progress=False)
    assert again.run_dir_ == snapshot
    images = _images(tiny_hybrid)
    np.testing.assert_array_equal(again.predict_proba(images), clf.predict_proba(images))
    assert list(again.predict(images)) == list(clf.predict(images))
    assert list(again.classes_) == list(clf.classes_) and again.n_seen_ == clf.n_seen_
    assert again.model_version_ == clf.model_version_
    # open_clip's spelling of a Hub id is the same repo
    other = HybridClassifier.from_pretrained("hf-hub:org/tiny-hybrid", device="cpu", workers=0)
    assert other.run_dir_ == snapshot


def test_predict_takes_a_saved_folder_as_its_checkpoint(clf, saved, tiny_hybrid, tmp_path, capsys):
    """``hybridcls predict --checkpoint FOLDER`` without ``--prompts``: the folder's own prompts,
    and the rows the run directory gives with them; a run directory still needs the prompts."""
    from hybridcls.cli import main

    common = _runtime_flags(tiny_hybrid)
    images = [str(p) for p in _images(tiny_hybrid)]
    assert main(["predict", *images, "--checkpoint", str(saved), *common, "-q",
                 "-o", str(tmp_path / "saved.csv")]) == 0
    assert main(["predict", *images, "--checkpoint", str(tiny_hybrid["run"]), *tiny_hybrid["common"],
                 "-q", "-o", str(tmp_path / "run.csv")]) == 0

    assert _rows(tmp_path / "saved.csv") == _rows(tmp_path / "run.csv")
    assert len(_rows(tmp_path / "run.csv")) == len(images)
    capsys.readouterr()
    assert main(["predict", *images, "--checkpoint", str(tiny_hybrid["run"]), *common, "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"hybridcls predict: error: --prompts or --classes is needed: {tiny_hybrid['run']} is a run "
        "directory, not a save_pretrained folder (which carries its prompts)")
    # what the folder fixes is refused before anything loads, as explain refuses it
    assert main(["predict", *images, "--checkpoint", str(saved), *common, "--templates",
                 str(tiny_hybrid["world"].templates_file), "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"hybridcls predict: error: --templates {tiny_hybrid['world'].templates_file}: the "
        f"save_pretrained folder {saved} fixes its CLIP model, prompts and templates (its "
        "class-text matrix is built from them); give the run directory it was saved from as "
        "--checkpoint, with --prompts, to change them")
    # an absolute path is no repo id: said at once, no Hub asked
    assert main(["predict", *images, "--checkpoint", str(tmp_path / "nowhere"), "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"hybridcls predict: error: --checkpoint {tmp_path / 'nowhere'}: no such folder, and not "
        "a Hugging Face Hub repo id (ORG/NAME)")
    assert main(["predict", *images, "--checkpoint", str(saved / "hybrid.json"), "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"hybridcls predict: error: --checkpoint {saved / 'hybrid.json'}: a file, not a folder (a "
        "run directory, or a folder from save_pretrained)")


def test_predict_and_explain_take_a_hub_repo_id(saved, hub_cache, tiny_hybrid, tmp_path, monkeypatch,
                                                capsys):
    """``--checkpoint ORG/NAME``: the repo's cached snapshot, as ``from_pretrained`` finds it
    (HF_HUB_CACHE, or ``--cache-dir``; ``hf-hub:`` spelling; ``--revision``; offline), predicts the
    rows of the saved folder it holds; a folder here of the same spelling wins."""
    from hybridcls.cli import main

    monkeypatch.setenv("HYBRIDCLS_CACHE_DIR", str(tmp_path / "text-cache"))  # not the user's
    images = [str(p) for p in _images(tiny_hybrid)]
    flags = _runtime_flags(tiny_hybrid, cache_dir=False)
    _place(saved, hub_cache, "org/tiny-hybrid")
    elsewhere = tmp_path / "elsewhere"  # --cache-dir is the Hub cache too, as cache_dir= is
    _place(saved, elsewhere, "org/other-name")

    def predict(checkpoint: str, out: str, *extra: str) -> int:
        return main(["predict", *images, "--checkpoint", checkpoint, *flags, *extra, "-q",
                     "-o", str(tmp_path / out)])

    assert predict(str(saved), "folder.csv") == 0
    expected = _rows(tmp_path / "folder.csv")
    assert len(expected) == len(images) and {r["status"] for r in expected} == {"ok"}
    assert predict("org/tiny-hybrid", "repo.csv") == 0
    assert predict("hf-hub:org/other-name", "spelled.csv", "--revision", REVISION,
                   "--cache-dir", str(elsewhere)) == 0
    here = tmp_path / "here"
    shutil.copytree(saved, here / "org" / "not-in-the-cache")
    monkeypatch.chdir(here)  # a folder of a repo id's spelling: the folder, never the Hub
    assert predict("org/not-in-the-cache", "local.csv") == 0
    for name in ("repo.csv", "spelled.csv", "local.csv"):
        assert _rows(tmp_path / name) == expected, name
    # explain loads the same saved classifier from the repo: its record names the same model
    log = tmp_path / "explain.json"
    assert main(["explain", images[0], "--checkpoint", "org/tiny-hybrid", *flags, "--neighbours", "0",
                 "-q", "-o", str(tmp_path / "explain"), "--log", str(log)]) == 0
    meta = json.loads((saved / "hybrid.json").read_text(encoding="utf-8"))
    assert json.loads(log.read_text(encoding="utf-8"))["models"]["model_version"] == meta["model_version"]
    capsys.readouterr()
    # a repo that is not in the cache, offline: the flag, the repo and why, before anything loads
    for command in ("predict", "explain"):
        assert main([command, images[0], "--checkpoint", "org/absent", *flags, "-q",
                     "-o", str(tmp_path / f"absent-{command}")]) == 2
        assert _error(capsys) == (
            f"hybridcls {command}: error: --checkpoint org/absent: no such local folder, and the Hub "
            "repo is not in the Hugging Face cache while downloads are off (HF_HUB_OFFLINE is set); "
            "unset HF_HUB_OFFLINE and run once with network access to cache it, or pass the folder "
            "of a saved HybridClassifier (check its spelling if it is one)")
        assert not (tmp_path / f"absent-{command}").exists()
    assert predict("org/tiny-hybrid", "v2.csv", "--revision", "v2") == 2
    assert _error(capsys).startswith("hybridcls predict: error: --checkpoint org/tiny-hybrid: no such "
                                     "local folder, and the Hub repo is not in the Hugging Face "
                                     "cache at revision v2 while downloads are off")
    assert predict(str(saved), "rev.csv", "--revision", "v2") == 2
    assert _error(capsys) == (f"hybridcls predict: error: --revision v2: --checkpoint {saved} is a "
                              "folder here; --revision chooses a version of a Hub repo")
    assert main(["predict", *images, "--prompts", str(tiny_hybrid["world"].prompts_file),
                 "--revision", "v2", "-q"]) == 2
    assert _error(capsys) == ("hybridcls predict: error: --revision v2: needs --checkpoint ORG/NAME, "
                              "a Hugging Face Hub repo id")
    # a repo that holds another kind of folder
    _place(tiny_hybrid["run"], hub_cache, "org/a-run")
    assert predict("org/a-run", "run.csv") == 2
    assert _error(capsys) == ("hybridcls predict: error: --checkpoint org/a-run: the Hub repo holds no "
                              "hybrid.json: not a folder from save_pretrained")
    assert not any((tmp_path / name).exists() for name in ("v2.csv", "rev.csv", "run.csv"))


def test_a_saved_folder_refuses_prompts(saved, tiny_hybrid, tmp_path, capsys):
    """A saved folder with ``--prompts`` / ``--classes`` was loaded as a run directory: the
    folder's gate (and support images, labelled by its own classes) with a class-text matrix
    built from the user's file. The folder fixes its classes: refused, before anything loads."""
    from hybridcls.cli import main

    world = tiny_hybrid["world"]
    images = [str(p) for p in _images(tiny_hybrid)]
    common = _runtime_flags(tiny_hybrid)
    for command in ("predict", "explain"):
        for flag, value in (("--prompts", str(world.prompts_file)), ("--classes", "fox,elk")):
            assert main([command, *images, "--checkpoint", str(saved), flag, value, *common, "-q",
                         "-o", str(tmp_path / command)]) == 2
            assert _error(capsys) == (
                f"hybridcls {command}: error: {flag} {value}: the save_pretrained folder {saved} "
                "fixes its CLIP model, prompts and templates (its class-text matrix is built from "
                "them); give the run directory it was saved from as --checkpoint, with --prompts, "
                "to change them")
            assert not (tmp_path / command).exists()


# What every message about a saved folder whose files disagree ends with: what to do.
_CHANGED = ("the folder was changed after save_pretrained() wrote it: put its files back as they "
            "were saved (or fetch the Hub repo again), or save it again from the run directory it "
            "was saved from")


def _lost(name):
    """A saved folder's file deleted, and what loading it says."""
    return (lambda f: (f / name).unlink(), lambda f: f"{f}: its {name} is missing; {_CHANGED}")


def test_a_saved_folder_whose_files_disagree_names_its_own_file(saved, tiny_hybrid, tmp_path, capsys):
    """The folder's prompts.txt and templates.txt are passed as prompts= and templates=, which
    the user never gave: a file edited or lost since it was saved is named as the folder's own,
    with what to do, never as --templates / --prompts; predict says so before any model loads."""
    from hybridcls.cli import main

    templates = (saved / "templates.txt").read_text(encoding="utf-8").splitlines()
    classes = json.loads((saved / "hybrid.json").read_text(encoding="utf-8"))["classes"]

    def add_template(folder):
        with open(folder / "templates.txt", "a", encoding="utf-8") as f:
            f.write("a blurry photo of a {}.\n")

    def swap_classes(folder):
        lines = (folder / "prompts.txt").read_text(encoding="utf-8").splitlines()
        (folder / "prompts.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n",
                                            encoding="utf-8")

    def other_weights(folder):
        meta = json.loads((folder / "hybrid.json").read_text(encoding="utf-8"))
        (folder / "hybrid.json").write_text(json.dumps({**meta, "clip_fingerprint": "0" * 64}),
                                            encoding="utf-8")

    cases = {
        "templates": (add_template, lambda f: (
            f"{f / 'templates.txt'}: holds {len(templates) + 1} templates, but {f / 'gate.json'} was "
            f"calibrated with {len(templates)} that differ ('a blurry photo of a {{}}.' is new), and the "
            f"folder's class-text matrix was built from those; {_CHANGED}")),
        "order": (swap_classes, lambda f: (
            f"{f / 'prompts.txt'}: its {len(classes)} classes are not the {len(classes)} that "
            f"hybrid.json records (the class-text matrix's columns, in order): class 1 is "
            f"{classes[1]!r} in it, {classes[0]!r} in hybrid.json; {_CHANGED}")),
        "no-prompts": (lambda f: (f / "prompts.txt").unlink(),
                       lambda f: f"{f}: its prompts.txt is missing; {_CHANGED}"),
        "no-templates": (lambda f: (f / "templates.txt").unlink(),
                         lambda f: f"{f}: its templates.txt is missing; {_CHANGED}"),
        # every file a saved folder holds, named as lost, with the same remedy
        **{f"no-{name}": _lost(name)
           for name in ("config.json", "model.safetensors", "text_classifier.safetensors")},
        "junk-text": (lambda f: (f / "text_classifier.safetensors").write_bytes(b"junk"),
                      lambda f: (f"{f / 'text_classifier.safetensors'}: not a readable class-text "
                                 f"matrix (SafetensorError); {_CHANGED}")),
        "bad-template": (lambda f: (f / "templates.txt").write_text("no placeholder\n", encoding="utf-8"),
                         None),
    }
    images = [str(p) for p in _images(tiny_hybrid)]
    common = _runtime_flags(tiny_hybrid)
    for name, (edit, message) in cases.items():
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        edit(folder)
        with pytest.raises(CheckpointError) as info:
            HybridClassifier.from_pretrained(folder, device="cpu", cache_dir=str(tmp_path / "cache"))
        said = str(info.value)
        if message is None:  # the prompt parser's own words: the file and line, then the remedy
            assert said.startswith(f"{folder / 'templates.txt'}:1: ") and said.endswith(f"; {_CHANGED}")
        else:
            assert said == message(folder), name
        for command in ("predict", "explain"):
            assert main([command, *images, "--checkpoint", str(folder), *common, "-q",
                         "-o", str(tmp_path / f"{name}-{command}")]) == 2
            assert _error(capsys) == f"hybridcls {command}: error: {said}", name
            assert not (tmp_path / f"{name}-{command}").exists()

    # other CLIP weights under the name hybrid.json records: the parameter that gives the right
    # ones is named as what to give, not as a value given (the user gave none)
    folder = tmp_path / "weights"
    shutil.copytree(saved, folder)
    other_weights(folder)
    loaded = json.loads((saved / "hybrid.json").read_text(encoding="utf-8"))["clip_fingerprint"][:12]
    said = (f"{folder}: saved with CLIP weights 000000000000..., the CLIP its hybrid.json names "
            f"loads {loaded}... here: give the weights it was saved with, as ")
    with pytest.raises(CheckpointError) as info:
        HybridClassifier.from_pretrained(folder, device="cpu", cache_dir=str(tmp_path / "cache"))
    assert str(info.value) == said + "clip_pretrained=FILE"
    assert main(["predict", *images, "--checkpoint", str(folder), *common, "-q",
                 "-o", str(tmp_path / "weights.csv")]) == 2
    assert _error(capsys) == f"hybridcls predict: error: {said}--clip-pretrained FILE"


def test_cache_dir_is_the_hub_cache_too(saved, tmp_path):
    cache = tmp_path / "elsewhere"
    snapshot = _place(saved, cache, "org/tiny-hybrid")
    # not offline: local_files_only alone keeps huggingface_hub off the network
    again = HybridClassifier.from_pretrained("org/tiny-hybrid", local_files_only=True, cache_dir=str(cache),
                                             device="cpu", workers=0)
    assert again.run_dir_ == snapshot


def test_a_repo_not_in_the_cache_offline_is_named(hub_cache):
    with pytest.raises(WeightsUnavailableError) as err:
        HybridClassifier.from_pretrained("org/absent", device="cpu")
    msg = str(err.value)
    assert msg.startswith("org/absent: no such local folder, and the Hub repo is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in msg


def test_local_files_only_is_named_when_it_stops_the_download(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("a request was made")

    for name in ("connect", "connect_ex"):  # whatever HTTP client huggingface_hub uses
        monkeypatch.setattr(socket.socket, name, no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(WeightsUnavailableError, match=rf"org/absent: .* cache {tmp_path} .*local_files_only=True"):
        HybridClassifier.from_pretrained("org/absent", local_files_only=True, cache_dir=str(tmp_path))


def test_an_unreachable_hub_is_not_called_offline(tmp_path, monkeypatch):
    """huggingface_hub raises LocalEntryNotFoundError when it cannot reach the Hub with
    downloads on, too: the message says the Hub cannot be reached, not that downloads are off."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error, and the file is not in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(WeightsUnavailableError) as err:
        HybridClassifier.from_pretrained("runs/awa3", cache_dir=str(tmp_path))
    assert str(err.value).startswith(f"runs/awa3: no such local folder, and the Hub repo is not in the "
                                     f"cache {tmp_path} while the Hub cannot be reached; ")


def test_a_folder_takes_no_revision_and_a_bad_name_is_neither(saved, tmp_path):
    with pytest.raises(ParameterError, match=r"revision='v1': .* is a local folder"):
        HybridClassifier.from_pretrained(saved, revision="v1")
    with pytest.raises(CheckpointError, match=r"no such folder, and not a Hugging Face Hub repo id"):
        HybridClassifier.from_pretrained(tmp_path / "a" / "b" / "c")
    with pytest.raises(CheckpointError, match=r"a file, not the folder of a saved HybridClassifier"):
        HybridClassifier.from_pretrained(saved / "hybrid.json")


def test_push_to_hub_uploads_the_saved_folder(clf, monkeypatch):
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload"] = (repo_id, kwargs)
        calls["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        calls["card"] = (folder / "README.md").read_text(encoding="utf-8")
        calls["config"] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        calls["weights"] = (folder / "model.safetensors").read_bytes()
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert clf.push_to_hub("org/tiny-hybrid", private=True) == "commit-info"
    assert calls["create"] == ("org/tiny-hybrid", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"][0] == "org/tiny-hybrid" and calls["upload"][1]["repo_type"] == "model"
    assert {"README.md", "config.json", "model.safetensors", "gate.json", "hybrid.json", "prompts.txt",
            "templates.txt", "text_classifier.safetensors"} <= set(calls["files"])
    assert {"index/clip.faiss", "index/clip.json"} <= set(calls["files"])
    assert calls["weights"] == (clf.run_dir_ / "model.safetensors").read_bytes()
    assert calls["config"]["label_names"] == list(clf.classes_[: clf.n_seen_])
    assert 'HybridClassifier.from_pretrained("org/tiny-hybrid")' in calls["card"]


def test_the_model_card_says_what_a_user_needs(clf, saved, tiny_hybrid):
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "hybridcls" and card.data.pipeline_tag == "image-classification"
    text = card.text
    seen, unseen = list(clf.classes_[: clf.n_seen_]), list(clf.classes_[clf.n_seen_:])
    seen_part, unseen_part = text.split("Seen (4;")[1].split("Unseen (2;")
    assert all(f"- {c}\n" in seen_part for c in seen) and not any(f"- {c}\n" in seen_part for c in unseen)
    assert all(f"- {c}\n" in unseen_part.split("## Models")[0] for c in unseen)
    config = json.loads((tiny_hybrid["run"] / "config.json").read_text(encoding="utf-8"))
    assert f"timm `{config['model']['name']}`" in text
    # the local-dir: CLIP by its folder's name, no tag (its weights come with it), no local path
    assert f"open_clip `local-dir:{TINY_CLIP_DIR.name}` (weights" in text and str(TINY_CLIP_DIR) not in text
    meta = json.loads((saved / "hybrid.json").read_text(encoding="utf-8"))
    assert (meta["clip_model"], meta["clip_pretrained"]) == (TINY_CLIP_MODEL_ID, None)
    fingerprint = meta["clip_fingerprint"]
    assert f"weights SHA-256 `{fingerprint}`" in text
    gate = json.loads((tiny_hybrid["run"] / "gate.json").read_text(encoding="utf-8"))
    assert (f"score `{gate['score']}`, mode `{gate['mode']}`, threshold {gate['threshold']:.4g} "
            f"(keeps at least {100 * gate['tpr']:.1f}%") in text
    best = gate["candidates"][0]
    assert f"H {100 * best['mean_h']:.1f}% (std {100 * best['std_h']:.1f}%)" in text
    cache = gate["cache_branch"]
    assert (f"{cache['n_val']} held-out images: {100 * cache['val_accuracy_plain']:.1f}% without the cache "
            f"branch, {100 * cache['val_accuracy']:.1f}% with it") in text
    assert "## Intended use and limits" in text and f"`model_version`: `{clf.model_version_}`" in text


def test_timm_reads_the_config_and_loads_the_backbone(clf, saved):
    config = json.loads((saved / "config.json").read_text(encoding="utf-8"))
    assert config["format"] == "hybridcls-supervised"  # still hybridcls's checkpoint
    backbone = timm.create_model(f"local-dir:{saved}", pretrained=False, num_classes=0)
    cfg = backbone.pretrained_cfg
    assert cfg["label_names"] == list(clf.classes_[: clf.n_seen_]) and cfg["num_classes"] == clf.n_seen_
    assert list(cfg["input_size"]) == config["data_config"]["input_size"]
    assert type(backbone) is type(clf.supervised_.backbone)
    state = {k.removeprefix("backbone."): v for k, v in load_file(saved / "model.safetensors").items()
             if k.startswith("backbone.")}
    backbone.load_state_dict(state, strict=True)
    x = torch.randn(2, *config["data_config"]["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(backbone.eval()(x), clf.supervised_.backbone(x))


def test_resume_and_merge_compare_the_files_a_saved_folder_loads(saved, tiny_hybrid, tmp_path, capsys):
    """``--checkpoint FOLDER`` predicts with the folder's templates and class-text matrix, which
    no flag names: the manifest compares every file loading the folder reads, so that two folders
    saved from one run with other templates neither resume nor merge into each other's rows."""
    from safetensors.numpy import load_file as load_numpy
    from safetensors.numpy import save_file as save_numpy

    from hybridcls.cli import build_parser, main
    from hybridcls.cli.predict import _validate, prediction_settings

    other = tmp_path / "other-templates"
    shutil.copytree(saved, other)
    with open(other / "templates.txt", "a", encoding="utf-8") as f:
        f.write("a blurry photo of a {}.\n")
    # saved with those templates, its gate records them too (a folder whose files disagree is
    # refused before anything is compared)
    gate = json.loads((other / "gate.json").read_text(encoding="utf-8"))
    gate["clip"]["templates"] = (other / "templates.txt").read_text(encoding="utf-8").splitlines()
    (other / "gate.json").write_text(json.dumps(gate), encoding="utf-8")
    # stands for the matrix those templates build: any other values
    text = load_numpy(str(other / "text_classifier.safetensors"))["text_features"]
    save_numpy({"text_features": -text}, str(other / "text_classifier.safetensors"))
    same = tmp_path / "same"  # a copy elsewhere: the same files, the same settings
    shutil.copytree(saved, same)

    common = _runtime_flags(tiny_hybrid)
    images = [str(p) for p in _images(tiny_hybrid)]

    def settings(folder: Path) -> dict:
        args = build_parser().parse_args(["predict", *images, "--checkpoint", str(folder), *common,
                                          "-o", str(tmp_path / "x.csv")])
        _validate(args)
        return prediction_settings(args)

    # every file of the folder but the model card, each by its content
    assert set(settings(saved)["checkpoint"]) == {p.name for p in saved.iterdir()} - {"README.md"}
    assert settings(same) == settings(saved)
    first, second = settings(saved)["checkpoint"], settings(other)["checkpoint"]
    assert [name for name in first if first[name] != second[name]] == [
        "gate.json", "templates.txt", "text_classifier.safetensors"]

    out = tmp_path / "pred.csv"
    argv = ["predict", *images, *common, "-q", "-o", str(out)]
    assert main([*argv, "--checkpoint", str(saved)]) == 0
    assert main([*argv, "--checkpoint", str(same), "--resume"]) == 0
    capsys.readouterr()
    assert main([*argv, "--checkpoint", str(other), "--resume"]) == 2
    assert _error(capsys) == (
        f"hybridcls predict: error: --resume: cannot continue {out}: it was written with other "
        "settings or inputs (checkpoint: 3 changed (gate.json, templates.txt, "
        "text_classifier.safetensors)); "
        "run without --resume to start it again, or choose another --output FILE")
    # parts of an array job, one predicted with another class-text matrix (the templates the gate
    # records unchanged, so that it predicts): not merged
    matrix = tmp_path / "other-matrix"
    shutil.copytree(saved, matrix)
    shutil.copy(other / "text_classifier.safetensors", matrix / "text_classifier.safetensors")
    parts = [tmp_path / "part0.csv", tmp_path / "part1.csv"]
    for i, folder in enumerate((saved, matrix)):
        assert main(["predict", *images, *common, "-q", "--checkpoint", str(folder),
                     "--shard", f"{i}/2", "-o", str(parts[i])]) == 0
    capsys.readouterr()
    assert main(["merge", *map(str, parts), "-o", str(tmp_path / "merged.csv")]) == 2
    assert "checkpoint: 1 changed (text_classifier.safetensors)" in _error(capsys)
    assert not (tmp_path / "merged.csv").exists()


def test_a_repo_id_is_refused_what_a_saved_folder_fixes_before_any_download(saved, hub_cache, tiny_hybrid,
                                                                            tmp_path, monkeypatch,
                                                                            capsys):
    """A repo id can only be a saved folder: ``--prompts``, ``--classes``, ``--clip-model``,
    ``--templates`` and ``--truncate-prompts`` are refused before the repo is fetched, named as
    the user gave it (not its snapshot in the cache), with advice for someone who has the repo."""
    import hybridcls.hub
    from hybridcls.cli import main

    _place(saved, hub_cache, "org/tiny-hybrid")  # a fetch would find it

    def fetched(*args, **kwargs):
        raise AssertionError("the repo was fetched before the flags were checked")

    monkeypatch.setattr(hybridcls.hub, "pretrained_folder", fetched)
    world = tiny_hybrid["world"]
    images = [str(p) for p in _images(tiny_hybrid)]
    flags = _runtime_flags(tiny_hybrid)
    given = [("--prompts", str(world.prompts_file)), ("--classes", "fox,elk"),
             ("--clip-model", TINY_CLIP_MODEL_ID), ("--templates", str(world.templates_file))]
    for command in ("predict", "explain"):
        for flag, value in given:
            assert main([command, *images, "--checkpoint", "org/tiny-hybrid", flag, value, *flags,
                         "-q", "-o", str(tmp_path / command)]) == 2
            assert _error(capsys) == (
                f"hybridcls {command}: error: {flag} {value}: --checkpoint org/tiny-hybrid (no "
                "folder here: a Hugging Face Hub repo, which can only be a save_pretrained folder) "
                "fixes its CLIP model, prompts and templates (its class-text matrix is built from "
                f"them); use the repo as it is, without {flag}, or, to change them, give the run "
                "directory it was saved from as --checkpoint, with --prompts, if you have it (the "
                "repo holds none)")
        assert main([command, *images, "--checkpoint", "hf-hub:org/tiny-hybrid", "--truncate-prompts",
                     *flags, "-q", "-o", str(tmp_path / command)]) == 2
        assert _error(capsys) == (
            f"hybridcls {command}: error: --truncate-prompts: --checkpoint hf-hub:org/tiny-hybrid (no "
            "folder here: a Hugging Face Hub repo, which can only be a save_pretrained folder) holds "
            "its class-text matrix as it was saved (long class texts were cut then, or refused); use "
            "the repo as it is, without --truncate-prompts, or, to build the class texts again, give "
            "the run directory it was saved from as --checkpoint, with --prompts, if you have it "
            "(the repo holds none)")
        assert not (tmp_path / command).exists()
    # a name that is no repo id is no repo's: said as before, whatever the flags
    nowhere = tmp_path / "nowhere"
    assert main(["predict", *images, "--checkpoint", str(nowhere), "--prompts",
                 str(world.prompts_file), *flags, "-q"]) == 2
    assert _error(capsys) == (f"hybridcls predict: error: --checkpoint {nowhere}: no such folder, and "
                              "not a Hugging Face Hub repo id (ORG/NAME)")
