"""AV-MNIST in the MultiBench layout (the files the AGM and MultiBench code read).

Expected layout::

    DIR/image/train_data.npy   N×784 image pixels, 0..255 (PCA-reduced MNIST, 28×28)
    DIR/image/test_data.npy    M×784
    DIR/audio/train_data.npy   N×112×112 audio spectrograms, 0..255
    DIR/audio/test_data.npy    M×112×112
    DIR/train_labels.npy       N integer labels 0..9
    DIR/test_labels.npy        M

Source: the AV-MNIST release of Vielzeuf et al. (2018) as packaged by MultiBench
(``datasets/avmnist/get_data.py`` reads this layout; the archive is linked from the MultiBench
README). Preprocessing as MultiBench does it: both modalities divided by 255; images reshaped to
1×28×28, spectrograms 1×112×112. There is no validation split: ``val`` is the last
``val_size`` (default 5,000, MultiBench's choice) training samples, or None with ``val_size=0``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..registry import DATASETS
from .base import DatasetSplits, TensorMultimodalDataset
from .io import DatasetFormatError, check_labels, check_same_length, load_npy, require_dir

CLASS_NAMES = tuple(str(d) for d in range(10))


def _split(root: Path, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    labels_path = root / f"{split}_labels.npy"
    labels = load_npy(labels_path, (None,), f"{split} labels")
    labels = check_labels(labels_path, labels, 10)
    image = load_npy(root / "image" / f"{split}_data.npy", (None, 784), f"{split} images (N×784 pixels 0..255)")
    audio = load_npy(root / "audio" / f"{split}_data.npy", (None, 112, 112), f"{split} spectrograms (N×112×112)")
    for name, arr in (("image", image), ("audio", audio)):
        path = root / name / f"{split}_data.npy"
        check_same_length(path, len(labels), len(arr), f"{split} {name} samples")
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 255 or not np.all(np.isfinite(arr))):
            raise DatasetFormatError(path, "expected finite values in [0, 255]")
    return {"image": image.reshape(-1, 1, 28, 28), "audio": audio.reshape(-1, 1, 112, 112)}, labels


def _dataset(inputs: dict[str, np.ndarray], labels: np.ndarray) -> TensorMultimodalDataset:
    tensors = {m: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / 255.0) for m, x in inputs.items()}
    return TensorMultimodalDataset(tensors, torch.from_numpy(labels), CLASS_NAMES)


@DATASETS.register("avmnist")
def avmnist(root: str | os.PathLike | None = None, val_size: int = 5000) -> DatasetSplits:
    """AV-MNIST from a MultiBench-layout directory ``root`` (default ``$MODBAL_AVMNIST``).

    Args:
        val_size: the last ``val_size`` training samples become the validation split (0: none).
    """
    root = root or os.environ.get("MODBAL_AVMNIST")
    if not root:
        raise ValueError("avmnist needs root=<directory with image/, audio/ and *_labels.npy> (or $MODBAL_AVMNIST)")
    folder = require_dir(root, "AV-MNIST in the MultiBench layout (image/, audio/, train_labels.npy, test_labels.npy)")
    train_x, train_y = _split(folder, "train")
    test_x, test_y = _split(folder, "test")
    if not 0 <= val_size < len(train_y):
        raise ValueError(f"val_size must be in [0, {len(train_y)}), got {val_size}")
    cut = len(train_y) - val_size
    train = _dataset({m: x[:cut] for m, x in train_x.items()}, train_y[:cut])
    val = _dataset({m: x[cut:] for m, x in train_x.items()}, train_y[cut:]) if val_size else None
    info = {"source": str(folder), "layout": "MultiBench",
            "num_samples": {"train": cut, "val": val_size, "test": len(test_y)}}
    return DatasetSplits("avmnist", train=train, val=val, test=_dataset(test_x, test_y), info=info)
