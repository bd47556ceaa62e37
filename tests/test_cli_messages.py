"""The command line shows library messages in its own flags' words.

Library code names Python parameters (tests/test_messages.py); ``hybridcls.cli.main``
rewrites each ``name=value`` into the flag of the running subcommand that sets it
(:func:`hybridcls.cli.common.flag_message`). Each case is a message of another module, run
through the command line, with the exact line a user reads: the library wording it comes
from is in the comment above each expected text.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from hybridcls.cli import main
from hybridcls.synth import TINY_CLIP_MODEL_ID


@pytest.fixture(scope="module")
def ctx(tiny_hybrid, tmp_path_factory) -> dict:
    """The tiny hybrid's run and world, one test image, a run without a gate, a work folder."""
    tmp = tmp_path_factory.mktemp("cli_messages")
    bare = tmp / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_hybrid["run"] / name, bare / name)
    image = min(tiny_hybrid["world"].test_dir.iterdir())
    return {**tiny_hybrid, "tmp": tmp, "bare": bare, "image": image}


def _without(flags: list[str], flag: str) -> list[str]:
    """``flags`` without ``flag`` and its value."""
    i = flags.index(flag)
    return flags[:i] + flags[i + 2:]


def _error_line(argv: list[str], capsys) -> str:
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    return err.strip().splitlines()[-1]


