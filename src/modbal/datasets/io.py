"""File checks shared by the dataset loaders, and where built datasets are cached.

Every loader reads through these helpers so that a bad file stops with a
:class:`DatasetFormatError` whose message names the file and what was expected.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

CACHE_ENV = "MODBAL_CACHE"


class DatasetFormatError(ValueError):
    """A dataset file is missing, truncated, wrongly shaped or holds values out of range."""

    def __init__(self, path: str | os.PathLike, problem: str | None = None) -> None:
        if problem is None:  # re-raised by a DataLoader worker: one argument, the worker's traceback
            lines = [line for line in str(path).splitlines() if f"{type(self).__name__}: " in line]
            text = lines[-1].split(f"{type(self).__name__}: ", 1)[1] if lines else str(path).strip()
            path, _, problem = text.partition(": ")
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``override``, else ``$MODBAL_CACHE``, else ``~/.cache/modbal``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modbal"


def require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DatasetFormatError(p, f"expected a directory holding {what}; it does not exist")
    return p


def require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DatasetFormatError(p, f"missing file; expected {what}")
    return p


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"


def check_shape(path: str | os.PathLike, array: np.ndarray, shape: Sequence[int | None], what: str) -> None:
    """Check ``array.shape`` against ``shape`` where ``None`` matches any size."""
    ok = array.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, array.shape))
    if not ok:
        raise DatasetFormatError(path, f"expected {what} of shape {_shape_text(shape)}, got {tuple(array.shape)}")


def load_npy(path: str | os.PathLike, shape: Sequence[int | None], what: str) -> np.ndarray:
    """Load a ``.npy`` file, turning numpy's errors on a truncated file into one naming the file."""
    p = require_file(path, f"{what} of shape {_shape_text(shape)} (.npy)")
    try:
        array = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DatasetFormatError(p, f"cannot read {what} (truncated or not a .npy file): {err}") from None
    check_shape(p, array, shape, what)
    return array


def check_labels(path: str | os.PathLike, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer labels in ``[0, num_classes)`` as int64; error naming the file otherwise."""
    labels = np.asarray(labels)
    if labels.size and not np.all(np.isfinite(labels.astype(np.float64))):
        raise DatasetFormatError(path, "labels contain NaN or infinite values")
    as_int = labels.astype(np.int64)
    if labels.size and not np.array_equal(as_int, labels):
        raise DatasetFormatError(path, "expected integer class labels")
    if labels.size and (as_int.min() < 0 or as_int.max() >= num_classes):
        raise DatasetFormatError(path, f"expected labels in [0, {num_classes}), "
                                       f"got values in [{as_int.min()}, {as_int.max()}]")
    return as_int


def check_same_length(path: str | os.PathLike, n_expected: int, n_got: int, what: str) -> None:
    if n_expected != n_got:
        raise DatasetFormatError(path, f"expected {n_expected} {what} (one per label), got {n_got}")


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into parts of the given fractions within every class (seeded, sorted output)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)
    if not np.isclose(bounds[-1], 1.0):
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)}")
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(bounds[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]
