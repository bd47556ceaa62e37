"""``hybridcls explain``: Grad-CAM, CLIP similarity maps, the decision, neighbours, the page."""

from __future__ import annotations

import copy
import html
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import open_clip
import pytest
import timm
import torch
from pagecheck import browser_image_check, page_references, require_browser
from PIL import Image
from tinyclip_factory import tiny_model_cfg

from hybridcls.cli import main
from hybridcls.data import expand_inputs
from hybridcls.explain import clip_patch_embeddings, clip_similarity_map, gradcam_maps, last_stage
from hybridcls.explain.clip_maps import maskclip_values
from hybridcls.explain.explainer import explain_images
from hybridcls.supervised import SupervisedModel
from hybridcls.synth import TINY_CLIP_MODEL_ID

N_GOOD = 4
# A file that is not an image, with markup in its name: the page must show it as text.
BROKEN = "0001b_<b>broken & co.png"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """A small world, a one-epoch test_convnext run and a TPR-calibrated hybrid (with its index)."""
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.synth import make_world
    from hybridcls.train import train

    d = tmp_path_factory.mktemp("explain_run")
    world = make_world(d / "world", seed=0, n_classes=6, n_unseen=2, train_per_class=(10, 12),
                       test_per_class=2, image_size=32)
    train(world.train_dir, d / "run", model="test_convnext", pretrained=False, freeze=None,
          image_size=32, epochs=1, seed=0, device="cpu", workers=0)
    clf = HybridClassifier(clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None,
                           templates=world.templates_file, method="tpr", device="cpu", batch_size=8,
                           workers=0, cache_dir=d / "cache").load_run(d / "run", world.prompts_file)
    clf.calibrate(world.train_dir)
    inputs = d / "inputs"
    inputs.mkdir()
    for src in sorted(Path(world.test_dir).iterdir())[:N_GOOD]:
        (inputs / src.name).write_bytes(src.read_bytes())
    (inputs / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return world, clf, d, inputs


@pytest.fixture(scope="module")
def cli_out(tiny_run) -> tuple[int, Path]:
    world, _, d, inputs = tiny_run
    out = d / "explain_out"
    rc = main(["explain", str(inputs), "--checkpoint", str(d / "run"), "--prompts",
               str(world.prompts_file), "--templates", str(world.templates_file), "--clip-model",
               TINY_CLIP_MODEL_ID, "--clip-pretrained", "", "--cache-dir", str(d / "cache"),
               "--neighbours", "3", "-q", "-o", str(out)])
    return rc, out


# ---------------------------------------------------------------- the command and its page


def test_every_input_once_in_order_with_the_decode_error(cli_out, tiny_run) -> None:
    rc, out = cli_out
    inputs = tiny_run[3]
    assert rc == 1  # one input failed, the others were explained
    text = (out / "index.html").read_text(encoding="utf-8")
    headings = re.findall(r"<h2>\d+\. ([^<]*)</h2>", text)
    assert headings == [html.escape(s.path) for s in expand_inputs([str(inputs)])]
    assert len(headings) == N_GOOD + 1
    assert "<b>broken" not in text
    card = text.split(html.escape(BROKEN) + "</h2>", 1)[1].split("</div>", 1)[0]
    assert 'class="error"' in card and "could not be explained" in card


def test_overlay_pngs_per_image_and_only_existing_relative_links(cli_out) -> None:
    _, out = cli_out
    refs = page_references(out / "index.html")
    for _, value in refs:
        url = urlparse(value)
        assert not url.scheme and not url.netloc and not value.startswith("/"), value
        target = (out / unquote(url.path)).resolve()
        assert target.is_relative_to(out.resolve()) and target.is_file(), value
    srcs = [unquote(v) for tag, v in refs if tag == "img"]
    for kind in ("input", "gradcam", "clip"):
        mine = [s for s in srcs if s.endswith(f"_{kind}.png")]
        assert len(mine) == N_GOOD, kind
        for s in mine:
            with Image.open(out / s) as im:
                assert im.format == "PNG" and im.mode == "RGB" and min(im.size) >= 96
    # Nearest training images: 3 per explained input, thumbnails of files in the training set.
    assert sum(s.startswith("neighbours/") for s in srcs) == 3 * N_GOOD


def test_explain_page_renders_in_headless_browser(cli_out, tmp_path: Path) -> None:
    browser = require_browser()
    check = browser_image_check(browser, cli_out[1] / "index.html", tmp_path / "profile")
    assert check["broken"] == [] and check["total"] == N_GOOD * (3 + 3)


def test_missing_grad_cam_names_the_extra(tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    world, _, d, inputs = tiny_run
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # makes the import fail
    rc = main(["explain", str(inputs), "--checkpoint", str(d / "run"), "--prompts",
               str(world.prompts_file), "-q", "-o", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "grad-cam" in err and "hybridcls[explain]" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the API: maps and decision


def test_maps_in_range_and_decision_is_the_classifiers(tiny_run, tmp_path: Path) -> None:
    _, clf, _, inputs = tiny_run
    sources = expand_inputs([str(inputs)])
    res = explain_images(clf, sources, tmp_path / "out", neighbours=2)
    assert [e.row.path for e in res.explanations] == [s.path for s in sources]
    expected = [r for rows in clf.rows(sources) for r in rows]
    for ex, row in zip(res.explanations, expected):
        assert (ex.row.status, ex.row.label, ex.row.branch) == (row.status, row.label, row.branch)
        if not ex.ok:
            assert ex.gradcam is None and ex.clip_map is None and not ex.files
            continue
        assert ex.row.extra["gate_score"] == pytest.approx(row.extra["gate_score"])
        assert ex.gradcam_class == row.extra["supervised_topk"][0][0]
        for m in (ex.gradcam, ex.clip_map):
            assert m.ndim == 2 and np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0
        assert ex.gradcam.shape == (32, 32)  # the supervised crop (image_size=32)
        assert ex.clip_map.shape == (32, 32)  # the tiny CLIP's input
        assert ex.clip_map.max() == pytest.approx(1.0)  # a 7x7 grid: the map has a "where"
        assert len(ex.neighbours) == 2
        assert ex.neighbours[0].similarity >= ex.neighbours[1].similarity
        assert all(Path(nb.path).is_file() and nb.label in clf.classes_[: clf.n_seen_]
                   for nb in ex.neighbours)
    assert res.n_errors == 1


def test_a_thin_strip_is_explained_on_its_centre(tiny_run, tmp_path: Path) -> None:
    # Issue 12: the towers' views cut a strip to 16:1 before resizing its shorter side.
    _, clf, _, _ = tiny_run
    paths = []
    for name, size in (("tall.png", (1, 16000)), ("wide.png", (16000, 1))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    res = explain_images(clf, paths, tmp_path / "out", neighbours=0)
    assert [e.ok for e in res.explanations] == [True, True]
    for ex in res.explanations:
        assert ex.gradcam.shape == (32, 32) and ex.clip_map.shape == (32, 32)
        with Image.open(ex.files["input"]) as im:
            # the supervised 32 x 32 crop, all of the strip's colour, at the display size
            assert im.size == (192, 192) and im.getextrema() == ((200, 200), (30, 30), (30, 30))


def test_thumbnail_of_a_thin_strip_is_at_most_16_to_1() -> None:
    from hybridcls.explain.overlay import thumbnail

    # shorter side to 96; unbounded, the long side would be 96 x 16000
    assert thumbnail(Image.new("RGB", (1, 16000)), side=96).size == (96, 16 * 96)
    assert thumbnail(Image.new("RGB", (16000, 1)), side=96).size == (16 * 96, 96)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(thumbnail(photo, side=96)),
                          np.asarray(photo.resize((128, 96), Image.Resampling.BICUBIC)))


def test_clip_map_is_highest_on_the_shape(tiny_run) -> None:
    """The shipped tiny CLIP's map of the true class lies on the drawn shape, not the background."""
    from hybridcls.eval.labels import read_labels

    world, clf, _, _ = tiny_run
    zs = clf.tower_
    labels = read_labels(world.labels_csv)
    gaps = []
    for path in sorted(Path(world.test_dir).iterdir()):
        image = Image.open(path).convert("RGB")
        x = zs.bundle.preprocess(image)[None]
        k = list(zs.classes).index(labels[path.name])
        m, _ = clip_similarity_map(zs.bundle.model.visual, x, zs.text_features[:, k])
        a = np.asarray(image.resize((32, 32)), dtype=float)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        shape = np.abs(a - np.median(border, axis=0)).sum(-1) > 60
        if shape.any() and (~shape).any():
            gaps.append(m[0].numpy()[shape].mean() - m[0].numpy()[~shape].mean())
    assert len(gaps) >= 8
    assert np.mean(gaps) > 0.15


def test_vit_patch_tokens_projected_like_the_pooled_embedding() -> None:
    cfg = tiny_model_cfg()
    cfg["vision_cfg"]["pool_type"] = "avg"  # pooled = mean of the same tokens, so they must agree
    torch.manual_seed(0)
    visual = open_clip.CLIP(**cfg).eval().visual
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        patches = clip_patch_embeddings(visual, x)
        pooled = visual(x)
    assert patches.shape == (2, 4, 4, cfg["embed_dim"])  # 32 px / 8 px patches
    torch.testing.assert_close(patches.mean(dim=(1, 2)), pooled, atol=1e-5, rtol=1e-5)
    m, cosine = clip_similarity_map(visual, x, torch.randn(cfg["embed_dim"]))
    assert m.shape == (2, 32, 32) and cosine.shape == (2, 4, 4)
    assert m.min() >= 0 and m.max() <= 1 and m.amax(dim=(1, 2)).allclose(torch.ones(2))
    assert cosine.abs().max() <= 1 + 1e-5


def test_maskclip_value_path_matches_the_attention_pool(tiny_run) -> None:
    """With one location and no positional embedding, attention pooling is the value path."""
    visual = tiny_run[1].tower_.bundle.model.visual
    assert type(visual).__name__ == "ModifiedResNet"  # the shipped tiny CLIP
    pool = copy.deepcopy(visual.attnpool)
    with torch.no_grad():
        pool.positional_embedding.zero_()
        feats = torch.randn(3, pool.v_proj.in_features, 1, 1)
        torch.testing.assert_close(maskclip_values(pool, feats)[:, 0, 0], pool(feats),
                                   atol=1e-5, rtol=1e-5)
        # Its 32 px input gives a 1x1 grid; the tower is run larger to reach min_grid cells a side.
        assert clip_patch_embeddings(visual, torch.randn(1, 3, 32, 32), min_grid=7).shape[1:3] == (7, 7)


@pytest.mark.parametrize("name, stage", [("test_convnext", "stages.3"), ("test_vit", "blocks.")])
def test_gradcam_on_the_last_stage(name: str, stage: str) -> None:
    torch.manual_seed(0)
    model = SupervisedModel(timm.create_model(name, pretrained=False, num_classes=0), 3).eval()
    layer_name, _ = last_stage(model.backbone)
    assert layer_name.startswith(stage)
    size = timm.data.resolve_data_config({}, model=model.backbone)["input_size"][-1]
    x = torch.randn(2, 3, size, size)
    maps = gradcam_maps(model, x, [0, 2])
    assert maps.shape == (2, size, size) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    # A backbone frozen in training (no parameter needs a gradient) gives the same maps.
    model.requires_grad_(False)
    np.testing.assert_allclose(gradcam_maps(model, x, [0, 2]), maps, atol=1e-5)


def test_without_an_index_the_page_says_so(tiny_run, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridcls.explain import write_explain_page

    _, clf, _, inputs = tiny_run
    # A run calibrated before indexes existed: no index, and no gate part that needs one.
    from hybridcls.gate import Gate

    monkeypatch.setattr(clf, "gate_", Gate.from_calibration(
        clf.gate_.calibration_.replace(cache_branch=None), n_seen=clf.n_seen_))
    res = explain_images(clf, [str(inputs)], tmp_path / "out")
    assert all(not ex.neighbours for ex in res.explanations)
    assert "no embedding index" in res.index_note
    page = write_explain_page(res)
    assert "no embedding index" in page.read_text(encoding="utf-8")
    assert not (tmp_path / "out" / "neighbours").exists()


def test_a_save_pretrained_folder_needs_no_prompts(tiny_run, tmp_path: Path) -> None:
    _, clf, d, inputs = tiny_run
    folder = clf.save_pretrained(tmp_path / "model")
    good = sorted(p for p in inputs.iterdir() if p.name != BROKEN)[:1]
    rc = main(["explain", str(good[0]), "--checkpoint", str(folder), "--cache-dir", str(d / "cache"),
               "--neighbours", "1", "-q", "-o", str(tmp_path / "out")])
    assert rc == 0
    assert len(list((tmp_path / "out" / "images").glob("*_clip.png"))) == 1
