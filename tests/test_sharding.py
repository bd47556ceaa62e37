"""Resume, shards and merge on prediction files, with a stand-in for the model (no torch model runs)."""

from __future__ import annotations

import json
import shutil

import pytest

from hybridcls import outputs
from hybridcls.data import Source
from hybridcls.errors import InputError, ParameterError
from hybridcls.outputs import PredictionRow, output_columns
from hybridcls.sharding import (
    Manifest,
    OutputScan,
    ShardSpec,
    manifest_path,
    merge_parts,
    predict_to_output,
)

ODD = ["plain.jpg", "with space.jpg", 'quote"d.jpg', "comma,name.jpg", "new\nline.jpg",
       "élan_猫.jpg", "a/b/deep.png", "undecodable_\udcff.jpg"]
SOURCES = [Source(f"in/{n}") for n in ODD] + [Source("in/missing.jpg", error="no such file")]
SETTINGS = {"model": "stand-in", "topk": 2}


class FakeModel:
    """Rows in batches of 3; records which inputs it was asked for."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, todo):
        self.seen += [s.path for s in todo]
        for i in range(0, len(todo), 3):
            yield [
                PredictionRow(s.path, label="fox", score=0.25 + len(s.path) / 100, branch="zeroshot",
                              topk=[("fox", 0.75), ("wolf", 0.25)], extra={"gate_score": 1.5})
                if s.ok else PredictionRow.failed(s.path, s.error)
                for s in todo[i:i + 3]
            ]


def _predict(out, model=None, *, fmt="csv", sources=SOURCES, settings=SETTINGS, **kw):
    return predict_to_output(model or FakeModel(), sources, out, fmt=fmt, topk=2,
                             extra_columns=["gate_score"] if fmt != "kaggle" else (),
                             settings=settings, **kw)


@pytest.mark.parametrize("fmt", outputs.FORMATS)
def test_a_file_cut_at_any_byte_resumes_to_the_uninterrupted_file(tmp_path, fmt, monkeypatch):
    # Thousands of resumes: fsync (durability, not what is tested here) would dominate.
    monkeypatch.setattr("os.fsync", lambda fd: None)
    ref = tmp_path / "ref.out"
    summary = _predict(ref, fmt=fmt)
    assert (summary.n_ok, summary.n_error, summary.resumed) == (len(SOURCES) - 1, 1, 0)
    full = ref.read_bytes()
    columns = output_columns(fmt, 2, ["gate_score"] if fmt != "kaggle" else ())
    ends = [r.end for r in OutputScan(ref, fmt, columns).records()]
    assert len(ends) == len(SOURCES)
    cut_file = tmp_path / "cut.out"
    # Every third byte, and every byte next to a record boundary (a cut inside the quoted
    # "new\nline" name or inside a multi-byte character falls in the first set).
    cuts = set(range(0, len(full), 3)) | {e + d for e in ends for d in (-2, -1, 0, 1)}
    if b"new\n" in full:  # CSV: just after the newline inside the quoted name
        cuts.add(full.index(b"new\n") + 4)
    cuts = sorted(cuts)
    for cut in [c for c in cuts if 0 <= c < len(full)]:
        cut_file.write_bytes(full[:cut])
        shutil.copy(manifest_path(ref), manifest_path(cut_file))
        model = FakeModel()
        summary = _predict(cut_file, model, fmt=fmt, resume=True)
        kept = sum(end <= cut for end in ends)  # records complete before the cut
        assert cut_file.read_bytes() == full, cut
        assert summary.resumed == kept
        assert model.seen == [s.path for s in SOURCES[kept:]]  # each input predicted once overall
        assert (summary.n_ok, summary.n_error) == (len(SOURCES) - 1, 1)


def test_resume_of_a_finished_file_predicts_nothing(tmp_path):
    out = tmp_path / "p.csv"
    _predict(out)
    model = FakeModel()
    assert _predict(out, model, resume=True).resumed == len(SOURCES)
    assert model.seen == []


def test_resume_without_a_file_starts_it(tmp_path):
    out = tmp_path / "new.csv"
    assert _predict(out, resume=True).resumed == 0
    assert out.read_bytes() == (_predict(tmp_path / "ref.csv") and (tmp_path / "ref.csv").read_bytes())


def test_resume_refuses_other_settings_inputs_or_edited_rows(tmp_path):
    out = tmp_path / "p.csv"
    _predict(out)
    with pytest.raises(InputError, match=r"resume=True: cannot continue .*p\.csv: .*model "
                                         r"\"stand-in\" vs \"other\"\); run without resume=True"):
        _predict(out, settings={**SETTINGS, "model": "other"}, resume=True)
    # a folder's fingerprint (file -> hash) differs by its files, not by two cut texts that read alike
    folder = {f"cat/{i}.png": "a" * 64 for i in range(5)}
    _predict(tmp_path / "s.csv", settings={**SETTINGS, "support": folder})
    edited = {**folder, "cat/1.png": "b" * 64, "dog/9.png": "c" * 64}
    del edited["cat/4.png"]
    with pytest.raises(InputError) as info:
        _predict(tmp_path / "s.csv", settings={**SETTINGS, "support": edited}, resume=True)
    assert ("support: 1 only in the first (cat/4.png); 1 only in the second (dog/9.png); "
            "1 changed (cat/1.png)") in str(info.value)
    with pytest.raises(InputError, match=r"inputs: 9 vs 8"):
        _predict(out, sources=SOURCES[:-1], resume=True)
    with pytest.raises(InputError, match=r"other paths or order"):
        _predict(out, sources=SOURCES[::-1], resume=True)
    with pytest.raises(InputError, match=r"range #0-#8 vs #0-#3"):
        _predict(out, shard=ShardSpec(0, 2), resume=True)
    text = out.read_text(encoding="utf-8")
    out.write_text(text.replace("in/plain.jpg", "in/other.jpg"), encoding="utf-8")
    with pytest.raises(InputError, match=r"p\.csv line 2: a row for 'in/other\.jpg' where input #0 is "
                                         r"'in/plain\.jpg'"):
        _predict(out, resume=True)
    manifest_path(out).unlink()
    with pytest.raises(InputError, match=r"no manifest p\.csv\.manifest\.json"):
        _predict(out, resume=True)


def test_a_run_without_resume_starts_again(tmp_path):
    out = tmp_path / "p.csv"
    _predict(out, settings={"model": "old"})
    _predict(out)
    assert Manifest.read(out).settings == SETTINGS
    assert len(list(OutputScan(out, "csv", Manifest.read(out).columns).records())) == len(SOURCES)


def test_shard_ranges_cover_every_index_once():
    for total in range(23):
        for n in range(1, 8):
            got = []
            for i in range(n):
                a, b = ShardSpec(i, n).range(0, total)
                got += range(a, b)
                assert (b - a) in (total // n, total // n + 1)
            assert got == list(range(total))


@pytest.mark.parametrize("text,message", [
    ("3/3", "I must be between 0 and 2"), ("1/0", "N must be at least 1"), ("a", "expected I/N"),
    ("-1/2", "expected I/N"), ("1/2/3", "expected I/N"),
])
def test_shard_spec_errors_name_the_parameter(text, message):
    with pytest.raises(ParameterError, match=rf"shard='{text}': .*{message}"):
        ShardSpec.parse(text)


@pytest.mark.parametrize("fmt", outputs.FORMATS)
def test_merged_shards_equal_one_run(tmp_path, fmt):
    _predict(tmp_path / "ref.out", fmt=fmt)
    parts = [tmp_path / f"part{i}.out" for i in range(4)]
    for i, p in enumerate(parts):
        _predict(p, fmt=fmt, shard=ShardSpec(i, 4))
    result = merge_parts(parts[::-1], tmp_path / "merged.out")
    assert (tmp_path / "merged.out").read_bytes() == (tmp_path / "ref.out").read_bytes()
    assert (result.rows, result.n_ok, result.n_error, result.parts) == (len(SOURCES), len(SOURCES) - 1, 1, 4)
    # The merged file carries the whole run's manifest: it can be merged or resumed again.
    assert Manifest.read(tmp_path / "merged.out") == Manifest.read(tmp_path / "ref.out")


def test_more_shards_than_inputs_give_empty_parts_that_merge(tmp_path):
    parts = [tmp_path / f"p{i}.jsonl" for i in range(12)]
    for i, p in enumerate(parts):
        _predict(p, fmt="jsonl", shard=ShardSpec(i, 12))
    merge_parts(parts, tmp_path / "m.jsonl")
    records = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["path"] for r in records] == [s.path for s in SOURCES]


def test_merge_errors_list_missing_duplicate_and_incomplete_inputs(tmp_path):
    parts = [tmp_path / f"part{i}.csv" for i in range(3)]
    for i, p in enumerate(parts):
        _predict(p, shard=ShardSpec(i, 3))
    out = tmp_path / "m.csv"
    with pytest.raises(InputError, match=r"inputs #3-#5 \(3\) missing: no part has them"):
        merge_parts([parts[0], parts[2]], out)
    with pytest.raises(InputError, match=r"inputs #6-#8 \(3\) twice: in .*part2\.csv and .*part2\.csv"):
        merge_parts(parts + [parts[2]], out)
    # A part cut short by a crash: its missing inputs are named, and how to finish it.
    text = parts[1].read_bytes()
    parts[1].write_bytes(text[: text.rindex(b"\n", 0, len(text) - 1) + 5])
    with pytest.raises(InputError, match=r"input #5 missing: .*part1\.csv \(shard 1/3\) stops after 2 of 3 "
                                         r"rows \(rerun it with resume=True\)"):
        merge_parts(parts, out)
    _predict(parts[1], shard=ShardSpec(1, 3), resume=True)
    # Other settings cannot be merged with these parts.
    other = tmp_path / "other.csv"
    _predict(other, settings={**SETTINGS, "topk": 3}, shard=ShardSpec(1, 3))
    with pytest.raises(InputError, match=r"come from different runs: topk 2 vs 3"):
        merge_parts([parts[0], other, parts[2]], out)
    # Rows that are not the part's inputs (edited after the run).
    parts[1].write_text(parts[1].read_text(encoding="utf-8").replace("comma,name", "comma;name"),
                        encoding="utf-8")
    with pytest.raises(InputError, match=r"part1\.csv \(shard 1/3\): its rows are not the paths"):
        merge_parts(parts, out)
    assert not out.exists()
    with pytest.raises(InputError, match=r"the output cannot be one of the parts"):
        merge_parts(parts, parts[0])
    (tmp_path / "foreign.csv").write_text("path,label\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"foreign\.csv: no manifest"):
        merge_parts([tmp_path / "foreign.csv"], out)


class BrokenModel:
    """A model that fails to load: raises before its first batch, as a bad prompts file does."""

    def __call__(self, todo):
        raise InputError("prompts.txt:3: 'fox' is listed twice")
        yield  # a generator, like the real predict_rows: it runs on the first next()


@pytest.mark.parametrize("resume", [False, True])
def test_a_model_that_fails_to_load_writes_nothing(tmp_path, resume):
    out = tmp_path / "p.csv"
    with pytest.raises(InputError, match="listed twice"):
        _predict(out, BrokenModel(), resume=resume)
    assert not out.exists() and not manifest_path(out).exists()
    # An existing file, cut by a crash, is left byte for byte as it was: not truncated, not replaced.
    _predict(out)
    out.write_bytes(out.read_bytes()[:-7])
    before, manifest = out.read_bytes(), manifest_path(out).read_bytes()
    with pytest.raises(InputError, match="listed twice"):
        _predict(out, BrokenModel(), resume=resume)
    assert out.read_bytes() == before and manifest_path(out).read_bytes() == manifest


def test_kaggle_duplicate_ids_are_refused_before_anything_is_written(tmp_path):
    sources = [Source("site1/IMG_0001.png"), Source("site2/IMG_0001.png")]
    out = tmp_path / "sub.csv"
    model = FakeModel()
    with pytest.raises(InputError, match=r"'IMG_0001\.png' would stand for both 'site1/IMG_0001\.png' "
                                         r"and 'site2/IMG_0001\.png'"):
        _predict(out, model, fmt="kaggle", sources=sources)
    assert model.seen == [] and not out.exists() and not manifest_path(out).exists()
    # each shard alone has one IMG_0001.png; the run as a whole has two: every shard refuses
    with pytest.raises(InputError, match=r"'IMG_0001\.png' would stand for both"):
        _predict(out, model, fmt="kaggle", sources=sources, shard=ShardSpec(1, 2))
    _predict(tmp_path / "p.csv", fmt="csv", sources=sources)  # full paths tell them apart


def test_merge_refuses_kaggle_parts_with_one_image_id_twice(tmp_path, monkeypatch):
    # Parts written before predict refused duplicate ids: the merge must not join them silently.
    monkeypatch.setattr("hybridcls.sharding.check_unique_keys", lambda paths, fmt: None)
    sources = [Source("site1/IMG_0001.png"), Source("site2/IMG_0001.png")]
    parts = [tmp_path / f"part{i}.csv" for i in range(2)]
    for i, p in enumerate(parts):
        _predict(p, fmt="kaggle", sources=sources, shard=ShardSpec(i, 2))
    with pytest.raises(InputError, match=r"image_id 'IMG_0001\.png' twice: .*part0\.csv line 2 and "
                                         r".*part1\.csv line 2"):
        merge_parts(parts, tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()
