"""``modbal bench STUDY``, and the executor options it shares with ``modbal sweep``."""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any


def add_executor_options(p: argparse.ArgumentParser) -> None:
    """``--jobs``, ``--executor``, ``--address``, ``--cluster``, ``--slurm``, ``--threads``."""
    g = p.add_argument_group("execution")
    g.add_argument("--jobs", type=int, default=1, help="local worker processes (default: 1, in this process)")
    g.add_argument("--executor", choices=("local", "ray", "submitit"), default="local",
                   help="where runs train: local processes (default), a Ray cluster, or Slurm via submitit")
    g.add_argument("--address", default=None,
                   help="ray: the cluster to join ('auto', 'ray://host:10001'; default: start a local Ray)")
    g.add_argument("--cluster", choices=("slurm", "local"), default=None,
                   help="submitit: slurm, or local processes (default: slurm when available)")
    g.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit: a job parameter, e.g. slurm_partition=gpu timeout_min=120 gpus_per_node=1 "
                        "(repeatable)")
    g.add_argument("--runs-per-job", type=int, default=1,
                   help="submitit: runs trained one after another in each job (default: 1)")
    g.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")


def executor_from_args(args: argparse.Namespace, out: str | Path) -> Any:
    from ..config import ConfigError, parse_override
    from .grid import make_executor

    params = {}
    for text in args.slurm:
        try:
            key, value = parse_override(text)
        except ConfigError as e:
            raise ConfigError(f"--slurm: {e}") from None
        params[".".join(key)] = value
    return make_executor(args.executor, jobs=args.jobs, address=args.address, folder=out, cluster=args.cluster,
                         parameters=params, runs_per_job=args.runs_per_job)


def _bench(args: argparse.Namespace) -> int:
    try:
        from .runner import run_study
    except ImportError as e:
        print(f"modbal bench: error: it needs {e.name}: pip install 'modbal[bench]'", file=sys.stderr)
        return 2
    from .study import builtin_studies, load_study

    if args.list:
        from .study import STUDIES_DIR

        for name in builtin_studies():
            print(f"{name:<24} {textwrap.shorten(load_study(STUDIES_DIR / f'{name}.yaml').description, 90)}")
        return 0
    if args.study is None:
        raise FileNotFoundError("bench needs a STUDY (a YAML file or a shipped study name; see --list)")
    study = load_study(args.study)
    out = Path(args.out or Path("runs") / "bench" / study.name)
    result = run_study(study, out, executor_from_args(args, out), threads=args.threads, progress=not args.quiet,
                       html=not args.no_html, dry_run=args.dry_run, table_only=args.table_only)
    return exit_status(result["failed"])


def exit_status(failed: list[str]) -> int:
    """0, or 1 after naming the failed runs on stderr (they are retried by rerunning the command)."""
    if not failed:
        return 0
    print(f"{len(failed)} runs failed (rerun the same command to retry them): " + ", ".join(failed), file=sys.stderr)
    return 1


def register(subparsers: Any) -> None:
    from ..report.cli import _guard

    b = subparsers.add_parser(
        "bench", help="fair method comparison: equal tuning budget, selection and report seeds, CIs, leaderboard",
        description="Run a study (a YAML file or a shipped study name): validate every (task, fusion, method) "
                    "first (what a method cannot serve is listed as n/a), choose each method's configuration on "
                    "validation over the selection seeds with the same budget for every method, re-train it on "
                    "fresh report seeds, and write leaderboard.md/.csv/.json/.html to --out. Finished runs are "
                    "reused: rerun the same command to resume.")
    b.add_argument("study", nargs="?", metavar="STUDY", help="study YAML, or a shipped study name (--list)")
    b.add_argument("--out", default=None, help="output folder (default: runs/bench/<study>)")
    b.add_argument("--list", action="store_true", help="list the shipped studies and exit")
    b.add_argument("--dry-run", action="store_true", help="validate and plan the grid, train nothing")
    b.add_argument("--table-only", action="store_true",
                   help="write the leaderboard from the runs already in --out, train nothing (cells whose runs "
                        "are missing are shown as unfinished)")
    b.add_argument("--no-html", action="store_true", help="skip leaderboard.html")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_executor_options(b)
    b.set_defaults(func=_guard("bench", _bench))
