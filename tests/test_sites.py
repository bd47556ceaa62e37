"""Site files: parsing and its errors (file:line), matching inputs to rows, the masks (issue 16, part 3)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hybridcls.data import Source
from hybridcls.errors import ParameterError, PromptFileError
from hybridcls.sites import allowed_columns, allowed_masks, read_site_classes
from hybridcls.zeroshot.prompts import parse_prompts

PROMPTS = parse_prompts("fox\nmoose | elk\npolar bear\nzebra\n", source="p.txt")


def _site_file(tmp_path, text: str, name: str = "sites.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path, text: str) -> str:
    with pytest.raises(PromptFileError) as exc:
        read_site_classes(_site_file(tmp_path, text))
    return str(exc.value)


@pytest.mark.parametrize(("text", "where", "reason"), [
    ("", ":1:", "empty site file"),
    ("path,classes\na,fox\n", ":1:", "expected a 'classes' column and a 'prefix' or 'site'"),
    ("prefix,site\na,b\n", ":1:", "expected a 'classes' column"),
    ("prefix,classes,Classes\na,fox,moose\n", ":1:", "column 'classes' appears 2 times"),
    ("prefix,classes\na,fox\nb,fox,moose\n", ":3:", "3 fields, expected 2 (prefix,classes)"),
    ("prefix,classes\n\na,fox\nb,\n", ":4:", "empty classes"),
    ("prefix,classes\na,fox;;moose\n", ":2:", "class 2 of 3 in 'fox;;moose' is empty"),
    ("prefix,classes\na,fox;Fox\n", ":2:", "a class is named twice in 'fox;Fox'"),
    ("prefix,site,classes\n,,fox\n", ":2:", "the row has neither a prefix nor a site"),
    ("prefix,classes\na,fox\n./a/,moose\n", ":3:", "is already on line 2"),
    ("site,classes\nk,fox\nk,moose\n", ":3:", "site 'k' is already on line 2"),
    ('prefix,classes\n"a,fox\n', ":2:", "malformed CSV"),
])
def test_malformed_site_file_names_file_and_line(tmp_path, text, where, reason):
    message = _error(tmp_path, text)
    assert message.startswith(str(tmp_path / "sites.csv") + where) and reason in message


def test_no_row_and_not_utf8_are_errors(tmp_path):
    assert "has no row after its header" in _error(tmp_path, "prefix,classes\n\n")
    path = tmp_path / "bad.csv"
    path.write_bytes(b"prefix,classes\na,f\xffx\n")
    with pytest.raises(PromptFileError, match=r"bad\.csv:2: not valid UTF-8"):
        read_site_classes(path)


def test_a_name_not_in_the_prompts_file_names_the_site_file_line(tmp_path):
    sites = read_site_classes(_site_file(tmp_path, "prefix,classes\na,fox\nb,moose;wolf\n"))
    with pytest.raises(PromptFileError) as exc:
        sites.resolve(PROMPTS)
    assert str(exc.value) == f"{tmp_path / 'sites.csv'}:3: class 'wolf' is not in the prompts file p.txt"


def test_longest_prefix_wins_synonyms_match_and_unmatched_inputs_allow_every_class(tmp_path):
    # prefixes are read from the site file's folder; a prefix holds itself and what lies under it
    sites = read_site_classes(_site_file(
        tmp_path, "prefix,classes\ntraps,fox;Moose\ntraps/north,ELK;polar_bear\ntraps/north/x.jpg,zebra\n"))
    resolved = sites.resolve(PROMPTS)
    paths = ["traps/a.jpg", "traps/north/b.jpg", "traps/north/x.jpg", "traps_b/c.jpg", "other/d.jpg"]
    sources = [Source(str(tmp_path / p)) for p in paths] + [Source("<image 5>", image=object())]
    mask, empty = allowed_masks(sources, len(PROMPTS), None, resolved)
    assert mask.astype(int).tolist() == [
        [1, 1, 0, 0],  # traps: fox; moose
        [0, 1, 1, 0],  # traps/north (the longer prefix): elk is moose's synonym; polar bear
        [0, 0, 0, 1],  # the file itself
        [1, 1, 1, 1],  # traps_b is not under traps
        [1, 1, 1, 1],  # no row: every class
        [1, 1, 1, 1],  # an image in memory has no path
    ]
    assert empty == {}


def test_relative_input_paths_match_absolute_prefixes(tmp_path, monkeypatch):
    sites = read_site_classes(_site_file(tmp_path, "prefix,classes\nkenya,zebra\n"))
    monkeypatch.chdir(tmp_path)
    mask, _ = allowed_masks([Source(os.path.join("kenya", "a.jpg"))], 4, None, sites.resolve(PROMPTS))
    assert mask.tolist() == [[False, False, False, True]]


def test_allowed_classes_intersect_and_an_input_with_none_left_is_named(tmp_path):
    sites = read_site_classes(_site_file(tmp_path, "prefix,classes\na,fox;moose\nb,zebra\n"))
    base = allowed_columns(["fox", "zebra"], PROMPTS)
    sources = [Source(str(tmp_path / "a" / "1.jpg")), Source(str(tmp_path / "c.jpg"))]
    mask, empty = allowed_masks(sources, 4, base, sites.resolve(PROMPTS))
    assert mask.astype(int).tolist() == [[1, 0, 0, 0], [1, 0, 0, 1]]
    assert empty == {}
    only_moose = allowed_columns(["elk"], PROMPTS)
    mask, empty = allowed_masks([Source(str(tmp_path / "b" / "2.jpg"))], 4, only_moose, sites.resolve(PROMPTS))
    assert not mask.any()
    assert empty == {0: f"no class is allowed: none of the classes of {tmp_path / 'sites.csv'} line 3 "
                        "is among the classes allowed everywhere"}


def test_allowed_classes_errors_name_the_parameter_and_the_name():
    with pytest.raises(ParameterError) as exc:
        allowed_columns(["fox", "wolf"], PROMPTS)
    assert str(exc.value) == "allowed_classes='wolf': not a class of the prompts file p.txt"
    with pytest.raises(ParameterError, match="expected at least one class name"):
        allowed_columns([], PROMPTS)


def test_a_list_files_site_column_wins_over_prefixes(tmp_path):
    sites = read_site_classes(_site_file(
        tmp_path, "prefix,site,classes\nimgs,everywhere,fox;moose;polar bear\n,arctic,polar bear\n"))
    (tmp_path / "imgs").mkdir()
    listing = tmp_path / "imgs" / "list.csv"
    listing.write_text("path,site\na.jpg,arctic\nb.jpg,\n", encoding="utf-8")
    bound = sites.for_inputs([str(listing)])
    sources = [Source(str(tmp_path / "imgs" / "a.jpg")), Source(str(tmp_path / "imgs" / "b.jpg"))]
    mask, _ = allowed_masks(sources, 4, None, bound.resolve(PROMPTS))
    assert mask.astype(int).tolist() == [[0, 0, 1, 0], [1, 1, 1, 0]]
    # unbound (no list file among the inputs): the prefix decides
    mask, _ = allowed_masks(sources[:1], 4, None, sites.resolve(PROMPTS))
    assert mask.astype(int).tolist() == [[1, 1, 1, 0]]


def test_a_list_files_unknown_site_names_the_list_file_line(tmp_path):
    sites = read_site_classes(_site_file(tmp_path, "site,classes\narctic,polar bear\n"))
    listing = tmp_path / "list.csv"
    listing.write_text("path,site\na.jpg,arctic\nb.jpg,savanna\n", encoding="utf-8")
    with pytest.raises(PromptFileError) as exc:
        sites.for_inputs(listing)
    assert str(exc.value) == (f"{listing}:3: site 'savanna' is not in {tmp_path / 'sites.csv'} "
                              "(its sites: 'arctic')")


def test_an_image_listed_twice_with_two_sites_is_refused(tmp_path):
    sites = read_site_classes(_site_file(tmp_path, "site,classes\narctic,polar bear\nwoods,fox\n"))
    listing = tmp_path / "list.csv"
    listing.write_text("path,site\na.jpg,arctic\nb.jpg,woods\na.jpg,arctic\na.jpg,woods\n",
                       encoding="utf-8")
    with pytest.raises(PromptFileError) as exc:
        sites.for_inputs(listing)
    assert str(exc.value) == (f"{listing}:5: {tmp_path / 'a.jpg'} is listed again with site "
                              f"'woods'; {listing} line 2 gives it site 'arctic' (one image, one site)")
    # listed again with the same site: one image, nothing lost
    listing.write_text("path,site\na.jpg,arctic\na.jpg,arctic\n", encoding="utf-8")
    assert len(sites.for_inputs(listing).listed) == 1


def test_a_row_that_reaches_no_input_is_a_warning_naming_file_line_and_prefix(tmp_path):
    import warnings

    from hybridcls.errors import SiteFileWarning

    path = _site_file(tmp_path, "prefix,site,classes\ntraps/kenya,,fox\ntraps/kneya,,moose\n"
                                "traps,,fox;moose;zebra\n,arctic,polar bear\n,savanna,zebra\n")
    listing = tmp_path / "list.csv"
    listing.write_text("path,site\ntraps/kenya/c.jpg,arctic\n", encoding="utf-8")
    sources = [Source(str(tmp_path / "traps" / "kenya" / n)) for n in ("a.jpg", "b.jpg", "c.jpg")]
    bound = read_site_classes(path).for_inputs([str(listing)])
    assert not bound.reach_checked
    with pytest.warns(SiteFileWarning) as caught:
        checked = bound.check_reach(sources)
    # a folder above the inputs ("traps") reaches them; a site a list file names reaches its image
    assert [str(w.message) for w in caught] == [
        (f"{path}:3: prefix {tmp_path / 'traps' / 'kneya'} holds none of the 3 inputs: its classes "
         "limit no image (a misspelt folder?)"),
        (f"{path}:6: site 'savanna' is named by no 'site' cell of a .csv list file among the 3 "
         "inputs: its classes limit no image")]
    assert checked.reach_checked and checked.rows == bound.rows
    # images given in memory have no path: every row is out of their reach
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_site_classes(path).check_reach([Source("<image 0>", image=np.zeros((2, 2, 3), np.uint8))])
    assert [str(w.message).split(": its classes")[0] for w in caught] == [
        f"{path}:2: prefix {tmp_path / 'traps' / 'kenya'} holds none of the 1 input",
        f"{path}:3: prefix {tmp_path / 'traps' / 'kneya'} holds none of the 1 input",
        f"{path}:4: prefix {tmp_path / 'traps'} holds none of the 1 input",
        f"{path}:5: site 'arctic' is named by no 'site' cell of a .csv list file among the 1 input",
        f"{path}:6: site 'savanna' is named by no 'site' cell of a .csv list file among the 1 input"]


def test_every_row_of_the_mask_is_a_copy(tmp_path):
    mask, _ = allowed_masks([Source("a.jpg"), Source("b.jpg")], 3, np.array([True, False, True]), None)
    mask[0, 0] = False
    assert mask[1].tolist() == [True, False, True]
