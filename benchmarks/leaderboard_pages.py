"""Copy finished `modbal bench` studies into the documentation: each study's ``leaderboard.md``
becomes ``docs/research/leaderboard/<study>.md`` and its per-task dot plot
``docs/img/leaderboard_<study>_<task>.png``, redrawn from the study's ``leaderboard.json``; the
summary table of ``docs/leaderboard.md`` (between its ``results-table`` markers) is rewritten
from the same files, one row per task and fusion, in the order the studies are given.

    python benchmarks/leaderboard_pages.py runs/bench/synthetic runs/bench/avdigits ...
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from modbal.bench.html import dot_plot

DOCS = Path(__file__).resolve().parents[1] / "docs"
SUMMARY_PAGE = DOCS / "leaderboard.md"
BEGIN, END = "<!-- results-table: begin -->", "<!-- results-table: end -->"
SIGNIFICANT = 0.05


def publish(study_out: Path) -> list[Path]:
    """Write one study's page and figures; returns the files written."""
    board = json.loads((study_out / "leaderboard.json").read_text())
    name = board["study"]
    page = DOCS / "research" / "leaderboard" / f"{name}.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    written = [page]
    text = (study_out / "leaderboard.md").read_text()
    for task in dict.fromkeys(g["task"] for g in board["groups"]):
        png = dot_plot(task, [g for g in board["groups"] if g["task"] == task])
        if png is None:
            continue
        image = DOCS / "img" / f"leaderboard_{name}_{task}.png"
        image.write_bytes(png)
        written.append(image)
        text += f"\n![{task}: test accuracy of every report seed per method](../../img/{image.name})\n"
    page.write_text(text)
    return written


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


def _entry(row: dict[str, Any]) -> str:
    """``label (Δ pp, Holm p)`` of a row compared with joint training."""
    return f"{row['label']} ({_pp(row['diff']['mean'])}, {row['diff']['p_holm']:.2g})"


def summary_rows(board: dict[str, Any]) -> list[str]:
    """Markdown rows: joint training, the ensemble's paired gap, the methods significantly above
    and below joint training after Holm's correction (the best other one when none is above)."""
    rows = []
    link = f"[{board['study']}](research/leaderboard/{board['study']}.md)"
    for g in board["groups"]:
        ref = next(r for r in g["rows"] if r["label"] == g["reference"])
        compared = sorted((r for r in g["rows"] if r.get("diff")), key=lambda r: -r["diff"]["mean"])
        above = [r for r in compared if r["diff"]["mean"] > 0 and r["diff"]["p_holm"] < SIGNIFICANT]
        below = [r for r in compared[::-1] if r["diff"]["mean"] < 0 and r["diff"]["p_holm"] < SIGNIFICANT]
        listed = ", ".join(_entry(r) for r in above)
        if not above:
            best = compared[0] if compared and compared[0]["diff"]["mean"] > 0 else None
            listed = "none" + (f" (best {best['label']} {_pp(best['diff']['mean'])}, Holm p "
                               f"{best['diff']['p_holm']:.2g})" if best else "")
        ens = g["ensemble"]
        d = ens["diff"]
        gap = (f"{_pp(d['mean'])} [{_pp(d['ci_lo'])}, {_pp(d['ci_hi'])}]" if ens["above_ref"]
               else f"{_pp(d['mean'])}: no gap")
        lower = ", ".join(_entry(r) for r in below)
        rows.append(f"| {link} | {g['task']} / {g['fusion']} | {100 * ref['acc']['mean']:.1f} ± "
                    f"{100 * ref['acc']['std']:.1f} | {100 * ens['acc']['mean']:.1f} ({gap}) | {listed} | "
                    f"{lower or 'none'} |")
    return rows


def write_summary(boards: list[dict[str, Any]], page: Path = SUMMARY_PAGE) -> None:
    """Replace the table between the markers of ``page`` by the rows of ``boards``."""
    header = ["| study | task / fusion | joint | ensemble (Δ vs joint) | above joint (Δ pp, Holm p) | below joint |",
              "|---|---|---|---|---|---|"]
    table = "\n".join(header + [row for board in boards for row in summary_rows(board)])
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page}: the markers {BEGIN} and {END} are missing")
    page.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{table}\n{END}", text,
                           flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+", type=Path, help="study output folders (each with leaderboard.json)")
    parser.add_argument("--no-summary", action="store_true", help=f"leave the table of {SUMMARY_PAGE.name} alone")
    args = parser.parse_args()
    for out in args.outs:
        for path in publish(out):
            print(path.relative_to(DOCS.parent))
    if not args.no_summary:
        write_summary([json.loads((out / "leaderboard.json").read_text()) for out in args.outs])
        print(SUMMARY_PAGE.relative_to(DOCS.parent))


if __name__ == "__main__":
    main()
