"""Reports over run directories: tables (Markdown), figures (PNG) and one self-contained HTML page,
plus grids of runs (``sweep``) and the ``modbal report | analyze | sweep`` subcommands.

>>> from modbal.report import load_runs, write_report
>>> write_report(load_runs(["runs/"]), "reports/")   # report.md, report.html
"""
from .tables import RunRecord, find_run_dirs, group_runs, load_run, load_runs, markdown_report


def write_report(runs, out_dir, title="modbal report"):
    """Write ``report.md`` and ``report.html`` (imports matplotlib on first use)."""
    from .html import write_report as _write

    return _write(runs, out_dir, title)


__all__ = ["RunRecord", "find_run_dirs", "group_runs", "load_run", "load_runs", "markdown_report", "write_report"]
