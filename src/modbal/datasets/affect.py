"""UR-Funny and CMU-MOSEI from the MultiBench affect pickles (vision, audio, text sequences).

Expected file (``root`` is the file or the directory holding it): one pickle (MultiBench's ``humor.pkl`` for UR-Funny,
``mosei_senti_data.pkl`` for CMU-MOSEI) holding ``{"train": d, "valid": d, "test": d}`` where each ``d`` is a dict with

    "vision": N×T×Fv, "audio": N×T×Fa, "text": N×T×Ft   float arrays (zero-padded in front)
    "labels": N, N×1 or N×1×1                           humor 0/1, or sentiment in [-3, 3]

(extra keys such as ``"id"`` are ignored). Source: MultiBench (Liang et al., 2021), whose
``datasets/affect/get_data.py`` reads these pickles; the features are the CMU-MultimodalSDK ones
(UR-Funny: OpenFace 371-d vision, COVAREP 81-d audio, GloVe 300-d text; MOSEI: 35-d Facet,
74-d COVAREP, 300-d GloVe). Feature sizes and T are read from the data, not assumed.

The pickle is read with :class:`ArraysOnlyUnpickler`, which admits numpy arrays and plain values
only; still, a pickle is code as much as data: use files from a source you trust.

Preprocessing: NaN and ±inf set to 0 (the raw features contain -inf). Binary labels:

* UR-Funny: humor = 1, not humor = 0 (labels stored as 0/1, or as -1/+1 which maps to 0/1).
* CMU-MOSEI (``binary="positive"``, default): 1 if sentiment > 0, else 0 (negative *and neutral*
  are class 0) — MultiBench's binary accuracy with zeros kept counts a label as positive when > 0.
  ``binary="nonnegative"``: 1 if sentiment ≥ 0 (the "negative / non-negative" Acc-2 many papers
  report). ``binary="exclude_zero"``: drop samples labelled exactly 0, then > 0 vs < 0.

Per-batch padding: with ``trim=True`` every sample drops its leading all-zero rows (MultiBench
aligns to the first non-zero text row; here a row counts as padding only when all three
modalities are zero there) and ``collate_fn`` right-pads a batch with zeros to its longest
sequence. With ``trim=False`` (default) samples keep the stored fixed length T.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import DATASETS
from .base import DatasetSplits
from .io import DatasetFormatError, check_same_length, require_file

MODALITIES = ("vision", "audio", "text")
SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}
BINARY_MODES = ("positive", "nonnegative", "exclude_zero")


class RefusedObject(pickle.UnpicklingError):
    """A pickle names a class or function :class:`ArraysOnlyUnpickler` does not admit."""


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain Python values only: a file naming any other class or
    function (which unpickling would call, so it could run code) is refused before anything runs."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise RefusedObject(f"{module}.{name}")


def load_pickle(path: str | os.PathLike) -> dict:
    """The MultiBench pickle's dict, read by :class:`ArraysOnlyUnpickler` (arrays and plain values only)."""
    p = require_file(path, "a MultiBench affect pickle {'train','valid','test'} -> {vision, audio, text, labels}")
    try:
        with open(p, "rb") as f:
            data = ArraysOnlyUnpickler(f).load()
    except RefusedObject as err:
        raise DatasetFormatError(p, f"refused: the pickle holds a Python object ({err}) besides arrays and "
                                    f"plain values, and loading it could run code; use only files from a source "
                                    f"you trust") from None
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, TypeError) as err:
        raise DatasetFormatError(p, f"cannot unpickle (truncated or not a pickle): {err!r}") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(p, f"expected a dict with keys train, valid, test; got {type(data).__name__}")
    for key in SPLIT_KEYS.values():
        if key not in data:
            raise DatasetFormatError(p, f"missing key {key!r}; expected keys train, valid, test, found {sorted(data)}")
    return data


def pad_collate(batch: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]]):
    """Right-pad each modality's T×F sequences with zeros to the batch's longest one."""
    inputs = {}
    for m in batch[0][0]:
        seqs = [x[m] for x, _ in batch]
        inputs[m] = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    return inputs, torch.stack([y for _, y in batch])


