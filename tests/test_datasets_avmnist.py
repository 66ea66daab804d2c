"""AV-MNIST loader on fixture files in the MultiBench layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modbal import DATASETS
from modbal.datasets import DatasetFormatError
from modbal.datasets.avmnist import avmnist


def write_avmnist(root: Path, n_train: int = 30, n_test: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        (root / "image").mkdir(parents=True, exist_ok=True)
        (root / "audio").mkdir(parents=True, exist_ok=True)
        np.save(root / "image" / f"{name}_data.npy", rng.integers(0, 256, (n, 784)).astype(np.float64))
        np.save(root / "audio" / f"{name}_data.npy", rng.integers(0, 256, (n, 112, 112)).astype(np.uint8))
        np.save(root / f"{name}_labels.npy", np.arange(n) % 10)
    return root


def test_avmnist_layout(tmp_path):
    root = write_avmnist(tmp_path)
    d = DATASETS.create("avmnist", root=root, val_size=10)
    assert d.modalities == ("image", "audio") and d.class_names == tuple("0123456789")
    assert d.input_shapes == {"image": (1, 28, 28), "audio": (1, 112, 112)}
    assert (len(d.train), len(d.val), len(d.test)) == (20, 10, 12)
    x, y = d.test[3]
    assert int(y) == 3 and x["image"].dtype == torch.float32
    assert 0 <= float(d.train.inputs["audio"].min()) and float(d.train.inputs["audio"].max()) <= 1
    raw = np.load(root / "image" / "train_data.npy")
    assert torch.allclose(d.train.inputs["image"][0].flatten(), torch.tensor(raw[0] / 255, dtype=torch.float32))
    assert avmnist(root=root, val_size=0).val is None


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("change, match", [
    (lambda r: truncate(r / "audio" / "train_data.npy"), r"audio/train_data.npy: cannot read"),
    (lambda r: np.save(r / "image" / "test_data.npy", np.zeros((12, 28, 28))),
     r"image/test_data.npy: expected .*\(N, 784\), got \(12, 28, 28\)"),
    (lambda r: np.save(r / "train_labels.npy", np.arange(30) % 11), r"train_labels.npy: expected labels in \[0, 10\)"),
    (lambda r: (r / "audio" / "test_data.npy").unlink(), r"audio/test_data.npy: missing file"),
    (lambda r: np.save(r / "image" / "train_data.npy", np.zeros((29, 784))),
     r"image/train_data.npy: expected 30 train image samples"),
    (lambda r: np.save(r / "image" / "train_data.npy", np.full((30, 784), 300.0)),
     r"image/train_data.npy: expected finite values in \[0, 255\]"),
])
def test_avmnist_bad_files_name_the_file(tmp_path, change, match):
    root = write_avmnist(tmp_path)
    change(root)
    with pytest.raises(DatasetFormatError, match=match):
        avmnist(root=root, val_size=5)


def test_avmnist_needs_root(tmp_path):
    with pytest.raises(DatasetFormatError, match="missing-dir"):
        avmnist(root=tmp_path / "missing-dir")
