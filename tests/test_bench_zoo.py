"""The zoo of worlds behind ``hybridcls bench quality --zoo`` (CPU, offline; the CI-sized zoo)."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hybridcls.bench.quality import best_routing_threshold
from hybridcls.bench.zoo import (
    CI_ZOO,
    FITTED_ON_TEST,
    GATE_BOUND,
    ZOO,
    WorldFeatures,
    _answers,  # the bound's wiring, pinned below
    _gate_decision,
    build_world,
    evaluate_zoo,
    load_features,
    run_zoo,
    zoo_specs,
)
from hybridcls.cli import main
from hybridcls.errors import InputError
from hybridcls.gate import BranchOutputs, FusionResult, Gate
from hybridcls.gate.metrics import seen_unseen_accuracy
from hybridcls.synth import World
from hybridcls.synth.world import attribute_distance

NAMES = [s.name for s in CI_ZOO]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The CI-sized zoo, built once: two tiny worlds, their runs, features and report."""
    root = tmp_path_factory.mktemp("zoo")
    out, cache = root / "out", root / "cache"
    report = run_zoo(out, "ci", cache_dir=cache)
    return {"out": out, "cache": cache, "report": report}


def test_report_has_every_world_and_consistent_figures(zoo: dict) -> None:
    report = zoo["report"]
    assert [w.name for w in report.worlds] == NAMES
    for w, spec in zip(report.worlds, CI_ZOO):
        methods = [r.method for r in w.rows]
        assert methods == ["supervised only", "zero-shot only", "oracle router", "hybrid, calibrated"]
        sup, zs, oracle, hybrid = w.rows
        assert w.share_of_oracle == pytest.approx(hybrid.harmonic / oracle.harmonic)
        assert w.margin == pytest.approx(hybrid.harmonic - max(sup.harmonic, zs.harmonic))
        assert sup.unseen == 0.0  # the supervised branch never names an unseen class
        n_test = (spec.n_seen + spec.n_unseen) * spec.test_per_class
        r = w.routing
        assert sum(r.values()) == n_test == w.info["n_test"]
        assert r["seen_to_supervised"] + r["seen_to_zeroshot"] == spec.n_seen * spec.test_per_class
        assert r["unseen_to_supervised"] + r["unseen_to_zeroshot"] == spec.n_unseen * spec.test_per_class
        assert 0.0 <= w.gate_auroc <= 1.0
        assert w.chosen["method"] == "leave-classes-out"
        assert w.chosen["mode"] in ("hard", "soft", "stacking") and 0 < w.chosen["tpr"] <= 1
        assert f"{w.chosen['score']} / {w.chosen['mode']}" in hybrid.note
        assert 0.0 <= w.info["clip_top1"] <= 1.0
    shares = [w.share_of_oracle for w in report.worlds]
    margins = [w.margin for w in report.worlds]
    assert report.summary["share_of_oracle"]["median"] == pytest.approx(statistics.median(shares))
    assert report.summary["share_of_oracle"]["worst"] == min(shares)
    assert report.summary["share_of_oracle"]["worst_world"] == NAMES[shares.index(min(shares))]
    assert report.summary["margin"]["median"] == pytest.approx(sum(margins) / 2)
    assert report.summary["margin"]["worst"] == min(margins)


def test_rows_recomputed_from_the_cached_features(zoo: dict) -> None:
    for w in zoo["report"].worlds:
        f = load_features(zoo["out"] / w.name)
        S = f.n_seen
        # the oracle: supervised argmax on seen images, CLIP's best unseen class on unseen ones
        oracle = np.where(f.y_test >= S, S + f.test.clip_logits[:, S:].argmax(axis=1),
                          f.test.sup_logits.argmax(axis=1))
        assert w.row("oracle router").harmonic == pytest.approx(seen_unseen_accuracy(f.y_test, oracle, S)[2])
        zs = f.test.clip_logits.argmax(axis=1)
        assert w.row("zero-shot only").accuracy == pytest.approx(np.mean(zs == f.y_test))
        # the default gate, fitted here on the saved arrays, makes the report's predictions
        pred = f.fit(Gate()).predict(f.test).pred
        assert w.row("hybrid, calibrated").accuracy == pytest.approx(np.mean(pred == f.y_test))


