"""``bench speed`` at CI size: every figure is produced, and the cold and warm text-cache paths both work."""

from __future__ import annotations

import json
import math

import pytest
from tinyclip_factory import count_text_encoding

from hybridcls.bench.speed import QUICK_MODELS, run_speed


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One quick run, counting every text the CLIP text tower encodes."""
    mp = pytest.MonkeyPatch()
    encoded = count_text_encoding(mp)
    try:
        out = tmp_path_factory.mktemp("speed")
        templates = ["a photo of a {}.", "a {}."]
        report = run_speed(out, models=QUICK_MODELS, images=6, batch_size=4, image_size=32, workers=0,
                           size=(64, 48), templates=templates)
    finally:
        mp.undo()
    return out, report, encoded, templates


def test_every_figure_is_a_positive_number_and_the_json_matches(quick_report):
    out, report, _, _ = quick_report
    expected = {
        "model-only (img/s)", "end-to-end, full hybrid (img/s)", "pipeline efficiency (end-to-end / model-only)",
        "end-to-end, cascade (img/s)", "naive baseline (img/s)", "speed-up over naive, full hybrid",
        "speed-up over naive, cascade", "GMACs per image, supervised", "GMACs per image, CLIP image tower",
        "first prediction, cold text cache (s)", "first prediction, warm text cache (s)",
        "warm-start speed-up (cold / warm)", "cascade: share of images CLIP ran on",
    }
    assert expected <= set(report.rows)
    for name in expected - {"cascade: share of images CLIP ran on"}:
        assert math.isfinite(report.rows[name]) and report.rows[name] > 0, name
    saved = json.loads((out / "speed.json").read_text())
    assert saved["rows"] == pytest.approx(report.rows)
    assert saved["info"]["images"] == 6


def test_cold_start_encodes_the_prompts_once_and_warm_start_reads_the_cache(quick_report):
    _, report, encoded, templates = quick_report
    # 50 classes x 2 templates through the text tower once (cold); the warm start encodes nothing
    assert sum(encoded) == 50 * len(templates)
    assert report.rows["first prediction, warm text cache (s)"] > 0


def test_cascade_runs_clip_on_about_the_requested_share(quick_report):
    _, report, _, _ = quick_report
    # the default cascade_share=0.6 of 6 images: CLIP on 4 of them (the MSP's quantile, ties aside);
    # the backbone-distance threshold lets every image pass under random weights
    assert report.rows["cascade: share of images CLIP ran on"] == pytest.approx(4 / 6)
