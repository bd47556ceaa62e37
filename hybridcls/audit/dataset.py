"""``audit_dataset``: look for problems in an ImageFolder training set before training on it.

One decoding pass over every file of DATA_DIR and of the optional validation
and test folders, which feeds the CLIP image tower (:mod:`hybridcls.audit.embed`)
and makes the small thumbnails of the pixel check (:mod:`hybridcls.audit.pixels`),
then the analyses of :mod:`hybridcls.audit.find`:

* near-duplicate groups inside DATA_DIR;
* leakage: validation / test images that are near-duplicates of a DATA_DIR image;
* likely mislabels: images whose nearest neighbours mostly carry another label;
* class counts and imbalance;
* unreadable files.

Thresholds and their measured separation are in ``docs/audit.md``.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hybridcls.audit.embed import clip_image_encoder, embed_sources
from hybridcls.audit.find import (
    ClassCount,
    Match,
    class_counts,
    duplicate_groups,
    find_matches,
    label_votes,
    self_neighbours,
)
from hybridcls.audit.pixels import crop_signatures, pixel_similarity, search_signatures
from hybridcls.cache import atomic_write_text
from hybridcls.data import Source, expand_inputs, scan_image_folder
from hybridcls.errors import DatasetError, InputError, ParameterError
from hybridcls.zeroshot.loading import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED

__all__ = [
    "CLIP_THRESHOLD",
    "MIN_CLASS_IMAGES",
    "MISLABEL_AGREEMENT",
    "NEIGHBOURS",
    "PIXEL_THRESHOLD",
    "AuditImage",
    "AuditReport",
    "DuplicateRow",
    "LeakRow",
    "MislabelRow",
    "audit_dataset",
    "default_output_dir",
]

#: Pixel similarity (:func:`~hybridcls.audit.pixels.pixel_similarity`) from which two images are copies.
PIXEL_THRESHOLD = 0.96
#: CLIP cosine from which two images count as copies even when their pixels differ
#: (grayscale, off-centre crops); meant for real CLIP models, see docs/audit.md.
CLIP_THRESHOLD = 0.97
#: Neighbours that vote on a label, and candidates per search for duplicates.
NEIGHBOURS = 10
#: Share of neighbours that must agree on another label to flag an image.
MISLABEL_AGREEMENT = 0.8
#: Classes with fewer readable images are flagged.
MIN_CLASS_IMAGES = 10

SPLITS = ("data", "val", "test")
# Fine pixel signatures kept in memory (61 KB each, 0.5 GB at most); misses cost 0.4 ms.
_SIGNATURE_CACHE = 8192


@dataclass(frozen=True)
class AuditImage:
    """One input file.

    Attributes:
        split: ``"data"`` (DATA_DIR), ``"val"`` or ``"test"``.
        path: The path as found by the folder walk.
        label: Its class folder (DATA_DIR), or the first subfolder of a
            val/test folder (``""`` for files directly inside it).
        error: Why it could not be read; ``None`` when it decoded.
    """

    split: str
    path: str
    label: str
    error: str | None = None


@dataclass(frozen=True)
class DuplicateRow:
    """A DATA_DIR image that belongs to a near-duplicate group.

    Attributes:
        group: Group number (0, 1, ...), in order of the groups' first image.
        size: Images in the group.
        path: This image.
        label: Its class.
        group_labels: The group's distinct classes, ``;``-joined (more than
            one: the same picture is filed under different classes).
        match: The image of the group this one is most similar to.
        clip_cosine: CLIP cosine to ``match``.
        pixel_similarity: Pixel similarity to ``match``.
        rule: Which test the pair passed: ``pixels``, ``clip`` or ``both``.
    """

    group: int
    size: int
    path: str
    label: str
    group_labels: str
    match: str
    clip_cosine: float
    pixel_similarity: float
    rule: str


@dataclass(frozen=True)
class LeakRow:
    """A validation or test image that is a near-duplicate of a DATA_DIR image.

    Attributes:
        split: ``"val"`` or ``"test"``.
        path: The leaked image.
        data_path: Its most similar DATA_DIR image.
        data_label: That image's class.
        clip_cosine: CLIP cosine of the pair.
        pixel_similarity: Pixel similarity of the pair.
        rule: Which test the pair passed.
    """

    split: str
    path: str
    data_path: str
    data_label: str
    clip_cosine: float
    pixel_similarity: float
    rule: str


@dataclass(frozen=True)
class MislabelRow:
    """A DATA_DIR image whose nearest neighbours mostly carry another label.

    Attributes:
        path: The image.
        label: Its class folder.
        suggested_label: The neighbours' most common class.
        agreement: Share of neighbours with ``suggested_label``.
        own_label_agreement: Share of neighbours with ``label``.
        neighbours: The nearest DATA_DIR images, nearest first (for the page).
    """

    path: str
    label: str
    suggested_label: str
    agreement: float
    own_label_agreement: float
    neighbours: tuple[str, ...] = ()


@dataclass
class AuditReport:
    """Everything :func:`audit_dataset` found; :meth:`save` writes it, :meth:`summary` says it.

    Attributes:
        data_dir: The audited training folder.
        images: Every input file, DATA_DIR first, then val, then test, in walk order.
        classes: DATA_DIR's classes.
        duplicates: Rows of near-duplicate groups, by group.
        leaks: Leaked validation / test images.
        mislabels: Likely mislabelled images, most confident first.
        class_counts: One row per class.
        imbalance_ratio: Readable images of the largest class over the smallest.
        settings: The thresholds, neighbour count and model used, and ``adapted``: what
            the data changed in them, one sentence each (written to ``index.html``).
        output_dir: Where :meth:`save` last wrote, if it did.
    """

    data_dir: str
    images: list[AuditImage]
    classes: list[str]
    duplicates: list[DuplicateRow] = field(default_factory=list)
    leaks: list[LeakRow] = field(default_factory=list)
    mislabels: list[MislabelRow] = field(default_factory=list)
    class_counts: list[ClassCount] = field(default_factory=list)
    imbalance_ratio: float = 1.0
    settings: dict[str, object] = field(default_factory=dict)
    output_dir: Path | None = None

    @property
    def unreadable(self) -> list[AuditImage]:
        """The files that did not decode, in input order."""
        return [im for im in self.images if im.error is not None]

    @property
    def n_groups(self) -> int:
        """Near-duplicate groups found inside DATA_DIR."""
        return len({r.group for r in self.duplicates})

    @property
    def small_classes(self) -> list[str]:
        """Classes with fewer readable images than the minimum."""
        return [c.name for c in self.class_counts if c.below_minimum]

    def summary(self) -> str:
        """A few lines for a terminal."""
        n_data = sum(im.split == "data" for im in self.images)
        extra = len(self.duplicates) - self.n_groups
        lines = [
            f"audited {n_data} images in {len(self.classes)} classes of {self.data_dir}"
            + "".join(f", {sum(im.split == s for im in self.images)} {s}"
                      for s in SPLITS[1:] if any(im.split == s for im in self.images)),
            f"near-duplicates: {self.n_groups} groups ({extra} extra copies)",
            (f"leakage: {sum(r.split == 'val' for r in self.leaks)} val and "
             f"{sum(r.split == 'test' for r in self.leaks)} test images are copies of DATA_DIR images"),
            f"likely mislabels: {len(self.mislabels)}",
            f"classes: imbalance {self.imbalance_ratio:.1f}x (largest / smallest)"
            + (f", {len(self.small_classes)} below {self.settings.get('min_class_images')} images"
               if self.small_classes else ""),
            f"unreadable files: {len(self.unreadable)}",
            *(f"adapted to the data: {note}" for note in self.settings.get("adapted", [])),
        ]
        if self.output_dir is not None:
            lines.append(f"report: {self.output_dir / 'index.html'}")
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike[str]) -> list[Path]:
        """Write the CSV files, the thumbnails and ``index.html`` into ``output_dir``.

        Returns:
            The files written (thumbnails excluded).
        """
        from hybridcls.audit.html import write_page

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        group_of = {r.path: r.group for r in self.duplicates}
        leak_of = {(r.split, r.path): r.data_path for r in self.leaks}
        suggested = {r.path: r.suggested_label for r in self.mislabels}
        tables: dict[str, tuple[list[str], list[list[object]]]] = {
            "images.csv": (
                ["split", "path", "label", "status", "error", "duplicate_group", "copy_of",
                 "suggested_label"],
                [[im.split, im.path, im.label, "error" if im.error else "ok", im.error or "",
                  group_of.get(im.path, "") if im.split == "data" else "",
                  leak_of.get((im.split, im.path), ""),
                  suggested.get(im.path, "") if im.split == "data" else ""]
                 for im in self.images],
            ),
            "duplicates.csv": (
                ["group", "size", "path", "label", "group_labels", "match", "clip_cosine",
                 "pixel_similarity", "rule"],
                [[r.group, r.size, r.path, r.label, r.group_labels, r.match, _f(r.clip_cosine),
                  _f(r.pixel_similarity), r.rule] for r in self.duplicates],
            ),
            "leakage.csv": (
                ["split", "path", "data_path", "data_label", "clip_cosine", "pixel_similarity", "rule"],
                [[r.split, r.path, r.data_path, r.data_label, _f(r.clip_cosine),
                  _f(r.pixel_similarity), r.rule] for r in self.leaks],
            ),
            "mislabels.csv": (
                ["path", "label", "suggested_label", "agreement", "own_label_agreement"],
                [[r.path, r.label, r.suggested_label, _f(r.agreement), _f(r.own_label_agreement)]
                 for r in self.mislabels],
            ),
            "class_counts.csv": (
                ["class", "images", "unreadable", "share", "below_minimum"],
                [[c.name, c.images, c.unreadable, _f(c.share), int(c.below_minimum)]
                 for c in self.class_counts],
            ),
            "unreadable.csv": (
                ["split", "path", "reason"],
                [[im.split, im.path, im.error] for im in self.unreadable],
            ),
        }
        written = []
        for name, (header, rows) in tables.items():
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
            atomic_write_text(out / name, buf.getvalue())
            written.append(out / name)
        written.append(write_page(self, out))
        self.output_dir = out
        return written


def _f(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4f}"


def default_output_dir(data_dir: str | os.PathLike[str]) -> Path:
    """``<DATA_DIR>-audit``, beside DATA_DIR (``data/train`` -> ``data/train-audit``)."""
    path = Path(os.path.abspath(os.fspath(data_dir)))
    return path.with_name(path.name + "-audit")


def _split_images(split: str, folder: str | os.PathLike[str] | None, parameter: str) -> list[AuditImage]:
    if folder is None:
        return []
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise DatasetError(f"{parameter}={root!r}: folder not found")
    try:
        sources = expand_inputs([root])
    except InputError as err:
        raise DatasetError(f"{parameter}={root!r}: {err}") from None
    out = []
    for s in sources:
        parts = Path(os.path.relpath(s.path, root)).parts
        out.append(AuditImage(split, s.path, parts[0] if len(parts) > 1 else "", s.error))
    return out


def _check(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {value}")


def audit_dataset(
    data_dir: str | os.PathLike[str],
    *,
    val_dir: str | os.PathLike[str] | None = None,
    test_dir: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 0,
    pixel_threshold: float | None = PIXEL_THRESHOLD,
    clip_threshold: float | None = CLIP_THRESHOLD,
    neighbours: int | None = None,
    mislabel_agreement: float = MISLABEL_AGREEMENT,
    min_class_images: int = MIN_CLASS_IMAGES,
    save: bool = True,
    progress: bool = False,
) -> AuditReport:
    """Audit an ImageFolder training set (and optionally its validation and test folders).

    Args:
        data_dir: ``DATA_DIR/<class>/**/<image>``.
        val_dir: Validation images (any layout), checked for copies of DATA_DIR images.
        test_dir: Test images (any layout), checked likewise.
        output_dir: Where CSV files, thumbnails and ``index.html`` go; default
            :func:`default_output_dir`.
        clip_model: open_clip model, as for ``hybridcls predict``.
        clip_pretrained: Its pretrained tag or weights file (None for ``local-dir:`` / ``hf-hub:``).
        cache_dir: Weights cache.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: Images per batch.
        workers: Decoding processes.
        pixel_threshold: Pixel similarity from which two images are copies (None: off).
        clip_threshold: CLIP cosine from which two images are copies (None: off).
        neighbours: Nearest neighbours that vote on labels and are checked for copies:
            1 to the number of other images DATA_DIR holds. None: :data:`NEIGHBOURS`, or
            every other readable image when there are fewer. When files that do not decode
            leave fewer others than asked, every other readable image is used, and
            ``settings["adapted"]`` says so; ``settings["neighbours"]`` is the count used.
        mislabel_agreement: Share of neighbours that must agree on another label.
        min_class_images: Classes with fewer readable images are flagged.
        save: Write the outputs (False: only return the report).
        progress: Progress bars on stderr.

    Returns:
        The :class:`AuditReport` (saved to ``output_dir`` unless ``save=False``).

    Raises:
        DatasetError: DATA_DIR (or a val/test folder) is missing, empty or not an ImageFolder.
        InputError: A threshold out of range.
        ParameterError: ``neighbours`` below 1 or more than the other images DATA_DIR holds.
        WeightsUnavailableError: The CLIP weights cannot be had offline.

    Example:
        >>> from hybridcls.audit import audit_dataset
        >>> from hybridcls.synth import TINY_CLIP_MODEL_ID
        >>> report = audit_dataset("synthetic-world/train", test_dir="synthetic-world/test",
        ...                        clip_model=TINY_CLIP_MODEL_ID, clip_pretrained=None,
        ...                        clip_threshold=None)  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    for name, value in (("pixel_threshold", pixel_threshold), ("clip_threshold", clip_threshold)):
        if value is not None:
            _check(name, value, -1.0, 1.0)
    _check("mislabel_agreement", mislabel_agreement, 0.0, 1.0)
    index = scan_image_folder(data_dir)
    # before any model loads: a count DATA_DIR cannot give is refused, as explain's is
    if neighbours is not None:
        _check_neighbours(neighbours, len(index.samples) - 1)
    images = [AuditImage("data", p, index.classes[y]) for p, y in index.samples]
    images += _split_images("val", val_dir, "val_dir")
    images += _split_images("test", test_dir, "test_dir")
    sources = [Source(im.path, im.error) for im in images]

    encoder = clip_image_encoder(clip_model, clip_pretrained, device=device, cache_dir=cache_dir)
    emb = embed_sources(encoder, sources, batch_size=batch_size, workers=workers,
                        progress=progress, desc="audit: CLIP", thumbnails=True)
    images = [AuditImage(im.split, im.path, im.label, emb.errors.get(i, im.error))
              for i, im in enumerate(images)]

    # Every source is either a row of the embeddings (and thumbnails) or an error: the rows
    # are the readable images, in input order.
    ok = emb.ok
    clip, thumbs = emb.vectors, emb.thumbnails
    coarse = search_signatures(thumbs)

    # 61 KB per image: bounded, so that a large set does not hold every image's crops at once.
    @functools.lru_cache(maxsize=_SIGNATURE_CACHE)
    def sig(r: int) -> np.ndarray:
        return crop_signatures(thumbs[r])

    split = np.array([images[i].split for i in ok])
    rows = {s: np.flatnonzero(split == s) for s in SPLITS}
    d = rows["data"]
    labels = np.array([index.classes.index(images[i].label) for i in ok[d]], dtype=np.int64)
    neighbours, adapted = _neighbours_used(neighbours, len(d) - 1)
    kw = {"k": neighbours, "clip_threshold": clip_threshold, "pixel_threshold": pixel_threshold}

    report = AuditReport(data_dir=os.fspath(data_dir), images=images, classes=list(index.classes))
    # DATA_DIR against itself by CLIP, searched once: duplicate candidates and label votes share it.
    nearest = self_neighbours(clip[d], neighbours)
    matches = find_matches(clip[d], coarse[d], clip[d], coarse[d],
                           lambda a, b: pixel_similarity(sig(d[a]), sig(d[b])), same_set=True,
                           clip_nearest=nearest, **kw)
    report.duplicates = _duplicate_rows(matches, [images[i] for i in ok[d]])
    for s in SPLITS[1:]:
        q = rows[s]
        found = find_matches(clip[q], coarse[q], clip[d], coarse[d],
                             lambda a, b, q=q: pixel_similarity(sig(q[a]), sig(d[b])), **kw)
        best: dict[int, Match] = {}
        for m in found:
            if m.query not in best or _strength(m) > _strength(best[m.query]):
                best[m.query] = m
        for qi in sorted(best):
            m = best[qi]
            ref = images[ok[d[m.ref]]]
            report.leaks.append(LeakRow(s, images[ok[q[qi]]].path, ref.path, ref.label,
                                        m.clip_cosine, m.pixel_similarity, m.rule))

    suggested, agreement, own, nb = label_votes(clip[d], labels, neighbours, nearest=nearest)
    flagged = np.flatnonzero((suggested != labels) & (agreement >= mislabel_agreement))
    for r in sorted(flagged, key=lambda r: (-agreement[r], r)):
        report.mislabels.append(MislabelRow(
            images[ok[d[r]]].path, index.classes[labels[r]], index.classes[suggested[r]],
            float(agreement[r]), float(own[r]), tuple(images[ok[d[j]]].path for j in nb[r])))

    all_labels = np.array([index.classes.index(im.label) for im in images if im.split == "data"])
    readable = np.array([im.error is None for im in images if im.split == "data"])
    report.class_counts, report.imbalance_ratio = class_counts(
        index.classes, all_labels, readable, min_class_images)
    report.settings = {
        "clip_model": clip_model, "clip_pretrained": clip_pretrained,
        "clip_fingerprint": encoder.bundle.fingerprint,
        "pixel_threshold": pixel_threshold, "clip_threshold": clip_threshold,
        "neighbours": neighbours, "mislabel_agreement": mislabel_agreement,
        "min_class_images": min_class_images, "adapted": adapted,
    }
    if save:
        report.save(output_dir if output_dir is not None else default_output_dir(data_dir))
    return report