def test_files_written_and_strict_json(zoo: dict) -> None:
    out = zoo["out"]
    text = (out / "zoo.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in zoo.json"))
    assert [w["name"] for w in data["worlds"]] == NAMES
    assert data["summary"]["share_of_oracle"]["worst"] == zoo["report"].summary["share_of_oracle"]["worst"]
    md = (out / "zoo.md").read_text()
    for name in NAMES:
        assert f"| {name} |" in md and f"### {name}" in md
    assert "share of the oracle's H median" in md


def test_features_cover_the_splits_and_the_test_set(zoo: dict) -> None:
    for spec in CI_ZOO:
        f = load_features(zoo["out"] / spec.name)
        world = World.load(zoo["out"] / spec.name / "world")
        n_train_files = sum(1 for _ in world.train_dir.rglob("*.png"))
        assert len(f.train) + len(f.val) == len(f.y_train) + len(f.y_val) == n_train_files
        assert len(f.test) == len(f.y_test) == len(world.read_labels())
        assert f.n_seen == spec.n_seen and len(f.classes) == spec.n_seen + spec.n_unseen
        assert f.test.clip_logits.shape == (len(f.test), len(f.classes))
        assert f.train.sup_logits.shape[1] == len(f.class_names) == spec.n_seen
        assert sorted(set(f.y_test.tolist())) == list(range(len(f.classes)))
        # every test image's label is the world's, joined by path
        labels = world.read_labels()
        truth = [labels[Path(p).name] for p in f.info["paths"]["test"]]
        assert [f.classes[i] for i in f.y_test] == truth
        assert f.info["spec"] == spec.as_dict()


def test_world_knobs_hold_in_the_ci_worlds(zoo: dict) -> None:
    for spec in CI_ZOO:
        world = World.load(zoo["out"] / spec.name / "world")
        seen = [tuple(c.split(" ")) for c in world.seen_classes]
        dist = [min(attribute_distance(tuple(u.split(" ")), s) for s in seen) for u in world.unseen_classes]
        assert (min(dist) >= 2) if spec.placement == "far" else (max(dist) == 1)
        assert world.placement == spec.placement and world.nuisance == spec.nuisance


def test_rerun_reuses_everything(zoo: dict) -> None:
    out = zoo["out"]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = run_zoo(out, "ci", cache_dir=zoo["cache"])
    assert again.info["reused"] == NAMES
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    for a, b in zip(again.worlds, zoo["report"].worlds):
        assert a.as_dict() == b.as_dict()
    with pytest.raises(InputError, match="holds the world of another spec \\(differs in epochs\\)"):
        build_world(out / CI_ZOO[0].name, replace(CI_ZOO[0], epochs=3), cache_dir=zoo["cache"])


def test_evaluate_zoo_refits_gate_variants(zoo: dict) -> None:
    default = evaluate_zoo(zoo["out"])
    for a, b in zip(default.worlds, zoo["report"].worlds):
        assert a.as_dict() == b.as_dict()
    tpr = evaluate_zoo(zoo["out"], Gate(method="tpr", score="msp", tpr=0.9))
    assert [w.chosen["score"] for w in tpr.worlds] == ["msp", "msp"]
    assert [w.chosen["mode"] for w in tpr.worlds] == ["hard", "hard"]
    seen_fitted: list[str] = []

    def factory(f: WorldFeatures) -> Gate:
        seen_fitted.append(f.name)
        return f.fit(Gate(method="tpr", score="clip_margin", tpr=1.0))

    one = evaluate_zoo(zoo["out"], factory, worlds=[NAMES[1]])
    assert seen_fitted == [NAMES[1]] and [w.name for w in one.worlds] == [NAMES[1]]
    # tpr 1.0 keeps every held-out seen image; hard routing counts follow the branch
    w = one.worlds[0]
    assert w.chosen["tpr"] == 1.0
    assert sum(w.routing.values()) == w.info["n_test"]


