"""Reports over run directories: tables (Markdown), figures (PNG, SVG or PDF) and one self-contained HTML page,
plus grids of runs (``sweep``) and the ``modbal report | analyze | sweep`` subcommands.

>>> from modbal.report import load_runs, write_report
>>> write_report(load_runs(["runs/"]), "reports/")   # report.md, report.html
"""
from .tables import RunRecord, find_run_dirs, group_runs, load_run, load_runs, markdown_report


def write_report(runs, out_dir, title="modbal report", fmt="png"):
    """Write ``report.md``, ``report.html`` and ``figures/`` (``fmt``: png, svg or pdf; imports
    matplotlib on first use)."""
    from .html import write_report as _write

    return _write(runs, out_dir, title, fmt)


__all__ = ["RunRecord", "find_run_dirs", "group_runs", "load_run", "load_runs", "markdown_report", "write_report"]
