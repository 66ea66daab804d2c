"""The HTML report in a real headless browser: every embedded image decodes (naturalWidth > 0)."""
import re
import shutil
import subprocess
import tempfile

import pytest
from test_report import make_grid

from modbal.report.html import write_report
from modbal.report.tables import load_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# written into the DOM after the load event, read back from --dump-dom
PROBE = ('<script>window.addEventListener("load", () => { for (const img of document.images) '
         'img.setAttribute("data-natural-width", String(img.naturalWidth)); '
         'document.body.setAttribute("data-probed", "1"); });</script>')


def _chromium(*args, cwd):
    profile = tempfile.mkdtemp(dir=cwd)
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_images_load_in_headless_chromium(tmp_path):
    make_grid(tmp_path / "runs")
    page = write_report(load_runs([tmp_path / "runs"]), tmp_path / "out")["html"]
    expected = page.read_text().count("<img ")
    assert expected == 5
    probe = tmp_path / "out" / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--dump-dom", probe.as_uri(), cwd=tmp_path).stdout
    assert 'data-probed="1"' in dom, "the load event never fired"
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == expected and all(w > 0 for w in widths), widths
    shot = tmp_path / "out.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri(), cwd=tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000
