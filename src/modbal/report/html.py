"""One self-contained HTML page: inline CSS, tables, figures embedded as base64 PNG, no external links."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

from .plots import report_figures
from .tables import RunRecord, Table, group_runs, markdown_report, report_tables

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


def figure_html(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_report(runs: Sequence[RunRecord], title: str = "modbal report") -> str:
    """The whole page as a string."""
    groups = group_runs(runs)
    tables = report_tables(runs)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{len(runs)} runs in {len(groups)} groups (dataset, fusion, method, and any other setting that "
             "differs between their runs; seeds are averaged over).</p>"]
    parts += [table_html(t) for t in tables[:-1]]
    figures = report_figures(groups)
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [figure_html(c, png) for c, png in figures]
    parts.append(table_html(tables[-1]))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_report(runs: Sequence[RunRecord], out_dir: str | Path, title: str = "modbal report") -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; returns their paths."""
    if not runs:
        raise ValueError("no runs to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    paths["markdown"].write_text(markdown_report(runs, title), encoding="utf-8")
    paths["html"].write_text(html_report(runs, title), encoding="utf-8")
    return paths
