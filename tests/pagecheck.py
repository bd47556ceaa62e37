"""Checks for the HTML pages we write: local references, and rendering in a real headless browser.

``page_references`` parses a page with :mod:`html.parser` and lists every
``src`` / ``href`` it holds. ``browser_image_check`` opens a copy of the page
in headless Chromium with an inline script that, on the ``load`` event (which
fires only once every image has loaded or failed), records each ``<img>``
whose ``naturalWidth`` is 0, i.e. that the browser could not fetch or decode.
``--dump-dom`` then prints the DOM with that record in it. The copy sits in the
page's own folder, so its relative links resolve exactly as the page's do.
``browser_screenshot`` renders the page itself with ``--screenshot``.

``require_browser`` is how a test gets the browser: without one it skips (a
user's own run), unless ``HYBRIDCLS_REQUIRE_BROWSER`` is set, as ``.ci/run``
sets it after installing Chromium: there a missing browser fails the test,
so the one check that the pages render cannot go quietly unrun.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

__all__ = ["REQUIRE_BROWSER_ENV", "browser_image_check", "browser_screenshot", "find_browser",
           "page_references", "require_browser"]

#: Set (to anything but "" or "0") where the browser tests must run: CI (.ci/run).
REQUIRE_BROWSER_ENV = "HYBRIDCLS_REQUIRE_BROWSER"

_PROBE = """<script>
window.addEventListener('load', function () {
  var broken = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (!im.complete || im.naturalWidth === 0) broken.push(im.getAttribute('src'));
  }
  var out = document.createElement('pre');
  out.id = 'image-check';
  out.textContent = JSON.stringify({total: document.images.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append((tag, value))


def page_references(page: Path) -> list[tuple[str, str]]:
    """``(tag, value)`` of every ``src`` and ``href`` attribute in ``page``."""
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.refs


def find_browser() -> str | None:
    """Chromium's path, or None when no such browser is installed."""
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """Chromium's path; skips the test without one, or fails it where ``REQUIRE_BROWSER_ENV`` is set."""
    browser = find_browser()
    if browser is None:
        if os.environ.get(REQUIRE_BROWSER_ENV, "") not in ("", "0"):
            pytest.fail(f"no headless browser (chromium) installed, and {REQUIRE_BROWSER_ENV} says "
                        "the browser tests must run (.ci/run installs Debian's chromium)")
        pytest.skip("no headless browser (chromium) installed")
    return browser


def _run(browser: str, args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--disable-gpu", f"--user-data-dir={profile}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox on
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=180,
                          check=False)


def browser_image_check(browser: str, page: Path, profile: Path) -> dict:
    """``{"total": n, "broken": [src, ...]}`` for ``page`` as headless Chromium loads it."""
    probe = page.with_name("_image_check.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                     encoding="utf-8")
    try:
        res = _run(browser, ["--virtual-time-budget=20000", "--dump-dom", probe.as_uri()], profile)
    finally:
        probe.unlink()
    m = re.search(r'<pre id="image-check">([^<]*)</pre>', res.stdout)
    assert m, f"the browser printed no image check (exit {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def browser_screenshot(browser: str, page: Path, shot: Path, profile: Path) -> None:
    """Render ``page`` to the PNG ``shot``."""
    res = _run(browser, ["--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()], profile)
    assert shot.is_file(), f"no screenshot (exit {res.returncode}): {res.stderr[-2000:]}"