# (case, argv, expected line after "hybridcls CMD: error: "), from ctx
CASES = {
    # runtime settings: RuntimeSettings -> "batch_size=0: expected a positive integer"
    "runtime-settings": lambda c: (
        ["predict", str(c["image"]), *c["common"], "--batch-size", "0"],
        "--batch-size 0: expected a positive integer"),
    # training config: TrainConfig.validate -> "val_split=1.5: must be between 0 and 1 (exclusive)"
    "training-config": lambda c: (
        ["train", str(c["world"].train_dir), "-o", str(c["tmp"] / "r1"), "--val-split", "1.5"],
        "--val-split 1.5: must be between 0 and 1 (exclusive)"),
    # resume: load_train_state -> "resume='DIR': folder not found"
    "resume-missing": lambda c: (
        ["train", str(c["world"].train_dir), "--resume", str(c["tmp"] / "nowhere")],
        f"--resume {c['tmp'] / 'nowhere'}: folder not found"),
    # resume: _resume_config -> "resume='RUN': that run was trained with lr=0.001, not lr=0.1; ...
    # (output=RUN_DIR)"
    "resume-other-options": lambda c: (
        ["train", str(c["world"].train_dir), "--resume", str(c["run"]), "--lr", "0.1", "-q"],
        (f"--resume {c['run']}: that run was trained with --lr 0.001, not --lr 0.1; resume without "
         "changing it, or start a new run in another folder (--output RUN_DIR)")),
    # the freeze: freeze_backbone -> "trainable_stages=9: ..." (_DESTINATIONS: --freeze)
    "freeze-stages": lambda c: (
        ["train", str(c["world"].train_dir), "-o", str(c["tmp"] / "r2"), "--model", "test_convnext",
         "--no-pretrained", "--image-size", "32", "--freeze", "9", "--workers", "0", "-q"],
        "--freeze 9: ConvNeXt has 4 stages; use 0 to 4, or None to train everything"),
    # the pretrained tag: resolve_model_name -> "tag='in99k': ..." (_DESTINATIONS: --pretrained)
    "pretrained-tag": lambda c: (
        ["train", str(c["world"].train_dir), "-o", str(c["tmp"] / "r3"), "--model", "test_convnext",
         "--pretrained", "in99k", "--image-size", "32", "--workers", "0", "-q"],
        "--pretrained in99k: timm has no tag 'in99k' for 'test_convnext'; known tags: r160_in1k"),
    # local weights: TrainConfig.check_files -> "weights='FILE': no such file (...)", before the
    # training images are checked
    "weights-missing": lambda c: (
        ["train", str(c["world"].train_dir), "-o", str(c["tmp"] / "r5"), "--weights",
         str(c["tmp"] / "no.safetensors"), "-q"],
        f"--weights {c['tmp'] / 'no.safetensors'}: no such file (.safetensors, or a .pth state dict)"),
    "weights-folder": lambda c: (
        ["train", str(c["world"].train_dir), "-o", str(c["tmp"] / "r5"), "--weights", str(c["tmp"]),
         "--folds", "2", "-q"],
        f"--weights {c['tmp']}: a folder, not a weights file (.safetensors, or a .pth state dict)"),
    # distributed training: launch -> "nproc=0: must be >= 1"
    "nproc": lambda c: (
        ["train", str(c["world"].train_dir), "-o", str(c["tmp"] / "r4"), "--nproc", "0"],
        "--nproc 0: must be >= 1"),
    # shard: ShardSpec.parse -> "shard='3/3': I must be between 0 and 2 (shards count from 0)"
    "shard": lambda c: (
        ["predict", str(c["image"]), *c["common"], "--shard", "3/3", "-o", str(c["tmp"] / "s.csv")],
        "--shard 3/3: I must be between 0 and 2 (shards count from 0)"),
    # sharding: Manifest.read -> "... (`hybridcls predict` with output=FILE) ..."
    "merge-without-manifest": lambda c: (
        ["merge", str(c["image"]), "-o", str(c["tmp"] / "m.csv")],
        (f"{c['image']}: no manifest {c['image'].name}.manifest.json beside it; only files written "
         "by predict_to_output (`hybridcls predict` with --output FILE) can be resumed or merged")),
    # calibration parameters: Gate.check_params -> "tpr=1.5: expected a rate in (0, 1]"
    "calibration-parameter": lambda c: (
        ["calibrate", str(c["run"]), *c["common"], "--method", "tpr", "--tpr", "1.5", "-q"],
        "--tpr 1.5: expected a rate in (0, 1]"),
    # the gate: HybridClassifier -> "... calibrate it first with HybridClassifier.calibrate()",
    # a method that has a command: that command with what it cannot run without
    "run-without-gate": lambda c: (
        ["predict", str(c["image"]), *c["common"], "--checkpoint", str(c["bare"]), "-q"],
        (f"{c['bare']}: the run has no gate.json; calibrate it first with "
         "`hybridcls calibrate RUN_DIR --prompts FILE`")),
    # run directories: read_checkpoint_config -> "run_dir='DIR': no config.json; ..." (load_run's
    # run_dir is --checkpoint), embedding_engine's checkpoint=, calibrate's positional RUN_DIR
    "checkpoint-not-a-run": lambda c: (
        ["predict", str(c["image"]), *c["common"], "--checkpoint", str(c["tmp"]), "-q"],
        f"--checkpoint {c['tmp']}: no config.json; not a hybridcls training run"),
    "embed-checkpoint-missing": lambda c: (
        ["embed", str(c["image"]), "-o", str(c["tmp"] / "e.npz"), "--checkpoint", str(c["tmp"] / "no-run"),
         "--clip-model", TINY_CLIP_MODEL_ID, "-q"],
        f"--checkpoint {c['tmp'] / 'no-run'}: run directory not found"),
    "calibrate-run-missing": lambda c: (
        ["calibrate", str(c["tmp"] / "no-run"), *c["common"], "-q"],
        f"{c['tmp'] / 'no-run'}: run directory not found"),
    # CLIP loading: _resolve_local_dir -> "clip_model='local-dir:DIR': folder DIR not found"
    "clip-model": lambda c: (
        ["predict", str(c["image"]), *c["common"], "--clip-model", f"local-dir:{c['tmp'] / 'nope'}"],
        f"--clip-model local-dir:{c['tmp'] / 'nope'}: folder {c['tmp'] / 'nope'} not found"),
    # the CLIP the gate records (a local-dir: model) with weights the user gave: their flag is at
    # fault, not the record: _resolve -> "clip_pretrained='X': ...; leave out clip_pretrained='X'"
    "clip-pretrained-with-recorded-local-dir": lambda c: (
        ["predict", str(c["image"]), "--checkpoint", str(c["run"]),
         *_without(c["common"], "--clip-model"),
         "--clip-pretrained", str(c["tmp"] / "w.safetensors"), "-q"],
        (f"--clip-pretrained {c['tmp'] / 'w.safetensors'}: not used with a local-dir: model, whose "
         f"weights come with it; leave out --clip-pretrained {c['tmp'] / 'w.safetensors'}")),
    # the audit: audit_dataset -> "test_dir='DIR': folder not found" (_DESTINATIONS: --test)
    "audit-test-folder": lambda c: (
        ["audit", str(c["world"].train_dir), "--test", str(c["tmp"] / "no-test"),
         "--clip-model", TINY_CLIP_MODEL_ID, "-q"],
        f"--test {c['tmp'] / 'no-test'}: folder not found"),
    # a nested subcommand: load_or_make_world -> "... not seed=0; use seed=1, or another
    # folder (out=DIR)", in bench quality's flags
    "bench-quality-seed": lambda c: (
        ["bench", "quality", "--out", str(c["root"]), "--seed", "0", "-q"],
        (f"{c['root'] / 'world'} holds the world of seed 1, not --seed 0; use --seed 1, or another "
         "folder (--out DIR)")),
    # files a flag gave that cannot be read: _read_text -> "prompts='FILE': cannot read file: ..."
    # (and templates=, site_classes=): a user who gave several files learns which flag
    "prompts-unreadable": lambda c: (
        ["predict", str(c["image"]), "--prompts", str(c["tmp"] / "no-prompts.txt"),
         *_without(c["common"], "--prompts"), "-q"],
        f"--prompts {c['tmp'] / 'no-prompts.txt'}: cannot read file: No such file or directory"),
    "templates-unreadable": lambda c: (
        ["predict", str(c["image"]), *_without(c["common"], "--templates"),
         "--templates", str(c["tmp"] / "no-templates.txt"), "-q"],
        f"--templates {c['tmp'] / 'no-templates.txt'}: cannot read file: No such file or directory"),
    "site-classes-unreadable": lambda c: (
        ["predict", str(c["image"]), *c["common"], "--site-classes", str(c["tmp"] / "no-sites.csv"),
         "-q"],
        f"--site-classes {c['tmp'] / 'no-sites.csv'}: cannot read file: No such file or directory"),
    # --classes is a list: as_prompt_set's "<prompts list>: N training class(es) match no name in
    # the list" is told as the flag's
    "classes-missing-a-seen-class": lambda c: (
        ["predict", str(c["image"]), "--checkpoint", str(c["run"]),
         "--classes", ",".join(c["world"].seen_classes[:-1]), *_without(c["common"], "--prompts"),
         "-q"],
        ("--classes: 1 training class(es) match no name in the list: "
         f"{c['world'].seen_classes[-1].replace(' ', '_')!r}; add them")),
    # ... and in demo's
    "demo-seed": lambda c: (
        ["demo", "--out", str(c["root"]), "--seed", "0", "-q"],
        (f"{c['root'] / 'world'} holds the world of seed 1, not --seed 0; use --seed 1, or another "
         "folder (--out DIR)")),
}


