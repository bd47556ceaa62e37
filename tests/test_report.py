"""``hybridcls report``: the HTML page, its figures, its files, and the page in a real browser."""

from __future__ import annotations

import math
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from pagecheck import browser_image_check, browser_screenshot, page_references, require_browser
from PIL import Image

from hybridcls.cli import main
from hybridcls.eval.metrics import reliability
from hybridcls.eval.report import evaluate_predictions
from hybridcls.outputs import PredictionRow, open_writer

SEEN = ["fox", "wolf", "bear"]
# A class name with markup in it: the page must show it as text.
UNSEEN = ["moose", "<b>elk</b> & co"]


@pytest.fixture(scope="module")
def predictions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A hybrid-style predictions file (gate scores, branches, one error row) and its labels."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("report_inputs")
    classes = SEEN + UNSEEN
    labels = ["image_id,label"]
    rows = []
    for i in range(120):
        true = classes[i % len(classes)]
        unseen = true in UNSEEN
        pred = true if rng.random() < (0.6 if unseen else 0.85) else classes[rng.integers(len(classes))]
        conf = float(rng.uniform(0.3, 1.0))
        gate = float(rng.normal(1.0 if unseen else -1.0, 0.8))
        name = f"img{i:03d}.png"
        labels.append(f'{name},"{true}"')
        if i == 7:
            rows.append(PredictionRow.failed(f"test/{name}", "not an image"))
            continue
        rows.append(PredictionRow(path=f"test/{name}", label=pred, score=conf,
                                  branch="zeroshot" if gate > 0 else "supervised",
                                  topk=[(pred, conf)], extra={"gate_score": gate}))
    pred_path = d / "pred.jsonl"
    with open_writer(pred_path, None, topk=1, extra_columns=["gate_score"]) as w:
        w.write_many(rows)
    (d / "labels.csv").write_text("\n".join(labels) + "\n", encoding="utf-8")
    (d / "seen.txt").write_text("\n".join(SEEN) + "\n", encoding="utf-8")
    return {"pred": pred_path, "labels": d / "labels.csv", "seen": d / "seen.txt"}


