"""An exclusive lock on a run directory for the whole life of a run (``RUN_DIR/.lock``).

The lock is an OS file lock (``fcntl.flock``) on ``.lock``, which also records who holds it (pid,
host, start time) for the message another process gets. The operating system releases the lock
when its holder exits in any way, SIGKILL included, so a lock file left by a killed process is
detected as stale (the lock is free although the file names a holder) and taken over. Where the
platform or file system has no ``flock``, the lock file is created exclusively and one naming a
process of this host that no longer runs is stale.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: the pid + host check alone
    fcntl = None

LOCK_NAME = ".lock"


class RunDirLocked(RuntimeError):
    """Another process holds the run directory."""


def _read(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    """``pid 123 on host h, since <time>`` (or "another process" when the file names nobody yet)."""
    if not holder.get("pid"):
        return "another process"
    since = f", since {holder['started']}" if holder.get("started") else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


def _alive_here(holder: dict[str, Any]) -> bool:
    """Whether the holder named in a lock file still runs (unknown hosts count as alive)."""
    if holder.get("host") != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def live_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s lock, as its lock file records, when that process still runs
    (a holder on another host counts as running). Reads only; takes no lock."""
    holder = _read(Path(run_dir) / LOCK_NAME)
    return holder if holder and _alive_here(holder) else None


class RunDirLock:
    """``with RunDirLock(run_dir): ...`` holds ``run_dir/.lock`` exclusively (see the module doc).

    ``acquire()`` raises :class:`RunDirLocked` naming the holder; ``stale`` then tells the holder
    of a lock taken over from a process that died (None when the lock was free and unclaimed).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, previous = self._lock_posix() if fcntl is not None else self._lock_pid_file()
        self.fd, self.stale = fd, previous or None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        return self

    def _lock_posix(self) -> tuple[int, dict[str, Any]]:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirLocked(self._busy(self._flock_holder())) from None
            except OSError as e:  # a file system without flock (some network mounts): pid + host alone
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                return self._lock_pid_file()
            try:  # the previous holder removed the file after we opened it: lock the current one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd, _read(self.path)
            except FileNotFoundError:
                pass
            os.close(fd)

    def _flock_holder(self, wait_s: float = 2.0) -> dict[str, Any]:
        """Who holds the file lock: a process that has just taken it writes its name a moment
        later, so until then the file is empty or still names the previous (dead) holder."""
        deadline = time.monotonic() + wait_s
        while True:
            holder = _read(self.path)
            if (holder and _alive_here(holder)) or time.monotonic() > deadline:
                return holder
            time.sleep(0.01)

    def _lock_pid_file(self) -> tuple[int, dict[str, Any]]:
        previous: dict[str, Any] = {}
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), previous
            except FileExistsError:
                holder = _read(self.path)
                if _alive_here(holder):
                    raise RunDirLocked(self._busy(holder)) from None
                previous = holder
                self.path.unlink(missing_ok=True)

    def _busy(self, holder: dict[str, Any]) -> str:
        return (f"run directory {str(self.path.parent)!r} is in use by {describe(holder)} (lock file "
                f"{str(self.path)!r}); wait for that run to end, or stop it")

    def release(self) -> None:
        """Remove the lock file, then let go (others that opened the old file notice and retry)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
