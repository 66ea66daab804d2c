"""AVE (Audio-Visual Event) from the pre-extracted features released with PSP / AVEL.

Expected layout (HDF5, read with h5py)::

    DIR/visual_feature.h5   key "avadataset": N×10×7×7×512 VGG-19 pool5 maps, one per 1 s segment
    DIR/audio_feature.h5    key "avadataset": N×10×128 VGGish embeddings
    DIR/right_labels.h5     key "avadataset": N×10×29 one-hot segment labels
                            (columns 0..27 the events, column 28 background)
    DIR/train_order.h5, DIR/val_order.h5, DIR/test_order.h5   key "order": row indices into the above

Source: the AVE dataset (Tian et al., ECCV 2018) with the features and orders published by its
AVEL repository and reused by PSP (Zhou et al., CVPR 2021) — the files AGM's AVE code reads.

Label per clip (the library classifies clips, one label per sample): the **video-level event**,
``argmax`` over the 28 event columns of the segment labels summed over the 10 segments
(background excluded). Every AVE video contains exactly one event category, so this is that
category; a row whose segments are all background is a format error. The per-segment labels
(0..28, 28 = background) stay available as ``dataset.segment_labels`` (N×10).

Items are read lazily (the visual features take ~4 GB): ``{"visual": 10×7×7×512, "audio": 10×128}``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..extras import require
from ..registry import DATASETS
from .base import DatasetSplits
from .io import DatasetFormatError, require_dir, require_file

NUM_SEGMENTS, NUM_EVENTS = 10, 28
FEATURES = {"visual": ("visual_feature.h5", (NUM_SEGMENTS, 7, 7, 512)),
            "audio": ("audio_feature.h5", (NUM_SEGMENTS, 128))}
LABELS_FILE, LABELS_SHAPE = "right_labels.h5", (NUM_SEGMENTS, NUM_EVENTS + 1)
KEY, ORDER_KEY = "avadataset", "order"
#: class names: the event column index; the category names (in column order) come with the AVE
#: annotations (``Annotations.txt``) and are not bundled here
EVENTS = tuple(f"event{c:02d}" for c in range(NUM_EVENTS))


def _h5_dataset(path: Path, key: str, shape: tuple[int, ...] | None, what: str):
    h5py = require("h5py", "the AVE dataset (HDF5 files)")
    require_file(path, f"HDF5 with key {key!r} ({what})")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DatasetFormatError(path, f"cannot open as HDF5 (truncated or not HDF5): {err}") from None
    if key not in f:
        found = sorted(f.keys())
        f.close()
        raise DatasetFormatError(path, f"missing key {key!r}; expected {what}, found keys {found}")
    ds = f[key]
    if shape is not None and tuple(ds.shape[1:]) != shape:
        f.close()
        raise DatasetFormatError(path, f"expected {what} of shape (N, {', '.join(map(str, shape))}) under {key!r}, "
                                       f"got {tuple(ds.shape)}")
    return f, ds


def _read(path: Path, key: str, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    f, ds = _h5_dataset(path, key, shape, what)
    try:
        return ds[()]
    except OSError as err:
        raise DatasetFormatError(path, f"cannot read {what} (truncated?): {err}") from None
    finally:
        f.close()


def video_labels(path: Path, segment_onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(video-level event 0..27, per-segment label 0..28) from N×10×29 one-hot segment labels."""
    if not np.all(np.isfinite(segment_onehot)) or segment_onehot.min() < 0:
        raise DatasetFormatError(path, "expected non-negative finite segment labels")
    events = segment_onehot[..., :NUM_EVENTS].sum(axis=1)
    empty = np.flatnonzero(events.max(axis=1) <= 0)
    if len(empty):
        raise DatasetFormatError(path, f"row {empty[0]}: expected at least one event segment, all are background")
    return events.argmax(axis=1).astype(np.int64), segment_onehot.argmax(axis=2).astype(np.int64)


class AVE(Dataset):
    """One AVE split; ``({"audio": 10×128, "visual": 10×7×7×512}, event)`` items read lazily."""

    modalities = ("audio", "visual")
    class_names = EVENTS

    def __init__(self, root: str | os.PathLike, split: str = "train") -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        self.root = require_dir(root, "the AVE feature files (visual_feature.h5, audio_feature.h5, ...)")
        labels_path = self.root / LABELS_FILE
        onehot = _read(labels_path, KEY, LABELS_SHAPE, "N×10×29 one-hot segment labels")
        order_path = self.root / f"{split}_order.h5"
        order = _read(order_path, ORDER_KEY, None, f"row indices of the {split} split").astype(np.int64).reshape(-1)
        if order.size and (order.min() < 0 or order.max() >= len(onehot)):
            raise DatasetFormatError(order_path, f"expected indices in [0, {len(onehot)}), "
                                                 f"got values in [{order.min()}, {order.max()}]")
        for m, (name, shape) in FEATURES.items():
            f, ds = _h5_dataset(self.root / name, KEY, shape, f"{m} features")
            n = ds.shape[0]
            f.close()
            if n != len(onehot):
                raise DatasetFormatError(self.root / name, f"expected {len(onehot)} rows (as {LABELS_FILE}), got {n}")
        events, segments = video_labels(labels_path, onehot[order])
        self.order = order
        self.labels = torch.from_numpy(events)
        self.segment_labels = torch.from_numpy(segments)
        self.input_shapes = {m: shape for m, (_, shape) in FEATURES.items()}
        self._files: dict = {}

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int):
        row = int(self.order[index])
        inputs = {}
        for m, (name, shape) in FEATURES.items():
            if m not in self._files:  # opened lazily, per worker process
                self._files[m] = _h5_dataset(self.root / name, KEY, shape, f"{m} features")
            try:
                inputs[m] = torch.from_numpy(np.asarray(self._files[m][1][row], np.float32))
            except OSError as err:
                raise DatasetFormatError(self.root / name, f"cannot read row {row} (truncated?): {err}") from None
        return inputs, self.labels[index]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


@DATASETS.register("ave")
def ave(root: str | os.PathLike | None = None) -> DatasetSplits:
    """AVE from the PSP feature release in ``root`` (default ``$MODBAL_AVE``); video-level labels."""
    root = root or os.environ.get("MODBAL_AVE")
    if not root:
        raise ValueError("ave needs root=<directory with visual_feature.h5, audio_feature.h5, right_labels.h5, "
                         "*_order.h5> (or $MODBAL_AVE)")
    parts = {s: AVE(root, s) for s in ("train", "val", "test")}
    info = {"source": str(Path(root)), "layout": "PSP features", "label": "video-level event (28 classes)",
            "num_samples": {s: len(d) for s, d in parts.items()}}
    return DatasetSplits("ave", train=parts["train"], val=parts["val"], test=parts["test"], info=info)
