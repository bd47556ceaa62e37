"""``bench speed`` at CI size: every figure is produced, and the cold and warm text-cache paths both work."""

from __future__ import annotations

import json
import math

import pytest
import timm
from tinyclip_factory import count_text_encoding

from hybridcls.bench.speed import QUICK_MODELS, run_speed
from hybridcls.device import cpu_native_bf16

SIZES = [(64, 48), (320, 240)]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One quick run, counting every text the CLIP text tower encodes."""
    mp = pytest.MonkeyPatch()
    encoded = count_text_encoding(mp)
    try:
        out = tmp_path_factory.mktemp("speed")
        templates = ["a photo of a {}.", "a {}."]
        report = run_speed(out, models=QUICK_MODELS, images=6, batch_size=4, image_size=32, workers=0,
                           sizes=SIZES, precisions=("fp32", "auto"), templates=templates)
    finally:
        mp.undo()
    return out, report, encoded, templates


def test_every_figure_is_a_positive_number_and_the_json_matches(quick_report):
    out, report, _, _ = quick_report
    auto = "auto"
    expected = {
        "matmul 2048x2048, fp32 (TFLOP/s)",
        "supervised tower, fp32 (img/s)", "clip tower, fp32 (img/s)", f"clip tower, {auto} (img/s)",
        "supervised tower, fp32: share of the fp32 matmul limit", f"model-only, {auto} (img/s)",
        f"end-to-end, full hybrid, 64x48, {auto} (img/s)", f"end-to-end, full hybrid, 320x240, {auto} (img/s)",
        "end-to-end, full hybrid, 320x240, fp32, every file decoded whole (img/s)",
        "speed-up over fp32 with every file decoded whole, 320x240", "pipeline efficiency (end-to-end / model-only)",
        f"end-to-end, cascade, 64x48, {auto} (img/s)", "naive baseline, 64x48 (img/s)",
        "naive baseline, 320x240 (img/s)", "speed-up over naive, full hybrid, 320x240", "speed-up over naive, cascade",
        "GMACs per image, supervised", "GMACs per image, CLIP image tower", "achieved TFLOP/s (model-only)",
        "first prediction, cold text cache (s)", "first prediction, warm text cache (s)",
        "warm-start speed-up (cold / warm)", "class-text matrix speed-up",
        f"zero-shot, hybridcls, 64x48, {auto} (img/s)", "zero-shot, plain open_clip loop, 64x48 (img/s)",
        "zero-shot speed-up over the plain open_clip loop", "weights fingerprint, hashed (s)",
        "cascade: share of images CLIP ran on", "zero-shot top-1 agreement, hybridcls / plain open_clip loop",
    }
    if cpu_native_bf16():
        expected.add("matmul 2048x2048, bf16 (TFLOP/s)")
    assert expected <= set(report.rows)
    for name in expected:
        assert math.isfinite(report.rows[name]) and report.rows[name] > 0, name
    saved = json.loads((out / "speed.json").read_text())
    assert saved["rows"] == pytest.approx(report.rows)
    assert saved["info"]["images"] == 6 and saved["info"]["jpeg_sizes"] == [list(s) for s in SIZES]
    # test_convnext resizes to floor(32 / crop_pct), the tiny CLIP to 32: the 320x240 files are
    # decoded at half size (240 // (2 * 33) = 3)
    crop_pct = timm.create_model("test_convnext").pretrained_cfg["crop_pct"]
    assert saved["info"]["draft_target_side"] == max(math.floor(32 / crop_pct), 32) == 33
    assert saved["info"]["pybioclip"] in ("timed", "not installed (pip install pybioclip)")


def test_the_two_text_builders_agree_and_only_the_cold_start_and_the_builders_encode(quick_report):
    _, report, encoded, templates = quick_report
    # 50 classes x 2 templates through the text tower for the cold start, then once more by each
    # builder timed side by side (open_clip's, hybridcls's); the warm start encodes nothing
    assert sum(encoded) == 3 * 50 * len(templates)
    assert report.rows["class-text matrix, max |difference|"] < 1e-5


def test_cascade_runs_clip_on_about_the_requested_share(quick_report):
    _, report, _, _ = quick_report
    # the default cascade_share=0.6 of 6 images: CLIP on 4 of them (the MSP's quantile, ties aside);
    # the backbone-distance threshold lets every image pass under random weights
    assert report.rows["cascade: share of images CLIP ran on"] == pytest.approx(4 / 6)
