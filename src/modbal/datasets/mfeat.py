"""UCI Multiple Features (handwritten digits, six feature views), read in the original UCI layout.

Expected layout (a directory, e.g. the UCI archive ``mfeat.tar`` unpacked)::

    DIR/mfeat-fou   76 Fourier coefficients of the character shapes
    DIR/mfeat-fac   216 profile correlations
    DIR/mfeat-kar   64 Karhunen-Loève coefficients
    DIR/mfeat-pix   240 pixel averages in 2×3 windows
    DIR/mfeat-zer   47 Zernike moments
    DIR/mfeat-mor   6 morphological features

Each file is whitespace-separated text, one pattern per line, no header and no label: 2,000 lines,
200 per class in class order 0..9 (line i of every file is the same digit). Source: UCI Machine
Learning Repository, "Multiple Features" (Duin), CC BY 4.0.

Any 2..6 views can be chosen (3..6 make a set with many modalities; 2 works too); the
samples are split with a seeded stratified split (default 60/20/20) and each view is standardized
with the training mean and std (per feature; constant features get std 1).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..registry import DATASETS
from .base import DatasetSplits, TensorMultimodalDataset
from .io import DatasetFormatError, require_dir, require_file, stratified_split

VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
NUM_SAMPLES, PER_CLASS = 2000, 200
CLASS_NAMES = tuple(str(d) for d in range(10))


def read_view(root: str | os.PathLike, view: str) -> np.ndarray:
    """One view as a 2000 × d float32 array; errors name the file and what was expected."""
    if view not in VIEWS:
        raise ValueError(f"unknown mfeat view {view!r}; allowed values: {', '.join(VIEWS)}")
    path = require_file(Path(root) / f"mfeat-{view}",
                        f"{NUM_SAMPLES} lines of {VIEWS[view]} whitespace-separated numbers")
    rows = []
    with open(path, encoding="ascii", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                values = [float(v) for v in line.split()]
            except ValueError:
                raise DatasetFormatError(path, f"line {number}: expected numbers, got {line.strip()[:40]!r}") from None
            if len(values) != VIEWS[view]:
                raise DatasetFormatError(path, f"line {number}: expected {VIEWS[view]} values, got {len(values)}")
            rows.append(values)
    if len(rows) != NUM_SAMPLES:
        raise DatasetFormatError(path, f"expected {NUM_SAMPLES} rows ({PER_CLASS} per class, classes 0..9 in order), "
                                       f"got {len(rows)}")
    data = np.asarray(rows, np.float32)
    if not np.all(np.isfinite(data)):
        raise DatasetFormatError(path, "expected finite values, found NaN or infinity")
    return data


@DATASETS.register("mfeat")
def mfeat(root: str | os.PathLike | None = None, views: Sequence[str] = ("fou", "fac", "kar", "pix", "zer", "mor"),
          split: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> DatasetSplits:
    """UCI Multiple Features digits with the chosen views as modalities.

    Args:
        root: directory holding ``mfeat-<view>`` files (default ``$MODBAL_MFEAT``).
        views: 2..6 of fou, fac, kar, pix, zer, mor (each a modality, named by the view).
        split: train/val/test fractions of each class. seed: the split's seed.
    """
    root = root or os.environ.get("MODBAL_MFEAT")
    if not root:
        raise ValueError("mfeat needs root=<directory of mfeat-* files> (or $MODBAL_MFEAT)")
    folder = require_dir(root, "the UCI Multiple Features files mfeat-fou ... mfeat-mor")
    views = list(views)
    if not 2 <= len(views) <= 6 or len(set(views)) != len(views):
        raise ValueError(f"choose 2..6 distinct views of {list(VIEWS)}, got {views}")
    data = {v: read_view(folder, v) for v in views}
    labels = np.repeat(np.arange(10), PER_CLASS)
    parts = stratified_split(labels, split, seed)
    stats = {v: (x[parts[0]].mean(0), x[parts[0]].std(0)) for v, x in data.items()}
    splits = []
    for idx in parts:
        inputs = {v: torch.from_numpy((x[idx] - stats[v][0]) / np.where(stats[v][1] > 0, stats[v][1], 1.0))
                  for v, x in data.items()}
        splits.append(TensorMultimodalDataset({v: t.float() for v, t in inputs.items()},
                                              torch.from_numpy(labels[idx]), CLASS_NAMES))
    info = {"source": str(folder), "views": {v: VIEWS[v] for v in views}, "split": list(split), "seed": seed,
            "num_samples": {s: len(p) for s, p in zip(("train", "val", "test"), parts)}}
    return DatasetSplits("mfeat", train=splits[0], val=splits[1], test=splits[2], info=info)
