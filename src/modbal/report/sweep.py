"""Grids of runs: the cross product of ``key=v1,v2`` / ``key=a:b`` overrides over one recipe.

``modbal sweep RECIPE method=joint,agm,ogm_ge seed=0:5 fusion=concat,maxout --jobs 2 --out DIR``
runs every combination, one run directory each, named deterministically from its overrides
(``DIR/method-agm__seed-3__fusion-maxout``), through the grid engine of ``modbal bench``
(:mod:`modbal.bench.grid`): complete runs are skipped, started ones resumed, the rest trained, by
local processes (``--jobs``), Ray or submitit. The report of the whole grid is written to
``DIR/report/`` at the end.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..bench.grid import Executor, LocalExecutor, run_grid, run_status
from ..bench.grid import Job as GridJob

#: shorthands accepted in a sweep axis, mapped to the config key they set
SHORTHANDS = {"fusion": "model.fusion.name"}
_RANGE = re.compile(r"^(-?\d+):(-?\d+)$")
_RANGE_ANYWHERE = re.compile(r"(^|,)\s*-?\d+:-?\d+\s*(,|$)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class SweepError(ValueError):
    """A sweep specification a user can fix."""


@dataclass(frozen=True)
class Axis:
    key: str  # as written (``fusion``, ``method.alpha``)
    values: tuple[str, ...]  # raw override values, in order


@dataclass(frozen=True)
class Job:
    name: str  # run directory name
    overrides: tuple[str, ...]  # ``key=value`` overrides for load_recipe (shorthands expanded)


def expand_values(text: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]``; ``"0:3"`` → ``["0", "1", "2"]`` (end excluded); mixed: ``"0:2,7"``."""
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise SweepError(f"empty value in {text!r}")
        match = _RANGE.match(item)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi <= lo:
                raise SweepError(f"empty range {item!r} (a:b means a, a+1, …, b−1)")
            out += [str(i) for i in range(lo, hi)]
        else:
            out.append(item)
    return out


def parse_axes(specs: Sequence[str]) -> list[Axis]:
    """``key=v1,v2`` and ``key=a:b`` specifications as axes, in the order given; ``SweepError``
    on a malformed one, an empty key, a key given twice or a repeated value."""
    axes = []
    seen = set()
    for spec in specs:
        if "=" not in spec:
            raise SweepError(f"sweep axis {spec!r} must look like key=v1,v2 or key=a:b")
        key, raw = spec.split("=", 1)
        key = key.strip()
        if not key:
            raise SweepError(f"sweep axis {spec!r}: empty key")
        if key in seen:
            raise SweepError(f"sweep axis {key!r} is given twice")
        seen.add(key)
        values = expand_values(raw)
        if len(set(values)) != len(values):
            raise SweepError(f"sweep axis {key!r} repeats a value: {values}")
        axes.append(Axis(key, tuple(values)))
    return axes


def split_specs(specs: Sequence[str], base_fusion: str | None = None) -> tuple[list[Axis], list[str]]:
    """Command-line ``KEY=VALUES``: lists and ranges become axes; single values become fixed
    overrides applied to every run (shorthands expanded), kept out of the run names."""
    axis_specs, fixed = [], []
    for spec in specs:
        key, _, raw = spec.partition("=")
        is_axis = ("," in raw or _RANGE_ANYWHERE.search(raw)) and not raw.lstrip().startswith(("{", "["))
        if is_axis:
            axis_specs.append(spec)
        elif key.strip() in SHORTHANDS:
            fixed.append(_override(key.strip(), raw.strip(), base_fusion))
        else:
            fixed.append(spec)
    return parse_axes(axis_specs), fixed


def _override(key: str, value: str, base_fusion: str | None) -> str:
    if key == "fusion":
        # switching the fusion drops the recipe's arguments of the other fusion; the recipe's own
        # fusion keeps them
        return f"model.fusion.name={value}" if value == base_fusion else f"model.fusion={{name: {value}}}"
    return f"{SHORTHANDS.get(key, key)}={value}"


def run_name(pairs: Sequence[tuple[str, str]]) -> str:
    """``[("method", "agm"), ("seed", "3")]`` → ``"method-agm__seed-3"`` (filesystem-safe)."""
    parts = [f"{_UNSAFE.sub('_', k)}-{_UNSAFE.sub('_', v)}" for k, v in pairs]
    return "__".join(parts) or "run"


def plan(axes: Sequence[Axis], base_fusion: str | None = None, fixed: Sequence[str] = ()) -> list[Job]:
    """Every combination, in axis order (the last axis varies fastest); ``fixed`` overrides are
    applied to every run (before the axis values) and do not enter the names."""
    jobs, names = [], set()
    for combo in itertools.product(*(a.values for a in axes)):
        pairs = list(zip((a.key for a in axes), combo))
        name = run_name(pairs)
        if name in names:
            raise SweepError(f"two combinations map to the run directory {name!r}; use distinct values")
        names.add(name)
        jobs.append(Job(name, tuple(fixed) + tuple(_override(k, v, base_fusion) for k, v in pairs)))
    return jobs


def sweep(recipe: str | None, axes: Sequence[Axis], out: str | Path, jobs: int = 1,
          fixed: Sequence[str] = (), report: bool = True, threads: int | None = None, analyze: bool = False,
          concept_seeds: Sequence[int] | None = None, echo: Callable[[str], None] = print,
          executor: Executor | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the grid; returns ``{"runs": [...], "skipped": [...], "failed": {dir: error}, "report": path}``.

    Every combination's config is loaded (and validated) before anything runs, so a bad value
    fails the sweep at once. The runs go through :func:`modbal.bench.grid.run_grid` (``executor``:
    default ``jobs`` local processes). With ``analyze``, every complete run also gets its SHAPE
    scores and competition strength (concepts shared in ``OUT/concept-cache``) before the report.
    """
    from ..config import load_recipe

    if jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {jobs}")
    base = load_recipe(recipe, list(fixed))
    planned = plan(axes, base["model"]["fusion"].get("name"), fixed)
    out = Path(out)
    grid = [GridJob.of(load_recipe(recipe, list(job.overrides)), out / job.name) for job in planned]  # validates all
    seen: dict[str, str] = {}
    for job, named in zip(grid, planned):
        if seen.setdefault(job.key, named.name) != named.name:
            raise SweepError(f"the combinations {seen[job.key]} and {named.name} give the same config")
    out.mkdir(parents=True, exist_ok=True)
    res = run_grid(grid, executor or LocalExecutor(jobs), threads=threads, name="sweep", where=out, echo=echo,
                   progress=progress)
    result: dict[str, Any] = {"runs": res.runs, "skipped": res.skipped, "failed": res.failed, "report": None}
    if analyze:
        from .analyze import competition, shape

        for run_dir in result["runs"]:
            if run_status(run_dir) == "complete":
                echo(f"  analyzing {run_dir}")
                shape(run_dir)
                competition(run_dir, concept_seeds=concept_seeds, concept_cache=out / "concept-cache", echo=echo)
    if report:
        from .html import write_report
        from .tables import load_runs

        runs = load_runs([d for d in result["runs"] if Path(d).exists()])
        if runs:
            paths = write_report(runs, out / "report", title=f"sweep {Path(recipe).stem if recipe else 'defaults'}")
            result["report"] = str(paths["html"])
            echo(f"report: {paths['markdown']} {paths['html']}")
    return result
