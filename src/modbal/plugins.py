"""Plug-ins: user code that registers methods, fusions, encoders or datasets.

Three ways to bring them in, all of them plain Python imports (importing a module runs its code,
so import only code you trust):

* ``imports: [mypkg.parts]`` in a recipe (or the override ``imports=[mypkg.parts]``): imported
  when the config is resolved, before it is validated, and kept in the run's ``config.yaml``, so
  ``--resume``, ``modbal eval`` and ``modbal analyze`` import them again.
* ``modbal --import mypkg.parts COMMAND ...`` (anywhere on the command line, any command):
  imported at start; the command and its child processes (``sweep --jobs`` workers) see them
  through the environment variable ``MODBAL_IMPORTS``, and every config resolved meanwhile
  records them in its ``imports``.
* an installed package declaring an entry point in the group ``modbal.plugins`` (the module to
  import, or a ``module:function`` called without arguments), loaded the first time a registry
  is looked up.

Module names resolve like ``python -m``: the current folder is searched first, then ``sys.path``.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Iterable, Iterator

#: the environment variable carrying ``--import`` modules to child processes (comma-separated)
ENV = "MODBAL_IMPORTS"
#: the entry-point group installed packages declare their plug-in module in
GROUP = "modbal.plugins"

_entry_points: dict[str, str] | None = None  # name → value of the entry points loaded so far


class PluginError(ImportError):
    """A plug-in module that cannot be imported; the message names it and why."""


def requested() -> list[str]:
    """The modules the command line asked for (``MODBAL_IMPORTS``)."""
    return [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or not all(part.isidentifier() for part in name.split(".")):
        raise PluginError(f"{where}: {name!r} is not a module name (dotted Python identifiers, e.g. mypkg.parts)")
    return name


def import_modules(names: Iterable[str], where: str = "imports") -> list[str]:
    """Import each module (the current folder first on the path, as ``python -m`` does) and
    return the names; :class:`PluginError` naming the module and the cause when one fails."""
    names = [_check_name(n, where) for n in names]
    cwd = os.getcwd()
    if names and cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            hint = (" (is it in the current folder or on PYTHONPATH?)"
                    if isinstance(e, ModuleNotFoundError) and e.name == name.split(".")[0] else "")
            raise PluginError(f"{where}: importing {name!r} failed: {type(e).__name__}: {e}{hint}") from e
    return names


def merged_imports(names: Any, where: str = "imports") -> list[str]:
    """``names`` (a config's ``imports``: a list of module names, or None) followed by the command
    line's, without repeats, all imported."""
    if names is None:
        names = []
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise PluginError(f"{where} must be a list of module names, got {names!r}")
    merged = list(dict.fromkeys([*names, *requested()]))
    return import_modules(merged, where)


@contextmanager
def session(names: Iterable[str]) -> Iterator[list[str]]:
    """Import ``names`` and publish them in ``MODBAL_IMPORTS`` for the duration (the command and
    the processes it starts); the variable is restored afterwards."""
    before = os.environ.get(ENV)
    merged = list(dict.fromkeys([*requested(), *names]))
    import_modules(merged, "--import")
    if merged:
        os.environ[ENV] = ",".join(merged)
    try:
        yield merged
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def split_import_args(argv: Iterable[str]) -> tuple[list[str], list[str]]:
    """``--import M`` / ``--import=M`` taken out of a command line (anywhere before a bare ``--``):
    ``(modules, the other arguments)``."""
    modules, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
            break
        if arg == "--import":
            value = next(args, None)
            if value is None or value.startswith("-"):
                raise PluginError("--import needs a MODULE (e.g. --import mypkg.parts)")
            modules.append(value)
        elif arg.startswith("--import="):
            modules.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return modules, rest


def load_entry_points() -> None:
    """Import the plug-ins installed packages declare (group ``modbal.plugins``), once per process.
    A broken plug-in is reported as a warning naming it, and skipped."""
    global _entry_points
    if _entry_points is not None:
        return
    _entry_points = {}
    for ep in metadata.entry_points(group=GROUP):
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, type):
                loaded()
        except Exception as e:  # noqa: BLE001  (one broken package must not stop modbal)
            warnings.warn(f"modbal plug-in {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}",
                          stacklevel=2)
            continue
        _entry_points[ep.name] = ep.value


def loaded_plugins() -> dict[str, str]:
    """The entry-point plug-ins loaded in this process (name → what the entry point names)."""
    return dict(_entry_points or {})
