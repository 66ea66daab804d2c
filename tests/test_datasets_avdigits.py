"""avdigits / avmnist-fsdd builders on reduced sizes, with fixture WAVs in the FSDD naming scheme."""
from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from modbal import DATASETS
from modbal.datasets import DatasetFormatError, audio, espeak
from modbal.datasets.avdigits import avdigits, avmnist_fsdd, pca_project

SHARED = Path(os.environ.get("MODBAL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FSDD = SHARED / "data" / "fsdd" / "recordings"
SMALL = dict(num_images=100, accents=["en", "en-us"], variants=["m1", "m3", "f1", "f2", "klatt"],
             pitches=(50,), speeds=(175,), progress=False)


def write_wav(path: Path, x: np.ndarray, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def test_espeak_synthesizes_distinct_voices():
    a = espeak.synthesize("seven", voice="en+m1")
    b = espeak.synthesize("seven", voice="en-us+f2", pitch=80)
    assert a.dtype == np.float32 and len(a) > 0.2 * espeak.sample_rate()
    assert 0 < np.abs(a).max() <= 1
    assert len(a) != len(b) or not np.allclose(a, b)
    with pytest.raises(ValueError, match="no voice"):
        espeak.synthesize("one", voice="no-such-voice")


def test_pca_projection_keeps_the_requested_energy():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((2000, 20)) * np.r_[np.sqrt(12.0), np.ones(19)]
    (tr, te), k, kept = pca_project(train, [train[:10]], 0.25)
    assert kept >= 0.25 and k == 1  # the first direction alone carries > 25% of the variance
    assert tr.shape == train.shape and np.allclose(te, tr[:10], atol=1e-5)


def test_avdigits_small_build_and_cache(tmp_path):
    d = DATASETS.create("avdigits", cache_dir=tmp_path, **SMALL)
    assert d.modalities == ("image", "audio") and d.class_names == tuple("0123456789")
    assert d.input_shapes == {"image": (1, 28, 28), "audio": (1, 64, 64)}
    assert (len(d.train), len(d.val), len(d.test)) == (70, 10, 20)
    x, y = d.train[0]
    assert x["image"].dtype == torch.float32 and x["audio"].dtype == torch.float32 and y.dtype == torch.long
    for split in (d.train, d.val, d.test):
        assert torch.equal(torch.bincount(split.labels, minlength=10), torch.full((10,), len(split) // 10))
        assert all(torch.isfinite(t).all() for t in split.inputs.values())
    # utterances: 2 accents x 5 variants per digit, split 7/1/2, none shared between splits
    assert d.info["num_utterances"] == {"train": 70, "val": 10, "test": 20}
    assert abs(float(d.train.inputs["audio"].mean())) < 1e-2  # standardized on train
    assert d.info["image"]["pca_components"] >= 1 and d.info["image"]["energy_kept"] >= 0.25
    assert d.info["cached"] is False and Path(d.info["cache_file"]).parent == tmp_path
    again = avdigits(cache_dir=tmp_path, **SMALL)
    assert again.info["cached"] is True and again.info["build_seconds"] == d.info["build_seconds"]
    assert torch.equal(again.test.inputs["audio"], d.test.inputs["audio"])
    assert len(list(tmp_path.glob("avdigits-*.npz"))) == 1


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MODBAL_CACHE", str(tmp_path / "env"))
    d = avdigits(**SMALL)
    assert Path(d.info["cache_file"]).parent == tmp_path / "env"


def test_avdigits_rejects_bad_parameters():
    with pytest.raises(ValueError, match="energy"):
        avdigits(energy=0.0, cache=False, **SMALL)
    with pytest.raises(ValueError, match="snr_db"):
        avdigits(snr_db=(3, -3), cache=False, **SMALL)


def fixture_fsdd(root: Path, takes: int = 12) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(4000) / 8000
    for d in range(10):
        for speaker in ("alice", "bob"):
            for take in range(takes):
                write_wav(root / f"{d}_{speaker}_{take}.wav", 0.5 * np.sin(2 * np.pi * (200 + 100 * d) * t)
                          + 0.01 * rng.standard_normal(len(t)))
    (root / "README.txt").write_text("not a recording")
    return root


def test_avmnist_fsdd_fixture_split_by_take(tmp_path):
    root = fixture_fsdd(tmp_path / "recordings")
    d = avmnist_fsdd(root=root, cache_dir=tmp_path / "cache", num_images=100, progress=False)
    assert d.info["num_utterances"] == {"train": 40, "val": 100, "test": 100}  # takes 10-11 / 5-9 / 0-4
    assert d.input_shapes == {"image": (1, 28, 28), "audio": (1, 64, 64)}
    assert (len(d.train), len(d.val), len(d.test)) == (70, 10, 20)


def test_fsdd_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetFormatError, match="nowhere"):
        avmnist_fsdd(root=tmp_path / "nowhere", cache=False, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="empty.*digit"):
        avmnist_fsdd(root=tmp_path / "empty", cache=False, progress=False)
    bad = tmp_path / "3_x_0.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt ")
    with pytest.raises(DatasetFormatError, match="3_x_0.wav"):
        audio.read_wav(bad)


def test_log_spectrogram_shape():
    spec = audio.log_spectrogram(np.zeros((3, 8000), np.float32), 126, 125, 64)
    assert spec.shape == (3, 64, 64) and np.isfinite(spec).all()


@pytest.mark.skipif(not FSDD.is_dir(), reason=f"FSDD recordings not found at {FSDD}")
def test_real_fsdd(tmp_path):
    d = avmnist_fsdd(root=FSDD, cache_dir=tmp_path, num_images=200, progress=False)
    assert d.info["num_utterances"] == {"train": 2400, "val": 300, "test": 300}
    assert d.input_shapes["audio"] == (1, 64, 64)


def test_corrupt_cache_is_rebuilt(tmp_path):
    first = avdigits(cache_dir=tmp_path, **SMALL)
    Path(first.info["cache_file"]).write_bytes(b"garbage")
    again = avdigits(cache_dir=tmp_path, **SMALL)
    assert again.info["cached"] is False and torch.equal(again.train.labels, first.train.labels)
    assert avdigits(cache_dir=tmp_path, **SMALL).info["cached"] is True
    other = avdigits(cache_dir=tmp_path, **{**SMALL, "snr_db": (0.0, 5.0)})  # new parameters, new file
    assert other.info["cached"] is False and len(list(tmp_path.glob("avdigits-*.npz"))) == 2


def test_stratified_split_is_disjoint_and_seeded():
    from modbal.datasets.io import stratified_split

    labels = np.repeat(np.arange(4), 10)
    parts = stratified_split(labels, (0.7, 0.1, 0.2), seed=3)
    assert [len(p) for p in parts] == [28, 4, 8]
    assert len(np.unique(np.concatenate(parts))) == 40
    assert all((np.bincount(labels[p], minlength=4) == len(p) // 4).all() for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, stratified_split(labels, (0.7, 0.1, 0.2), seed=3)))
