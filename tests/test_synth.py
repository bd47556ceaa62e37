"""Tests of the synthetic open-set world and its shipped tiny CLIP (CPU, offline)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from hybridcls.errors import DatasetError, InputError
from hybridcls.synth import (
    TINY_CLIP_DIR,
    TINY_CLIP_MODEL_ID,
    World,
    make_world,
    zero_shot_accuracy,
)
from hybridcls.synth import tiny_clip as tiny_clip_module
from hybridcls.synth.render import (
    COLOURS,
    SHAPES,
    TEXTURES,
    VOCABULARY,
    Attributes,
    all_attributes,
    render,
)
from hybridcls.synth.tiny_clip import (
    TINY_CLIP_CFG,
    caption_tokens,
    save_tiny_clip,
    tiny_clip_model_id,
    train_tiny_clip,
)
from hybridcls.synth.world import attribute_distance, select_classes

TRAIN_RANGE = (2, 6)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    # Full 50-class shape, few images: the structure is what matters here.
    return make_world(
        tmp_path_factory.mktemp("synth") / "world",
        seed=0,
        train_per_class=TRAIN_RANGE,
        test_per_class=10,
    )


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _small(path: Path, seed: int) -> World:
    return make_world(
        path, seed=seed, n_classes=12, n_unseen=3, train_per_class=(2, 4), test_per_class=2
    )


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = _digests(_small(tmp_path / "a", seed=3).root)
    b = _digests(_small(tmp_path / "b", seed=3).root)
    assert len(a) > 30
    assert a == b


def test_different_seed_gives_different_world(tmp_path: Path) -> None:
    a = _small(tmp_path / "a", seed=3)
    b = _small(tmp_path / "b", seed=4)
    assert a.classes != b.classes
    assert (a.test_dir / "00000.png").read_bytes() != (b.test_dir / "00000.png").read_bytes()


def test_split_sizes_and_class_order(world: World) -> None:
    assert len(world.classes) == 50
    assert len(world.seen_classes) == 40
    assert len(world.unseen_classes) == 10
    assert set(world.seen_classes) | set(world.unseen_classes) == set(world.classes)
    assert not set(world.seen_classes) & set(world.unseen_classes)
    assert list(world.classes) == sorted(world.classes)
    assert len(set(world.classes)) == 50


@pytest.mark.parametrize("seed", range(25))
def test_every_unseen_attribute_occurs_among_seen(seed: int) -> None:
    seen, unseen = select_classes(seed, n_classes=50, n_unseen=10)
    assert (len(seen), len(unseen)) == (40, 10)
    for position in range(3):
        seen_values = {a[position] for a in seen}
        assert {u[position] for u in unseen} <= seen_values


def test_class_names_are_attribute_words(world: World) -> None:
    for name in world.classes:
        colour, texture, shape = name.split(" ")
        assert colour in COLOURS and texture in TEXTURES and shape in SHAPES
    assert len(all_attributes()) == len(COLOURS) * len(TEXTURES) * len(SHAPES)


def test_train_folder_is_imagefolder_of_seen_classes_with_imbalanced_counts(world: World) -> None:
    folders = sorted(p.name for p in world.train_dir.iterdir())
    assert folders == sorted(name.replace(" ", "_") for name in world.seen_classes)
    # ImageFolder sorts folder names; the seen classes come in that same order.
    assert [f.replace("_", " ") for f in folders] == list(world.seen_classes)
    counts = [len(list((world.train_dir / f).glob("*.png"))) for f in folders]
    lo, hi = TRAIN_RANGE
    assert all(lo <= c <= hi for c in counts)
    assert min(counts) == lo and max(counts) == hi
    meta = json.loads((world.root / "world.json").read_text())
    assert meta["train_counts"] == {c: n for c, n in zip(world.seen_classes, counts)}


def test_labels_cover_every_test_image_exactly_once(world: World) -> None:
    with open(world.labels_csv, newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["image_id", "label"]
        rows = list(reader)
    ids = [r[0] for r in rows]
    files = sorted(p.name for p in world.test_dir.iterdir())
    assert sorted(ids) == files
    assert len(ids) == len(set(ids)) == 50 * 10
    labels = [r[1] for r in rows]
    assert {lab: labels.count(lab) for lab in set(labels)} == {c: 10 for c in world.classes}
    # File names say nothing about the class, and classes are interleaved.
    assert all(name[:-4].isdigit() for name in files)
    assert labels[:10] != [labels[0]] * 10


def test_prompts_and_templates_files(world: World) -> None:
    lines = world.prompts_file.read_text().splitlines()
    names = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    assert names == list(world.classes)
    templates = [
        ln for ln in world.templates_file.read_text().splitlines() if not ln.startswith("#")
    ]
    assert templates and all(t.count("{}") == 1 for t in templates)


def test_world_load_round_trip(world: World) -> None:
    assert World.load(world.root) == world


def test_world_load_names_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="world.json"):
        World.load(tmp_path)


def test_make_world_refuses_bad_arguments(world: World, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="already exists"):
        make_world(world.root)
    with pytest.raises(InputError, match="n_unseen"):
        make_world(tmp_path / "x", n_classes=5, n_unseen=5)
    with pytest.raises(InputError, match="n_classes"):
        make_world(tmp_path / "y", n_classes=len(all_attributes()) + 1)
    with pytest.raises(InputError, match="train_per_class"):
        make_world(tmp_path / "z", train_per_class=(10, 5))


def test_shipped_tiny_clip_layout() -> None:
    config = json.loads((TINY_CLIP_DIR / "open_clip_config.json").read_text())
    assert config["model_cfg"] == TINY_CLIP_CFG
    assert config["preprocess_cfg"]["size"] == TINY_CLIP_CFG["vision_cfg"]["image_size"]
    weights = TINY_CLIP_DIR / "open_clip_model.safetensors"
    assert weights.stat().st_size < 10 * 1024 * 1024
    assert TINY_CLIP_MODEL_ID == "local-dir:" + str(TINY_CLIP_DIR)


def test_every_caption_fits_the_context() -> None:
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_MODEL_ID)
    tokens = caption_tokens(tokenizer)
    assert tokens.shape[:2] == (len(all_attributes()), 5)
    # The last position stays free: no caption was truncated.
    assert (tokens[..., -1] == 0).all()


def test_shipped_tiny_clip_zero_shot_accuracy(world: World) -> None:
    acc = zero_shot_accuracy(world)
    assert acc["overall"] >= 0.70, acc
    assert acc["unseen"] >= 0.70, acc
    assert acc["seen"] >= 0.70, acc


def test_train_and_save_round_trip_through_local_dir(tmp_path: Path) -> None:
    model = train_tiny_clip(steps=2, batch_size=8, warmup=1, log_every=0)
    again = train_tiny_clip(steps=2, batch_size=8, warmup=1, log_every=0)
    other_seed = train_tiny_clip(steps=2, batch_size=8, warmup=1, log_every=0, seed=1)
    # Seeded: the same recipe gives the same weights, another seed does not.
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert not torch.equal(other_seed.text_projection, model.text_projection)
    out = save_tiny_clip(model, tmp_path / "clip", info={"note": "test"})
    loaded, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(out))
    for name, tensor in model.state_dict().items():
        # Stored as float16: equal up to half-precision rounding.
        assert torch.equal(loaded.state_dict()[name], tensor.half().float()), name
    assert json.loads((out / "open_clip_config.json").read_text())["hybridcls"] == {"note": "test"}
    assert preprocess.transforms[0].size == 32


# ---------------------------------------------------------------- world variation knobs


def _pixel_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and content, PNGs by their decoded pixels
    (so the digest does not depend on the PNG encoder's compression)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            if p.suffix == ".png":
                with Image.open(p) as img:
                    h.update(np.asarray(img).tobytes())
            else:
                h.update(p.read_bytes())
    return h.hexdigest()


# The module's world (seed 0, the default class split, 2-6 training and 10 test images
# per class) hashed with the code from before the variation knobs existed: the knobs at
# their defaults must not change a pixel or a byte of any file. (That code's full default
# world, make_world(out, seed=0), hashed 1beaa1cd... the same way, and still does.)
DEFAULT_WORLD_DIGEST = "a3a5470610f6cbd81be607bc3e93125224ca228842984c8d6bc3599eceb76a0b"


def test_default_world_unchanged_by_the_knobs(world: World, tmp_path: Path) -> None:
    assert _pixel_digest(world.root) == DEFAULT_WORLD_DIGEST
    explicit = make_world(tmp_path / "w", seed=0, train_per_class=TRAIN_RANGE, test_per_class=10,
                          vocab=None, placement="random", nuisance=1.0)
    assert _pixel_digest(explicit.root) == DEFAULT_WORLD_DIGEST
    meta = json.loads((world.root / "world.json").read_text())
    assert not {"vocabulary", "placement", "nuisance"} & set(meta)
    assert (world.vocabulary, world.placement, world.nuisance) == (VOCABULARY, "random", 1.0)


def test_nuisance_zero_draws_every_nuisance_at_its_middle() -> None:
    img = np.asarray(render(Attributes("red", "plain", "circle"), np.random.default_rng(5), size=64,
                            nuisance=0.0)).astype(int)
    # background at the middle level 170, untinted, no gradient, no noise
    for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
        assert corner.tolist() == [170, 170, 170]
    # the object centred, in its reference colour (no jitter)
    assert img[32, 32].tolist() == list(COLOURS["red"])
    # the same draws at nuisance 1 give today's image, which has noise and jitter
    default = np.asarray(render(Attributes("red", "plain", "circle"), np.random.default_rng(5), size=64))
    again = np.asarray(render(Attributes("red", "plain", "circle"), np.random.default_rng(5), size=64,
                              nuisance=1.0))
    assert np.array_equal(default, again)
    assert default[0, 0].tolist() != [170, 170, 170]


@pytest.mark.parametrize("bad", [-0.1, 2.5, float("nan")])
def test_nuisance_out_of_range_is_refused(bad: float, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nuisance must be between 0 and 2"):
        render(Attributes("red", "plain", "circle"), np.random.default_rng(0), nuisance=bad)
    with pytest.raises(InputError, match="nuisance must be between 0 and 2"):
        make_world(tmp_path / "w", nuisance=bad)
    assert not (tmp_path / "w").exists()


def test_nuisance_scales_the_spread_of_the_images(tmp_path: Path) -> None:
    calm = make_world(tmp_path / "calm", n_classes=4, n_unseen=1, train_per_class=(1, 1),
                      test_per_class=6, nuisance=0.5)
    wild = make_world(tmp_path / "wild", n_classes=4, n_unseen=1, train_per_class=(1, 1),
                      test_per_class=6, nuisance=2.0)
    assert json.loads((wild.root / "world.json").read_text())["nuisance"] == 2.0
    assert World.load(wild.root).nuisance == 2.0

    def corner_spread(w: World) -> float:
        return float(np.std([np.asarray(Image.open(p))[0, 0] for p in sorted(w.test_dir.iterdir())]))

    # the same draws, each nuisance's deviation from its middle 4x as large
    assert corner_spread(wild) > 2.5 * corner_spread(calm)


def _min_distances(seen: list[Attributes], unseen: list[Attributes]) -> list[int]:
    return [min(attribute_distance(u, s) for s in seen) for u in unseen]


def _combination_only(seen: list[Attributes], unseen: list[Attributes]) -> bool:
    return all(u[k] in {s[k] for s in seen} for u in unseen for k in range(3))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("counts", [(25, 5), (50, 10)])
def test_placement_close_and_far_distances(seed: int, counts: tuple[int, int]) -> None:
    n_classes, n_unseen = counts
    seen, unseen = select_classes(seed, n_classes, n_unseen, placement="close")
    assert (len(seen), len(unseen)) == (n_classes - n_unseen, n_unseen)
    assert _min_distances(seen, unseen) == [1] * n_unseen
    assert _combination_only(seen, unseen)

    seen, unseen = select_classes(seed, n_classes, n_unseen, placement="far")
    assert (len(seen), len(unseen)) == (n_classes - n_unseen, n_unseen)
    assert not set(seen) & set(unseen)
    assert min(_min_distances(seen, unseen)) >= 2
    assert _combination_only(seen, unseen)


def test_random_placement_is_the_default_draw() -> None:
    assert select_classes(3, 50, 10, placement="random") == select_classes(3, 50, 10)
    # sparse random draws are not always close: the knob changes something
    sparse = [select_classes(s, 25, 5) for s in range(10)]
    assert any(max(_min_distances(seen, unseen)) > 1 for seen, unseen in sparse)


def test_far_placement_refusals() -> None:
    with pytest.raises(InputError, match="placement='far' needs every attribute family to vary; "
                                         "vocabulary holds texture at one value"):
        select_classes(0, 20, 5, vocab={"texture": ["plain"]}, placement="far")
    with pytest.raises(InputError, match="cannot place 20 unseen classes at least two attributes "
                                         "from 80 seen ones"):
        select_classes(0, 100, 20, placement="far")
    with pytest.raises(InputError, match="placement must be one of random, close, far, got 'near'"):
        select_classes(0, 20, 5, placement="near")


def test_family_restriction_holds_and_is_recorded(tmp_path: Path) -> None:
    w = make_world(tmp_path / "w", seed=2, n_classes=15, n_unseen=4, train_per_class=(1, 2),
                   test_per_class=1, vocab={"texture": ["plain"], "colour": ["blue", "red", "green"]},
                   placement="close")
    words = [name.split(" ") for name in w.classes]
    assert {t for _, t, _ in words} == {"plain"}
    assert {c for c, _, _ in words} <= {"red", "green", "blue"}
    assert len(set(w.classes)) == 15
    meta = json.loads((w.root / "world.json").read_text())
    # the vocabulary's order, not the order given
    assert meta["vocabulary"] == {"colour": ["red", "green", "blue"], "texture": ["plain"],
                                  "shape": list(SHAPES)}
    assert meta["placement"] == "close"
    assert World.load(w.root) == w
    with pytest.raises(InputError, match="vocabulary\\['colour'\\]: unknown value 'pink'"):
        make_world(tmp_path / "x", vocab={"colour": ["pink"]})
    with pytest.raises(InputError, match="unknown attribute family 'size'"):
        make_world(tmp_path / "y", vocab={"size": ["big"]})
    with pytest.raises(InputError, match="n_classes must be between 2 and 6"):
        make_world(tmp_path / "z", n_classes=8, vocab={"texture": ["plain"], "colour": ["red"]})


# ---------------------------------------------------------------- cached tiny CLIPs


def test_tiny_clip_model_id_trains_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    calls: list[dict] = []
    real = tiny_clip_module.train_tiny_clip

    def counting(**kwargs):
        calls.append(kwargs)
        return real(**kwargs, warmup=1)

    monkeypatch.setattr(tiny_clip_module, "train_tiny_clip", counting)
    model_id = tiny_clip_model_id(2, batch_size=4, cache_dir=tmp_path)
    folder = tmp_path / "tiny_clip" / "steps2-seed0-batch4"
    assert model_id == "local-dir:" + str(folder)
    weights = folder / "open_clip_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert tiny_clip_model_id(2, batch_size=4, cache_dir=tmp_path) == model_id
    assert len(calls) == 1 and calls[0]["steps"] == 2 and calls[0]["batch_size"] == 4
    assert weights.stat().st_mtime_ns == stamp
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["hybridcls"]["recipe"] == {"steps": 2, "seed": 0, "batch_size": 4}
    open_clip.create_model_and_transforms(model_id)  # a loadable local-dir: model
    # another seed is another model; a folder recording another recipe is retrained
    tiny_clip_model_id(2, seed=1, batch_size=4, cache_dir=tmp_path)
    assert len(calls) == 2
    config["hybridcls"]["recipe"]["steps"] = 3
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    tiny_clip_model_id(2, batch_size=4, cache_dir=tmp_path)
    assert len(calls) == 3
    # the shipped recipe is the shipped folder, never trained
    assert tiny_clip_model_id(500, cache_dir=tmp_path) == TINY_CLIP_MODEL_ID
    assert len(calls) == 3
    with pytest.raises(InputError, match="steps must be a whole number of at least 1, got 0"):
        tiny_clip_model_id(0, cache_dir=tmp_path)
