"""``predict --site-classes`` / ``--allowed-classes`` end to end on the tiny world (issue 16, part 3)."""

from __future__ import annotations

import json

import pytest

from hybridcls.cli import main
from hybridcls.outputs import read_predictions


def _predict(tiny_hybrid, extra, out, *, hybrid=True, inputs=None):
    argv = ["predict", *(inputs or [str(tiny_hybrid["world"].test_dir)]), *tiny_hybrid["common"],
            "-q", "-o", str(out), *extra]
    if hybrid:
        argv += ["--checkpoint", str(tiny_hybrid["run"])]
    return main(argv)


def test_zero_shot_site_list_equals_a_prompts_file_of_the_allowed_classes(tiny_hybrid, tmp_path):
    # zero-shot, the restriction is exact: the softmax over the allowed classes' logits alone
    world = tiny_hybrid["world"]
    keep = [world.classes[0], world.classes[3], world.classes[5]]
    sites = tmp_path / "sites.csv"
    sites.write_text(f"prefix,classes\n{world.test_dir},{';'.join(keep)}\n", encoding="utf-8")
    subset = tmp_path / "subset.txt"
    subset.write_text("".join(c + "\n" for c in keep), encoding="utf-8")
    assert _predict(tiny_hybrid, ["--site-classes", str(sites), "--all-scores"], tmp_path / "a.jsonl",
                    hybrid=False) == 0
    common = tiny_hybrid["common"]
    at = common.index("--prompts")
    argv = ["predict", str(world.test_dir), *common[:at], *common[at + 2:], "--prompts", str(subset),
            "-q", "--all-scores", "-o", str(tmp_path / "b.jsonl")]
    assert main(argv) == 0
    restricted, alone = read_predictions(tmp_path / "a.jsonl"), read_predictions(tmp_path / "b.jsonl")
    assert [r["path"] for r in restricted] == [r["path"] for r in alone]
    for r, a in zip(restricted, alone):
        assert r["label"] == a["label"]
        assert set(r["scores"]) == set(world.classes)
        assert all(r["scores"][c] == 0 for c in world.classes if c not in keep)
        assert all(abs(r["scores"][c] - a["scores"][c]) <= 2e-6 for c in keep)


def test_hybrid_rows_keep_to_their_sites_and_an_input_with_no_class_is_an_error_row(tiny_hybrid, tmp_path):
    world = tiny_hybrid["world"]
    images = sorted(p for p in world.test_dir.iterdir())
    seen, unseen = world.seen_classes[0], world.unseen_classes[0]
    sites = tmp_path / "sites.csv"
    # the folder allows one seen and one unseen class; one image allows only a class that
    # --allowed-classes leaves out
    sites.write_text(f"prefix,classes\n{world.test_dir},{seen};{unseen}\n"
                     f"{images[0]},{world.seen_classes[1]}\n", encoding="utf-8")
    out = tmp_path / "v.jsonl"
    rc = _predict(tiny_hybrid, ["--site-classes", str(sites), "--allowed-classes", f"{seen},{unseen}"], out)
    assert rc == 1  # one input failed
    rows = read_predictions(out)
    assert [r["path"] for r in rows] == [str(p) for p in images]  # every input once, in order
    assert rows[0]["status"] == "error" and "no class is allowed" in rows[0]["error"]
    assert f"{sites} line 3" in rows[0]["error"]
    assert {r["label"] for r in rows[1:]} <= {seen, unseen}
    assert all(t["score"] == 0 for r in rows[1:] for t in r["topk"] if t["label"] not in (seen, unseen))
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text(encoding="utf-8"))
    assert manifest["record"]["gate"]["restriction"] == {"allowed_classes": [seen, unseen],
                                                         "site_classes": str(sites)}
    assert manifest["settings"]["allowed_classes"] == [seen, unseen]
    assert manifest["settings"]["site_classes"] is not None


@pytest.mark.parametrize(("extra", "message"), [
    (["--allowed-classes", "purple plain wolf"],
     "--allowed-classes purple plain wolf: not a class of the prompts file"),
    (["--site-classes", "{sites}"], "{sites}:2: class 'wolf' is not in the prompts file"),
    (["--site-classes", "{sites}", "--cascade"], "--cascade with --site-classes"),
])
def test_bad_class_lists_are_refused_before_any_model_loads(tiny_hybrid, tmp_path, capsys, extra, message):
    sites = tmp_path / "sites.csv"
    sites.write_text("prefix,classes\nx,wolf\n", encoding="utf-8")
    extra = [e.format(sites=sites) for e in extra]
    capsys.readouterr()
    assert _predict(tiny_hybrid, extra, tmp_path / "v.jsonl") == 2
    assert message.format(sites=sites) in capsys.readouterr().err
    assert not (tmp_path / "v.jsonl").exists()


def test_a_row_that_reaches_no_input_is_warned_once_over_every_input(tiny_hybrid, tmp_path, capsys):
    """The command line checks the rows on every input before a shard predicts its share: a row
    that holds only images of the other shard is no warning, a misspelt folder is, once; the
    library checks the inputs of each prediction."""
    from hybridcls.errors import SiteFileWarning
    from hybridcls.synth import TINY_CLIP_MODEL_ID
    from hybridcls.zeroshot.classifier import ZeroShotClassifier

    world = tiny_hybrid["world"]
    images = sorted(world.test_dir.iterdir())
    seen = world.seen_classes[0]
    misspelt = world.test_dir.parent / "tset"
    sites = tmp_path / "sites.csv"
    sites.write_text(f"prefix,classes\n{images[-1]},{seen}\n{misspelt},{seen}\n", encoding="utf-8")
    capsys.readouterr()
    assert _predict(tiny_hybrid, ["--site-classes", str(sites), "--shard", "0/2"], tmp_path / "v.jsonl") == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "warning" in line] == [
        (f"hybridcls predict: warning: {sites}:3: prefix {misspelt} holds none of the {len(images)} "
         "inputs: its classes limit no image (a misspelt folder?)")]
    clf = ZeroShotClassifier(TINY_CLIP_MODEL_ID, None, prompts=str(world.prompts_file),
                             templates=str(world.templates_file), device="cpu", workers=0,
                             progress=False, cache_dir=tiny_hybrid["root"] / "cache",
                             site_classes=sites).fit()
    with pytest.warns(SiteFileWarning) as caught:
        clf.predict([str(p) for p in images[:2]])
    assert [str(w.message).split(": its")[0] for w in caught] == [
        f"{sites}:2: prefix {images[-1]} holds none of the 2 inputs",
        f"{sites}:3: prefix {misspelt} holds none of the 2 inputs"]