class AffectSequences(Dataset):
    """One split of a MultiBench affect pickle: ``({vision, audio, text: T×F}, label)`` items."""

    modalities = MODALITIES
    class_names: tuple[str, ...] = ("0", "1")

    def __init__(self, path: Path, split: dict, split_name: str, task: str, binary: str = "positive",
                 trim: bool = False, modalities: Sequence[str] = MODALITIES) -> None:
        if not isinstance(split, dict):
            raise DatasetFormatError(path, f"split {split_name!r}: expected a dict, got {type(split).__name__}")
        for key in (*modalities, "labels"):
            if key not in split:
                raise DatasetFormatError(path, f"split {split_name!r}: missing key {key!r} "
                                               f"(expected vision, audio, text, labels; found {sorted(split)})")
        labels = np.asarray(split["labels"], dtype=np.float64)
        if labels.ndim == 0 or labels.size != len(labels) or labels.ndim > 3:
            raise DatasetFormatError(path, f"split {split_name!r}: expected labels of shape (N,), (N, 1) or "
                                           f"(N, 1, 1), got {labels.shape}")
        labels = labels.reshape(-1)
        if not np.all(np.isfinite(labels)):
            raise DatasetFormatError(path, f"split {split_name!r}: labels contain NaN or infinity")
        keep = np.arange(len(labels))
        if task == "humor":
            values = set(np.unique(labels).tolist())
            if not values <= {0.0, 1.0} and not values <= {-1.0, 1.0}:
                raise DatasetFormatError(path, f"split {split_name!r}: expected humor labels 0/1 (or -1/+1), "
                                               f"got values {sorted(values)[:6]}")
            y = (labels > 0).astype(np.int64)
            self.class_names = ("not humor", "humor")
        else:
            if len(labels) and (labels.min() < -3 or labels.max() > 3):
                raise DatasetFormatError(path, f"split {split_name!r}: expected sentiment labels in [-3, 3], "
                                               f"got values in [{labels.min()}, {labels.max()}]")
            if binary == "exclude_zero":
                keep = np.flatnonzero(labels != 0)
            y = (labels >= 0 if binary == "nonnegative" else labels > 0).astype(np.int64)[keep]
            self.class_names = ("negative", "positive") if binary == "exclude_zero" else \
                ("negative or neutral", "positive") if binary == "positive" else ("negative", "non-negative")
        self.inputs = {}
        for m in modalities:
            x = np.asarray(split[m])
            if x.ndim != 3:
                raise DatasetFormatError(path, f"split {split_name!r}: expected {m} of shape (N, T, F), got {x.shape}")
            check_same_length(path, len(labels), len(x), f"{m} sequences in split {split_name!r}")
            x = np.nan_to_num(x[keep].astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            self.inputs[m] = torch.from_numpy(x)
        lengths = {m: x.shape[1] for m, x in self.inputs.items()}
        if trim and len(set(lengths.values())) > 1:
            raise DatasetFormatError(path, f"split {split_name!r}: trim=True needs one sequence length T for every "
                                           f"modality, got {lengths}")
        self.modalities = tuple(modalities)
        self.labels = torch.from_numpy(y)
        self.trim = trim
        self.input_shapes = {m: tuple(x.shape[1:]) for m, x in self.inputs.items()}
        if trim:
            nonzero = sum((x.abs().sum(-1) > 0).long() for x in self.inputs.values()) > 0  # N×T
            first = torch.where(nonzero.any(1), nonzero.float().argmax(1),
                                torch.full_like(nonzero[:, 0], nonzero.shape[1] - 1, dtype=torch.long))
            self.start = first.long()
        self.collate_fn = pad_collate if trim else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self.trim:
            s = int(self.start[index])
            return {m: x[index, s:] for m, x in self.inputs.items()}, self.labels[index]
        return {m: x[index] for m, x in self.inputs.items()}, self.labels[index]


def _resolve(root, env: str, default_file: str, name: str) -> Path:
    root = root or os.environ.get(env)
    if not root:
        raise ValueError(f"{name} needs root=<MultiBench {default_file} or its directory> (or ${env})")
    p = Path(root).expanduser()
    return p / default_file if p.is_dir() else p


def _affect(name: str, path, task: str, binary: str, trim: bool, modalities: Sequence[str]) -> DatasetSplits:
    if binary not in BINARY_MODES:
        raise ValueError(f"binary must be one of {BINARY_MODES}, got {binary!r}")
    modalities = tuple(modalities)
    if len(modalities) < 2 or not set(modalities) <= set(MODALITIES):
        raise ValueError(f"choose at least 2 of {MODALITIES}, got {modalities}")
    p = Path(path)
    data = load_pickle(p)
    parts = {s: AffectSequences(p, data[key], key, task, binary, trim, modalities) for s, key in SPLIT_KEYS.items()}
    info = {"source": str(p), "layout": "MultiBench pickle", "task": task,
            "binary": binary if task != "humor" else None,
            "trim": trim, "num_samples": {s: len(d) for s, d in parts.items()},
            "feature_sizes": {m: parts["train"].input_shapes[m][-1] for m in modalities}}
    splits = DatasetSplits(name, train=parts["train"], val=parts["val"], test=parts["test"], info=info)
    splits.check()  # the same feature sizes (and T, unless trimmed) in every split, none empty
    return splits


@DATASETS.register("urfunny")
def urfunny(root: str | os.PathLike | None = None, trim: bool = False,
            modalities: Sequence[str] = MODALITIES) -> DatasetSplits:
    """UR-Funny humor detection from MultiBench's ``humor.pkl``: ``root`` is the file or its directory
    (default ``$MODBAL_URFUNNY``)."""
    return _affect("urfunny", _resolve(root, "MODBAL_URFUNNY", "humor.pkl", "urfunny"), "humor", "positive", trim,
                   modalities)


@DATASETS.register("mosei")
def mosei(root: str | os.PathLike | None = None, binary: str = "positive", trim: bool = False,
          modalities: Sequence[str] = MODALITIES) -> DatasetSplits:
    """Binary CMU-MOSEI sentiment from MultiBench's ``mosei_senti_data.pkl``: ``root`` is the file or
    its directory (default ``$MODBAL_MOSEI``). ``binary``: see the module docstring."""
    return _affect("mosei", _resolve(root, "MODBAL_MOSEI", "mosei_senti_data.pkl", "mosei"), "sentiment", binary, trim,
                   modalities)