@pytest.fixture(scope="module")
def report_dir(predictions: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    rc = main(["report", str(predictions["pred"]), "--labels", str(predictions["labels"]),
               "--seen-classes", str(predictions["seen"]), "-o", str(out)])
    assert rc == 0
    return out


class _Figures(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, float] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-figure" in a:
            self.values[a["data-figure"]] = float(a["data-value"])


def test_page_references_only_files_inside_its_folder(report_dir: Path) -> None:
    page = report_dir / "index.html"
    refs = page_references(page)
    srcs = [v for tag, v in refs if tag == "img"]
    assert {Path(s).name for s in srcs} == {"confusion_matrix.png", "per_class_accuracy.png",
                                             "gate_histogram.png", "reliability.png"}
    for _, value in refs:
        url = urlparse(value)
        assert not url.scheme and not url.netloc and not value.startswith("/"), value
        target = (report_dir / unquote(url.path)).resolve()
        assert target.is_relative_to(report_dir.resolve()) and target.is_file(), value
    for src in srcs:
        with Image.open(report_dir / unquote(src)) as im:
            assert im.format == "PNG" and im.width > 100


def test_page_figures_equal_evaluate_predictions(report_dir: Path,
                                                 predictions: dict[str, Path]) -> None:
    parser = _Figures()
    parser.feed((report_dir / "index.html").read_text(encoding="utf-8"))
    ev = evaluate_predictions(predictions["pred"], predictions["labels"], SEEN)
    expected = {"accuracy": ev.scores.accuracy, "seen": ev.scores.seen, "unseen": ev.scores.unseen,
                "harmonic": ev.scores.harmonic, "gate_auroc": ev.gate["auroc"],
                "gate_fpr_at_tpr_unseen_positive": ev.gate["fpr_at_tpr_unseen_positive"],
                "ece": ev.reliability.ece}
    assert parser.values.keys() == expected.keys()
    for key, value in expected.items():
        assert parser.values[key] == pytest.approx(value, abs=1e-12), key
    # The error row counts as a wrong prediction and has no confidence.
    assert ev.n_errors == 1 and ev.reliability.n_images == 119


def test_class_names_are_escaped(report_dir: Path) -> None:
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    assert "<b>elk</b>" not in text
    assert "&lt;b&gt;elk&lt;/b&gt; &amp; co" in text


def test_without_seen_classes_u_and_h_are_undefined(predictions: dict[str, Path],
                                                    tmp_path: Path) -> None:
    rc = main(["report", str(predictions["pred"]), "--labels", str(predictions["labels"]),
               "-o", str(tmp_path / "out")])
    assert rc == 0
    parser = _Figures()
    parser.feed((tmp_path / "out" / "index.html").read_text(encoding="utf-8"))
    assert math.isnan(parser.values["unseen"]) and math.isnan(parser.values["harmonic"])
    assert math.isnan(parser.values["gate_auroc"])  # no unseen images: no AUROC
    assert not math.isnan(parser.values["accuracy"])


def test_missing_matplotlib_names_the_extra(predictions: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    rc = main(["report", str(predictions["pred"]), "--labels", str(predictions["labels"]),
               "-o", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "hybridcls[plots]" in err
    assert not (tmp_path / "out").exists()


def test_reliability_bins_and_ece() -> None:
    r = reliability([0.95, 0.95, 0.95, 0.95, 0.55, 0.55, float("nan")],
                    [True, True, True, False, True, False, True], n_bins=10)
    assert r.n_images == 6
    assert r.counts[9] == 4 and r.counts[5] == 2 and r.counts.sum() == 6
    assert r.accuracy[9] == pytest.approx(0.75) and r.confidence[5] == pytest.approx(0.55)
    # ECE = 4/6 * |0.75 - 0.95| + 2/6 * |0.5 - 0.55|
    assert r.ece == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.05)
    # Outcomes drawn with the stated confidence: a calibrated predictor has a small ECE.
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 20000)
    assert reliability(conf, rng.uniform(0, 1, conf.size) < conf).ece < 0.02
    assert reliability(conf, np.ones(conf.size, bool)).ece == pytest.approx(1 - conf.mean(), abs=1e-9)


def test_page_renders_in_headless_browser_with_every_image(report_dir: Path, tmp_path: Path) -> None:
    browser = require_browser()
    page = report_dir / "index.html"
    check = browser_image_check(browser, page, tmp_path / "profile")
    assert check == {"total": 4, "broken": []}
    shot = tmp_path / "page.png"
    browser_screenshot(browser, page, shot, tmp_path / "profile")
    with Image.open(shot) as im:
        # Something other than a blank page was drawn.
        assert len(im.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10


def test_browser_check_sees_a_missing_image(report_dir: Path, tmp_path: Path) -> None:
    """The browser check can fail: a page pointing at a missing PNG is caught."""
    browser = require_browser()
    page = report_dir / "broken_copy.html"
    page.write_text(re.sub("reliability.png", "no_such_file.png",
                           (report_dir / "index.html").read_text(encoding="utf-8")),
                    encoding="utf-8")
    try:
        check = browser_image_check(browser, page, tmp_path / "profile")
    finally:
        page.unlink()
    assert check == {"total": 4, "broken": ["no_such_file.png"]}


def test_without_a_browser_the_tests_skip_unless_ci_requires_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import pagecheck

    monkeypatch.setattr(pagecheck, "find_browser", lambda: None)
    monkeypatch.delenv(pagecheck.REQUIRE_BROWSER_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no headless browser"):
        pagecheck.require_browser()
    monkeypatch.setenv(pagecheck.REQUIRE_BROWSER_ENV, "1")  # as .ci/run sets it
    with pytest.raises(pytest.fail.Exception, match="HYBRIDCLS_REQUIRE_BROWSER says the browser tests must run"):
        pagecheck.require_browser()
    monkeypatch.setattr(pagecheck, "find_browser", lambda: "/usr/bin/chromium")
    assert pagecheck.require_browser() == "/usr/bin/chromium"
