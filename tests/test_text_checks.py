"""Class text against the model's context length, and classes the model cannot tell apart.

Token counts are checked against open_clip's own tokenizer output (a text of n
tokens fills n positions before the padding when tokenised with a context
large enough), never against the function under test.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from tinyclip_factory import make_tiny_clip, tiny_model_cfg

from hybridcls.cli import build_parser, main
from hybridcls.errors import ClassTextWarning, PromptFileError
from hybridcls.synth import TINY_CLIP_MODEL_ID
from hybridcls.synth.render import all_attributes
from hybridcls.synth.world import CAPTION_TEMPLATES
from hybridcls.zeroshot import (
    as_prompt_set,
    as_template_set,
    build_text_classifier,
    check_class_text,
    load_clip,
    read_prompts,
    text_checks,
    token_counts,
)
from hybridcls.zeroshot.text_checks import similar_column_pairs, warn_similar_classes

REPO = Path(__file__).resolve().parents[1]
LONG = (
    "large grey animal with a long trunk big ears thick wrinkled skin ivory tusks pillar legs "
    "and a small tail"
)


def n_tokens(tokenizer, text: str) -> int:
    """Start + text + end tokens, read off open_clip's own padded output (pad id 0, end id > 0)."""
    ids = tokenizer([text], context_length=512)[0]
    return int(ids.nonzero().max()) + 1


@pytest.fixture(scope="module")
def tiny_tok():
    """The shipped tiny CLIP's tokenizer: a 12-token context."""
    tok = open_clip.get_tokenizer(TINY_CLIP_MODEL_ID)
    assert tok.context_length == 12
    return tok


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def files(tmp_path):
    """``templates.txt`` with its template on line 2, for prompts written per test."""
    templates = as_template_set(
        write(tmp_path, "templates.txt", "# one template\na photo of a {}.\n")
    )

    def check(prompts_text: str, tok, **kw):
        prompts = read_prompts(write(tmp_path, "prompts.txt", prompts_text))
        check_class_text(tok, prompts, templates, model="tiny", **kw)

    return tmp_path, check


# ---------------------------------------------------------------- too long for the context


def test_token_counts_match_open_clips_tokenizer(tiny_tok):
    texts = ["a photo of a cat.", "a photo of a " + LONG + ".", "café, 東京 & c#"]
    vit = open_clip.get_tokenizer("ViT-B-32")  # offline: the BPE vocabulary ships with open_clip
    assert vit.context_length == 77
    for tok in (tiny_tok, vit):
        assert token_counts(tok, texts) == [n_tokens(tok, t) for t in texts]
    assert token_counts(tiny_tok, ["a photo of a cat."]) == [8]  # sot a photo of a cat . eot


@pytest.mark.parametrize(
    ("line", "what"),
    [
        (f"{LONG}", "name"),
        (f"elephant: {LONG}", "description"),
        (f"elephant | {LONG}", "synonym"),
    ],
)
def test_a_long_name_description_or_synonym_names_file_line_count_and_limit(
    files, tiny_tok, line, what
):
    tmp_path, check = files
    phrase = {"name": LONG, "description": f"elephant, {LONG}", "synonym": LONG}[what]
    expected = n_tokens(tiny_tok, f"a photo of a {phrase}.")
    assert expected > 12
    with pytest.raises(PromptFileError) as err:
        check(f"# animals\ncat\n{line}\n", tiny_tok)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'prompts.txt'}:3: class ")
    assert f"{what}" in msg.splitlines()[0]
    assert (
        f": {expected} tokens with template 'a photo of a {{}}.' ({tmp_path / 'templates.txt'}:2)"
        in msg
    )
    assert "the limit is 12" in msg and "12-token context of tiny" in msg
    assert msg.endswith("Shorten them, or pass truncate_prompts=True to accept the cut.")
    assert err.value.line == 3


