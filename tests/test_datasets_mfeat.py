"""UCI Multiple Features loader on fixture files in the original UCI layout."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from modbal import DATASETS
from modbal.datasets import DatasetFormatError
from modbal.datasets.mfeat import VIEWS, mfeat

SHARED = Path(os.environ.get("MODBAL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MFEAT = SHARED / "data" / "mfeat"


def write_mfeat(root: Path, views=tuple(VIEWS), rows: int = 2000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 200)[:rows]
    for v in views:
        x = rng.standard_normal((rows, VIEWS[v])) + labels[:, None] * 3.0
        np.savetxt(root / f"mfeat-{v}", x, fmt="%.5f", delimiter="  ")
    return root


def test_mfeat_views_splits_and_standardization(tmp_path):
    root = write_mfeat(tmp_path / "mfeat")
    d = DATASETS.create("mfeat", root=root, views=["fou", "kar", "mor"], seed=1)
    assert d.modalities == ("fou", "kar", "mor")
    assert d.input_shapes == {"fou": (76,), "kar": (64,), "mor": (6,)}
    assert (len(d.train), len(d.val), len(d.test)) == (1200, 400, 400)
    for split in (d.train, d.val, d.test):
        counts = torch.bincount(split.labels, minlength=10)
        assert (counts == counts[0]).all() and split.inputs["fou"].dtype == torch.float32
    assert torch.allclose(d.train.inputs["kar"].mean(0), torch.zeros(64), atol=1e-4)
    assert torch.allclose(d.train.inputs["kar"].std(0, unbiased=False), torch.ones(64), atol=1e-3)
    # labels follow the line order: 200 lines per class, the fixture's mean grows with the class
    x, y = d.test.inputs["mor"], d.test.labels
    assert x[y == 9].mean() > x[y == 0].mean()
    same = mfeat(root=root, views=["fou", "kar", "mor"], seed=1)
    assert torch.equal(same.test.labels, d.test.labels)
    six = mfeat(root=root)
    assert len(six.modalities) == 6


@pytest.mark.parametrize("change, match", [
    (lambda r: (r / "mfeat-kar").unlink(), r"mfeat-kar: missing file"),
    (lambda r: (r / "mfeat-kar").write_text("\n".join(["1 2 3"] * 2000)),
     r"mfeat-kar: line 1: expected 64 values, got 3"),
    (lambda r: (r / "mfeat-mor").write_text("\n".join(["1 2 3 4 5 6"] * 1500)), r"mfeat-mor: expected 2000 rows"),
    (lambda r: (r / "mfeat-mor").write_text("\n".join(["1 2 x 4 5 6"] * 2000)), r"mfeat-mor: line 1: expected numbers"),
])
def test_mfeat_bad_files_name_the_file(tmp_path, change, match):
    root = write_mfeat(tmp_path / "mfeat", views=("fou", "kar", "mor"))
    change(root)
    with pytest.raises(DatasetFormatError, match=match):
        mfeat(root=root, views=["fou", "kar", "mor"])


def test_mfeat_arguments(tmp_path):
    with pytest.raises(DatasetFormatError, match="nowhere"):
        mfeat(root=tmp_path / "nowhere")
    root = write_mfeat(tmp_path / "m", views=("fou",))
    with pytest.raises(ValueError, match="2..6 distinct views"):
        mfeat(root=root, views=["fou"])
    with pytest.raises(ValueError, match="unknown mfeat view"):
        mfeat(root=root, views=["fou", "xyz"])


@pytest.mark.skipif(not MFEAT.is_dir(), reason=f"UCI mfeat files not found at {MFEAT}")
def test_real_mfeat():
    d = mfeat(root=MFEAT)
    assert d.input_shapes == {v: (n,) for v, n in VIEWS.items()}
    assert len(d.train) + len(d.val) + len(d.test) == 2000
