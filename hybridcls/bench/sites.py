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

from pathlib import Path
from typing import Any

import numpy as np

from hybridcls.bench.quality import QualityReport, QualityRow, world_run_test_features
from hybridcls.cache import atomic_write_text
from hybridcls.errors import ParameterError
from hybridcls.gate import BranchOutputs, Gate
from hybridcls.gate.metrics import seen_unseen_accuracy
from hybridcls.gate.restriction import mask_logits

__all__ = ["SitesReport", "make_sites", "run_sites", "sites_rows"]

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


def sites_rows(clf: Any, feats: BranchOutputs, y: np.ndarray, allowed: np.ndarray) -> list[QualityRow]:
    """The hybrid, the zero-shot branch and the oracle router, without and with ``allowed``.

    Args:
        clf: A calibrated :class:`~hybridcls.hybrid.HybridClassifier`.
        feats: Its tower outputs on the test images (both towers on every image).
        y: ``[N]`` true class indices in ``clf.classes_`` order.
        allowed: ``[N, C]`` each image's site list.
    """
    S = clf.n_seen_
    zero_shot = Gate.zero_shot()
    clip_only = BranchOutputs(clip_logits=feats.clip_logits)
    seen = clf.seen_logits(feats)
    rows = []
    for lists, mask in (("none", None), ("per site", allowed)):
        clip = feats.clip_logits if mask is None else mask_logits(feats.clip_logits, mask)
        sup = seen if mask is None else mask_logits(seen, mask[:, :S])
        oracle = np.where(y >= S, S + clip[:, S:].argmax(axis=1), sup.argmax(axis=1))
        rows += [
            _row("hybrid, calibrated default", y, clf.predict_features(feats, allowed=mask).pred, S, lists),
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
