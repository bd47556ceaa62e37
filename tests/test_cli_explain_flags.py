"""``hybridcls explain`` takes predict's decision flags and shows predict's decision with them.

For each flag, the same images through ``predict`` and ``explain`` with the same flags: the
explanation's rows (the result the page is made from) carry the answer, probability and branch
predict wrote; a bad value gets predict's message, word for word.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

import hybridcls.explain
from hybridcls.cli import build_parser, main
from hybridcls.outputs import read_predictions
from hybridcls.synth.hierarchy import write_hierarchy_prompts


def _flags(tiny_hybrid: dict, tmp_path: Path, prompts: Path | None = None) -> list[str]:
    """The CLIP and runtime flags of the tiny hybrid's run, with another prompts file if given."""
    common = list(tiny_hybrid["common"])
    if prompts is not None:
        common[common.index("--prompts") + 1] = str(prompts)
    return common


def _predict(tiny_hybrid: dict, common: list[str], extra: list[str], out: Path) -> int:
    return main(["predict", str(tiny_hybrid["world"].test_dir), *common, "--checkpoint",
                 str(tiny_hybrid["run"]), "-q", "-o", str(out), *extra])


def _explain(tiny_hybrid: dict, common: list[str], extra: list[str], out: Path,
             monkeypatch: pytest.MonkeyPatch, checkpoint: Path | None = None) -> tuple[int, list]:
    """Run ``explain`` and keep the :class:`ExplainResult` its page is written from."""
    results = []
    real = hybridcls.explain.explain_images

    def keep(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(hybridcls.explain, "explain_images", keep)
    rc = main(["explain", str(tiny_hybrid["world"].test_dir), *common, "--checkpoint",
               str(checkpoint or tiny_hybrid["run"]), "--neighbours", "0", "-q", "-o", str(out),
               *extra])
    return rc, results


def _support_dir(tiny_hybrid: dict, tmp_path: Path) -> Path:
    """Two training images of each seen class, one subfolder per class."""
    support = tmp_path / "support"
    for folder in sorted(Path(tiny_hybrid["world"].train_dir).iterdir()):
        (support / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:2]:
            shutil.copy(image, support / folder.name / image.name)
    return support


def _same_decisions(predicted: list[dict], result) -> None:
    """Every input once, in order, with predict's answer, probability and branch (and rank and
    leaf when predict rolled up)."""
    rows = [ex.row for ex in result.explanations]
    assert [r.path for r in rows] == [p["path"] for p in predicted]
    for row, p in zip(rows, predicted):
        assert (row.status, row.label, row.branch) == (p["status"], p["label"], p["branch"])
        assert row.score == pytest.approx(p["score"], abs=1e-6)
        if "rank" in p:
            assert (row.extra["rank"], row.extra["leaf"]) == (p["rank"], p["leaf"])


# ---------------------------------------------------------------- each flag acts as in predict


@pytest.mark.parametrize("flag", ["--support", "--allowed-classes", "--site-classes",
                                  "--rollup-threshold", "--rollup-precision", "--unknown-threshold"])
def test_explain_shows_predicts_decision_with_the_flag(tiny_hybrid, tmp_path, monkeypatch, flag):
    world = tiny_hybrid["world"]
    prompts = None
    keep = [world.seen_classes[0], world.seen_classes[1], world.unseen_classes[0]]
    if flag == "--support":
        extra = [flag, str(_support_dir(tiny_hybrid, tmp_path))]
    elif flag == "--allowed-classes":
        # a hard gate: the zero-shot top-k of the rows it keeps supervised is explain's own
        extra = [flag, ",".join(keep), "--mode", "hard"]
    elif flag == "--site-classes":
        sites = tmp_path / "sites.csv"
        # the folder allows three classes; its first image, one unseen class only (no seen
        # class: the supervised branch has no answer, and explain draws no Grad-CAM for it)
        first = min(world.test_dir.iterdir())
        sites.write_text(f"prefix,classes\n{world.test_dir},{';'.join(keep)}\n"
                         f"{first},{world.unseen_classes[0]}\n", encoding="utf-8")
        extra = [flag, str(sites), "--mode", "hard"]
    elif flag == "--rollup-threshold":
        prompts, extra = write_hierarchy_prompts(world, tmp_path / "tree.txt"), [flag, "0.9"]
    elif flag == "--rollup-precision":
        prompts, extra = write_hierarchy_prompts(world, tmp_path / "tree.txt"), [flag, "0.95"]
    else:
        extra = [flag, "0.6"]
    common = _flags(tiny_hybrid, tmp_path, prompts)
    pred = tmp_path / "pred.jsonl"
    assert _predict(tiny_hybrid, common, extra, pred) == 0
    predicted = read_predictions(pred)
    record = json.loads(pred.with_name(pred.name + ".manifest.json").read_text(encoding="utf-8"))
    rc, results = _explain(tiny_hybrid, common, extra, tmp_path / "explain", monkeypatch)
    assert rc == 0
    (result,) = results
    _same_decisions(predicted, result)
    page = (tmp_path / "explain" / "index.html").read_text(encoding="utf-8")
    gate = record["record"]["gate"]
    if flag == "--support":
        # the support images joined, as predict's record counts them (two per seen class)
        assert result.gate["support"]["counts"] == gate["support"]["counts"] == {
            c: 2 for c in world.seen_classes}
        assert f"{2 * len(world.seen_classes)} support images" in page
    elif flag in ("--allowed-classes", "--site-classes"):
        assert result.gate["restriction"] == gate["restriction"]
        for ex in result.explanations:
            shown = [ex.row.label, ex.clip_class, ex.gradcam_class,
                     *(c for c, _ in ex.row.extra["zeroshot_topk"] if _ > 0),
                     *(c for c, _ in ex.row.extra["supervised_topk"] if _ > 0)]
            assert set(shown) - {""} <= set(keep), ex.row.path
            assert ex.n_allowed == (1 if ex.row.path == str(first) else 3) \
                if flag == "--site-classes" else ex.n_allowed == 3
        assert "restricted to 3 classes" in page
        assert any(not ex.zeroshot_consulted for ex in result.explanations)
        if flag == "--site-classes":
            ex = result.explanations[0]
            assert ex.row.label == world.unseen_classes[0] and ex.row.branch == "zeroshot"
            assert ex.gradcam is None and "gradcam" not in ex.files and ex.gradcam_class == ""
            assert "restricted to 1 class<" in page and "no Grad-CAM" in page
    elif flag.startswith("--rollup"):
        assert result.gate["rollup"] == gate["rollup"]
        rolled = [ex for ex in result.explanations if ex.row.extra["rank"] > 0]
        assert rolled, "the threshold rolls some answer up"
        for ex in rolled:
            # the answer is an ancestor; the CLIP map is of the class it came from
            assert ex.row.label not in world.classes and ex.clip_class == ex.row.extra["leaf"]
        assert "rolled up from" in page and "roll-up threshold" in page
    else:
        assert gate["unknown_threshold"] == 0.6
        # the threshold answers some inputs 'unknown' (the rows compared above say which)
        assert "unknown" in [ex.row.label for ex in result.explanations]


def test_a_saved_folder_takes_the_flags_too(tiny_hybrid, tmp_path, monkeypatch):
    """A ``save_pretrained`` folder (its own prompts, here with ancestors) with a class list and
    a roll-up: the decisions predict makes on its run directory with the same flags."""
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.synth import TINY_CLIP_MODEL_ID

    world = tiny_hybrid["world"]
    tree = write_hierarchy_prompts(world, tmp_path / "tree.txt")
    folder = HybridClassifier(
        clip_model=TINY_CLIP_MODEL_ID, templates=world.templates_file, device="cpu", workers=0,
        cache_dir=tiny_hybrid["root"] / "cache").load_run(tiny_hybrid["run"], tree
                                                          ).save_pretrained(tmp_path / "model")
    keep = ",".join([world.seen_classes[0], world.seen_classes[2], world.unseen_classes[1]])
    extra = ["--allowed-classes", keep, "--rollup-threshold", "0.9"]
    pred = tmp_path / "pred.jsonl"
    assert _predict(tiny_hybrid, _flags(tiny_hybrid, tmp_path, tree), extra, pred) == 0
    runtime = ["--cache-dir", str(tiny_hybrid["root"] / "cache"), "--device", "cpu", "--workers", "0"]
    rc, (result,) = _explain(tiny_hybrid, runtime, extra, tmp_path / "explain", monkeypatch,
                             checkpoint=folder)
    assert rc == 0
    _same_decisions(read_predictions(pred), result)
    assert result.gate["rollup"] == {"threshold": 0.9}


def _cascading_run(tiny_hybrid: dict, tmp_path: Path) -> Path:
    """A copy of the tiny run whose cascade skips CLIP on about half of the test images.

    A one-epoch branch is unsure of everything, so its calibrated cascade sends every image to
    CLIP; the copy's MSP threshold is the median of the test images' supervised MSP (the
    softmax of the logits, as the cascade reads them), its distance threshold one that every
    image meets.
    """
    import numpy as np

    from hybridcls.gate.cascade import max_softmax
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.synth import TINY_CLIP_MODEL_ID

    world = tiny_hybrid["world"]
    clf = HybridClassifier(clip_model=TINY_CLIP_MODEL_ID, templates=world.templates_file, device="cpu",
                           workers=0, cache_dir=tiny_hybrid["root"] / "cache", progress=False
                           ).load_run(tiny_hybrid["run"], world.prompts_file)
    msp = max_softmax(clf.extract_features([world.test_dir], clip="none").sup_logits)
    run = tmp_path / "run"
    shutil.copytree(tiny_hybrid["run"], run)
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    gate.update(cascade_msp=float(np.median(msp)), cascade_distance=1e6)
    (run / "gate.json").write_text(json.dumps(gate), encoding="utf-8")
    return run


def test_explain_takes_the_cascade_and_shows_predicts_answers(tiny_hybrid, tmp_path, monkeypatch,
                                                               capsys):
    """``--cascade`` changes the answers (the images it keeps are the supervised branch's alone):
    explain's rows are predict's with it, CLIP still drawn for every image, and the rows it
    kept from CLIP say that the zero-shot branch was not consulted."""
    run = _cascading_run(tiny_hybrid, tmp_path)
    common = _flags(tiny_hybrid, tmp_path)
    n = len(list(tiny_hybrid["world"].test_dir.iterdir()))
    answers = {}
    for cascade in ([], ["--cascade"]):
        pred = tmp_path / f"pred{len(cascade)}.jsonl"
        capsys.readouterr()
        assert main(["predict", str(tiny_hybrid["world"].test_dir), *common, "--checkpoint", str(run),
                     "-q", "-o", str(pred), *cascade]) == 0
        ran = int(capsys.readouterr().err.split("the CLIP image tower ran on ")[1].split()[0])
        predicted = read_predictions(pred)
        rc, (result,) = _explain(tiny_hybrid, common, cascade, tmp_path / f"ex{len(cascade)}",
                                 monkeypatch, checkpoint=run)
        assert rc == 0
        _same_decisions(predicted, result)
        skipped = [p["zeroshot_topk"] == [] for p in predicted]
        assert [not ex.zeroshot_consulted for ex in result.explanations] == skipped
        assert all(ex.clip_class and "clip" in ex.files for ex in result.explanations)
        if cascade:
            # the median threshold keeps some images from CLIP, not all
            assert 0 < ran < n and sum(skipped) == n - ran
            assert all(p["branch"] == "supervised" for p, s in zip(predicted, skipped) if s)
        else:
            assert ran == n and not any(skipped)
        answers[bool(cascade)] = [(p["label"], p["branch"], p["score"]) for p in predicted]
    assert answers[True] != answers[False]


def test_the_decision_flags_have_one_definition():
    """predict and explain take the same decision flags, with the same help and values."""
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices

    def decision(command):
        (group,) = [g for g in commands[command]._action_groups if g.title == "decision"]
        return [(a.option_strings, a.help, a.choices, a.default) for a in group._group_actions]

    flags = [strings[0] for strings, *_ in decision("predict")]
    assert {"--mode", "--cascade", "--support", "--allowed-classes"} <= set(flags)
    assert decision("explain") == decision("predict")


def test_topk_has_one_definition():
    """--topk: one rule in predict and explain (range, default, what a class list does);
    only what K counts is the command's own."""
    from hybridcls.outputs import DEFAULT_TOPK

    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    (predict,) = [a for a in commands["predict"]._actions if "--topk" in a.option_strings]
    (explain,) = [a for a in commands["explain"]._actions if "--topk" in a.option_strings]
    assert predict.help.startswith("top-k labels per row, ")
    assert explain.help.startswith("classes listed per branch, ")
    rule = f"at most the number of classes (default: {DEFAULT_TOPK}, or every class when there are fewer)"
    assert predict.help.split(", ", 1)[1] == explain.help.split(", ", 1)[1]
    assert rule in predict.help
    assert (predict.type, predict.default, predict.metavar) == (explain.type, explain.default, explain.metavar) \
        == (int, None, "K")


def test_a_folder_saved_with_cut_class_texts_is_its_class_text_matrix(tiny_hybrid, tmp_path,
                                                                      monkeypatch, capsys):
    """A save_pretrained folder holds its class-text matrix (here with a class text cut to the
    tiny CLIP's context when it was saved): predict and explain read it without
    ``--truncate-prompts``, and refuse that flag, which could not act on it."""
    from hybridcls.errors import ClassTextWarning, ParameterError
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.synth import TINY_CLIP_MODEL_ID

    world = tiny_hybrid["world"]
    long = tmp_path / "long.txt"
    long.write_text(world.prompts_file.read_text(encoding="utf-8").rstrip("\n")
                    + "\nan extremely long class name that goes on and on well past twelve tokens\n",
                    encoding="utf-8")
    with pytest.warns(ClassTextWarning, match="are cut to the 12-token context"):
        folder = HybridClassifier(
            clip_model=TINY_CLIP_MODEL_ID, templates=world.templates_file, device="cpu", workers=0,
            cache_dir=tiny_hybrid["root"] / "cache", truncate_prompts=True,
        ).load_run(tiny_hybrid["run"], long).save_pretrained(tmp_path / "model")
    runtime = ["--cache-dir", str(tiny_hybrid["root"] / "cache"), "--device", "cpu", "--workers", "0"]
    images = str(world.test_dir)
    # the run directory with the same prompts, cut at load: the same rows
    assert main(["predict", images, *_flags(tiny_hybrid, tmp_path, long), "--checkpoint",
                 str(tiny_hybrid["run"]), "--truncate-prompts", "-q", "-o", str(tmp_path / "run.jsonl")]) == 0
    assert main(["predict", images, *runtime, "--checkpoint", str(folder), "-q",
                 "-o", str(tmp_path / "saved.jsonl")]) == 0
    saved = read_predictions(tmp_path / "saved.jsonl")
    assert saved == read_predictions(tmp_path / "run.jsonl")
    rc, (result,) = _explain(tiny_hybrid, runtime, [], tmp_path / "explain", monkeypatch,
                             checkpoint=folder)
    assert rc == 0
    _same_decisions(saved, result)
    for command in ("predict", "explain"):
        capsys.readouterr()
        out = tmp_path / f"refused-{command}"
        assert main([command, images, *runtime, "--checkpoint", str(folder), "--truncate-prompts",
                     "-q", "-o", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"hybridcls {command}: error: --truncate-prompts: the save_pretrained folder {folder} "
            "holds its class-text matrix as it was saved (long class texts were cut then, or "
            "refused); give the run directory it was saved from as --checkpoint, with --prompts, "
            "to build the class texts again")
        assert not out.exists()
    with pytest.raises(ParameterError, match=r"^truncate_prompts=True: a saved folder fixes"):
        HybridClassifier.from_pretrained(folder, truncate_prompts=True, device="cpu")


# ---------------------------------------------------------------- bad values: predict's messages


@pytest.mark.parametrize(("extra", "message"), [
    (["--support", "{tmp}/nowhere"],
     "--support {tmp}/nowhere: no such folder (one subfolder of images per class)"),
    (["--support", "{sites}"], "--support {sites}: is a file, not a folder"),
    (["--rollup-threshold", "0.5"], "--rollup-threshold needs ancestors in the prompts file"),
    (["--rollup-threshold", "0.5", "--rollup-precision", "0.9"],
     "--rollup-threshold and --rollup-precision: give one"),
    (["--allowed-classes", "purple plain wolf"],
     "--allowed-classes purple plain wolf: not a class of the prompts file"),
    (["--allowed-classes", "fox,,elk"], "argument --allowed-classes: name 2 of 3 in 'fox,,elk' is empty"),
    (["--site-classes", "{sites}"], "{sites}:2: class 'wolf' is not in the prompts file"),
    (["--cascade", "--allowed-classes", "fox"],
     "--cascade with --allowed-classes: the cascade decides from the confidence over every seen"),
    (["--mode", "fuzzy"], "argument --mode: invalid choice: 'fuzzy'"),
    # the tiny world's prompts file names 6 classes (conftest: n_classes=6)
    (["--topk", "7"], "--topk 7: more than the 6 classes that {prompts} names; give 1 to 6"),
    (["--topk", "0"], "--topk 0: give a whole number from 1 to 6, the classes that {prompts} names"),
])
def test_a_bad_value_gets_predicts_message(tiny_hybrid, tmp_path, capsys, monkeypatch, extra, message):
    sites = tmp_path / "sites.csv"
    sites.write_text("prefix,classes\nx,wolf\n", encoding="utf-8")
    names = {"sites": sites, "tmp": tmp_path, "prompts": tiny_hybrid["world"].prompts_file}
    extra = [e.format(**names) for e in extra]
    message = message.format(**names)
    common = _flags(tiny_hybrid, tmp_path)
    errors = {}
    for command in ("predict", "explain"):
        capsys.readouterr()
        try:
            rc = (_predict(tiny_hybrid, common, extra, tmp_path / "p.jsonl") if command == "predict"
                  else _explain(tiny_hybrid, common, extra, tmp_path / "explain", monkeypatch)[0])
        except SystemExit as exc:  # argparse refuses a flag's value (its type) by exiting
            rc = exc.code
        assert rc == 2
        err = capsys.readouterr().err
        assert message in err, (command, err)
        # the same line, after the command's name
        errors[command] = [line.split(":", 1)[1] for line in err.splitlines() if message in line]
    assert errors["predict"] == errors["explain"]
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "explain").exists()


def test_a_saved_folder_without_ancestors_refuses_the_roll_up(tiny_hybrid, tmp_path, capsys):
    """The ancestors are read from the folder's own prompts file, before any model loads."""
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.synth import TINY_CLIP_MODEL_ID

    world = tiny_hybrid["world"]
    folder = HybridClassifier(
        clip_model=TINY_CLIP_MODEL_ID, templates=world.templates_file, device="cpu", workers=0,
        cache_dir=tiny_hybrid["root"] / "cache").load_run(tiny_hybrid["run"], world.prompts_file
                                                          ).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    rc = main(["explain", str(world.test_dir), "--checkpoint", str(folder), "--rollup-threshold",
               "0.5", "-q", "-o", str(tmp_path / "out")])
    assert rc == 2
    assert ("hybridcls explain: error: --rollup-threshold needs ancestors in the prompts file"
            in capsys.readouterr().err)
    # the CLIP flags a saved folder fixes are refused, not ignored
    rc = main(["explain", str(world.test_dir), "--checkpoint", str(folder), "--clip-model",
               "ViT-B-32", "-q", "-o", str(tmp_path / "out")])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"hybridcls explain: error: --clip-model ViT-B-32: the save_pretrained folder {folder} fixes "
        "its CLIP model, prompts and templates (its class-text matrix is built from them); give the "
        "run directory it was saved from as --checkpoint, with --prompts, to change them")
    assert not (tmp_path / "out").exists()


