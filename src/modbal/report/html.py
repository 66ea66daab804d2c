"""One self-contained HTML page (inline CSS, tables, figures embedded as base64 PNG or SVG, no
external links), ``report.md``, and every figure as a file in ``figures/`` (PNG, SVG or PDF)."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

from .plots import FORMATS, close, render, report_figures, slug
from .tables import RunRecord, Table, group_runs, markdown_report, md_text, report_tables

MIME = {"png": "image/png", "svg": "image/svg+xml"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:nth-child(-n+3) { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } p.note { color: #555; font-size: 0.9em; }
"""


def table_html(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{esc(table.note)}</p>' if table.note else ""
    return f"<h2>{esc(table.title)}</h2>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(caption: str, data: bytes, mime: str = "image/png") -> str:
    """A ``<figure>`` with the image embedded as a data URI (PNG or SVG bytes) and its caption."""
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:{mime};base64,{encoded}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_report(runs: Sequence[RunRecord], title: str = "modbal report",
                figures: Sequence[tuple[str, bytes, str]] | None = None) -> str:
    """The whole page as a string; ``figures``: (caption, image bytes, MIME type) to embed (default:
    every report figure as PNG)."""
    groups = group_runs(runs)
    tables = report_tables(runs)
    if figures is None:
        figures = []
        for caption, fig in report_figures(groups):
            figures.append((caption, render(fig, "png"), MIME["png"]))
            close(fig)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{len(runs)} runs in {len(groups)} groups (dataset, fusion, method, and any other setting that "
             "differs between their runs; seeds are averaged over).</p>"]
    parts += [table_html(t) for t in tables[:-1]]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [figure_html(caption, data, mime) for caption, data, mime in figures]
    parts.append(table_html(tables[-1]))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_report(runs: Sequence[RunRecord], out_dir: str | Path, title: str = "modbal report",
                 fmt: str = "png") -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/NN-<caption>.<fmt>`` (``fmt``: png, svg or
    pdf) into ``out_dir``; the page embeds the figures as SVG with ``fmt="svg"``, else as PNG.
    Returns the paths (``markdown``, ``html``, ``figures``: the folder)."""
    if not runs:
        raise ValueError("no runs to report")
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}; allowed values: {', '.join(FORMATS)}")
    out = Path(out_dir)
    figure_dir = out / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    for old in figure_dir.glob("[0-9][0-9]-*.*"):  # the previous report's figures
        if old.suffix.lstrip(".") in FORMATS:
            old.unlink()
    embed = "svg" if fmt == "svg" else "png"
    embedded, files = [], []
    for n, (caption, fig) in enumerate(report_figures(group_runs(runs)), 1):
        data = render(fig, embed)
        embedded.append((caption, data, MIME[embed]))
        path = figure_dir / f"{n:02d}-{slug(caption)}.{fmt}"
        path.write_bytes(data if fmt == embed else render(fig, fmt))
        close(fig)
        files.append((caption, path))
    paths = {"markdown": out / "report.md", "html": out / "report.html", "figures": figure_dir}
    figure_md = ["## Figures", ""] + [f"![{md_text(c)}](figures/{p.name})" for c, p in files] + [""] if files else []
    paths["markdown"].write_text(markdown_report(runs, title) + "\n".join(["", *figure_md]), encoding="utf-8")
    paths["html"].write_text(html_report(runs, title, embedded), encoding="utf-8")
    return paths
