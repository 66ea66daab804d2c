"""``run_study``: validate a study's whole grid, run stage 1 (selection), choose, run stage 2
(report), and write the leaderboard — each stage through the grid engine, so a rerun resumes."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .grid import Executor, LocalExecutor, run_grid
from .leaderboard import leaderboard, write
from .study import Study, choose, load_study, plan_study, report_jobs, selection_jobs


def run_study(study: str | Path | Study, out: str | Path, executor: Executor | None = None,
              threads: int | None = None, echo: Callable[[str], None] = print, progress: bool = True,
              html: bool = True, dry_run: bool = False) -> dict[str, Any]:
    """Run (or resume) a study into ``out`` and write ``out/leaderboard.*``. Returns the
    leaderboard data with ``"paths"`` and ``"failed"`` (run directory → error) added."""
    study = study if isinstance(study, Study) else load_study(study)
    out = Path(out)
    start = time.perf_counter()
    plan = plan_study(study, out, echo=echo)
    stage1 = selection_jobs(plan)
    valid = [c for c in plan.cells if not c.na]
    echo(f"study {study.name}: {len(plan.cells)} (task, fusion, method) cells, {len(plan.cells) - len(valid)} n/a; "
         f"budget {plan.budget} configurations per method; {len(stage1)} selection runs on seeds "
         f"{study.selection_seeds}, then {len(valid) * len(study.report_seeds)} report runs on seeds "
         f"{study.report_seeds}")
    if dry_run:
        return {"plan": plan, "paths": {}, "failed": {}}
    executor = executor or LocalExecutor()
    first = run_grid([job for *_, job in stage1], executor, threads, name="selection", where=out / "runs",
                     echo=echo, progress=progress)
    choices = {(c.task, c.fusion, c.label): choose(plan, c) for c in valid}
    second = run_grid(report_jobs(plan, choices), executor, threads, name="report", where=out / "runs",
                      echo=echo, progress=progress)
    board = leaderboard(plan, choices)
    board["wall_s_this_call"] = time.perf_counter() - start
    paths = write(board, out, html=html)
    echo("leaderboard: " + " ".join(str(p) for p in paths.values()))
    return {**board, "paths": paths, "failed": {**first.failed, **second.failed}}
