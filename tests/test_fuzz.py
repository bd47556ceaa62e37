"""Fuzzing the two parsers that read untrusted bytes: prompts/templates files and images.

Nothing may escape but the documented error (``PromptFileError``,
``ImageDecodeError``), and what comes back must keep its promises (classes
with names, unique after normalisation; an RGB image).

Each test runs ``HYBRIDCLS_FUZZ_EXAMPLES`` cases (default 80: a few hundred in
the suite, a few seconds). For a longer hunt::

    HYBRIDCLS_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from hybridcls.data import load_image
from hybridcls.data.images import decode_image_bytes
from hybridcls.errors import ImageDecodeError, PromptFileError
from hybridcls.zeroshot.prompts import (
    normalize_label,
    parse_prompts,
    parse_templates,
    read_prompts,
)

FUZZ = settings(
    max_examples=int(os.environ.get("HYBRIDCLS_FUZZ_EXAMPLES", "80")),
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Text made mostly of the characters the prompts grammar gives meaning to.
_GRAMMAR = st.sampled_from(list("ab :|#{}+-_ \t\n\r\x00\ufeffé\u2028"))
_PROMPT_TEXT = st.text(alphabet=_GRAMMAR | st.characters(), max_size=300)


def _parsed_or_refused(parse, source: str):
    """``parse()``, or None when it raised the documented error (naming ``source``)."""
    try:
        return parse()
    except PromptFileError as exc:
        assert str(exc).startswith(source)
        return None


def _check_prompt_set(ps) -> None:
    assert len(ps) >= 1
    keys = [normalize_label(c.name) for c in ps]
    assert all(keys) and len(set(keys)) == len(keys)
    for c in ps:
        assert c.name == c.name.strip() and "|" not in c.name and ":" not in c.name
        assert all(s and normalize_label(s) for s in c.synonyms)
        assert c.description is None or c.description.strip()
        assert c.line >= 1


@FUZZ
@given(text=_PROMPT_TEXT)
@example(text="a|+")  # found by a long run: a synonym of separators only was accepted
def test_prompts_text_parses_or_raises_prompt_file_error(text):
    ps = _parsed_or_refused(lambda: parse_prompts(text, source="fuzz.txt"), "fuzz.txt")
    if ps is not None:
        _check_prompt_set(ps)


@FUZZ
@given(data=st.binary(max_size=300) | _PROMPT_TEXT.map(lambda t: t.encode("utf-8", "replace")))
def test_prompts_file_bytes_parse_or_raise_prompt_file_error(tmp_path, data):
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    ps = _parsed_or_refused(lambda: read_prompts(path), str(path))
    if ps is not None:
        _check_prompt_set(ps)


@FUZZ
@given(text=_PROMPT_TEXT)
def test_templates_parse_or_raise_prompt_file_error(text):
    templates = _parsed_or_refused(lambda: parse_templates(text, source="t.txt"), "t.txt")
    if templates is None:
        return
    assert templates and len(set(templates)) == len(templates)
    for t in templates:
        assert t.format("X") != t.format("Y")  # one working placeholder


# ------------------------------------------------------------------------------------ images

# A pixel ceiling well below the default keeps a mutated header from asking for
# gigabytes; the check it exercises is the same.
MAX_PIXELS = 4_000_000


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(23, 31, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


REAL = {
    "png": _encoded("PNG"),
    "png-rgba": _encoded("PNG", "RGBA"),
    "jpeg": _encoded("JPEG"),
    "gif": _encoded("GIF", "P"),
    "bmp": _encoded("BMP"),
    "webp": _encoded("WEBP"),
    "tiff": _encoded("TIFF"),
}


def _decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image_bytes(data, "fuzz.img", max_pixels=MAX_PIXELS)
    except ImageDecodeError as exc:
        assert exc.path == "fuzz.img" and exc.reason and "\n" not in exc.reason
        return
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    assert image.width * image.height <= MAX_PIXELS


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes_decode_or_raise_image_decode_error(data):
    _decodes_or_refuses(data)


@FUZZ
@given(kind=st.sampled_from(sorted(REAL)), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_real_images_decode_or_raise_image_decode_error(kind, cut):
    data = REAL[kind]
    _decodes_or_refuses(data[: int(len(data) * cut)])


@FUZZ
@given(
    kind=st.sampled_from(sorted(REAL)),
    edits=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=6),
    anywhere=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=3
    ),
)
def test_mutated_images_decode_or_raise_image_decode_error(kind, edits, anywhere):
    data = bytearray(REAL[kind])
    # Header bytes (dimensions, chunk lengths, markers) first, then a few anywhere.
    for position, value in edits:
        data[position % len(data)] = value
    for where, value in anywhere:
        data[int(where * len(data))] = value
    _decodes_or_refuses(bytes(data))


@FUZZ
@given(kind=st.sampled_from(sorted(REAL)), cut=st.floats(0, 1))
def test_load_image_on_damaged_files_raises_only_image_decode_error(tmp_path, kind, cut):
    path = Path(tmp_path) / f"damaged.{kind}"
    path.write_bytes(REAL[kind][: int(len(REAL[kind]) * cut)])
    try:
        image = load_image(path, max_pixels=MAX_PIXELS)
    except ImageDecodeError as exc:
        assert exc.path == str(path) and exc.reason
        return
    assert image.mode == "RGB"


@pytest.mark.parametrize("kind", sorted(REAL))
def test_the_fuzzed_originals_are_valid_images(kind):
    # Mutations start from good files: make sure they are, or the fuzzing proves little.
    assert decode_image_bytes(REAL[kind], kind).size == (31, 23)
