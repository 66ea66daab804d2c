"""Copy finished `modbal bench` studies into the documentation: each study's ``leaderboard.md``
becomes ``docs/research/leaderboard/<study>.md`` and its per-task dot plot
``docs/img/leaderboard_<study>_<task>.png``, redrawn from the study's ``leaderboard.json``.

    python benchmarks/leaderboard_pages.py runs/bench/synthetic runs/bench/avdigits ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from modbal.bench.html import dot_plot

DOCS = Path(__file__).resolve().parents[1] / "docs"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+", type=Path, help="study output folders (each with leaderboard.json)")
    for out in parser.parse_args().outs:
        for path in publish(out):
            print(path.relative_to(DOCS.parent))


if __name__ == "__main__":
    main()