def test_zoo_measures_what_calibrate_fits(zoo: dict) -> None:
    from hybridcls.hybrid import HybridClassifier
    from hybridcls.synth.tiny_clip import tiny_clip_model_id

    spec = CI_ZOO[1]
    root = zoo["out"] / spec.name
    world = World.load(root / "world")
    clip = tiny_clip_model_id(spec.clip_steps, batch_size=spec.clip_batch_size, cache_dir=zoo["cache"])
    clf = HybridClassifier(clip_model=clip, clip_pretrained=None, templates=world.templates_file,
                           device="cpu", workers=0, cache_dir=zoo["cache"], progress=False,
                           ).load_run(root / "run", world.prompts_file).calibrate(world.train_dir, save=False)
    f = load_features(root)
    gate = f.fit(Gate())
    assert gate.calibration_.score == clf.gate_.calibration_.score
    assert gate.calibration_.mode == clf.gate_.calibration_.mode
    assert gate.calibration_.threshold == pytest.approx(clf.gate_.calibration_.threshold, rel=1e-4)
    assert np.array_equal(gate.predict(f.test).pred, clf.predict_features(f.test).pred)


def test_zoo_specs_sizes_and_refusals() -> None:
    assert zoo_specs("ci") == list(CI_ZOO)
    assert zoo_specs(3) == list(ZOO[:3])
    assert len({s.name for s in ZOO}) == len(ZOO) and len({s.seed for s in ZOO}) == len(ZOO)
    for bad in (0, len(ZOO) + 1, "3", True):
        with pytest.raises(InputError, match=f"n must be between 1 and {len(ZOO)}"):
            zoo_specs(bad)