def test_a_template_too_long_even_for_the_shortest_name_is_the_templates_line(tmp_path, tiny_tok):
    long_template = "a very blurry, dark and hard to see photo of the {} at night."
    templates = as_template_set(write(tmp_path, "t.txt", f"a photo of a {{}}.\n{long_template}\n"))
    prompts = read_prompts(write(tmp_path, "p.txt", "cat\nred fox\n"))
    expected = n_tokens(tiny_tok, long_template.format("cat"))
    assert expected > 12
    with pytest.raises(PromptFileError) as err:
        check_class_text(tiny_tok, prompts, templates, model="tiny")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 't.txt'}:2: template ")
    assert (
        f"{expected} tokens even with the shortest class text 'cat' ({tmp_path / 'p.txt'}:1)" in msg
    )
    assert "the limit is 12" in msg
    assert "p.txt:2" not in msg  # 'red fox' is not blamed for the template's length


def test_every_problem_is_counted_the_first_few_listed(files, tiny_tok):
    _, check = files
    lines = [f"{LONG} number {i}" for i in range(7)]
    with pytest.raises(PromptFileError) as err:
        check("\n".join(lines) + "\n", tiny_tok)
    msg = str(err.value)
    listed = re.findall(r"prompts\.txt:(\d+): class", msg)
    assert listed == ["1", "2", "3", "4", "5"]
    assert "... and 2 more" in msg
    assert "7 class phrase(s) or template(s) make texts longer than the 12-token context" in msg


def test_the_bundled_templates_do_not_all_fit_the_tiny_clip(tiny_tok):
    """The default 80 templates are too long for the tiny CLIP even with its shortest class names."""
    names = [a.name for a in all_attributes()]
    bundled = as_template_set(None)
    too_long = [
        line
        for t, line in zip(bundled, bundled.lines)
        if min(n_tokens(tiny_tok, t.format(n)) for n in names) > 12
    ]
    assert too_long  # e.g. 'a photo of the hard to see {}.'
    with pytest.raises(PromptFileError) as err:
        check_class_text(tiny_tok, as_prompt_set(names), bundled, model="tiny")
    msg = str(err.value)
    assert msg.startswith(
        f"<bundled templates.txt>:{too_long[0]}: template "
    )  # templates come first
    # and the names too long for some other template ('a low resolution photo of the {}.')
    other = [t for t, line in zip(bundled, bundled.lines) if line not in too_long]
    names_over = [n for n in names if max(n_tokens(tiny_tok, t.format(n)) for t in other) > 12]
    assert f"{len(too_long) + len(names_over)} class phrase(s) or template(s)" in msg
    # the user cannot edit the bundled file: the advice is to pass templates of their own
    assert "Shorten them" not in msg
    assert msg.endswith(
        "The bundled default templates are too long for this model and cannot be edited: pass "
        "your own, shorter templates with templates=FILE (a templates file; in Python also a list "
        "of strings with {} for the class text), or pass truncate_prompts=True to accept the cut.")


def test_a_long_class_with_the_bundled_templates_is_told_both_remedies(tiny_tok):
    # every bundled template fits 'cat', so only the long class is at fault, seen through them
    with pytest.raises(PromptFileError) as err:
        check_class_text(tiny_tok, as_prompt_set(["cat", LONG]), as_template_set(None), model="tiny")
    msg = str(err.value)
    assert msg.startswith("<prompts list>:2: class ")
    assert msg.endswith(
        "Shorten the class text, pass your own, shorter templates with templates=FILE (a "
        "templates file; in Python also a list of strings with {} for the class text), or pass "
        "truncate_prompts=True to accept the cut.")


# ---------------------------------------------------------------- the repository's own text


def test_repository_prompts_and_templates_fit_vit_b_32():
    vit = open_clip.get_tokenizer("ViT-B-32")
    animals = read_prompts(REPO / "prompts" / "animals.txt")
    for templates in (as_template_set(REPO / "prompts" / "templates.txt"), as_template_set(None)):
        check_class_text(vit, animals, templates, model="ViT-B-32")  # raises on any overflow
        longest = max(
            n_tokens(vit, t.format(p))
            for c in animals
            for p in [c.name, *c.synonyms, f"{c.name}, {c.description}"]
            for t in templates
        )
        assert longest <= 77


