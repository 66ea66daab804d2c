"""Headless Chromium for the tests that render modbal's HTML pages (they skip without it)."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# written into the DOM after the load event, read back from --dump-dom
PROBE = ('<script>window.addEventListener("load", () => { for (const img of document.images) '
         'img.setAttribute("data-natural-width", String(img.naturalWidth)); '
         'document.body.setAttribute("data-probed", "1"); });</script>')
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile in ``cwd``."""
    profile = tempfile.mkdtemp(dir=cwd)
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def loaded_image_widths(html: str, folder: Path) -> list[int]:
    """The natural width of every image of ``html`` once the page has loaded in Chromium (0: not
    decoded); fails when the load event never fires."""
    probe = folder / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri(), cwd=folder).stdout
    assert 'data-probed="1"' in dom, "the load event never fired"
    return [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
