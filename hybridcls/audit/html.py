"""The audit's HTML page: one self-contained ``index.html`` with small JPEG thumbnails beside it.

Built with the shared :mod:`hybridcls.htmlpage` (the stylesheet, escaping and
relative links of the ``report`` and ``explain`` pages): every name on the
page is HTML-escaped and every link is relative (the page, its ``thumbs/``
folder and the CSV files move together). Long sections show their first
:data:`MAX_ROWS` entries; the CSV files hold all of them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from hybridcls.cache import atomic_path
from hybridcls.data import load_image
from hybridcls.errors import ImageDecodeError
from hybridcls.htmlpage import bar, esc, rel_link, shown, table, thumb_figure
from hybridcls.htmlpage import write_page as write_html

if TYPE_CHECKING:
    from hybridcls.audit.dataset import AuditReport

__all__ = ["MAX_ROWS", "THUMB_PIXELS", "write_page"]

#: Entries shown per section of the page.
MAX_ROWS = 200
#: Longest side of a page thumbnail, in pixels.
THUMB_PIXELS = 96


class _Thumbs:
    """Writes each image's page thumbnail once; names are hashes of the path (no odd characters)."""

    def __init__(self, out: Path) -> None:
        self.folder = out / "thumbs"
        self.done: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self.done:
            name = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".jpg"
            try:
                image = load_image(path, target_side=THUMB_PIXELS)
            except ImageDecodeError:
                self.done[path] = None
                return None
            image.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
            with atomic_path(self.folder / name) as tmp:
                image.save(tmp, format="JPEG", quality=85)
            self.done[path] = rel_link(self.folder / name, self.folder.parent)
        return self.done[path]


def _figure(thumbs: _Thumbs, path: str, caption: str) -> str:
    return thumb_figure(thumbs(path), caption, title=path)


def _more(n: int, csv_name: str) -> str:
    if n <= MAX_ROWS:
        return ""
    return f'<p class="note">{n - MAX_ROWS} more in <a href="{esc(csv_name)}">{esc(csv_name)}</a>.</p>'


_CSV_FILES = ("images.csv", "duplicates.csv", "leakage.csv", "mislabels.csv", "class_counts.csv",
              "unreadable.csv")


def write_page(report: AuditReport, out: Path) -> Path:
    """Write ``out/index.html`` (and ``out/thumbs/*.jpg``) for ``report``; returns the page's path."""
    thumbs = _Thumbs(out)
    label_of = {im.path: im.label for im in report.images if im.split == "data"}
    parts = [
        f"<pre>{esc(report.summary())}</pre>",
        # every setting, an empty one (no note adapted, no CLIP threshold) as "none"
        "<p>Settings: " + esc(", ".join(f"{k} = {shown(v, empty='none')}"
                                        for k, v in report.settings.items())) + "</p>",
        "<p>CSV files: " + " ".join(f'<a href="{esc(n)}">{esc(n)}</a>' for n in _CSV_FILES) + "</p>",
    ]

    parts.append(f"<h2>Near-duplicate groups ({report.n_groups})</h2>")
    groups: dict[int, list] = {}
    for r in report.duplicates:
        groups.setdefault(r.group, []).append(r)
    for g, rows in list(groups.items())[:MAX_ROWS]:
        warn = (' <span class="error">(filed under different classes)</span>'
                if ";" in rows[0].group_labels else "")
        parts.append(f"<div><p>group {g}: {len(rows)} images{warn}</p>")
        parts += [_figure(thumbs, r.path, f"{r.label}: {Path(r.path).name} "
                          f"(pixels {r.pixel_similarity:.3f}, CLIP {r.clip_cosine:.3f})") for r in rows]
        parts.append("</div>")
    parts.append(_more(len(groups), "duplicates.csv"))

    parts.append(f"<h2>Leakage ({len(report.leaks)})</h2>")
    if report.leaks:
        parts.append(table(
            ["split", "image", "DATA_DIR copy", "pixels", "CLIP"],
            [(r.split, ("raw", _figure(thumbs, r.path, r.path)),
              ("raw", _figure(thumbs, r.data_path, f"{r.data_label}: {r.data_path}")),
              f"{r.pixel_similarity:.3f}", f"{r.clip_cosine:.3f}") for r in report.leaks[:MAX_ROWS]],
            numeric=[3, 4]))
    parts.append(_more(len(report.leaks), "leakage.csv"))

    parts.append(f"<h2>Likely mislabels ({len(report.mislabels)})</h2>")
    if report.mislabels:
        parts.append(table(
            ["image", "label", "neighbours say", "nearest images"],
            [(("raw", _figure(thumbs, r.path, Path(r.path).name)), r.label,
              f"{r.suggested_label} ({r.agreement:.0%})",
              ("raw", "".join(_figure(thumbs, p, label_of.get(p, "")) for p in r.neighbours[:5])))
             for r in report.mislabels[:MAX_ROWS]]))
    parts.append(_more(len(report.mislabels), "mislabels.csv"))

    parts.append(f"<h2>Classes ({len(report.class_counts)}, imbalance "
                 f"{report.imbalance_ratio:.1f}x)</h2>")
    top = max((c.images for c in report.class_counts), default=1) or 1
    parts.append(table(
        ["class", "images", "unreadable", ""],
        # A class below the minimum is shown in the warning colour.
        [(("raw", f'<span class="error">{esc(c.name)}</span>') if c.below_minimum else c.name,
          c.images, c.unreadable, ("raw", bar(c.images / top))) for c in report.class_counts],
        numeric=[1, 2]))

    bad = report.unreadable
    parts.append(f"<h2>Unreadable files ({len(bad)})</h2>")
    if bad:
        parts.append(table(["split", "file", "reason"],
                           [(im.split, im.path, im.error or "") for im in bad[:MAX_ROWS]]))
    parts.append(_more(len(bad), "unreadable.csv"))
    return write_html(out / "index.html", f"Audit of {report.data_dir}", "\n".join(p for p in parts if p))