def test_synthetic_world_text_fits_the_tiny_clip(tiny_tok):
    names = [a.name for a in all_attributes()]  # every composition any world can draw
    check_class_text(
        tiny_tok, as_prompt_set(names), as_template_set(list(CAPTION_TEMPLATES)), model="tiny"
    )
    assert max(n_tokens(tiny_tok, t.format(n)) for n in names for t in CAPTION_TEMPLATES) <= 12


# ---------------------------------------------------------------- classes the model cannot tell apart


def test_classes_identical_once_cut_are_refused_by_name_even_when_truncation_is_allowed(
    files, tiny_tok
):
    tmp_path, check = files
    with pytest.raises(PromptFileError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", ClassTextWarning)
        check(f"cat\n{LONG} alpha\n{LONG} beta\n", tiny_tok, truncate_prompts=True)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'prompts.txt'}:3: class ")
    assert "beta" in msg.splitlines()[0] and "alpha" in msg.splitlines()[0]
    assert f"({tmp_path / 'prompts.txt'}:2)" in msg
    assert "once cut to its 12-token context" in msg and "identical" in msg


def test_names_that_tokenise_alike_are_refused_without_any_cut(tmp_path):
    # NFC and NFD spellings of 'café' are two names to the parser, one text to the tokenizer.
    vit = open_clip.get_tokenizer("ViT-B-32")
    prompts = read_prompts(write(tmp_path, "p.txt", "caf\u00e9\ncafe\u0301\n"))
    with pytest.raises(
        PromptFileError, match=r"p\.txt:2: class .* same tokens as class .*p\.txt:1"
    ):
        check_class_text(vit, prompts, as_template_set(["a photo of a {}."]), model="ViT-B-32")


def test_similar_column_pairs_and_the_warning_name_both_classes(tmp_path):
    e = torch.eye(4)
    near = torch.nn.functional.normalize(e[0] + 0.01 * e[1], dim=0)  # cosine 1 / sqrt(1.0001)
    w = torch.stack([e[0], e[2], near, e[3]], dim=1)
    assert similar_column_pairs(w, 0.999) == [(0, 2, pytest.approx(1 / 1.0001**0.5))]
    assert similar_column_pairs(w, 0.99996) == []
    prompts = read_prompts(write(tmp_path, "p.txt", "# c\nfox\nowl\nred fox\nbat\n"))
    with pytest.warns(ClassTextWarning) as rec:
        warn_similar_classes(w, prompts)
    msg = str(rec[0].message)
    assert msg.startswith(
        "1 pair(s) of classes whose text columns are nearly identical (cosine >= 0.999)"
    )
    assert (
        f"{tmp_path / 'p.txt'}:4: class 'red fox' and class 'fox' ({tmp_path / 'p.txt'}:2)" in msg
    )
    assert "0.99995" in msg


