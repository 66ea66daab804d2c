"""The HTML report in a real headless browser: every embedded image decodes (naturalWidth > 0)."""

from _browser import chromium, loaded_image_widths, needs_chromium
from test_report import make_grid

from modbal.report.html import write_report
from modbal.report.tables import load_runs


@needs_chromium
def test_report_images_load_in_headless_chromium(tmp_path):
    make_grid(tmp_path / "runs")
    page = write_report(load_runs([tmp_path / "runs"]), tmp_path / "out")["html"]
    expected = page.read_text().count("<img ")
    assert expected == 5
    widths = loaded_image_widths(page.read_text(), tmp_path / "out")
    assert len(widths) == expected and all(w > 0 for w in widths), widths
    shot = tmp_path / "out.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri(), cwd=tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000