@pytest.mark.parametrize("case", CASES)
def test_a_library_message_reads_in_the_commands_flags(ctx, case, capsys):
    argv, expected = CASES[case](ctx)
    assert _error_line(argv, capsys) == f"hybridcls {argv[0]}: error: {expected}"


def test_predict_resume_and_merge_name_predicts_resume_flag(ctx, capsys):
    """sharding: "resume=True: ... run without resume=True ...", and merge_parts' "(rerun it with
    resume=True)" in merge, which has no --resume of its own (_SWITCHES)."""
    tmp: Path = ctx["tmp"] / "shards"
    images = str(ctx["world"].test_dir)
    argv = ["predict", images, *ctx["common"], "-q"]
    out = tmp / "pred.csv"
    tmp.mkdir()
    assert main([*argv, "-o", str(out)]) == 0
    assert _error_line([*argv, "-o", str(out), "--precision", "fp32", "--resume"], capsys) == (
        f"hybridcls predict: error: --resume: cannot continue {out}: it was written with other "
        'settings or inputs (precision "auto" vs "fp32"); run without --resume to start it again, '
        "or choose another --output FILE")
    parts = [tmp / f"part{i}.csv" for i in range(2)]
    for i, part in enumerate(parts):
        assert main([*argv, "--shard", f"{i}/2", "-o", str(part)]) == 0
    lines = parts[1].read_text(encoding="utf-8").splitlines(keepends=True)
    parts[1].write_text("".join(lines[:-1]), encoding="utf-8")  # a part cut after its next-to-last row
    line = _error_line(["merge", *map(str, parts), "-o", str(tmp / "m.csv")], capsys)
    n = len(out.read_text(encoding="utf-8").splitlines()) - 1  # the inputs: one row each
    size = n - n // 2
    assert line.startswith("hybridcls merge: error: cannot merge 2 part(s): ")
    assert line.endswith(f"{parts[1]} (shard 1/2) stops after {size - 1} of {size} rows "
                         "(rerun it with --resume)")


