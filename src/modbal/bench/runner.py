"""``run_study``: validate a study's whole grid, run stage 1 (selection), choose, run stage 2
(report), and write the leaderboard — each stage through the grid engine, so a rerun resumes.

Cells that take teachers (the study's uni-modal runs) run in a later phase of each stage: stage 1
chooses their teachers' configuration before training their selection runs, and stage 2 trains the
teachers' report runs before theirs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .grid import Executor, LocalExecutor, run_grid
from .leaderboard import leaderboard, write
from .study import (
    Choice,
    Study,
    bind_teachers,
    choose_cells,
    load_study,
    phases,
    plan_study,
    report_jobs,
    selection_jobs,
)


def run_study(study: str | Path | Study, out: str | Path, executor: Executor | None = None,
              threads: int | None = None, echo: Callable[[str], None] = print, progress: bool = True,
              html: bool = True, dry_run: bool = False, table_only: bool = False) -> dict[str, Any]:
    """Run (or resume) a study into ``out`` and write ``out/leaderboard.*``; with ``table_only``,
    train nothing and tabulate the runs already there. Returns the leaderboard data with
    ``"paths"`` and ``"failed"`` (run directory → error) added."""
    study = study if isinstance(study, Study) else load_study(study)
    out = Path(out)
    start = time.perf_counter()
    plan = plan_study(study, out, echo=echo)
    steps = phases(plan)
    valid = [c for cells in steps for c in cells]
    n_selection = sum(len(c.candidates) for c in valid) * len(study.selection_seeds)
    echo(f"study {study.name}: {len(plan.cells)} (task, fusion, method) cells, {len(plan.cells) - len(valid)} n/a; "
         f"budget {plan.budget} configurations per method; {n_selection} selection runs on seeds "
         f"{study.selection_seeds}, then {len(valid) * len(study.report_seeds)} report runs on seeds "
         f"{study.report_seeds}" + (f"; {len(steps)} phases (cells with teachers after them)" if len(steps) > 1
                                    else ""))
    if dry_run:
        return {"plan": plan, "paths": {}, "failed": {}}
    executor = executor or LocalExecutor()
    failed: dict[str, str] = {}
    trained: list[str] = []

    def grid(jobs: list, stage: str, k: int) -> None:
        if table_only:
            return
        name = stage if len(steps) == 1 else f"{stage} {k + 1}/{len(steps)}"
        result = run_grid(jobs, executor, threads, name=name, where=out / "runs", echo=echo, progress=progress)
        failed.update(result.failed)
        trained.extend(result.trained)

    choices: dict[tuple[str, str, str], Choice] = {}
    for k, cells in enumerate(steps):
        bind_teachers(plan, choices, cells)
        grid([job for *_, job in selection_jobs(plan, cells)], "selection", k)
        choices.update(choose_cells(plan, cells))
    for k, cells in enumerate(steps):
        grid(report_jobs(plan, choices, cells), "report", k)
    board = leaderboard(plan, choices)
    board["wall_s_this_call"] = time.perf_counter() - start
    board["trained_this_call"] = len(trained)
    paths = write(board, out, html=html)
    echo("leaderboard: " + " ".join(str(p) for p in paths.values()))
    return {**board, "paths": paths, "failed": failed}
