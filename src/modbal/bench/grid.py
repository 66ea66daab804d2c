"""The grid engine behind ``modbal sweep`` and ``modbal bench``: a list of runs, each keyed by its
resolved config, trained by an interchangeable executor, read back from run directories only.

A :class:`Job` is a resolved config and the run directory it trains into. The engine is idempotent:
a run whose ``summary.json`` says ``complete`` (or that stopped on non-finite values, which a
rerun would repeat) is never trained again; one that left a ``config.yaml`` is resumed from its
last checkpoint (``run_experiment(..., resume=True)``: exact, or from scratch when no checkpoint
was written yet); the rest start fresh. Two jobs with the same config are one run. So a killed
grid is resumed by running it again, and any executor leaves the same run directories:

- :class:`LocalExecutor` — in this process (``jobs=1``) or ``jobs`` spawned worker processes;
- :class:`RayExecutor` — tasks on a Ray cluster (``address``; none: a local one started here);
- :class:`SubmititExecutor` — Slurm jobs through submitit (``cluster="local"`` runs them as local
  processes, ``"slurm"`` submits them).

The run directories must be visible to every worker (a shared file system on a cluster); the
results are read from them, never from what a worker returns.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

Call = tuple[Mapping[str, Any], str, "int | None"]  # (config, run_dir, torch threads)
Outcome = tuple[str, "str | None"]  # (run_dir, error or None)


class GridError(ValueError):
    """A grid or executor setting a user can fix."""


def config_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a resolved config (``run_dir`` left out): what identifies a run."""
    body = {k: v for k, v in config.items() if k != "run_dir"}
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Job:
    """One run: its resolved config and the directory it trains into."""

    run_dir: str
    config: Mapping[str, Any] = field(compare=False, hash=False)
    key: str = ""

    @classmethod
    def of(cls, config: Mapping[str, Any], run_dir: str | Path) -> "Job":
        return cls(str(run_dir), config, config_key(config))


