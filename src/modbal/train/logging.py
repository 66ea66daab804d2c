"""The run directory's log files: ``steps.jsonl``, ``epochs.jsonl``, ``log.txt``, TensorBoard.

Only rank 0 writes (other ranks get a :class:`RunFiles` with ``enabled=False``). JSON lines are
flushed after each record; on resume, records written after the checkpoint being resumed are
cut off (:meth:`RunFiles.truncate`), so the files read as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .checkpoint import _json_default, atomic_write_text


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


class RunFiles:
    """Appends to the run directory's log files (no-op when ``enabled`` is False)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, echo: bool = False,
                 tensorboard: str | bool = "auto") -> None:
        self.dir = Path(run_dir)
        self.enabled, self.echo = enabled, echo
        self._handles: dict[str, Any] = {}
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tensorboard in ("auto", True):
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(str(self.dir / "tensorboard"))
                except Exception as e:  # tensorboard not installed
                    if tensorboard is True:
                        self.log(f"tensorboard requested but unavailable: {e}")

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

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{prefix}{k}", v, step)

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
        if self._tb is not None:
            self._tb.close()
            self._tb = None