def _check_neighbours(neighbours: int, others: int) -> None:
    if not 1 <= neighbours <= others:
        raise ParameterError("neighbours", neighbours, (
            f"more than the {others} other images DATA_DIR holds" if neighbours > others
            else "expected at least 1") + f"; give 1 to {others}")


def _neighbours_used(asked: int | None, others: int) -> tuple[int, list[str]]:
    """The neighbour count an audit uses, and the note when unreadable files changed it.

    Args:
        asked: ``audit_dataset``'s ``neighbours`` (None: the default), already checked
            against DATA_DIR's files.
        others: Readable DATA_DIR images besides each one.

    Returns:
        ``(neighbours, adapted)``: the count, and a sentence when ``asked`` was more than
        the readable images allow (the default adapts without one, as ``topk``'s does).
    """
    others = max(others, 0)
    if asked is None:
        return min(NEIGHBOURS, others), []
    if asked <= others:
        return asked, []
    return others, [f"neighbours={asked} -> {others}: DATA_DIR has {others + 1} readable images"]


def _strength(m: Match) -> tuple[float, float]:
    return (m.pixel_similarity, m.clip_cosine)


def _duplicate_rows(matches: Sequence[Match], images: Sequence[AuditImage]) -> list[DuplicateRow]:
    groups = duplicate_groups(len(images), matches)
    best: dict[int, tuple[int, Match]] = {}
    for m in matches:
        for a, b in ((m.query, m.ref), (m.ref, m.query)):
            if a not in best or _strength(m) > _strength(best[a][1]):
                best[a] = (b, m)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if g >= 0:
            members.setdefault(int(g), []).append(i)
    rows = []
    for g in sorted(members):
        idx = members[g]
        group_labels = ";".join(sorted({images[i].label for i in idx}))
        for i in idx:
            partner, m = best[i]
            rows.append(DuplicateRow(g, len(idx), images[i].path, images[i].label, group_labels,
                                     images[partner].path, m.clip_cosine, m.pixel_similarity, m.rule))
    return rows
