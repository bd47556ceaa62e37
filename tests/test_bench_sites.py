"""``bench sites``: class lists per site on the synthetic world (issue 16, part 3), on the session's run."""

from __future__ import annotations

import numpy as np
import pytest

from hybridcls.bench.quality import labelled_test_set
from hybridcls.bench.sites import make_sites, sites_rows
from hybridcls.errors import ParameterError


def test_make_sites_places_every_image_at_a_site_that_holds_its_class():
    y = np.repeat(np.arange(10), 3)
    holds, site = make_sites(y, 10, n_sites=4, sites_per_class=2, seed=3)
    assert holds.sum(axis=0).tolist() == [2] * 10  # each class at exactly 2 sites
    assert holds[site, y].all()
    with pytest.raises(ParameterError, match="sites_per_class=5: expected 1 to n_sites=4"):
        make_sites(y, 10, n_sites=4, sites_per_class=5)


@pytest.fixture(scope="module")
def sites_report(world_run):
    world, clf = world_run
    sources, y = labelled_test_set(world, clf)
    feats = clf.extract_features(sources)
    holds, site = make_sites(y, len(clf.classes_), seed=0)
    rows = sites_rows(clf, feats, y, holds[site])
    return {(r.method, r.note): r for r in rows}


def test_site_lists_raise_the_hybrids_accuracy_on_the_synthetic_world(sites_report):
    for (method, lists), r in sorted(sites_report.items()):
        print(f"{method:28s} {lists:9s} S {100 * r.seen:5.1f} U {100 * r.unseen:5.1f} "
              f"H {100 * r.harmonic:5.1f} acc {100 * r.accuracy:5.1f}")
    hybrid = sites_report[("hybrid, calibrated default", "none")]
    listed = sites_report[("hybrid, calibrated default", "per site")]
    zs, zs_listed = sites_report[("zero-shot only", "none")], sites_report[("zero-shot only", "per site")]
    # Reached on the session's world run (4 epochs, seed 0): the hybrid 96.1 -> 96.5% accuracy with
    # the lists, H 92.6 -> 93.7; zero-shot alone 83.1 -> 91.5%. The hybrid's training is not bitwise
    # reproducible across machines (the bench's run of the same settings: 96.9 -> 97.0%), hence
    # 1.5 points of allowance for it; zero-shot (the shipped tiny CLIP, no training) 1 point.
    assert listed.accuracy >= 0.965 - 0.015 and listed.harmonic >= 0.937 - 0.015
    assert listed.accuracy >= hybrid.accuracy - 0.005  # right lists never cost the hybrid accuracy
    # each site holds about 2/5 of the classes: zero-shot, whose errors spread over every class,
    # gains the most
    assert zs_listed.accuracy >= 0.915 - 0.01 and zs_listed.accuracy - zs.accuracy >= 0.05