# ---------------------------------------------------------------- build_text_classifier and the cache


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A tiny CLIP with (random) weights from a file: a 16-token context."""
    return load_clip(f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('clip') / 'tiny')}")


def test_truncation_opt_in_builds_the_matrix_and_warns_once_with_the_count(tiny_bundle, tmp_path):
    prompts = ["cat", LONG, f"dog: {LONG}"]
    templates = ["a photo of a {}.", "{}."]
    tok = tiny_bundle.tokenizer
    texts = [t.format(p) for p in ["cat", LONG, "dog", f"dog, {LONG}"] for t in templates]
    n_cut = sum(n_tokens(tok, x) > 16 for x in texts)
    assert n_cut == 4
    with pytest.raises(PromptFileError, match="2 class phrase"):
        build_text_classifier(tiny_bundle, prompts, templates, cache_dir=tmp_path)
    with pytest.warns(ClassTextWarning) as rec:
        w = build_text_classifier(
            tiny_bundle, prompts, templates, cache_dir=tmp_path, truncate_prompts=True
        )
    assert w.shape == (32, 3)
    assert torch.allclose(w.norm(dim=0), torch.ones(3), atol=1e-5)
    cut = [r for r in rec if issubclass(r.category, ClassTextWarning)]
    assert len(cut) == 1
    assert str(cut[0].message).startswith(
        f"{n_cut} of {len(texts)} class texts (phrases in templates) "
        "are cut to the 16-token context"
    )


def test_a_warm_cache_does_not_bypass_the_check(tiny_bundle, tmp_path):
    """A matrix cached for over-long text (as an older version wrote it) is not used without the opt-in."""
    prompts, templates = ["cat", LONG], ["a photo of a {}."]
    with pytest.warns(ClassTextWarning):
        build_text_classifier(
            tiny_bundle, prompts, templates, cache_dir=tmp_path, truncate_prompts=True
        )
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 1
    with pytest.raises(PromptFileError, match=r"<prompts list>:2: class .* the limit is 16"):
        build_text_classifier(tiny_bundle, prompts, templates, cache_dir=tmp_path)


def test_near_identical_columns_warn_unless_the_model_is_random_init(
    tmp_path, monkeypatch, tiny_bundle
):
    """The threshold lowered so that two real columns cross it: the wiring, not the threshold."""
    prompts, templates = ["red fox", "red foxes"], ["a photo of a {}."]
    w = build_text_classifier(tiny_bundle, prompts, templates, use_cache=False)
    cos = float(w[:, 0] @ w[:, 1])
    monkeypatch.setattr(text_checks, "NEAR_IDENTICAL_COSINE", cos - 1e-4)
    with pytest.warns(
        ClassTextWarning, match=r"<prompts list>:2: class 'red foxes' and class 'red fox' \(<prompts list>:1\)"
    ):
        build_text_classifier(tiny_bundle, prompts, templates, use_cache=False)
    cfg = tmp_path / "hybridcls-test-random.json"
    cfg.write_text(json.dumps(tiny_model_cfg()), encoding="utf-8")
    open_clip.add_model_config(cfg)
    random_bundle = load_clip("hybridcls-test-random", pretrained=None)
    assert random_bundle.random_init
    monkeypatch.setattr(text_checks, "NEAR_IDENTICAL_COSINE", -1.0)  # every pair would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClassTextWarning)
        build_text_classifier(random_bundle, prompts, templates, use_cache=False)


# ---------------------------------------------------------------- the command line


def test_predict_refuses_then_truncates_on_request(tmp_path, tiny_bundle, capsys):
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "a.png")
    prompts = write(tmp_path, "prompts.txt", f"cat\n{LONG}\n")
    templates = write(tmp_path, "templates.txt", "a photo of a {}.\n")
    argv = [
        "predict",
        str(tmp_path / "a.png"),
        "--prompts",
        str(prompts),
        "--templates",
        str(templates),
        "--clip-model",
        tiny_bundle.model_id,
        "--cache-dir",
        str(tmp_path / "c"),
        "--workers",
        "0",
        "-q",
        "-o",
        str(tmp_path / "out.csv"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    expected = n_tokens(tiny_bundle.tokenizer, f"a photo of a {LONG}.")
    assert (
        f"{prompts}:2: class " in err and f"{expected} tokens" in err and "the limit is 16" in err
    )
    # the command line prints the library's ClassTextWarning as one line, in its own flags' words
    assert main([*argv, "--truncate-prompts"]) == 0
    err = capsys.readouterr().err
    assert "hybridcls predict: warning: 1 of 2 class texts" in err and "(--truncate-prompts)" in err
    assert (tmp_path / "out.csv").is_file()


@pytest.mark.parametrize("command", ["predict", "calibrate", "explain"])
def test_every_subcommand_that_builds_a_text_classifier_passes_the_opt_in(command, monkeypatch):
    from hybridcls.cli.common import hybrid_from_args
    from hybridcls.cli.decision import classifier_from_args
    from hybridcls.hybrid import HybridClassifier

    monkeypatch.setattr(HybridClassifier, "load_run", lambda self, run_dir, prompts=None: self)
    # explain builds its hybrid as predict does, from the decision flags
    build = (lambda args: classifier_from_args(args, None)) if command == "explain" else hybrid_from_args
    first = ["run"] if command == "calibrate" else ["x.png", "--checkpoint", "run"]
    for flag, value in (([], False), (["--truncate-prompts"], True)):
        args = build_parser().parse_args([command, *first, "--prompts", "p.txt", *flag])
        assert build(args).truncate_prompts is value
