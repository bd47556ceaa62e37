"""Self-contained HTML pages: escaped text, relative links, one stylesheet, atomic writes.

The pages that ``hybridcls report``, ``hybridcls explain`` and ``hybridcls
audit`` write live in a folder with their images beside them, so the folder
can be moved, zipped or served as it is. Every piece of text that comes from
a file name, a class name or an error message goes through :func:`esc`;
every link is relative to the page (:func:`rel_link` refuses anything else).
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from hybridcls.cache import atomic_write_text

__all__ = ["bar", "esc", "figure", "img", "page", "rel_link", "shown", "table", "thumb_figure",
           "write_page"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 40em; }
.error { color: #b00020; font-weight: bold; }
.note { color: #555; font-size: 0.9em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; margin: 1em 0; }
figure.thumb { width: 110px; margin: 0.2em; font-size: 0.75em; word-break: break-all; }
figure.thumb img { max-width: 96px; max-height: 96px; display: block; }
.missing { width: 96px; height: 64px; background: #eee; display: flex; align-items: center;
  justify-content: center; }
.bar { background: #69c; height: 0.8em; }
"""


def esc(value: Any) -> str:
    """``value`` as HTML text, quotes included (safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def shown(value: Any, *, empty: str = "") -> str:
    """A value as a page says it: None and an empty list or tuple as ``empty`` (never Python's
    ``None`` or ``[]``), a list's or tuple's items joined by ``"; "``, anything else as ``str``.

    Example:
        >>> shown(None), shown([], empty="none"), shown(["k 10 -> 9", "rounds 5 -> 4"]), shown(0.5)
        ('', 'none', 'k 10 -> 9; rounds 5 -> 4', '0.5')
    """
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return empty
    if isinstance(value, (list, tuple)):
        return "; ".join(map(str, value))
    return str(value)


def rel_link(target: str | os.PathLike[str], base: str | os.PathLike[str]) -> str:
    """A URL-quoted link to ``target`` relative to the folder ``base`` (the page's folder).

    Raises:
        ValueError: ``target`` is not inside ``base``: a page must not point
            outside its own folder, or it stops being self-contained.
    """
    rel = Path(os.path.relpath(Path(target).resolve(), Path(base).resolve()))
    if rel.parts and rel.parts[0] == os.pardir:
        raise ValueError(f"{target} is outside the page's folder {base}")
    return quote(PurePosixPath(*rel.parts).as_posix())


def img(src: str, alt: str, *, width: int | None = None, lazy: bool = False) -> str:
    """An ``<img>`` tag; ``src`` must already be a relative link (see :func:`rel_link`).

    ``lazy`` lets the browser fetch it only when scrolled near (pages with hundreds of images).
    """
    size = f' width="{int(width)}"' if width else ""
    load = ' loading="lazy"' if lazy else ""
    return f'<img src="{esc(src)}" alt="{esc(alt)}"{size}{load}>'


def figure(src: str, caption: str, *, width: int | None = None) -> str:
    """An image with a caption (the caption is escaped)."""
    return f"<figure>{img(src, caption, width=width)}<figcaption>{esc(caption)}</figcaption></figure>"


def thumb_figure(src: str | None, caption: str, *, title: str = "", missing: str = "unreadable"
                 ) -> str:
    """A small captioned picture for pages that show many (at most 96 px, loaded lazily).

    Args:
        src: A relative link to the picture (see :func:`rel_link`); ``None``
            shows a grey box saying ``missing`` in its place.
        caption: Shown under it (escaped).
        title: Shown on hover, e.g. the full path the caption shortens (escaped).
        missing: The box's text when there is no picture.

    Example:
        >>> thumb_figure(None, "a<b")
        '<figure class="thumb"><div class="missing">unreadable</div><figcaption>a&lt;b</figcaption></figure>'
    """
    pic = img(src, title or caption, lazy=True) if src is not None else f'<div class="missing">{esc(missing)}</div>'
    hover = f' title="{esc(title)}"' if title else ""
    return f'<figure class="thumb"{hover}>{pic}<figcaption>{esc(caption)}</figcaption></figure>'


def bar(fraction: float, *, width: int = 200) -> str:
    """A horizontal bar ``fraction`` (0 to 1) of ``width`` pixels long, for a bar chart in a table.

    Example:
        >>> bar(0.5)
        '<div class="bar" style="width:100px"></div>'
    """
    return f'<div class="bar" style="width:{width * max(0.0, min(1.0, fraction)):.0f}px"></div>'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Sequence[int] = ()
          ) -> str:
    """A table of escaped cells (as :func:`shown` says them: an empty one is blank); columns
    listed in ``numeric`` are right-aligned.

    A cell given as ``("raw", html)`` is inserted unescaped (for nested tags we built).

    Example:
        >>> table(["item", "value"], [("finished", None)])  # doctest: +ELLIPSIS
        '...<tbody><tr><td>finished</td><td></td></tr></tbody></table>'
    """
    num = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for j, cell in enumerate(row):
            cls = ' class="num"' if j in num else ""
            text = cell[1] if isinstance(cell, tuple) and cell[:1] == ("raw",) else esc(shown(cell))
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, body: str) -> str:
    """A whole HTML5 document with the shared stylesheet inline (no external files)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def write_page(path: str | os.PathLike[str], title: str, body: str) -> Path:
    """Write :func:`page` to ``path`` atomically and return the path."""
    path = Path(path)
    atomic_write_text(path, page(title, body))
    return path