def test_more_neighbours_than_the_index_holds_are_refused(tiny_hybrid, tmp_path, capsys):
    """``--neighbours`` beyond the run's embedding index would list fewer images than asked."""
    from hybridcls.index import load_run_index

    n = load_run_index(tiny_hybrid["run"]).ntotal
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["explain", str(tiny_hybrid["world"].test_dir), *tiny_hybrid["common"], "--checkpoint",
               str(tiny_hybrid["run"]), "--neighbours", str(n + 1), "-q", "-o", str(out)])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"hybridcls explain: error: --neighbours {n + 1}: more than the {n} training images the "
        f"run's embedding index holds; give 0 to {n}")
    assert not out.exists()


def test_the_default_neighbours_shrink_to_a_small_index(tiny_hybrid, tmp_path, monkeypatch):
    """Only a number the user gives is refused beyond the index; the default (5) lists every
    indexed image when the index holds fewer (here: a default made larger than the index)."""
    from hybridcls.cli import build_parser
    from hybridcls.cli.common import hybrid_from_args
    from hybridcls.errors import ParameterError
    from hybridcls.explain import explain_images, explainer
    from hybridcls.index import load_run_index

    n = load_run_index(tiny_hybrid["run"]).ntotal
    monkeypatch.setattr(explainer, "DEFAULT_NEIGHBOURS", n + 3)
    args = build_parser().parse_args(["explain", "x.png", *tiny_hybrid["common"], "--checkpoint",
                                      str(tiny_hybrid["run"])])
    clf = hybrid_from_args(args)
    image = min(tiny_hybrid["world"].test_dir.rglob("*.png"))
    result = explain_images(clf, [str(image)], tmp_path / "out")
    assert [len(e.neighbours) for e in result.explanations] == [n]
    with pytest.raises(ParameterError, match=rf"neighbours={n + 1}: more than the {n} training images"):
        explain_images(clf, [str(image)], tmp_path / "out2", neighbours=n + 1)
