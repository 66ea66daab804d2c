"""The run directory's log files: ``steps.jsonl``, ``epochs.jsonl``, ``log.txt``, ``summary.json``,
and the optional experiment trackers (TensorBoard, Weights & Biases).

Only rank 0 writes (other ranks get a :class:`RunFiles` with ``enabled=False``). JSON lines are
flushed after each record; on resume, records written after the checkpoint being resumed are
cut off (:meth:`RunFiles.truncate`), so the files read as one uninterrupted run.

Trackers get every record on one x axis, the global step: per-step values as ``train/step/<key>``,
per-epoch values as ``train/epoch/<key>`` and ``val/<key>`` (logged at the step that ends the
epoch), the hyperparameters as a text summary at the start and beside the final test metrics at
the end. :class:`RunLogger` writes the same directory from one's own training loop.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .checkpoint import _json_default, atomic_write_json, atomic_write_text

#: trackers a run may log to besides its files (``train.tensorboard``, ``train.wandb``)
TRACKERS = ("tensorboard", "wandb")
#: files that mark a directory as holding a run
LOG_FILES = ("steps.jsonl", "epochs.jsonl", "summary.json")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (a torn last line, from a killed writer, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` → ``{"optim.lr": 0.1}`` (lists and other values kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _commit(folder: Path) -> dict[str, Any]:
    """The commit of the git work tree holding ``folder`` and whether tracked files differ from it."""
    commit = _git(["rev-parse", "HEAD"], folder)
    if not commit:
        return {}
    status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
    return {"commit": commit, "dirty": bool(status)}


def run_environment() -> dict[str, Any]:
    """What produced a run: modbal, torch and Python versions, the command line, the git commit of
    the working directory (when it is inside a repository) and of modbal's own source (when it is
    a checkout), and the plug-ins loaded."""
    import torch

    from .. import __version__
    from ..plugins import loaded_plugins

    argv = sys.argv or [""]
    env: dict[str, Any] = {
        "modbal": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "command": shlex.join([Path(argv[0]).name, *argv[1:]]),
    }
    try:
        here = _commit(Path.cwd())
    except OSError:  # the working directory was removed
        here = {}
    if here:
        env["git_commit"], env["git_dirty"] = here["commit"], here["dirty"]
    package = Path(__file__).resolve().parents[1]
    tracked = _git(["ls-files", "--error-unmatch", "__init__.py"], package) is not None  # a checkout, not site-packages
    source = _commit(package) if tracked else {}
    if source and source["commit"] != here.get("commit"):
        env["modbal_commit"], env["modbal_dirty"] = source["commit"], source["dirty"]
    plugins = loaded_plugins()
    if plugins:
        env["plugins"] = plugins
    return env


# -- trackers ----------------------------------------------------------------------------------
class _TensorBoard:
    """Scalars under one global-step axis; hyperparameters as text, and with the final metrics."""

    def __init__(self, folder: Path, purge_step: int | None) -> None:
        from ..extras import require

        require("tensorboard", "TensorBoard logging (train.tensorboard)")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def hparams(self, hparams: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v!r}" for k, v in flatten(hparams).items())
        self.writer.add_text("hparams", text, 0)

    def finish(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        if hparams and metrics:
            values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(hparams).items()}
            self.writer.add_hparams(values, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """A Weights & Biases run in ``RUN_DIR/wandb/`` (project from ``WANDB_PROJECT``, default
    ``modbal``; ``WANDB_MODE=offline`` keeps it local). A resumed run continues the same W&B run."""

    def __init__(self, folder: Path, name: str) -> None:
        from ..extras import require

        self.wandb = require("wandb", "Weights & Biases logging (train.wandb)")
        id_file = folder / "wandb" / "modbal-run-id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
        self.run = self.wandb.init(dir=str(folder), id=run_id, resume="allow", name=name,
                                   project=os.environ.get("WANDB_PROJECT", "modbal"))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def hparams(self, hparams: Mapping[str, Any]) -> None:
        self.run.config.update(dict(hparams), allow_val_change=True)

    def finish(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def close(self) -> None:
        self.run.finish()


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def step_tags(record: Mapping[str, Any]) -> dict[str, float]:
    """A ``steps.jsonl`` record as tracker scalars: ``train/step/<key>`` (epoch and step left out)."""
    return {f"train/step/{k}": v for k, v in _numbers(record).items() if k not in ("epoch", "step")}


def epoch_tags(record: Mapping[str, Any]) -> dict[str, float]:
    """An ``epochs.jsonl`` record as tracker scalars: ``val/*`` and ``val_before_change/*`` (a
    method's pre-rollback validation) kept, ``train/<key>`` and unprefixed keys (``lr``,
    ``time_s``) under ``train/epoch/``."""
    out = {}
    for key, value in _numbers(record).items():
        if key == "epoch":
            continue
        if key.startswith(("val/", "val_before_change/")):
            out[key] = value
        else:
            out["train/epoch/" + key.removeprefix("train/")] = value
    return out


class RunFiles:
    """Appends to the run directory's log files (no-op when ``enabled`` is False) and feeds the
    trackers: TensorBoard (``tensorboard``: ``"auto"`` when installed, True, False) and Weights &
    Biases (``wandb``: True or False). Trackers start with :meth:`start`, once the run knows the
    step it starts from."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, echo: bool = False,
                 tensorboard: str | bool = "auto", wandb: bool = False) -> None:
        self.dir = Path(run_dir)
        self.enabled, self.echo = enabled, echo
        self.tensorboard, self.wandb = tensorboard, wandb
        self._handles: dict[str, Any] = {}
        self._trackers: list[Any] = []
        self._hparams: dict[str, Any] = {}
        self._started = False
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def start(self, hparams: Mapping[str, Any] | None = None, step: int = 0, name: str | None = None) -> None:
        """Open the trackers (a resumed run passes the step it resumes at: TensorBoard drops the
        events it had logged from there on) and record ``hparams``."""
        if not self.enabled or self._started:
            return
        self._started = True
        self._hparams = dict(hparams or {})
        if self.tensorboard in ("auto", True):
            try:
                self._trackers.append(_TensorBoard(self.dir / "tensorboard", purge_step=step or None))
            except ImportError as e:
                if self.tensorboard is True:
                    raise
                self.log(f"TensorBoard logging off: {e}")
        if self.wandb:
            self._trackers.append(_Wandb(self.dir, name or self.dir.name))
        for tracker in self._trackers:
            tracker.hparams(self._hparams)
        self.log("environment: " + json.dumps(run_environment()))

    def _file(self, name: str):
        if name not in self._handles:
            self._handles[name] = open(self.dir / name, "a", encoding="utf-8")
        return self._handles[name]

    def append(self, name: str, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        f = self._file(name)
        f.write(json.dumps({k: _clean(v) for k, v in record.items()}, default=_json_default) + "\n")
        f.flush()

    def log_step(self, record: Mapping[str, Any], step: int) -> None:
        """One ``steps.jsonl`` record; trackers get ``train/step/<key>`` at ``step``."""
        self.append("steps.jsonl", record)
        self._scalars(step_tags(record), step)

    def log_epoch(self, record: Mapping[str, Any], step: int) -> None:
        """One ``epochs.jsonl`` record; trackers get ``train/epoch/<key>`` and ``val/<key>`` at
        ``step``, the global step that ended the epoch."""
        self.append("epochs.jsonl", record)
        self._scalars(epoch_tags(record), step)

    def _scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.enabled and values:
            for tracker in self._trackers:
                tracker.scalars(values, step)

    def log(self, message: str) -> None:
        """A timestamped line in ``log.txt`` (and on stderr unless quiet)."""
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        f = self._file("log.txt")
        f.write(line + "\n")
        f.flush()
        if self.echo:
            print(message, file=sys.stderr, flush=True)

    def finish(self, metrics: Mapping[str, Any]) -> None:
        """Give the trackers the final metrics (``test/acc``, …) beside the hyperparameters."""
        if self.enabled:
            for tracker in self._trackers:
                tracker.finish(self._hparams, _numbers(metrics))

    def truncate(self, name: str, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Rewrite ``name`` (atomically) keeping the records for which ``keep`` is true."""
        if not self.enabled or not (self.dir / name).is_file():
            return 0
        self._close(name)
        rows = read_jsonl(self.dir / name)
        kept = [r for r in rows if keep(r)]
        atomic_write_text(self.dir / name, "".join(json.dumps(r) + "\n" for r in kept))
        return len(rows) - len(kept)

    def _close(self, name: str) -> None:
        f = self._handles.pop(name, None)
        if f is not None:
            f.close()

    def close(self) -> None:
        for name in list(self._handles):
            self._close(name)
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close()


class RunLogger:
    """A run directory written from one's own training loop, with the runner's files, so that
    ``modbal report`` reads it beside the runner's runs.

    >>> with RunLogger("runs/mine", dataset="mydata", method="agm", modalities=["audio", "image"],
    ...                hparams={"lr": 0.01, "alpha": 1.5}) as log:
    ...     for epoch in range(epochs):
    ...         for inputs, targets in loader:
    ...             ...
    ...             log.log_step({"loss": loss.item(), **method.statistics()})
    ...         log.log_epoch({"train/loss": train_loss, "val/acc": val_acc})
    ...     log.finish(test={"acc": test_acc, "macro_f1": test_f1})

    Files: ``steps.jsonl`` (``epoch``, ``step`` and your values), ``epochs.jsonl`` (``epoch`` and
    your values: ``train/<key>``, ``val/<key>``; ``val/mono_acc/<m>`` is plotted per modality),
    ``summary.json`` (dataset, method, fusion, seed, modalities, best_epoch, val, test, elapsed_s,
    status, hparams, environment), ``log.txt``, and ``tensorboard/`` / ``wandb/`` with
    ``tensorboard=True|"auto"`` / ``wandb=True``. Leaving the ``with`` block on an exception
    records ``status: "failed"``. The directory must not already hold a run.
    """

    def __init__(self, run_dir: str | Path, *, dataset: str, method: str, modalities: Sequence[str],
                 fusion: str = "custom", seed: int = 0, hparams: Mapping[str, Any] | None = None,
                 tensorboard: str | bool = "auto", wandb: bool = False, echo: bool = False) -> None:
        self.dir = Path(run_dir)
        held = [f for f in LOG_FILES if (self.dir / f).exists()]
        if held:
            raise FileExistsError(f"{str(self.dir)!r} already holds a run ({', '.join(held)}); choose another folder")
        self.identity = {"dataset": str(dataset), "method": str(method), "fusion": str(fusion), "seed": int(seed),
                         "modalities": [str(m) for m in modalities]}
        self.hparams = dict(hparams or {})
        self.files = RunFiles(self.dir, echo=echo, tensorboard=tensorboard, wandb=wandb)
        self.files.start({**self.identity, **self.hparams}, name=f"{method}-seed{seed}")
        self.step = 0  # steps logged so far (the global step of the next log_step is step + 1)
        self.epoch = 0  # the epoch log_step records are attributed to
        self.summary: dict[str, Any] | None = None
        self._started = time.perf_counter()
        self.files.log(f"started {method} on {dataset} ({fusion}), seed {seed}")

    def log_step(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """One training step: ``values`` such as ``loss``, ``acc``, ``lr``, ``method.statistics()``.
        ``step`` (the global step, counting from 1) defaults to one more than the last one."""
        self.step = self.step + 1 if step is None else int(step)
        self.files.log_step({"epoch": self.epoch, "step": self.step, **values}, self.step)

    def log_epoch(self, values: Mapping[str, Any], epoch: int | None = None) -> None:
        """One finished epoch (0-based; default: the next one): ``train/loss``, ``val/acc``,
        ``val/mono_acc/<m>``, … The following steps count towards the next epoch."""
        epoch = self.epoch if epoch is None else int(epoch)
        self.files.log_epoch({"epoch": epoch, **values}, self.step)
        self.epoch = epoch + 1

    def log(self, message: str) -> None:
        """A line in ``log.txt``."""
        self.files.log(message)

    def finish(self, test: Mapping[str, Any] | None = None, val: Mapping[str, Any] | None = None,
               best_epoch: int | None = None, status: str = "complete", **extra: Any) -> dict[str, Any]:
        """Write ``summary.json`` (``test``/``val``: metric dicts such as ``{"acc": 0.91, "macro_f1":
        0.9, "mono_acc/audio": 0.6}``; ``extra`` keys are added as they are) and close the files.
        Returns the summary."""
        if self.summary is not None:
            return self.summary
        test, val = dict(test or {}), dict(val or {})
        self.summary = {**self.identity, "best_epoch": self.epoch - 1 if best_epoch is None else int(best_epoch),
                        "epochs": self.epoch, "val": val, "test": test,
                        "elapsed_s": time.perf_counter() - self._started, "status": status,
                        "hparams": self.hparams, "environment": run_environment(), **extra}
        atomic_write_json(self.dir / "summary.json", self.summary)
        self.files.finish({f"test/{k}": v for k, v in test.items()})
        self.files.log(f"{status}: " + " ".join(f"test {k} {v}" for k, v in test.items()))
        self.files.close()
        return self.summary

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if error is not None:
            self.finish(status="failed", error=f"{kind.__name__}: {error}")
        else:
            self.finish()
