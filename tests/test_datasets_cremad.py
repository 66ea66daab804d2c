"""CREMA-D loader on fixture files in the OGM-GE layout."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modbal import DATASETS
from modbal.datasets import DatasetFormatError
from modbal.datasets.cremad import EMOTIONS, CremaD, cremad

CLIPS = {"train": [("1001_DFA_ANG_XX", "ANG"), ("1001_IEO_HAP_HI", "HAP"), ("1002_TIE_NEU_XX", "NEU")],
         "test": [("1003_MTI_SAD_XX", "SAD"), ("1004_ITS_FEA_LO", "FEA")]}


def write_wav(path: Path, seconds: float = 1.2, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())


def write_cremad(root: Path, crlf_bom: bool = True) -> Path:
    rng = np.random.default_rng(0)
    (root / "AudioWAV").mkdir(parents=True)
    for split, rows in CLIPS.items():
        text = "".join(f"{c},{e}\r\n" if crlf_bom else f"{c},{e}\n" for c, e in rows)
        (root / f"{split}.csv").write_bytes(("\ufeff" if crlf_bom else "").encode() + text.encode())
        for clip, _ in rows:
            write_wav(root / "AudioWAV" / f"{clip}.wav")
            frames = root / "Image-01-FPS" / clip
            frames.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(frames / f"{i:06d}.jpg")
    return root


def test_cremad_layout(tmp_path):
    root = write_cremad(tmp_path / "cremad")
    d = DATASETS.create("cremad", root=root, image_size=32)
    assert d.modalities == ("audio", "visual") and d.class_names == EMOTIONS and d.val is None
    assert (len(d.train), len(d.test)) == (3, 2)
    assert d.input_shapes == {"audio": (1, 257, 188), "visual": (3, 32, 32)}
    assert d.train.labels.tolist() == [5, 1, 0] and d.test.labels.tolist() == [2, 3]
    x, y = d.test[0]
    assert x["audio"].shape == (1, 257, 188) and x["audio"].dtype == torch.float32
    assert x["visual"].shape == (3, 32, 32) and x["visual"].dtype == torch.float32 and int(y) == 2
    assert torch.isfinite(x["audio"]).all()
    again, _ = d.test[0]
    assert torch.equal(again["visual"], x["visual"])  # evaluation is deterministic
    xt, _ = d.train[1]  # augmented: random frame, crop and flip
    assert xt["visual"].shape == (3, 32, 32)
    multi = CremaD(root, "test", image_size=16, num_frames=2)
    assert multi.input_shapes["visual"] == (2, 3, 16, 16) and multi[1][0]["visual"].shape == (2, 3, 16, 16)


def test_plain_csv(tmp_path):
    root = write_cremad(tmp_path / "c", crlf_bom=False)
    assert cremad(root=root, image_size=16).train.labels.tolist() == [5, 1, 0]


@pytest.mark.parametrize("change, match", [
    (lambda r: (r / "train.csv").write_text("1001_DFA_ANG_XX,ANGRY\n"), r"train.csv: line 1: expected an emotion"),
    (lambda r: (r / "test.csv").write_text("just-one-column\n"), r"test.csv: line 1: expected 'clip,EMO'"),
    (lambda r: (r / "test.csv").unlink(), r"test.csv: missing file"),
    (lambda r: (r / "AudioWAV" / "1003_MTI_SAD_XX.wav").unlink(), r"1003_MTI_SAD_XX.wav: missing file"),
    (lambda r: [p.unlink() for p in (r / "Image-01-FPS" / "1004_ITS_FEA_LO").glob("*.jpg")],
     r"1004_ITS_FEA_LO: missing visual modality"),
])
def test_cremad_bad_layout_names_the_file(tmp_path, change, match):
    root = write_cremad(tmp_path / "c")
    change(root)
    with pytest.raises(DatasetFormatError, match=match):
        cremad(root=root, image_size=16)


def test_cremad_truncated_files_fail_on_access(tmp_path):
    root = write_cremad(tmp_path / "c")
    wav = root / "AudioWAV" / "1003_MTI_SAD_XX.wav"
    wav.write_bytes(wav.read_bytes()[:30])
    jpg = root / "Image-01-FPS" / "1004_ITS_FEA_LO" / "000000.jpg"
    jpg.write_bytes(b"not a jpeg")
    d = cremad(root=root, image_size=16)
    with pytest.raises(DatasetFormatError, match="1003_MTI_SAD_XX.wav"):
        d.test[0]
    with pytest.raises(DatasetFormatError, match="000000.jpg"):
        d.test[1]


def test_validation_carved_from_train_is_not_augmented(tmp_path):
    from modbal.train.data import carve_validation
    d = DATASETS.create("cremad", root=write_cremad(tmp_path / "c"), image_size=32)
    train, val = carve_validation(d.train, fraction=0.34, seed=0)
    assert train.dataset.augment and not val.dataset.augment
    first, _ = val[0]
    again, _ = val[0]
    assert torch.equal(first["visual"], again["visual"])  # deterministic, like the test split