def test_the_bundled_templates_advice_names_the_templates_flag(ctx, capsys):
    """text_checks: "... templates=FILE ..., or pass truncate_prompts=True to accept the cut"."""
    common = list(ctx["common"])
    i = common.index("--templates")
    del common[i:i + 2]  # the bundled templates: some are longer than the tiny CLIP's 16 tokens
    status = main(["predict", str(ctx["image"]), *common, "-q"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("hybridcls predict: error: ")
    assert err.rstrip().endswith(
        "The bundled default templates are too long for this model and cannot be edited: pass "
        "your own, shorter templates with --templates FILE (a templates file; in Python also a "
        "list of strings with {} for the class text), or pass --truncate-prompts to accept the cut.")


def test_the_missing_clip_weights_advice_names_the_clip_flags(ctx, capsys, monkeypatch):
    """zeroshot.loading: "pass clip_model='local-dir:DIR' (...), or clip_pretrained='FILE' (...),
    or cache_dir='DIR' (...)", with HF_HUB_OFFLINE set (conftest) and no network."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    common = list(ctx["common"])
    common[common.index("--clip-model") + 1] = "ViT-B-32"
    common[common.index("--cache-dir") + 1] = str(ctx["tmp"] / "empty-cache")
    line = _error_line(["predict", str(ctx["image"]), *common, "-q"], capsys)
    assert line.startswith("hybridcls predict: error: The weights of open_clip model ViT-B-32 with "
                           "pretrained tag laion2b_s34b_b79k are not available: ")
    assert ("To use a local copy, pass --clip-model local-dir:DIR (a folder holding "
            "open_clip_config.json and open_clip_model.safetensors), or --clip-pretrained FILE "
            "(a weights file of that model), or --cache-dir DIR (a cache that already holds "
            "them). ") in line


def _first_error_line(argv: list[str], capsys) -> str:
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    return next(line for line in err.splitlines() if line.startswith("hybridcls "))


def test_a_folder_given_by_a_flag_is_named_by_its_flag(ctx, capsys):
    """scan_image_folder / drop_unreadable / support_samples / resolve_training_data start their
    errors with the parameter that gave the folder (support=, val_dir=, calibrate's data_dir=),
    which each command writes as its flag (--support, --val, --data)."""
    tmp: Path = ctx["tmp"] / "folders"
    tmp.mkdir()
    classes = sorted(p.name for p in ctx["world"].train_dir.iterdir())
    image = ctx["image"]
    calibrate = ["calibrate", str(ctx["run"]), *ctx["common"], "-q", "--data"]
    (tmp / "empty").mkdir()
    (tmp / "a-file").write_text("not a folder", encoding="utf-8")
    (tmp / "empty-class" / classes[0]).mkdir(parents=True)
    shutil.copy(image, tmp / "empty-class" / classes[0] / "1.png")
    (tmp / "empty-class" / classes[1]).mkdir()
    for name in classes[2:]:  # two of the run's four classes, three images each
        (tmp / "other" / name).mkdir(parents=True)
        for i in range(3):
            shutil.copy(image, tmp / "other" / name / f"{i}.png")
    for folder, expected in [
        (tmp / "nowhere", f"--data {tmp / 'nowhere'}: training folder not found: {tmp / 'nowhere'}"),
        (tmp / "empty", (f"--data {tmp / 'empty'}: no class subfolders in {tmp / 'empty'} (the "
                        f"training folder): expected one folder per class, e.g. "
                        f"{tmp / 'empty' / 'cat' / '001.jpg'}")),
        (tmp / "a-file", (f"--data {tmp / 'a-file'}: not a folder: {tmp / 'a-file'} (expected the "
                         "training folder)")),
        (tmp / "empty-class", (f"--data {tmp / 'empty-class'}: empty class folder: "
                              f"{tmp / 'empty-class' / classes[1]} (in the training folder)")),
        # the classes are checked before any image is decoded or split (not val_split's advice)
        (tmp / "other", (f"--data {tmp / 'other'}: its 2 classes differ from the run's 4: "
                        f"{classes[0]!r}, {classes[1]!r} missing; give the folder the run was "
                        "trained on")),
    ]:
        assert _error_line([*calibrate, str(folder)], capsys) == f"hybridcls calibrate: error: {expected}"
    # support: one unreadable image, then a class folder with none readable
    support = tmp / "support" / classes[0]
    support.mkdir(parents=True)
    shutil.copy(image, support / "1.png")
    (support / "2.png").write_bytes(b"")
    predict = ["predict", str(image), "--checkpoint", str(ctx["run"]), *ctx["common"], "-q",
               "--support", str(tmp / "support")]
    assert _first_error_line(predict, capsys) == (
        f"hybridcls predict: error: --support {tmp / 'support'}: 1 support image(s) cannot be read "
        "(each one counts when there are a few per class):")
    (support / "1.png").unlink()
    assert _first_error_line(predict, capsys) == (
        f"hybridcls predict: error: --support {tmp / 'support'}: class folder {support} has no "
        "readable image (in the support folder): none of its 1 file decodes:")
    # train's validation folder (--val): the same refusal, before anything is written
    val = tmp / "val"
    shutil.copytree(tmp / "support", val)
    (val / classes[1]).mkdir()
    shutil.copy(image, val / classes[1] / "1.png")
    out = tmp / "never"
    assert _first_error_line(["train", str(ctx["world"].train_dir), "-o", str(out), "--val", str(val),
                              "--workers", "0", "-q"], capsys) == (
        f"hybridcls train: error: --val {val}: class folder {val / classes[0]} has no readable "
        "image (in the validation folder): none of its 1 file decodes:")
    assert not out.exists()


def test_a_call_of_a_method_with_a_command_reads_as_that_command():
    """``calibrate(...)`` / ``train(...)`` in a library message become the command line that does
    it, values quoted for the shell; a path that merely contains ``train(`` stays as it is."""
    from hybridcls.cli import build_parser
    from hybridcls.cli.common import flag_message

    args = build_parser().parse_args(["predict", "x.jpg", "--prompts", "p.txt"])

    def shown(message: str) -> str:
        return flag_message(message, args.parser_, args.commands_)

    assert shown("calibrate it first with HybridClassifier.calibrate()") == (
        "calibrate it first with `hybridcls calibrate RUN_DIR --prompts FILE`")
    assert shown("give it with calibrate(data_dir=DIR), which records it") == (
        "give it with `hybridcls calibrate RUN_DIR --prompts FILE --data DIR`, which records it")
    assert shown("finish it with train(data_dir='/d/my set', resume='/runs/a,b(1)'), then") == (
        "finish it with `hybridcls train '/d/my set' --resume '/runs/a,b(1)'`, then")
    for stays in ("data/train(old): folder not found", "/photos/explain(1).jpg: cannot decode",
                  "runs/calibrate(2)/gate.json: not found"):
        assert shown(stays) == stays


def test_a_windows_path_reads_as_written():
    import argparse

    from hybridcls.cli.common import flag_message
    from hybridcls.errors import ParameterError

    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir")
    message = str(ParameterError("cache_dir", "C:\\data\\cache", "not found"))
    assert message == "cache_dir='C:\\\\data\\\\cache': not found"  # the repr doubles backslashes
    assert flag_message(message, parser) == "--cache-dir C:\\data\\cache: not found"


def _parsers():
    """Every (sub)command's parser, nested ones (bench memory) included."""
    import argparse

    from hybridcls.cli import build_parser

    todo = [("hybridcls", build_parser())]
    while todo:
        name, parser = todo.pop()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]


def test_every_command_that_takes_prompts_takes_an_inline_class_list():
    with_prompts = []
    for name, parser in _parsers():
        flags = {o: a for a in parser._actions for o in a.option_strings}
        if "--prompts" not in flags:
            continue
        with_prompts.append(name)
        assert "--classes" in flags, name
        group = next(g for g in parser._mutually_exclusive_groups if flags["--prompts"] in g._group_actions)
        assert flags["--classes"] in group._group_actions, name  # one or the other, not both
    assert sorted(with_prompts) == ["hybridcls bench memory", "hybridcls calibrate", "hybridcls evaluate",
                                    "hybridcls explain", "hybridcls predict", "hybridcls report"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--classes", "fox,,elk"], "argument --classes: name 2 of 3 in 'fox,,elk' is empty"),
    (["--classes", "fox,elk,"], "argument --classes: name 3 of 3 in 'fox,elk,' is empty"),
    (["--classes", "polar bear,elk,Polar_Bear"],
     "argument --classes: names 1 and 3 ('polar bear' and 'Polar_Bear') are the same class"),
    (["--classes", "moose: a deer"], ("argument --classes: name 1 ('moose: a deer') holds ':': "
                                      "--classes takes names only; write a prompts file (--prompts FILE)")),
    (["--classes", "fox,elk", "--prompts", "p.txt"], "argument --prompts: not allowed with argument --classes"),
])
def test_inline_class_list_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "photos/", *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_predict_without_classes_is_refused(capsys):
    """Neither flag, and no save_pretrained folder whose prompts stand in for them."""
    assert main(["predict", "photos/"]) == 2
    assert capsys.readouterr().err.strip() == "hybridcls predict: error: --prompts or --classes is needed"


def test_evaluate_takes_the_classes_inline(tmp_path, capsys):
    pred = tmp_path / "pred.csv"
    pred.write_text("path,label,score,branch,status,error\na.png,fox,0.9,zeroshot,ok,\n"
                    "b.png,elk,0.8,zeroshot,ok,\n", encoding="utf-8")
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,label\na.png,fox\nb.png,owl\n", encoding="utf-8")
    seen = tmp_path / "seen.txt"
    seen.write_text("fox\n", encoding="utf-8")
    argv = ["evaluate", str(pred), "--labels", str(labels), "--seen-classes", str(seen)]
    # owl is no class of the list: refused, naming its line, as with a prompts file
    assert _error_line([*argv, "--classes", "fox,elk"], capsys).endswith(
        f"{labels}:3: label 'owl' is of a class that is neither seen nor predictable; 1 such "
        "class(es): 'owl'")
    assert main([*argv, "--classes", "fox,elk,owl"]) == 0
    assert "accuracy 50.00%" in capsys.readouterr().out


def test_a_labels_file_that_cannot_be_read_is_named_by_labels(tmp_path, capsys):
    """eval.labels: ``labels='x.csv': cannot read labels file (...)``, on the command line
    ``--labels x.csv: ...`` (evaluate reads it after the predictions, report before)."""
    from hybridcls.errors import ParameterError
    from hybridcls.eval import read_labels

    pred = tmp_path / "pred.csv"
    pred.write_text("path,label,score,branch,status,error\na.png,fox,0.9,zeroshot,ok,\n", encoding="utf-8")
    seen = tmp_path / "seen.txt"
    seen.write_text("fox\n", encoding="utf-8")
    missing = tmp_path / "no-labels.csv"
    with pytest.raises(ParameterError, match=r"^labels='.*no-labels\.csv': cannot read labels file \("):
        read_labels(missing)
    assert _error_line(["evaluate", str(pred), "--labels", str(tmp_path), "--seen-classes", str(seen)],
                       capsys) == (
        f"hybridcls evaluate: error: --labels {tmp_path}: cannot read labels file (Is a directory)")
    assert _error_line(["report", str(pred), "--labels", str(missing), "-o", str(tmp_path / "r")],
                       capsys) == (f"hybridcls report: error: --labels {missing}: cannot read labels "
                                   "file (No such file or directory)")


def test_an_item_of_the_class_list_is_named_as_a_name_of_classes(ctx, capsys):
    """text_checks names a class by its source and line: ``<prompts list>:2`` for a Python list,
    which on the command line is the second name of --classes."""
    long = "a striped circle " + "with many more words " * 4
    argv = ["predict", str(ctx["image"]), "--classes", f"red circle,{long.strip()}",
            *_without(ctx["common"], "--prompts"), "-q"]
    line = _first_error_line(argv, capsys)
    assert line.startswith("hybridcls predict: error: --classes name 2: class 'a striped circle ")
    assert "<" not in line


def test_recorded_templates_are_named_as_the_gates(ctx, capsys):
    """Without --templates a run's gate gives its recorded templates; a problem with one names
    gate.json and the template's place in its list, not ``<list>``."""
    import json

    run = ctx["tmp"] / "long-template-run"
    shutil.copytree(ctx["run"], run)
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    long = "a " + "very " * 20 + "long photo of the {}."  # past the tiny CLIP's context
    gate["clip"]["templates"] = [gate["clip"]["templates"][0], long]
    (run / "gate.json").write_text(json.dumps(gate), encoding="utf-8")
    argv = ["predict", str(ctx["image"]), "--checkpoint", str(run),
            *_without(ctx["common"], "--templates"), "-q"]
    assert _first_error_line(argv, capsys).startswith(
        "hybridcls predict: error: <templates recorded in gate.json>:2: template 'a very very ")


def test_stacking_on_another_score_names_the_mode_and_how_to_calibrate_for_it():
    """Gate.with_options: ``mode='stacking'`` on a gate calibrated on another score than
    clip_margin names the parameter (library) and --mode with the calibrate command (CLI)."""
    from hybridcls.cli import build_parser
    from hybridcls.cli.common import flag_message
    from hybridcls.errors import ParameterError
    from hybridcls.gate import Gate, GateCalibration

    cal = GateCalibration(score="msp", mode="hard", threshold=0.5, method="manual")
    with pytest.raises(ParameterError) as err:
        Gate.from_calibration(cal, n_seen=1).with_options(mode="stacking")
    assert str(err.value) == (
        "mode='stacking': stacking mode works on the 'clip_margin' score, and this gate was "
        "calibrated on 'msp'; leave out mode='stacking' to use its 'hard' mode, or "
        "calibrate(method='tpr', score='clip_margin') first")
    args = build_parser().parse_args(["predict", "x.jpg", "--prompts", "p.txt"])
    assert flag_message(str(err.value), args.parser_, args.commands_) == (
        "--mode stacking: stacking mode works on the 'clip_margin' score, and this gate was "
        "calibrated on 'msp'; leave out --mode stacking to use its 'hard' mode, or "
        "`hybridcls calibrate RUN_DIR --prompts FILE --method tpr --score clip_margin` first")


def test_a_saved_folders_fixed_settings_point_to_the_run_directory_in_both_worlds():
    """from_pretrained refuses clip_model / prompts / templates before reading anything; its
    load_run(run_dir=..., prompts=...) reads as predict's and explain's own flags."""
    from hybridcls.cli import build_parser
    from hybridcls.cli.common import flag_message
    from hybridcls.errors import ParameterError
    from hybridcls.hybrid import HybridClassifier

    with pytest.raises(ParameterError) as err:
        HybridClassifier.from_pretrained("saved", templates="t.txt")
    assert str(err.value).endswith(
        "; to change them, load the run directory it was saved from with "
        "load_run(run_dir=RUN_DIR, prompts=FILE)")
    for command in ("predict", "explain"):
        args = build_parser().parse_args([command, "x.jpg", "--checkpoint", "saved"])
        assert flag_message(str(err.value), args.parser_, args.commands_) == (
            "--templates t.txt: a saved folder fixes its CLIP model, prompts and templates (its "
            "class-text matrix is built from them); to change them, load the run directory it "
            "was saved from with `--checkpoint RUN_DIR --prompts FILE`")


def test_a_missing_gate_or_data_folder_is_said_before_any_model_loads(ctx, capsys, monkeypatch):
    """predict / explain on a run without gate.json, calibrate with a --data that is not there:
    the error comes from the folder's listing, with no checkpoint or CLIP loaded (which may mean
    a download)."""
    import hybridcls.hybrid
    import hybridcls.zeroshot.tower

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap check")

    monkeypatch.setattr(hybridcls.hybrid, "load_checkpoint", loaded)
    monkeypatch.setattr(hybridcls.zeroshot.tower, "load_clip", loaded)
    bare = ctx["bare"]
    for command in ("predict", "explain"):
        argv = [command, str(ctx["image"]), *ctx["common"], "--checkpoint", str(bare), "-q"]
        if command == "explain":
            argv += ["-o", str(ctx["tmp"] / "never-explained")]
        assert _error_line(argv, capsys) == (
            f"hybridcls {command}: error: {bare}: the run has no gate.json; calibrate it first "
            "with `hybridcls calibrate RUN_DIR --prompts FILE`")
    nowhere = ctx["tmp"] / "no-data"
    assert _error_line(["calibrate", str(ctx["run"]), *ctx["common"], "--data", str(nowhere), "-q"],
                       capsys) == (
        f"hybridcls calibrate: error: --data {nowhere}: training folder not found: {nowhere}")


def test_a_recorded_training_folder_that_moved_is_said_before_any_model_loads(ctx, capsys, monkeypatch):
    """calibrate without --data, predict and explain with --rollup-precision read the held-out
    images from the folder the run records (gate.json's, then config.json's): neither here is said
    from the run's JSON files, with no checkpoint or CLIP loaded."""
    import json

    import hybridcls.hybrid
    import hybridcls.zeroshot.tower

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap check")

    moved = ctx["tmp"] / "moved-run"
    shutil.copytree(ctx["run"], moved)
    gone = {name: str(ctx["tmp"] / f"gone-{name}") for name in ("gate", "run")}
    for name, key in (("gate.json", "gate"), ("config.json", "run")):
        record = json.loads((moved / name).read_text(encoding="utf-8"))
        record["data_dir"] = gone[key]
        (moved / name).write_text(json.dumps(record), encoding="utf-8")
    monkeypatch.setattr(hybridcls.hybrid, "load_checkpoint", loaded)
    monkeypatch.setattr(hybridcls.zeroshot.tower, "load_clip", loaded)
    said = (f"{moved}: its training folder is not here (looked for {gone['gate']} and {gone['run']}); "
            "give the folder where it is now with `hybridcls calibrate RUN_DIR --prompts FILE --data "
            "DIR`, which records it for later loads")
    assert _error_line(["calibrate", str(moved), *ctx["common"], "-q"], capsys) == (
        f"hybridcls calibrate: error: {said}")
    for command in ("predict", "explain"):
        argv = [command, str(ctx["image"]), *ctx["common"], "--checkpoint", str(moved),
                "--rollup-precision", "0.9", "-q"]
        if command == "explain":
            argv += ["-o", str(ctx["tmp"] / "never-explained")]
        assert _error_line(argv, capsys) == f"hybridcls {command}: error: {said}"


def test_a_broken_bench_world_is_named_by_its_folder_and_out(ctx, capsys):
    """A world the benches reuse that lost a seen class's images: said before anything trains
    or calibrates on it, by the folder and --out (not calibrate's data_dir=, which the bench's
    user never gave)."""
    out = ctx["tmp"] / "broken-bench"
    shutil.copytree(ctx["world"].root, out / "world")
    name = ctx["world"].seen_classes[0]
    folder = out / "world" / "train" / name.replace(" ", "_")
    shutil.rmtree(folder)
    expected = (f"{out / 'world'} holds the world of seed 1, but the training images of {name!r} "
                f"are missing ({folder}); delete {out / 'world'} to make it again, or use another "
                "folder (--out DIR)")
    for argv in (["bench", "quality", "--out", str(out), "--seed", "1", "-q"],
                 ["demo", "--out", str(out), "--seed", "1", "-q"]):
        assert _error_line(argv, capsys) == f"hybridcls {argv[0]}: error: {expected}"
    assert not (out / "run").exists()  # nothing trained


def test_the_support_warning_names_the_gates_calibrated_tpr_not_a_parameter(ctx, capsys):
    """Gate.with_support keeps the threshold when the seen images are too few to set it at the
    gate's TPR: it says "the calibrated TPR 0.8" (gate.json's tpr), not ``tpr=0.8``, which predict
    has no flag for and the user never set there."""
    import json

    world = ctx["world"]
    unseen = world.unseen_classes[0]
    support = ctx["tmp"] / "support-tpr" / unseen.replace(" ", "_")
    support.mkdir(parents=True)
    for image_id, label in sorted(world.read_labels().items()):
        if label == unseen:
            shutil.copy(world.test_dir / image_id, support / image_id)
    argv = ["predict", str(ctx["image"]), "--checkpoint", str(ctx["run"]), *ctx["common"], "-q",
            "--support", str(support.parent), "-o", str(ctx["tmp"] / "support-tpr.csv")]
    assert main(argv) == 0
    warning = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("hybridcls predict: warning: support images:")]
    tpr = json.loads((ctx["run"] / "gate.json").read_text(encoding="utf-8"))["tpr"]
    assert len(warning) == 1 and "tpr=" not in warning[0]
    assert f"too few to set one at the calibrated TPR {tpr:g}, which needs at least " in warning[0]


def test_a_gate_of_another_number_of_seen_classes_is_refused_and_calibrate_replaces_it(ctx, capsys):
    """A gate.json recorded for another number of seen classes (another run's, or this run's
    before it was trained again on other classes) is refused where the gate is used, naming both
    numbers; it does not stop `hybridcls calibrate`, which writes this run's."""
    import json

    run = ctx["tmp"] / "other-n-seen"
    shutil.copytree(ctx["run"], run)
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    n_seen = len(ctx["world"].seen_classes)  # the run's training folders
    assert gate["n_seen"] == n_seen
    (run / "gate.json").write_text(json.dumps({**gate, "n_seen": n_seen - 1}), encoding="utf-8")
    out = ctx["tmp"] / "other-n-seen.csv"
    assert _error_line(["predict", str(ctx["image"]), *ctx["common"], "--checkpoint", str(run),
                        "-o", str(out), "-q"], capsys) == (
        f"hybridcls predict: error: {run / 'gate.json'}: calibrated for {n_seen - 1} seen classes, "
        f"not the {n_seen} of {run}: it belongs to another run; calibrate it again with "
        "`hybridcls calibrate RUN_DIR --prompts FILE`, which replaces it")
    assert not out.exists()
    assert main(["calibrate", str(run), *ctx["common"], "-q"]) == 0
    assert json.loads((run / "gate.json").read_text(encoding="utf-8"))["n_seen"] == n_seen
    capsys.readouterr()
    assert main(["predict", str(ctx["image"]), *ctx["common"], "--checkpoint", str(run),
                 "-o", str(out), "-q"]) == 0


def test_every_checkpoint_flag_names_what_it_takes_in_the_usage_line():
    """Each command's usage line names every form its --checkpoint takes: predict and explain a
    run directory, a save_pretrained folder or a Hub repo id (tests/test_hub.py runs each), embed
    the first two (it loads the backbone only), bench memory a run directory (its runs pass
    --prompts, which a saved folder refuses); evaluate's --seen-classes a folder of either kind.
    A command given --checkpoint later fails here until it says what it takes."""
    import argparse

    from hybridcls.cli import build_parser

    def parsers(parser, name=""):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    yield from parsers(child, f"{name} {sub}".strip())

    found = {name: (action.metavar, parser.format_usage()) for name, parser in parsers(build_parser())
             for action in parser._actions if "--checkpoint" in action.option_strings}
    assert {name: metavar for name, (metavar, _) in found.items()} == {
        "predict": "RUN_DIR|SAVED_DIR|ORG/NAME", "explain": "RUN_DIR|SAVED_DIR|ORG/NAME",
        "embed": "RUN_DIR|SAVED_DIR", "bench memory": "RUN_DIR"}
    for name, (metavar, usage) in found.items():
        assert f"--checkpoint {metavar}" in " ".join(usage.split()), name
    evaluate = dict(parsers(build_parser()))["evaluate"].format_usage()
    assert "--seen-classes FILE|RUN_DIR|SAVED_DIR" in " ".join(evaluate.split())
