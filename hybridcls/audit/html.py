"""The audit's HTML page: one self-contained ``index.html`` with small JPEG thumbnails beside it.

Every name on the page is HTML-escaped and every link is relative (the page,
its ``thumbs/`` folder and the CSV files move together). Long sections show
their first :data:`MAX_ROWS` entries; the CSV files hold all of them.
"""

from __future__ import annotations

import hashlib
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from hybridcls.cache import atomic_path, atomic_write_text
from hybridcls.data import load_image
from hybridcls.errors import ImageDecodeError

if TYPE_CHECKING:
    from hybridcls.audit.dataset import AuditReport

__all__ = ["MAX_ROWS", "THUMB_PIXELS", "write_page"]

#: Entries shown per section of the page.
MAX_ROWS = 200
#: Longest side of a page thumbnail, in pixels.
THUMB_PIXELS = 96

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em} td,th{padding:.2em .5em;border-bottom:1px solid #eee;
text-align:left;vertical-align:top} figure{display:inline-block;margin:.2em;width:110px;
font-size:.7em;word-break:break-all;vertical-align:top} figure img{max-width:96px;max-height:96px;
display:block} .bar{background:#69c;height:.8em} .warn{color:#b30000} .muted{color:#777}
.missing{width:96px;height:64px;background:#eee;display:flex;align-items:center;justify-content:center}
"""


class _Thumbs:
    """Writes each image's page thumbnail once; names are hashes of the path (no odd characters)."""

    def __init__(self, out: Path) -> None:
        self.folder = out / "thumbs"
        self.done: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self.done:
            name = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".jpg"
            try:
                image = load_image(path)
            except ImageDecodeError:
                self.done[path] = None
                return None
            image.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
            with atomic_path(self.folder / name) as tmp:
                image.save(tmp, format="JPEG", quality=85)
            self.done[path] = f"thumbs/{name}"
        return self.done[path]


def _figure(thumbs: _Thumbs, path: str, caption: str) -> str:
    src = thumbs(path)
    img = (f'<img src="{escape(quote(src))}" alt="{escape(path)}" loading="lazy">' if src
           else '<div class="missing">unreadable</div>')
    return f'<figure title="{escape(path)}">{img}<figcaption>{escape(caption)}</figcaption></figure>'


def _more(n: int, csv_name: str) -> str:
    if n <= MAX_ROWS:
        return ""
    return f'<p class="muted">{n - MAX_ROWS} more in <a href="{csv_name}">{csv_name}</a>.</p>'


def write_page(report: AuditReport, out: Path) -> Path:
    """Write ``out/index.html`` (and ``out/thumbs/*.jpg``) for ``report``; returns the page's path."""
    thumbs = _Thumbs(out)
    label_of = {im.path: im.label for im in report.images if im.split == "data"}
    name = Path(report.data_dir).name or report.data_dir
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Audit of {escape(name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Audit of {escape(report.data_dir)}</h1>",
        "<pre>" + escape(report.summary()) + "</pre>",
        "<p>Settings: " + ", ".join(f"{escape(k)} = {escape(str(v))}"
                                    for k, v in report.settings.items()) + "</p>",
        '<p>CSV files: ' + " ".join(f'<a href="{n}">{n}</a>' for n in (
            "images.csv", "duplicates.csv", "leakage.csv", "mislabels.csv", "class_counts.csv",
            "unreadable.csv")) + "</p>",
    ]

    parts.append(f"<h2>Near-duplicate groups ({report.n_groups})</h2>")
    groups: dict[int, list] = {}
    for r in report.duplicates:
        groups.setdefault(r.group, []).append(r)
    for g, rows in list(groups.items())[:MAX_ROWS]:
        warn = ' <span class="warn">(filed under different classes)</span>' if ";" in rows[0].group_labels else ""
        parts.append(f"<div><p>group {g}: {len(rows)} images{warn}</p>")
        parts += [_figure(thumbs, r.path, f"{r.label}: {Path(r.path).name} "
                          f"(pixels {r.pixel_similarity:.3f}, CLIP {r.clip_cosine:.3f})") for r in rows]
        parts.append("</div>")
    parts.append(_more(len(groups), "duplicates.csv"))

    parts.append(f"<h2>Leakage ({len(report.leaks)})</h2>")
    if report.leaks:
        parts.append("<table><tr><th>split</th><th>image</th><th>DATA_DIR copy</th>"
                     "<th>pixels</th><th>CLIP</th></tr>")
        for r in report.leaks[:MAX_ROWS]:
            parts.append(
                f"<tr><td>{escape(r.split)}</td><td>{_figure(thumbs, r.path, r.path)}</td>"
                f"<td>{_figure(thumbs, r.data_path, f'{r.data_label}: {r.data_path}')}</td>"
                f"<td>{r.pixel_similarity:.3f}</td><td>{r.clip_cosine:.3f}</td></tr>")
        parts.append("</table>")
    parts.append(_more(len(report.leaks), "leakage.csv"))

    parts.append(f"<h2>Likely mislabels ({len(report.mislabels)})</h2>")
    if report.mislabels:
        parts.append("<table><tr><th>image</th><th>label</th><th>neighbours say</th>"
                     "<th>nearest images</th></tr>")
        for r in report.mislabels[:MAX_ROWS]:
            nb = "".join(_figure(thumbs, p, label_of.get(p, "")) for p in r.neighbours[:5])
            parts.append(
                f"<tr><td>{_figure(thumbs, r.path, Path(r.path).name)}</td><td>{escape(r.label)}</td>"
                f"<td>{escape(r.suggested_label)} ({r.agreement:.0%})</td><td>{nb}</td></tr>")
        parts.append("</table>")
    parts.append(_more(len(report.mislabels), "mislabels.csv"))

    parts.append(f"<h2>Classes ({len(report.class_counts)}, imbalance "
                 f"{report.imbalance_ratio:.1f}x)</h2><table><tr><th>class</th><th>images</th>"
                 "<th>unreadable</th><th></th></tr>")
    top = max((c.images for c in report.class_counts), default=1) or 1
    for c in report.class_counts:
        cls = ' class="warn"' if c.below_minimum else ""
        parts.append(f"<tr{cls}><td>{escape(c.name)}</td><td>{c.images}</td><td>{c.unreadable}</td>"
                     f'<td><div class="bar" style="width:{200 * c.images / top:.0f}px"></div></td></tr>')
    parts.append("</table>")

    bad = report.unreadable
    parts.append(f"<h2>Unreadable files ({len(bad)})</h2>")
    if bad:
        parts.append("<table><tr><th>split</th><th>file</th><th>reason</th></tr>")
        parts += [f"<tr><td>{escape(im.split)}</td><td>{escape(im.path)}</td>"
                  f"<td>{escape(im.error or '')}</td></tr>" for im in bad[:MAX_ROWS]]
        parts.append("</table>")
    parts.append(_more(len(bad), "unreadable.csv"))
    parts.append("</body></html>\n")
    page = out / "index.html"
    atomic_write_text(page, "\n".join(p for p in parts if p))
    return page