def run_status(run_dir: str | Path) -> str:
    """``"complete"``, ``"diverged"`` (stopped on non-finite values: final), ``"resume"`` (the run
    was started: a ``config.yaml`` exists) or ``"new"``."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
        except (json.JSONDecodeError, OSError):
            data = {}
        status = data.get("status") if isinstance(data, dict) else None
        if status == "complete":
            return "complete"
        if status == "failed" and str(data.get("error", "")).startswith("FloatingPointError"):
            return "diverged"
    if (run_dir / "config.yaml").is_file() or (run_dir / "checkpoints" / "last.pt").is_file():
        return "resume"
    return "new"


def train_run(config: Mapping[str, Any] | None, run_dir: str, resume: bool) -> None:
    """Train one run (the engine's only contact with the runner; tests replace it)."""
    from ..train.run import run_experiment

    run_experiment(None if resume else config, run_dir, resume=resume, quiet=True)


def execute(config: Mapping[str, Any], run_dir: str, threads: int | None = None) -> Outcome:
    """Train or resume one run in whatever process an executor chose; never raises (one failed
    run must not stop the grid). Top-level so that every executor can pickle it."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        if run_status(run_dir) in ("complete", "diverged"):  # another worker (or an earlier study) did it
            return run_dir, None
        resume = (Path(run_dir) / "config.yaml").is_file()
        if resume:
            _check_same_config(config, run_dir)
        train_run(config, run_dir, resume)
        return run_dir, None
    except Exception as e:  # noqa: BLE001
        return run_dir, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def _check_same_config(config: Mapping[str, Any], run_dir: str) -> None:
    from ..config import ConfigError, load_yaml, resolve

    path = Path(run_dir) / "config.yaml"
    saved = resolve(load_yaml(path.read_text()), source=str(path))
    if config_key(saved) != config_key(resolve(dict(config))):
        raise ConfigError(f"{run_dir} holds a run of another config; move it away or choose another output folder")


# -- executors ---------------------------------------------------------------------------------
class Executor(Protocol):
    """Runs ``execute`` over calls and yields the outcomes in the order they finish."""

    def run(self, calls: Sequence[Call]) -> Iterator[Outcome]: ...


class LocalExecutor:
    """Local runs: sequentially in this process (``jobs=1``) or in ``jobs`` spawned processes."""

    def __init__(self, jobs: int = 1) -> None:
        if jobs < 1:
            raise GridError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs

    def run(self, calls: Sequence[Call]) -> Iterator[Outcome]:
        if self.jobs == 1 or len(calls) <= 1:
            for call in calls:
                yield execute(*call)
            return
        with ProcessPoolExecutor(max_workers=min(self.jobs, len(calls)), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(execute, *call) for call in calls]
            for future in as_completed(futures):
                yield future.result()


def _optional(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise GridError(f"this executor needs {module}: pip install 'modbal[{extra}]'") from None


class RayExecutor:
    """Ray tasks (one CPU each by default). ``address``: an existing cluster (``"auto"`` or
    ``"ray://host:10001"``); None starts a local Ray for the grid and stops it afterwards."""

    def __init__(self, address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
                 num_cpus: int | None = None) -> None:
        self.address, self.cpus, self.gpus, self.num_cpus = address, cpus_per_run, gpus_per_run, num_cpus

    def run(self, calls: Sequence[Call]) -> Iterator[Outcome]:
        ray = _optional("ray", "ray")
        started = not ray.is_initialized()
        if started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                kwargs["num_cpus"] = self.num_cpus
            ray.init(address=self.address, **kwargs)
        try:
            remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(execute)
            pending = {remote.remote(*call): call for call in calls}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                call = pending.pop(done[0])
                try:
                    yield ray.get(done[0])
                except Exception as e:  # noqa: BLE001  (a worker that died: the run is retried on a rerun)
                    yield call[1], f"{type(e).__name__}: {e}"
        finally:
            if started:
                ray.shutdown()


def execute_many(calls: Sequence[Call]) -> list[Outcome]:
    """Several runs one after another in one process (one scheduler job for several short runs)."""
    return [execute(*call) for call in calls]


class SubmititExecutor:
    """Submitit jobs of ``runs_per_job`` runs each. ``cluster``: ``"slurm"``, ``"local"`` (local
    processes) or None (Slurm when available, else local); ``parameters`` go to
    ``update_parameters`` (e.g. ``slurm_partition``, ``timeout_min``, ``gpus_per_node``)."""

    def __init__(self, folder: str | Path, cluster: str | None = None, parameters: Mapping[str, Any] | None = None,
                 runs_per_job: int = 1, poll_s: float = 0.5) -> None:
        if runs_per_job < 1:
            raise GridError(f"runs per job must be >= 1, got {runs_per_job}")
        self.folder, self.cluster, self.parameters = Path(folder), cluster, dict(parameters or {})
        self.runs_per_job, self.poll_s = runs_per_job, poll_s

    def run(self, calls: Sequence[Call]) -> Iterator[Outcome]:
        submitit = _optional("submitit", "slurm")
        executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
        params = {"timeout_min": 60, **self.parameters}
        try:
            executor.update_parameters(**params)
        except (TypeError, ValueError) as e:
            raise GridError(f"submitit parameters {params}: {e}") from None
        chunks = [list(calls[i:i + self.runs_per_job]) for i in range(0, len(calls), self.runs_per_job)]
        pending = {executor.submit(execute_many, chunk): chunk for chunk in chunks}
        while pending:
            finished = [job for job in pending if job.done()]
            if not finished:
                time.sleep(self.poll_s)
                continue
            for job in finished:
                chunk = pending.pop(job)
                try:
                    yield from job.result()
                except Exception as e:  # noqa: BLE001  (a job killed by the scheduler: retried on a rerun)
                    reason = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                    for call in chunk:
                        yield call[1], f"{type(e).__name__}: {reason}"


def make_executor(name: str = "local", jobs: int = 1, address: str | None = None, folder: str | Path = ".",
                  cluster: str | None = None, parameters: Mapping[str, Any] | None = None,
                  runs_per_job: int = 1) -> Executor:
    """The executor a command-line option names: ``local``, ``ray`` or ``submitit``."""
    if name == "local":
        return LocalExecutor(jobs)
    if name == "ray":
        return RayExecutor(address)
    if name == "submitit":
        return SubmititExecutor(Path(folder) / "submitit", cluster, parameters, runs_per_job)
    raise GridError(f"unknown executor {name!r}; allowed values: local, ray, submitit")


# -- the grid ----------------------------------------------------------------------------------
@dataclass
class GridResult:
    runs: list[str]  # every job's run directory, in job order
    skipped: list[str]  # complete or diverged before this call
    failed: dict[str, str]  # run directory → error, for runs that did not finish now
    trained: list[str]  # runs this call trained or resumed (diverged ones included)


def unique(jobs: Iterable[Job]) -> list[Job]:
    """Jobs with distinct configs, in order (a config listed twice is one run); two configs sharing
    a run directory are an error."""
    by_key: dict[str, Job] = {}
    by_dir: dict[str, str] = {}
    for job in jobs:
        if by_dir.setdefault(job.run_dir, job.key) != job.key:
            raise GridError(f"two different configs map to the run directory {job.run_dir}")
        by_key.setdefault(job.key, job)
    return list(by_key.values())


def run_grid(jobs: Sequence[Job], executor: Executor | None = None, threads: int | None = None,
             name: str = "grid", where: str | Path = "", echo: Callable[[str], None] = print,
             progress: bool = True) -> GridResult:
    """Train every job that is not complete (see the module docstring); a progress bar with ETA."""
    from tqdm.auto import tqdm

    executor = executor or LocalExecutor()
    jobs = unique(jobs)
    status = {j.run_dir: run_status(j.run_dir) for j in jobs}
    skipped = [j.run_dir for j in jobs if status[j.run_dir] in ("complete", "diverged")]
    todo = [j for j in jobs if status[j.run_dir] not in ("complete", "diverged")]
    resume = sum(status[j.run_dir] == "resume" for j in todo)
    echo(f"{name}: {len(jobs)} runs, {len(skipped)} complete, {resume} to resume, {len(todo) - resume} new"
         + (f" → {where}" if where else ""))
    failed: dict[str, str] = {}
    if todo:
        calls = [(dict(j.config), j.run_dir, threads) for j in todo]
        bar = tqdm(total=len(todo), desc=name, unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        try:
            say = bar.write if progress else echo
            for run_dir, error in executor.run(calls):
                outcome = run_status(run_dir)  # what the run directory says, not what the worker returned
                if outcome == "diverged":
                    say(f"  diverged {run_dir}: {(error or '').splitlines()[0] if error else ''}")
                elif outcome != "complete":
                    failed[run_dir] = error or "the run ended without a complete summary.json"
                    say(f"  failed   {run_dir}: {failed[run_dir].splitlines()[0]}")
                elif not progress:
                    echo(f"  finished {run_dir}")
                bar.update(1)
        finally:
            bar.close()
    return GridResult([j.run_dir for j in jobs], skipped, failed, [j.run_dir for j in todo])
