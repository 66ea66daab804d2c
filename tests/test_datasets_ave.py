"""AVE loader on fixture HDF5 files in the PSP feature layout."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from modbal import DATASETS
from modbal.datasets import DatasetFormatError
from modbal.datasets.ave import AVE, ave

N = 12


def write_ave(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.zeros((N, 10, 29), np.float32)
    for i in range(N):
        event = i % 28 if i < 6 else (i * 5) % 28
        labels[i, :, 28] = 1  # background
        labels[i, 2:7, 28] = 0
        labels[i, 2:7, event] = 1
    with h5py.File(root / "right_labels.h5", "w") as f:
        f["avadataset"] = labels
    with h5py.File(root / "visual_feature.h5", "w") as f:
        f["avadataset"] = rng.standard_normal((N, 10, 7, 7, 512)).astype(np.float32)
    with h5py.File(root / "audio_feature.h5", "w") as f:
        f["avadataset"] = rng.standard_normal((N, 10, 128)).astype(np.float32)
    for split, idx in (("train", [0, 1, 2, 3, 4, 5, 6]), ("val", [7, 8]), ("test", [9, 10, 11])):
        with h5py.File(root / f"{split}_order.h5", "w") as f:
            f["order"] = np.array(idx)
    return root


def test_ave_layout(tmp_path):
    root = write_ave(tmp_path / "ave")
    d = DATASETS.create("ave", root=root)
    assert d.modalities == ("audio", "visual") and len(d.class_names) == 28
    assert (len(d.train), len(d.val), len(d.test)) == (7, 2, 3)
    assert d.input_shapes == {"visual": (10, 7, 7, 512), "audio": (10, 128)}
    assert d.train.labels.tolist() == [0, 1, 2, 3, 4, 5, 2]  # video-level event; 6*5 % 28 = 2
    assert d.test.labels.tolist() == [(9 * 5) % 28, (10 * 5) % 28, (11 * 5) % 28]
    assert d.test.segment_labels[0].tolist() == [28, 28, 17, 17, 17, 17, 17, 28, 28, 28]
    x, y = d.test[1]
    with h5py.File(root / "audio_feature.h5") as f:
        assert torch.allclose(x["audio"], torch.from_numpy(f["avadataset"][10]))
    assert x["visual"].shape == (10, 7, 7, 512) and x["visual"].dtype == torch.float32


def _rewrite(path: Path, key: str, value) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f[key] = value


@pytest.mark.parametrize("change, match", [
    (lambda r: (r / "audio_feature.h5").write_bytes((r / "audio_feature.h5").read_bytes()[:500]),
     r"audio_feature.h5: cannot open"),
    (lambda r: _rewrite(r / "audio_feature.h5", "avadataset", np.zeros((N, 10, 64))),
     r"audio_feature.h5: expected audio features of shape \(N, 10, 128\)"),
    (lambda r: _rewrite(r / "visual_feature.h5", "features", np.zeros((N, 10, 7, 7, 512))),
     r"visual_feature.h5: missing key 'avadataset'"),
    (lambda r: _rewrite(r / "test_order.h5", "order", np.array([3, 99])),
     r"test_order.h5: expected indices in \[0, 12\)"),
    (lambda r: _rewrite(r / "right_labels.h5", "avadataset", np.zeros((N, 10, 29))),
     r"right_labels.h5: row 0: expected at least one event"),
    (lambda r: (r / "visual_feature.h5").unlink(), r"visual_feature.h5: missing file"),
    (lambda r: _rewrite(r / "visual_feature.h5", "avadataset", np.zeros((N - 1, 10, 7, 7, 512))),
     r"visual_feature.h5: expected 12 rows"),
])
def test_ave_bad_files_name_the_file(tmp_path, change, match):
    root = write_ave(tmp_path / "ave")
    change(root)
    with pytest.raises(DatasetFormatError, match=match):
        ave(root=root)


def test_ave_pickles_without_open_files(tmp_path):
    import pickle

    d = AVE(write_ave(tmp_path / "ave"), "val")
    d[0]
    clone = pickle.loads(pickle.dumps(d))  # DataLoader workers
    assert torch.equal(clone[1][0]["audio"], d[1][0]["audio"])
