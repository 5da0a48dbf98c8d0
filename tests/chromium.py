"""Headless Chromium for tests that check HTML as a reader sees it: rendered offline by a real browser.

    chromium = require_chromium()                       # Debian's /usr/bin/chromium, or a failure saying how to get it
    dom = run_chromium(chromium, tmp_path / "profile", page.as_uri(), "--dump-dom")
    page = RenderedPage(dom)                            # .text, .links (href -> text), .rows (text and icon classes)
    run_chromium(chromium, tmp_path / "profile-shot", page.as_uri(), f"--screenshot={png}", "--window-size=1280,2000")
    width, height, shades = png_facts(png)              # shades > 50: something was drawn, not a blank page
    assert_screenshot_drawn(chromium, tmp_path / "profile-shot", page.as_uri(), png, 1280, 2000)   # both in one

No host name resolves in these runs, so nothing a page links from the network loads: a test sees what an
offline reviewer sees. Used by tests/data/test_data_docs.py (GX Data Docs) and tests/release/test_report_render.py.
"""
from __future__ import annotations

import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")   # Debian's package; `make test` installs it


def require_chromium() -> Path:
    """Chromium, or a failure (never a skip: a reviewer must be able to open what CI checked) saying how to get it."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: this test renders HTML in headless Chromium. Install it with "
                    "`apt-get install chromium` (Debian), or run `make test`, which installs it.", pytrace=False)
    return CHROMIUM


def run_chromium(chromium: Path, profile: Path, url: str, *output: str) -> str:
    """Headless Chromium on `url` with a fresh profile; no host name resolves, so the CDN scripts and
    styles a page links never load: this is the page as an offline reviewer sees it. Returns stdout."""
    command = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", *output, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
    return done.stdout


class RenderedPage(HTMLParser):
    """What a reader sees of a rendered DOM: its text, its links (href -> text) and, per table row, the
    row's text and the classes of its icons (GX shows a result's status as an icon)."""

    def __init__(self, dom: str):
        super().__init__()
        self.text, self.links, self.rows = "", {}, []
        self._open_rows: list[dict] = []
        self._link: list | None = None
        self._hidden = 0
        self.feed(dom)
        self.text = " ".join(self.text.split())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "style"):
            self._hidden += 1
        elif tag == "tr":
            self._open_rows.append({"text": "", "icons": ""})
        elif tag == "a" and attrs.get("href"):
            self._link = [attrs["href"], ""]
        elif tag == "i":
            for row in self._open_rows:
                row["icons"] += f" {attrs.get('class') or ''}"

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._hidden -= 1
        elif tag == "tr" and self._open_rows:
            row = self._open_rows.pop()
            self.rows.append({"text": " ".join(row["text"].split()), "icons": row["icons"]})
        elif tag == "a" and self._link:
            self.links[self._link[0]] = " ".join(self._link[1].split())
            self._link = None

    def handle_data(self, data):
        if self._hidden:
            return
        data += " "   # text of neighbouring elements is separate words
        self.text += data
        for row in self._open_rows:
            row["text"] += data
        if self._link:
            self._link[1] += data


def png_facts(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decompressed pixel rows) of a PNG: a blank page has a
    handful of values, rendered text (anti-aliased) has hundreds."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    chunks, position = {}, 8
    while position < len(data):
        (length,), kind = struct.unpack(">I", data[position:position + 4]), data[position + 4:position + 8]
        chunks[kind] = chunks.get(kind, b"") + data[position + 8:position + 8 + length]
        position += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    return width, height, len(set(zlib.decompress(chunks[b"IDAT"])))


def assert_screenshot_drawn(chromium: Path, profile: Path, url: str, png: Path, width: int, height: int) -> None:
    """A screenshot of `url` at width x height is taken, and something was drawn on it (not a blank page)."""
    run_chromium(chromium, profile, url, f"--screenshot={png}", f"--window-size={width},{height}")
    got_width, got_height, shades = png_facts(png)
    assert (got_width, got_height) == (width, height)
    assert shades > 50, f"{png}: only {shades} distinct byte values: a blank page?"
