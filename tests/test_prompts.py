"""Prompts and templates files: the format, every error, and the shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridcls.errors import PromptFileError
from hybridcls.zeroshot.prompts import (
    ClassPrompt,
    PromptSet,
    as_prompt_set,
    check_templates,
    normalize_label,
    parse_prompts,
    parse_templates,
    read_prompts,
    read_templates,
)

REPO = Path(__file__).resolve().parents[1]

AWA2_CLASSES = [
    "antelope",
    "grizzly+bear",
    "killer+whale",
    "beaver",
    "dalmatian",
    "persian+cat",
    "horse",
    "german+shepherd",
    "blue+whale",
    "siamese+cat",
    "skunk",
    "mole",
    "tiger",
    "hippopotamus",
    "leopard",
    "moose",
    "spider+monkey",
    "humpback+whale",
    "elephant",
    "gorilla",
    "ox",
    "fox",
    "sheep",
    "seal",
    "chimpanzee",
    "hamster",
    "squirrel",
    "rhinoceros",
    "rabbit",
    "bat",
    "giraffe",
    "wolf",
    "chihuahua",
    "rat",
    "weasel",
    "otter",
    "buffalo",
    "zebra",
    "giant+panda",
    "deer",
    "bobcat",
    "pig",
    "lion",
    "mouse",
    "polar+bear",
    "collie",
    "walrus",
    "raccoon",
    "cow",
    "dolphin",
]


# ---------------------------------------------------------------- the format


def test_parse_names_descriptions_synonyms_and_lines():
    text = (
        "# a comment\n"
        "\n"
        "grizzly bear\n"
        "moose: a large deer with broad flat antlers | elk\n"
        "bat: a flying mammal | fruit bat | flying fox   # inline comment\n"
        "   killer   whale  \n"
    )
    ps = parse_prompts(text, source="p.txt")
    assert ps.names == ["grizzly bear", "moose", "bat", "killer whale"]
    assert list(ps) == [
        ClassPrompt("grizzly bear", None, (), 3),
        ClassPrompt("moose", "a large deer with broad flat antlers", ("elk",), 4),
        ClassPrompt("bat", "a flying mammal", ("fruit bat", "flying fox"), 5),
        ClassPrompt("killer whale", None, (), 6),
    ]
    assert len(ps) == 4 and ps.source == "p.txt"


def test_hash_inside_a_word_is_text_not_a_comment():
    ps = parse_prompts("c#note: language #1 | c sharp")
    assert ps[0].name == "c#note" and ps[0].description == "language"


def test_read_prompts_accepts_utf8_with_bom(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffcafé au lait\nzèbre\n".encode("utf-8"))
    assert read_prompts(f).names == ["café au lait", "zèbre"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("grizzly+bear", "grizzly bear"),
        ("German_Shepherd", "german shepherd"),
        ("  killer -  whale ", "killer whale"),
        ("SPIDER\tMONKEY", "spider monkey"),
    ],
)
def test_normalize_label(raw, expected):
    assert normalize_label(raw) == expected


@given(st.text(alphabet=st.sampled_from("abcXYZ _+-\t"), max_size=20))
def test_normalize_label_is_idempotent_and_has_no_separators(s):
    n = normalize_label(s)
    assert normalize_label(n) == n
    assert not any(ch in n for ch in "_+-\t") and "  " not in n and n == n.strip()


def test_match_by_normalised_name_or_synonym():
    ps = parse_prompts("grizzly bear | brown bear\nmoose: big deer | elk\nox")
    assert ps.match("Grizzly_Bear") == 0
    assert ps.match("brown+bear") == 0
    assert ps.match("ELK") == 1
    assert ps.match("ox") == 2
    assert ps.match("wolf") is None
    assert ps.index("grizzly+bear") == 0
    with pytest.raises(KeyError):
        ps.index("brown bear")  # index() is by class name only


def test_match_on_two_lines_is_an_error_naming_both():
    ps = parse_prompts("cow | cattle\nox | cattle", source="p.txt")
    with pytest.raises(PromptFileError) as err:
        ps.match("Cattle")
    msg = str(err.value)
    assert msg.startswith("p.txt:2:")
    assert "'cow'" in msg and "line 1" in msg and "'ox'" in msg


def test_list_of_names_is_a_prompts_source():
    ps = as_prompt_set(["cat", "moose: a large deer | elk"])
    assert ps.names == ["cat", "moose"] and ps[1].synonyms == ("elk",) and ps.source == "<prompts list>"
    assert as_prompt_set(ps) is ps
    with pytest.raises(PromptFileError, match=r"<prompts list>:2: duplicate class"):
        as_prompt_set(["Cat", "cat"])
    with pytest.raises(PromptFileError, match=r"<prompts list>:1: expected one class per item"):
        as_prompt_set(["cat\ndog"])


# ---------------------------------------------------------------- prompts errors


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("cat\n: a small feline\n", 2, "empty class name"),
        ("cat\n  | kitty\n", 2, "empty class name"),
        ("cat\n+_-\n", 2, "empty class name"),
        ("cat | | kitty\n", 1, "empty synonym"),
        ("cat | kitty |\n", 1, "empty synonym"),
        ("cat:\n", 1, "empty description"),
        ("cat | kitty | Kitty\n", 1, "repeats a name on this line"),
        ("lion\ncat | kitty\nLION\n", 3, "duplicate class 'LION' (already on line 1)"),
    ],
)
def test_line_errors_name_file_and_line(text, line, reason):
    with pytest.raises(PromptFileError) as err:
        parse_prompts(text, source="animals.txt")
    assert err.value.path == "animals.txt" and err.value.line == line
    assert str(err.value).startswith(f"animals.txt:{line}: ")
    assert reason in str(err.value)


def test_duplicate_class_after_normalisation_names_the_earlier_line():
    with pytest.raises(PromptFileError) as err:
        parse_prompts("# header\ngrizzly bear\nwolf\nGrizzly+Bear\n", source="p.txt")
    assert str(err.value) == "p.txt:4: duplicate class 'Grizzly+Bear' (already on line 2)"


def test_synonym_that_is_another_class_name_is_an_error():
    with pytest.raises(PromptFileError) as err:
        parse_prompts("moose | elk\nelk\n", source="p.txt")
    assert str(err.value).startswith("p.txt:1: ") and "line 2" in str(err.value)


def test_no_classes_is_an_error(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("# only comments\n\n   \n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"empty\.txt: no classes found"):
        read_prompts(f)


def test_missing_file_is_an_error_naming_it(tmp_path):
    f = tmp_path / "nope.txt"
    with pytest.raises(PromptFileError) as err:
        read_prompts(f)
    assert err.value.path == str(f) and "cannot read file" in str(err.value)


def test_a_file_that_cannot_be_read_is_named_by_the_parameter_that_gave_it(tmp_path):
    """as_prompt_set / as_template_set / read_site_classes(parameter=): ``name='FILE': ``, which
    the command line shows as the flag (tests/test_cli_messages.py)."""
    from hybridcls.sites import read_site_classes
    from hybridcls.zeroshot.prompts import as_template_set

    f = tmp_path / "nope.txt"
    for read, parameter in ((as_prompt_set, "prompts"), (as_template_set, "templates"),
                            (lambda p: read_site_classes(p, parameter="site_classes"), "site_classes")):
        with pytest.raises(PromptFileError) as err:
            read(str(f))
        assert str(err.value) == f"{parameter}={str(f)!r}: cannot read file: No such file or directory"
        assert (err.value.path, err.value.line, err.value.parameter) == (str(f), None, parameter)


def test_directory_is_an_unreadable_file(tmp_path):
    with pytest.raises(PromptFileError, match="cannot read file"):
        read_prompts(tmp_path)


def test_non_utf8_file_names_the_line(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("cat\ndog\nz\u00e8bre\n".encode("latin-1"))
    with pytest.raises(PromptFileError) as err:
        read_prompts(f)
    assert err.value.line == 3 and "not valid UTF-8" in str(err.value)


# ---------------------------------------------------------------- templates


def test_parse_templates_skips_comments_and_blank_lines():
    assert parse_templates("# t\n\na photo of a {}.\n  itap of my {}.  \n") == [
        "a photo of a {}.",
        "itap of my {}.",
    ]


def test_literal_braces_are_allowed_when_doubled():
    assert check_templates(["{{{}}}"]) == ["{{{}}}"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a photo of a {}.\na photo of a cat.\n", "no '{}' placeholder"),
        ("a photo of a {}.\na {name}.\n", "exactly one '{}'"),
        ("a photo of a {}.\na {} and a {}.\n", "exactly one '{}'"),
        ("a photo of a {}.\na {} in {braces.\n", "exactly one '{}'"),
        (
            "a photo of a {}.\na photo of a {}.\n",
            "duplicate template 'a photo of a {}.' (already on line 1)",
        ),
    ],
)
def test_template_errors_name_file_and_line(text, reason):
    with pytest.raises(PromptFileError) as err:
        parse_templates(text, source="templates.txt")
    assert str(err.value).startswith("templates.txt:2: ") and reason in str(err.value)


def test_no_templates_is_an_error(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"t\.txt: no templates found"):
        read_templates(f)


def test_template_list_errors_name_the_item():
    with pytest.raises(PromptFileError, match=r"<templates list>:2: .*no '\{\}' placeholder"):
        check_templates(["a {}.", "no placeholder"])


# ---------------------------------------------------------------- shipped files


def test_bundled_templates_are_open_clips_openai_imagenet_templates():
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    assert read_templates() == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def test_repo_templates_file_equals_bundled_default_byte_for_byte():
    bundled = REPO / "hybridcls" / "zeroshot" / "templates.txt"
    assert (REPO / "prompts" / "templates.txt").read_bytes() == bundled.read_bytes()
    assert read_templates(REPO / "prompts" / "templates.txt") == read_templates()


def test_animals_file_has_the_50_awa2_classes_in_dataset_order():
    ps = read_prompts(REPO / "prompts" / "animals.txt")
    assert isinstance(ps, PromptSet) and len(ps) == 50
    assert [normalize_label(n) for n in ps.names] == [normalize_label(c) for c in AWA2_CLASSES]
    # Readable names: spaces, not the dataset's '+'.
    assert ps.names[1] == "grizzly bear" and not any("+" in n or "_" in n for n in ps.names)
    # Every dataset spelling finds its own line.
    assert [ps.match(c) for c in AWA2_CLASSES] == list(range(50))


def test_animals_file_tells_the_cattle_classes_apart():
    ps = read_prompts(REPO / "prompts" / "animals.txt")
    for name in ("ox", "cow", "buffalo"):
        assert ps[ps.index(name)].description, f"{name} needs a description"
