"""``hybridcls bench sites``: accuracy with and without class lists per site, on the synthetic world.

The world's test images are spread over ``n_sites`` sites, each holding a
subset of the classes (every class occurs at ``sites_per_class`` sites drawn
at random; each test image is placed at one of its class's sites), and each
site's list is the classes it holds: the geofence case, where the lists are
right. The same tower outputs are then predicted without and with the lists
(:meth:`~hybridcls.hybrid.HybridClassifier.predict_features` with
``allowed=``), for the calibrated hybrid, the zero-shot branch alone and the
oracle router. No training beyond :func:`~hybridcls.bench.quality.prepare_world_run`'s.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.bench.quality import QualityReport, QualityRow, world_run_test_features
from hybridcls.cache import atomic_write_json, atomic_write_text
from hybridcls.errors import ParameterError
from hybridcls.gate import BranchOutputs, Gate
from hybridcls.gate.metrics import seen_unseen_accuracy
from hybridcls.gate.restriction import mask_logits

__all__ = ["SitesReport", "SitesZooReport", "make_sites", "run_sites", "sites_rows", "sites_zoo"]

#: Sites the world is split into, and at how many of them each class occurs.
DEFAULT_SITES = 5
DEFAULT_SITES_PER_CLASS = 2


class SitesReport(QualityReport):
    """Rows without and with the lists (each row's ``note`` says which), times and the split."""

    def markdown(self) -> str:
        lines = ["| method | class lists | S | U | H | accuracy |", "|---|---|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r.method} | {r.note} | {100 * r.seen:.1f} | {100 * r.unseen:.1f} | "
                         f"{100 * r.harmonic:.1f} | {100 * r.accuracy:.1f} |")
        return "\n".join(lines)


def make_sites(y: np.ndarray, n_classes: int, *, n_sites: int = DEFAULT_SITES,
               sites_per_class: int = DEFAULT_SITES_PER_CLASS, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Split labelled images over sites that each hold a subset of the classes.

    Args:
        y: ``[N]`` true class indices.
        n_classes: ``C``.
        n_sites: Number of sites.
        sites_per_class: At how many sites each class occurs (drawn without replacement).
        seed: Seeds the draws.

    Returns:
        ``(site_classes [n_sites, C] bool, site_of_image [N])``: each image lies at a site
        that holds its class.

    Raises:
        ParameterError: ``sites_per_class`` not in ``1..n_sites``.
    """
    if not 1 <= sites_per_class <= n_sites:
        raise ParameterError("sites_per_class", sites_per_class, f"expected 1 to n_sites={n_sites}")
    rng = np.random.default_rng(seed)
    holds = np.zeros((n_sites, n_classes), dtype=bool)
    for c in range(n_classes):
        holds[rng.choice(n_sites, size=sites_per_class, replace=False), c] = True
    site = np.array([rng.choice(np.flatnonzero(holds[:, c])) for c in y], dtype=np.int64)
    return holds, site


def _row(method: str, y: np.ndarray, pred: np.ndarray, n_seen: int, lists: str) -> QualityRow:
    s, u, h = seen_unseen_accuracy(y, pred, n_seen)
    return QualityRow(method, s, u, h, float(np.mean(pred == y)), note=lists)


def sites_rows(clf: Any, feats: BranchOutputs, y: np.ndarray, allowed: np.ndarray,
               oracle_seen_logits: np.ndarray | None = None) -> list[QualityRow]:
    """The hybrid, the zero-shot branch and the oracle router, without and with ``allowed``.

    Args:
        clf: A calibrated :class:`~hybridcls.hybrid.HybridClassifier`, or a fitted
            :class:`~hybridcls.gate.Gate` (the zoo's worlds: their cached outputs).
        feats: Its tower outputs on the test images (both towers on every image).
        y: ``[N]`` true class indices in ``clf.classes_`` order.
        allowed: ``[N, C]`` each image's site list.
        oracle_seen_logits: ``[N, S]`` the seen-class logits the oracle router reads (default:
            those the gate reads, ``clf.seen_logits(feats)``; the zoo's: the plain supervised
            logits, so that its oracle is the zoo table's).
    """
    S = clf.n_seen_
    zero_shot = Gate.zero_shot()
    clip_only = BranchOutputs(clip_logits=feats.clip_logits)
    seen = clf.seen_logits(feats) if oracle_seen_logits is None else np.asarray(oracle_seen_logits)
    # the classifier's own entry point on outputs (its prediction options), else the gate's
    predict = clf.predict if isinstance(clf, Gate) else clf.predict_features
    rows = []
    for lists, mask in (("none", None), ("per site", allowed)):
        clip = feats.clip_logits if mask is None else mask_logits(feats.clip_logits, mask)
        sup = seen if mask is None else mask_logits(seen, mask[:, :S])
        oracle = np.where(y >= S, S + clip[:, S:].argmax(axis=1), sup.argmax(axis=1))
        rows += [
            _row("hybrid, calibrated default", y, predict(feats, allowed=mask).pred, S, lists),
            _row("zero-shot only", y, zero_shot.predict(clip_only, allowed=mask).pred, S, lists),
            _row("oracle router", y, oracle, S, lists),
        ]
    return rows


def run_sites(out_dir: str | Path, *, seed: int = 0, epochs: int = 8, n_sites: int = DEFAULT_SITES,
              sites_per_class: int = DEFAULT_SITES_PER_CLASS, model: str | None = None,
              image_size: int = 64, workers: int = 0, progress: bool = False) -> SitesReport:
    """The comparison on the synthetic world (see the module docstring); writes ``sites.md`` / ``.json``.

    Example:
        >>> print(run_sites("bench-out").markdown())  # doctest: +SKIP
    """
    out = Path(out_dir)
    _, clf, seconds, _, feats, y = world_run_test_features(
        out, seed=seed, epochs=epochs, model=model, image_size=image_size, workers=workers,
        progress=progress)
    holds, site = make_sites(y, len(clf.classes_), n_sites=n_sites, sites_per_class=sites_per_class,
                             seed=seed)
    rows = sites_rows(clf, feats, y, holds[site])
    info = {"world_seed": seed, "epochs": epochs, "n_test": len(y), "n_sites": n_sites,
            "sites_per_class": sites_per_class, "classes_per_site": holds.sum(axis=1).tolist(),
            "n_seen_classes": clf.n_seen_, "n_classes": len(clf.classes_)}
    report = SitesReport(rows, seconds, info)
    report.to_json(out / "sites.json")
    atomic_write_text(out / "sites.md", report.markdown() + "\n")
    return report


@dataclass
class SitesZooReport:
    """:func:`sites_zoo`'s figures: one :class:`SitesReport` per world, and the hybrid's H gain.

    Attributes:
        worlds: ``{world name: its report}``, in the zoo's order (rows as :func:`sites_rows`).
        gain: ``{world name: the hybrid's H with the lists minus without}`` (fractions).
    """

    worlds: dict[str, SitesReport]
    gain: dict[str, float]

    def markdown(self) -> str:
        lines = [("| world | hybrid H, no lists | per site | gain | zero-shot H, no lists | per site "
                  "| oracle H, no lists | per site |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in self.worlds.items():
            h = [100 * row.harmonic for row in r.rows]
            lines.append(f"| {name} | {h[0]:.1f} | {h[3]:.1f} | {h[3] - h[0]:+.1f} | {h[1]:.1f} | "
                         f"{h[4]:.1f} | {h[2]:.1f} | {h[5]:.1f} |")
        worst = min(self.gain, key=self.gain.__getitem__)
        held = sum(g >= 0 for g in self.gain.values())
        lines += ["", (f"The hybrid's H with the lists: gain median "
                       f"{100 * statistics.median(self.gain.values()):+.1f}, worst "
                       f"{100 * self.gain[worst]:+.1f} ({worst}); {held} of {len(self.gain)} worlds "
                       "gain or hold.")]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"worlds": {n: {"rows": [vars(r) for r in rep.rows], "info": rep.info}
                           for n, rep in self.worlds.items()}, "gain": self.gain}


def sites_zoo(out_dir: str | Path, n: int | str | None = None, *, n_sites: int = DEFAULT_SITES,
              sites_per_class: int = DEFAULT_SITES_PER_CLASS, cache_dir: str | Path | None = None,
              workers: int = 0, progress: bool = False) -> SitesZooReport:
    """The comparison on every world of the zoo (:mod:`hybridcls.bench.zoo`), from the cached
    towers' outputs: the default gate fitted as ``calibrate`` fits it, the test images spread
    over sites by :func:`make_sites` (seeded by the world's seed); the oracle router reads the
    plain supervised logits, as the zoo table's does. Writes ``sites.md`` and
    ``sites.json`` into ``out_dir``.

    Args:
        out_dir: The zoo's folder (:func:`hybridcls.bench.zoo.run_zoo`).
        n: Build (or reuse) the first ``n`` worlds, or ``"ci"``, first; ``None``: the worlds
            already built there (:func:`hybridcls.bench.zoo.cached_worlds`).
        n_sites: As :func:`make_sites`'s.
        sites_per_class: Likewise.
        cache_dir: As :func:`hybridcls.bench.zoo.build_world`'s, for worlds still to build.
        workers: Decoding processes, likewise.
        progress: Progress bars, likewise.

    Raises:
        ParameterError: ``sites_per_class`` not in ``1..n_sites``.
        InputError: No world built there (and ``n`` not given).
    """
    from hybridcls.bench.zoo import built_worlds, load_features

    out = Path(out_dir)
    reports: dict[str, SitesReport] = {}
    for name in built_worlds(out, n, cache_dir=cache_dir, workers=workers, progress=progress):
        f = load_features(out / name)
        seed = int(f.info.get("spec", {}).get("seed", 0))
        holds, site = make_sites(f.y_test, len(f.classes), n_sites=n_sites,
                                 sites_per_class=sites_per_class, seed=seed)
        rows = sites_rows(f.fit(Gate()), f.test, f.y_test, holds[site], oracle_seen_logits=f.test.sup_logits)
        reports[name] = SitesReport(rows, {}, {"world_seed": seed, "n_test": len(f.y_test),
                                               "n_sites": n_sites, "sites_per_class": sites_per_class,
                                               "classes_per_site": holds.sum(axis=1).tolist()})
    report = SitesZooReport(reports, {name: r.rows[3].harmonic - r.rows[0].harmonic
                                      for name, r in reports.items()})
    atomic_write_json(out / "sites.json", report.as_dict())
    atomic_write_text(out / "sites.md", report.markdown() + "\n")
    return report
