"""Audit a training set: near-duplicates, leakage across splits, likely mislabels, class counts, unreadable files.

* :mod:`~hybridcls.audit.dataset`: :func:`audit_dataset` and the :class:`AuditReport` it returns;
* :mod:`~hybridcls.audit.embed`: CLIP image embeddings through the engine;
* :mod:`~hybridcls.audit.pixels`: the pixel-level duplicate check;
* :mod:`~hybridcls.audit.find`: the analyses, on arrays;
* :mod:`~hybridcls.audit.html`: the HTML page;
* :mod:`~hybridcls.audit.plant`: planted problems in a synthetic world, to measure the audit.

See ``docs/audit.md``.

Example:
    >>> from hybridcls.audit import audit_dataset
    >>> report = audit_dataset("data/train", test_dir="data/test")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
"""

from __future__ import annotations

from hybridcls.audit.dataset import (
    CLIP_THRESHOLD,
    MIN_CLASS_IMAGES,
    MISLABEL_AGREEMENT,
    NEIGHBOURS,
    PIXEL_THRESHOLD,
    AuditImage,
    AuditReport,
    DuplicateRow,
    LeakRow,
    MislabelRow,
    audit_dataset,
    default_output_dir,
)
from hybridcls.audit.find import ClassCount
from hybridcls.audit.plant import PlantedProblems, plant_problems

__all__ = [
    "CLIP_THRESHOLD",
    "MIN_CLASS_IMAGES",
    "MISLABEL_AGREEMENT",
    "NEIGHBOURS",
    "PIXEL_THRESHOLD",
    "AuditImage",
    "AuditReport",
    "ClassCount",
    "DuplicateRow",
    "LeakRow",
    "MislabelRow",
    "PlantedProblems",
    "audit_dataset",
    "default_output_dir",
    "plant_problems",
]
