"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is one ``torch.save`` dict: ``model``, ``optimizer``, ``scheduler``, ``scaler``,
``method`` (the method's ``state_dict()``), ``rng`` (torch CPU/CUDA, numpy, python), ``sampler``
(the training sampler's seed, epoch and position: its permutation is regenerated from these),
``loop`` (epoch, step in epoch, global step, the epoch's running sums, best-so-far) and
``config``. Files are written to a temporary name in the same folder and moved into place with
``os.replace``, so a reader (or a crash) never sees a half-written checkpoint; a temporary left by
a killed writer is removed when the run resumes (:func:`remove_stale_temporaries`).

Everything in a checkpoint is a tensor or a plain value (numbers, strings, lists, dicts), so it is
read with ``torch.load(weights_only=True)``, which never runs code a file holds: a checkpoint from
elsewhere (run directories get shared) cannot execute anything when modbal loads it.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

FORMAT = 2          # 2: RNG states as tensors and lists (format 1 held numpy's state as an array)
READABLE = (1, 2)
# what format 1 needs besides tensors: numpy's RNG key, a plain uint32 array (no code can run through these)
_NUMPY_ARRAY = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (_reconstruct, "numpy.core.multiarray._reconstruct"),
                (_reconstruct, "numpy._core.multiarray._reconstruct")]


class CheckpointError(ConfigError):
    """A checkpoint that is missing, unreadable, refused (it could run code) or not modbal's."""


def _atomic_write(path: str | Path, write: Any, mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`atomic_save`, safely: tensors and plain values only.

    ``torch.load(weights_only=True)`` never runs code a file holds; a file holding anything else (a
    pickled object that would run code when loaded) is refused. Raises :class:`CheckpointError`
    (one line naming the file) when the file is missing, unreadable, refused or not modbal's.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's remarks on foreign files; the error says it
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(e))
        if found is None:  # not a class or function the file names: a damaged file
            raise CheckpointError(f"checkpoint {str(path)!r} is unreadable, damaged or not a checkpoint "
                                  f"(UnpicklingError)") from None
        raise CheckpointError(f"refused to load checkpoint {str(path)!r}: it holds a Python object "
                              f"({found.group(1) or found.group(2)}) that could run code when loaded, not only "
                              f"tensors and plain values; modbal writes no such file, so do not trust its "
                              f"source") from None
    except Exception as e:  # empty, truncated or overwritten files fail in many ways (EOF, zip, OS errors)
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable, empty or truncated "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE:
        raise CheckpointError(f"{str(path)!r} is not a modbal checkpoint (format {FORMAT})")
    return state


def _first_line(error: BaseException) -> str:
    """The error's first sentence (torch's messages run on with advice)."""
    text = str(error).strip().splitlines()
    return text[0].split(". ")[0][:160] if text else "no detail"


def rng_state() -> dict[str, Any]:
    """The global random states (torch CPU and every CUDA device, numpy, python) as tensors and
    plain values, so a checkpoint loads with ``weights_only=True``."""
    bit_generator, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": str(bit_generator), "key": torch.from_numpy(key.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": _python_state(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (also the format-1 layout, which kept numpy's state as a tuple)."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = (saved["bit_generator"], saved["key"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                 saved["cached_gaussian"])
    np.random.set_state(saved)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files :func:`atomic_save` / :func:`atomic_write_text` leave behind when
    the process is killed mid-write (``.<name>.<random>.tmp``, for the given ``names`` only)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"\.(" + "|".join(re.escape(n) for n in names) + r")\.[A-Za-z0-9_]+\.tmp")
    removed = []
    for p in folder.iterdir():
        if pattern.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