def test_cli_zoo(zoo: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out, cache = str(zoo["out"]), str(zoo["cache"])
    assert main(["bench", "quality", "--zoo", "ci", "--out", out, "--cache-dir", cache, "-q"]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in NAMES)
    assert "wrote" in printed and "zoo.md" in printed
    assert main(["bench", "quality", "--zoo", "9", "--out", out]) == 2
    assert "--zoo takes a number of worlds from 1 to 8, or 'ci'; got '9'" in capsys.readouterr().err
    assert main(["bench", "quality", "--zoo", "ci", "--seed", "1", "--epochs", "2", "--out", out]) == 2
    assert "--seed, --epochs: each world of --zoo sets its own" in capsys.readouterr().err
    assert main(["bench", "quality", "--cache-dir", cache, "--out", out]) == 2
    assert "--cache-dir applies to --zoo only" in capsys.readouterr().err


# The calibrated default gate's figures on the CI-sized worlds, as reached when the default
# was set (docs/gate.md, "The zoo"): share of the oracle router's H and H over the better
# single branch. The allowance is the noise measured there: these worlds have 4 test
# images per class and a supervised branch of 1-2 epochs, and two builds on the same
# machine (threaded training is not bit-reproducible) gave ci-far shares of 0.78 and 0.62.
REACHED = {"ci-close": (1.6667, -0.0203), "ci-far": (0.7778, 0.3333)}
ALLOWANCE = 0.25


def test_default_gate_holds_its_levels_on_the_ci_worlds(zoo: dict) -> None:
    for w in zoo["report"].worlds:
        share, margin = REACHED[w.name]
        assert w.share_of_oracle >= share - ALLOWANCE, (w.name, w.share_of_oracle)
        assert w.margin >= margin - ALLOWANCE, (w.name, w.margin)


# ------------------------------------------------------------------ roll-up on the zoo's worlds


def test_rollup_on_the_zoo(zoo: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench rollup --zoo``: each world's natural tree over its cached outputs, the thresholds
    chosen on its held-out images, and the bound read off its test labels (the fewest wrong
    answers any threshold gives with at least 90% answered with a class)."""
    from hybridcls.bench.rollup import MIN_LEAF_SHARE, rollup_zoo, world_hierarchy
    from hybridcls.hierarchy import rollup, rollup_figures

    out, cache = zoo["out"], zoo["cache"]
    report = rollup_zoo(out, "ci", precisions=(0.5, 0.9), cache_dir=cache)
    assert list(report.worlds) == NAMES
    for name, r in report.worlds.items():
        f = load_features(out / name)
        gate = f.fit(Gate())
        probs = gate.predict(f.test).probs
        off, *rest = r.rows
        # no roll-up: the wrong answers are the gate's wrong classes
        assert off.figures.n_wrong == int(np.sum(probs.argmax(axis=1) != f.y_test))
        bound = next(row for row in rest if row.oracle)
        assert bound.figures.leaf_share >= MIN_LEAF_SHARE
        # the bound is the best threshold: none of the calibrated ones that keep as many class
        # answers does better, nor does no roll-up (a threshold of its own)
        for row in [off, *rest]:
            if row.figures.leaf_share >= MIN_LEAF_SHARE:
                assert bound.figures.n_wrong <= row.figures.n_wrong, (name, row)
        # its figures are those of its threshold, applied as predictions apply roll-up
        h = world_hierarchy(World.load(out / name / "world"), f.class_names)
        res = rollup(probs, h, bound.threshold)
        assert rollup_figures(f.y_test, res.leaf, res.rank, h) == bound.figures
        # every target either chose a threshold or says why none reaches it
        targets = sorted([row.target for row in rest if not row.oracle]
                         + [float(t) for t in r.info["unreachable"]])
        assert targets == [0.5, 0.9]
    for column in ("precision 0.5", "precision 0.9", "bound"):
        cuts = []
        for r in report.worlds.values():
            row = next((x for x in r.rows if (x.oracle if column == "bound" else
                                              x.target is not None and f"precision {x.target:g}" == column)),
                       None)
            base = r.rows[0].figures.n_wrong
            cuts.append(0.0 if row is None or base == 0 else 1 - row.figures.n_wrong / base)
        assert report.summary[column]["median"] == pytest.approx(statistics.median(cuts))
        assert report.summary[column]["worst"] == pytest.approx(min(cuts))
    written = json.loads((out / "rollup.json").read_text(encoding="utf-8"))
    assert sorted(written["worlds"]) == sorted(NAMES)

    assert main(["bench", "rollup", "--zoo", "ci", "--out", str(out), "--cache-dir", str(cache),
                 "--precisions", "0.9", "-q"]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in NAMES) and "bound: cut median" in printed
    assert printed.rstrip().endswith(f"wrote {out / 'rollup.md'} and {out / 'rollup.json'}")
    # a target no threshold reaches on a world is said as such in the summary, not only as a 0 cut
    off = sum(1 for r in report.worlds.values() if "0.9" in r.info["unreachable"])
    assert (f"unreachable, so roll-up off, on {off} of 2" in printed) == (off > 0)
    assert main(["bench", "rollup", "--zoo", "ci", "--seed", "1", "--out", str(out)]) == 2
    assert "--seed: each world of --zoo sets its own" in capsys.readouterr().err
    assert main(["bench", "rollup", "--cache-dir", str(cache), "--out", str(out)]) == 2
    assert "--cache-dir applies to --zoo only" in capsys.readouterr().err


def test_sites_on_the_zoo(zoo: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench sites --zoo``: each world's test images spread over sites (seeded by its seed), the
    default gate without and with the lists; the lists are right, so the oracle router's
    accuracy cannot fall with them (it only loses wrong candidates)."""
    from hybridcls.bench.sites import make_sites, sites_zoo
    from hybridcls.gate.restriction import mask_logits

    out, cache = zoo["out"], zoo["cache"]
    report = sites_zoo(out, "ci", n_sites=3, sites_per_class=1, cache_dir=cache)
    assert list(report.worlds) == NAMES
    for name, r in report.worlds.items():
        f = load_features(out / name)
        holds, site = make_sites(f.y_test, len(f.classes), n_sites=3, sites_per_class=1,
                                 seed=f.info["spec"]["seed"])
        gate = f.fit(Gate())
        # the hybrid's rows are the gate's predictions without and with each image's list
        for row, mask in ((r.rows[0], None), (r.rows[3], holds[site])):
            pred = gate.predict(f.test, allowed=mask).pred
            assert row.accuracy == pytest.approx(float(np.mean(pred == f.y_test)))
        # one site per class: each image's list holds its class, and the zero-shot branch picks
        # among its site's classes only
        clip = mask_logits(f.test.clip_logits, holds[site])
        assert r.rows[4].accuracy == pytest.approx(float(np.mean(clip.argmax(axis=1) == f.y_test)))
        assert r.rows[5].accuracy >= r.rows[2].accuracy
        assert report.gain[name] == pytest.approx(r.rows[3].harmonic - r.rows[0].harmonic)
    assert json.loads((out / "sites.json").read_text(encoding="utf-8"))["gain"] == report.gain

    assert main(["bench", "sites", "--zoo", "ci", "--out", str(out), "--cache-dir", str(cache), "-q"]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in NAMES) and "gain median" in printed
    assert main(["bench", "sites", "--zoo", "ci", "--epochs", "3", "--out", str(out)]) == 2
    assert "--epochs: each world of --zoo sets its own" in capsys.readouterr().err
    assert main(["bench", "sites", "--cache-dir", str(cache), "--out", str(out)]) == 2
    assert "--cache-dir applies to --zoo only" in capsys.readouterr().err


def test_fewshot_on_the_zoo(zoo: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench fewshot --zoo``: support images of the unseen classes drawn from each world's test
    set, joined as ``add_support`` joins them, scored on the test images left."""
    from hybridcls.bench.fewshot import draw_support, fewshot_zoo
    from hybridcls.errors import DataTooSmallError

    out, cache = zoo["out"], zoo["cache"]
    report = fewshot_zoo(out, "ci", ks=(0, 1), draws=2, cache_dir=cache)
    assert list(report.worlds) == NAMES
    for name, (k0, k1) in report.worlds.items():
        f = load_features(out / name)
        gate = f.fit(Gate())
        # k = 0 is the calibrated gate on every test image, one draw
        pred = gate.predict(f.test).pred
        assert (k0.k, k0.draws) == (0, 1)
        assert k0.accuracy == pytest.approx(float(np.mean(pred == f.y_test)))
        # k = 1: one image of each unseen class per draw, never scored
        hs = []
        for draw in range(2):
            support = draw_support(f.y_test, range(f.n_seen, len(f.classes)), 1, draw)
            assert sorted(f.y_test[support].tolist()) == list(range(f.n_seen, len(f.classes)))
            rest = np.setdiff1d(np.arange(len(f.y_test)), support)
            used = gate.with_support(f.test.rows(support), f.y_test[support], class_names=f.classes,
                                     held_out=f.val, y_held_out=f.y_val)
            hs.append(seen_unseen_accuracy(f.y_test[rest], used.predict(f.test.rows(rest)).pred, f.n_seen)[2])
        assert (k1.k, k1.draws) == (1, 2) and k1.harmonic == pytest.approx(float(np.mean(hs)))
    shares = [rows[1].oracle_share for rows in report.worlds.values()]
    assert report.summary[1]["median"] == pytest.approx(statistics.median(shares))
    # the test set holds 4 images of each class: 4 support images would leave none
    with pytest.raises(DataTooSmallError, match=r"class '.+' has 4 test images: k=4 support images of it "
                                                r"would leave none"):
        fewshot_zoo(out, ks=(4,), draws=1)
    # with the worlds named, before any is built (or reused)
    with pytest.raises(DataTooSmallError, match=r"^k=4: the zoo's worlds hold 4 test images of a class, .* "
                                                r"ask for at most 3$"):
        fewshot_zoo(out, "ci", ks=(0, 4), cache_dir=cache)

    assert main(["bench", "fewshot", "--zoo", "ci", "--k", "0,1", "--draws", "1", "--out", str(out),
                 "--cache-dir", str(cache), "-q"]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in NAMES) and "k = 1: share of the oracle's H median" in printed
    assert main(["bench", "fewshot", "--zoo", "ci", "--retrain-k", "1", "--out", str(out)]) == 2
    assert "--retrain-k: the retrain route is not measured with --zoo" in capsys.readouterr().err
    # '' is "no retrain route", which --zoo is: accepted
    assert main(["bench", "fewshot", "--zoo", "ci", "--k", "0", "--draws", "1", "--retrain-k", "",
                 "--out", str(out), "--cache-dir", str(cache), "-q"]) == 0
    capsys.readouterr()
    assert main(["bench", "fewshot", "--zoo", "ci", "--model", "resnet18", "--out", str(out)]) == 2
    assert "--model: each world of --zoo sets its own" in capsys.readouterr().err


def _routing_h(scores: np.ndarray, t: float, y: np.ndarray, sup: np.ndarray, zs: np.ndarray,
               n_seen: int) -> float:
    """H of hard routing at threshold t, as the gate routes (score > t: zero-shot; NaN stays)."""
    h = seen_unseen_accuracy(y, np.where(scores > t, zs, sup), n_seen)[2]
    return 0.0 if np.isnan(h) else h


def test_best_routing_threshold_is_the_brute_force_best() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, S = int(rng.integers(2, 40)), int(rng.integers(1, 5))
        C = S + int(rng.integers(1, 4))
        y, sup, zs = rng.integers(0, C, n), rng.integers(0, S, n), rng.integers(S, C, n)
        y[0], y[-1] = 0, S  # H needs a seen and an unseen image
        scores = rng.integers(0, 6, n).astype(float)  # ties
        scores[rng.random(n) < 0.1] = np.nan
        scores[rng.random(n) < 0.1] = -np.inf
        t, h = best_routing_threshold(scores, y, sup, zs, S)
        candidates = [-np.inf, *sorted(set(scores[~np.isnan(scores)].tolist()))]
        hs = [_routing_h(scores, c, y, sup, zs, S) for c in candidates]
        assert h == pytest.approx(max(hs), abs=1e-12)
        assert t == candidates[hs.index(max(hs))]  # the smallest threshold reaching it
    with pytest.raises(InputError, match="expected four"):
        best_routing_threshold([0.1, 0.2], [0], [0], [1], 1)
    with pytest.raises(InputError, match="y contains 1 negative class indices"):
        best_routing_threshold([0.1], [-1], [0], [1], 1)
    with pytest.raises(InputError, match="sup_pred contains 1 NaN"):
        best_routing_threshold([0.1], [0], [np.nan], [1], 1)
    with pytest.raises(InputError, match="y has 2 seen and 0 unseen images: H needs both"):
        best_routing_threshold([0.1, 0.2], [0, 0], [0, 0], [1, 1], 1)
    with pytest.raises(InputError, match="y has 0 seen and 0 unseen"):
        best_routing_threshold([], [], [], [], 1)
    with pytest.raises(InputError, match="n_seen=0: expected a whole number, 1 or more"):
        best_routing_threshold([0.1], [0], [0], [1], 0)


def test_threshold_bounds_read_the_test_labels(zoo: dict) -> None:
    report = zoo["report"]
    for w in report.worlds:
        f = load_features(zoo["out"] / w.name)
        gate = f.fit(Gate())
        S, y = f.n_seen, f.y_test
        oracle = w.row("oracle router").harmonic
        assert {GATE_BOUND, FITTED_ON_TEST, *gate.calibration_.base_scores} == set(w.threshold_bounds)
        # the gate's own decision at its calibrated threshold is one of the thresholds tried
        assert w.gate_bound >= w.share_of_oracle - 1e-12
        # and no threshold beats perfect routing with the same answers
        res = gate.predict(f.test)
        sup = res.sup_probs.argmax(axis=1)
        unseen = S + f.test.clip_logits[:, S:].argmax(axis=1)
        perfect = seen_unseen_accuracy(y, np.where(y >= S, unseen, sup), S)[2] / oracle
        assert max(w.threshold_bounds.values()) <= perfect + 1e-12
        # a base score's bound is hard routing at its best test threshold
        name = max(w.base_score_bounds, key=w.base_score_bounds.get)
        t, h = best_routing_threshold(gate.base_scores(f.test)[name], y, sup, unseen, S)
        assert w.score_bound == pytest.approx(h / oracle)
        assert h == pytest.approx(_routing_h(gate.base_scores(f.test)[name], t, y, sup, unseen, S))
    for key in ("gate_bound", "score_bound", "fitted_bound"):
        values = [getattr(w, key) for w in report.worlds]
        assert report.summary[key]["median"] == pytest.approx(statistics.median(values))
        assert report.summary[key]["worst"] == min(values)
    md = report.markdown()
    assert "Bounds (the best threshold on the test labels, as a share of the oracle's H)" in md
    assert f"the gate's decision: median {100 * report.summary['gate_bound']['median']:.1f}" in md


def test_the_gate_decision_is_hard_routing_on_one_score(zoo: dict) -> None:
    """What the gate's bound moves the threshold of: at the calibrated threshold it gives the
    gate's own answers, in every mode."""
    for name in NAMES:
        f = load_features(zoo["out"] / name)
        gate = f.fit(Gate())
        variants = [gate, gate.with_options(mode="hard"), gate.with_options(mode="soft"),
                    gate.with_options(mode="hard", unseen_only=False)]
        for g in variants:
            res = g.predict(f.test)
            score, seen, unseen = _gate_decision(g, f, res, *_answers(f, res))
            routed = np.where(score > g.calibration.threshold, unseen, seen)
            np.testing.assert_array_equal(routed, res.pred, err_msg=f"{name} {g.calibration.mode}")
        # stacking is a threshold on clip_margin, with CLIP's answers on both sides
        stacking = f.fit(Gate(method="tpr", score="clip_margin", tpr=0.9)).with_options(mode="stacking")
        res = stacking.predict(f.test)
        score, seen, unseen = _gate_decision(stacking, f, res, *_answers(f, res))
        np.testing.assert_array_equal(
            np.where(score > stacking.calibration.threshold, unseen, seen), res.pred)


def test_threshold_bounds_of_gates_that_are_not_a_fitted_gate(zoo: dict) -> None:
    class Wrapped:  # anything with predict(): no calibration, so no decision to bound
        def __init__(self, gate: Gate) -> None:
            self.gate = gate

        def predict(self, outputs: BranchOutputs) -> FusionResult:
            return self.gate.predict(outputs)

    wrapped = evaluate_zoo(zoo["out"], lambda f: Wrapped(f.fit(Gate())))
    plain = zoo["report"]
    for w, p in zip(wrapped.worlds, plain.worlds):
        assert w.threshold_bounds == {} and w.share_of_oracle == p.share_of_oracle
    for key in ("gate_bound", "score_bound", "fitted_bound"):
        assert wrapped.summary[key] == {"median": None, "worst": None, "worst_world": None,
                                        "worlds": 0}
    assert "Bounds (" not in wrapped.markdown()
