"""UR-Funny and CMU-MOSEI loaders on fixture pickles in the MultiBench layout."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from modbal import DATASETS
from modbal.datasets import DatasetFormatError
from modbal.datasets.affect import mosei, urfunny

SIZES = {"vision": 7, "audio": 5, "text": 4}


def split(n: int, labels, t: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d = {m: rng.standard_normal((n, t, f)).astype(np.float32) for m, f in SIZES.items()}
    for m in d:
        d[m][:, :2] = 0  # front padding
    d["audio"][0, 3, 1] = -np.inf
    d["labels"] = np.asarray(labels, np.float32)
    d["id"] = np.arange(n)
    return d


def write_pickle(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def test_urfunny(tmp_path):
    path = write_pickle(tmp_path / "humor.pkl", {"train": split(6, [0, 1, 1, 0, 1, 0]),
                                                  "valid": split(2, [1, 0]), "test": split(3, [0, 0, 1])})
    d = DATASETS.create("urfunny", root=tmp_path)  # the directory holding humor.pkl
    assert d.modalities == ("vision", "audio", "text") and len(d.class_names) == 2
    assert (len(d.train), len(d.val), len(d.test)) == (6, 2, 3)
    assert d.input_shapes == {"vision": (6, 7), "audio": (6, 5), "text": (6, 4)}
    assert d.train.labels.tolist() == [0, 1, 1, 0, 1, 0] and d.train.labels.dtype == torch.long
    x, _ = d.train[0]
    assert x["audio"][3, 1] == 0 and torch.isfinite(x["audio"]).all()
    assert d.info["feature_sizes"] == SIZES
    assert urfunny(root=path).test.labels.tolist() == [0, 0, 1]


def test_urfunny_pm1_labels(tmp_path):
    path = write_pickle(tmp_path / "h.pkl", {k: split(2, [[-1], [1]]) for k in ("train", "valid", "test")})
    assert urfunny(root=path).train.labels.tolist() == [0, 1]


def test_mosei_binary_conventions(tmp_path):
    sentiment = [[[-2.0]], [[0.0]], [[0.4]], [[3.0]], [[-0.2]]]
    path = write_pickle(tmp_path / "mosei_senti_data.pkl", {k: split(5, sentiment) for k in ("train", "valid", "test")})
    assert mosei(root=path).train.labels.tolist() == [0, 0, 1, 1, 0]
    assert mosei(root=path, binary="nonnegative").train.labels.tolist() == [0, 1, 1, 1, 0]
    ez = mosei(root=path, binary="exclude_zero")
    assert ez.train.labels.tolist() == [0, 1, 1, 0] and ez.train.inputs["text"].shape[0] == 4
    with pytest.raises(ValueError, match="binary"):
        mosei(root=path, binary="median")


def test_trim_and_collate(tmp_path):
    data = {k: split(4, [0.5, -1, 1, 2]) for k in ("train", "valid", "test")}
    data["train"]["vision"][1, :4] = 0
    data["train"]["audio"][1, :4] = 0
    data["train"]["text"][1, :4] = 0
    path = write_pickle(tmp_path / "m.pkl", data)
    d = mosei(root=path, trim=True)
    assert d.train[0][0]["text"].shape == (4, 4) and d.train[1][0]["text"].shape == (2, 4)
    loader = DataLoader(d.train, batch_size=4, collate_fn=d.train.collate_fn)
    inputs, y = next(iter(loader))
    assert inputs["vision"].shape == (4, 4, 7) and y.shape == (4,)
    assert mosei(root=path).train.collate_fn is None


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("valid"), r"missing key 'valid'"),
    (lambda d: d["train"].pop("text"), r"split 'train': missing key 'text'"),
    (lambda d: d["test"].update(audio=np.zeros((3, 6))), r"split 'test': expected audio of shape \(N, T, F\)"),
    (lambda d: d["test"].update(vision=np.zeros((2, 6, 7))), r"expected 3 vision sequences"),
    (lambda d: d["train"].update(labels=np.array([0, 1, 2, 0, 1, 0])), r"expected humor labels 0/1"),
])
def test_urfunny_bad_pickles_name_the_file(tmp_path, change, match):
    data = {"train": split(6, [0, 1, 1, 0, 1, 0]), "valid": split(2, [1, 0]), "test": split(3, [0, 0, 1])}
    change(data)
    path = write_pickle(tmp_path / "humor.pkl", data)
    with pytest.raises(DatasetFormatError, match=r"humor.pkl: .*" + match):
        urfunny(root=path)


def test_mosei_label_range_and_truncation(tmp_path):
    path = write_pickle(tmp_path / "mosei_senti_data.pkl",
                        {k: split(2, [0.5, 4.0]) for k in ("train", "valid", "test")})
    with pytest.raises(DatasetFormatError, match=r"mosei_senti_data.pkl: .*sentiment labels in \[-3, 3\]"):
        mosei(root=tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetFormatError, match="mosei_senti_data.pkl: cannot unpickle"):
        mosei(root=tmp_path)
    with pytest.raises(DatasetFormatError, match="missing file"):
        mosei(root=tmp_path / "nothing.pkl")
