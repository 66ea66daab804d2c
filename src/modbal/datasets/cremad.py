"""CREMA-D (6 emotions, audio + face frames) in the layout the OGM-GE and AGM code read.

Expected layout::

    DIR/train.csv, DIR/test.csv        headerless rows ``clip,EMO`` (EMO in NEU HAP SAD FEA DIS ANG;
                                       UTF-8 with or without BOM, LF or CRLF line ends)
    DIR/AudioWAV/{clip}.wav            the CREMA-D audio (16 kHz PCM WAV)
    DIR/Image-01-FPS/{clip}/*.jpg      frames extracted at 1 fps (``frames_dir`` to change)

Source: the CREMA-D release (Cao et al., 2014; github.com/CheyneyComputerScience/CREMA-D); the
split CSVs and the 1-fps frame extraction come from the OGM-GE repository (Peng et al., CVPR 2022;
``data/CREMAD/*.csv`` and its ``video_preprocessing`` script), which AGM reuses.

Per item, loaded lazily:

* **audio** (1×257×188): the clip at 22.05 kHz (resampled with scipy's polyphase filter; the
  public code uses librosa), tiled to 3 s, clipped to [-1, 1], ``log(|STFT| + 1e-7)`` with
  n_fft 512, hop 353, Hann window, centred frames.
* **visual**: ``num_frames`` frames (default 1) resized to ``image_size`` (224) with ImageNet
  normalization, shape 3×S×S (or T×3×S×S for T > 1). Training with ``augment=True`` picks frames at
  random (sorted) with a random resized crop (scale 0.08–1, aspect 3/4–4/3) and a horizontal flip,
  as OGM-GE does; evaluation takes evenly spaced frames and a plain resize (OGM-GE picks random
  frames at test time too; evenly spaced keeps evaluation deterministic).

There is no validation split in the public CSVs: ``val`` is None and the runner carves one from
``train``.
"""
from __future__ import annotations

import copy
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..extras import require
from ..registry import DATASETS
from . import audio as au
from .base import DatasetSplits
from .io import DatasetFormatError, require_dir, require_file

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
SAMPLE_RATE, SECONDS, N_FFT, HOP = 22050, 3, 512, 353
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def read_split_csv(path: str | os.PathLike) -> list[tuple[str, int]]:
    """``clip,EMO`` rows of a headerless CSV (BOM and CRLF tolerated) as (clip, class index)."""
    p = require_file(path, "headerless rows 'clip,EMO'")
    rows = []
    text = p.read_bytes().decode("utf-8-sig", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = [s.strip() for s in line.split(",")]
        if len(parts) != 2 or not parts[0]:
            raise DatasetFormatError(p, f"line {number}: expected 'clip,EMO', got {line[:60]!r}")
        if parts[1] not in EMOTIONS:
            raise DatasetFormatError(p, f"line {number}: expected an emotion in {' '.join(EMOTIONS)}, got {parts[1]!r}")
        rows.append((parts[0], EMOTIONS.index(parts[1])))
    if not rows:
        raise DatasetFormatError(p, "expected at least one 'clip,EMO' row, the file is empty")
    return rows


def audio_features(path: str | os.PathLike) -> np.ndarray:
    """1×257×188 log-magnitude STFT of the first 3 s (tiled) at 22.05 kHz."""
    x, rate = au.read_wav(path)
    x = au.resample(x, rate, SAMPLE_RATE)
    n = SAMPLE_RATE * SECONDS
    x = np.clip(np.tile(x, math.ceil(n / len(x)))[:n], -1.0, 1.0)
    return au.log_spectrogram(x[None], N_FFT, HOP, eps=1e-7)


def _random_resized_crop(img, rng: random.Random):
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.crop((left, top, left + cw, top + ch))
    side = min(w, h)
    return img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))


class CremaD(Dataset):
    """One CREMA-D split read lazily from disk; items are ``({"audio", "visual"}, label)``.

    Args:
        root: dataset directory (see module docstring). split: "train" or "test".
        image_size: side of the resized frames (default 224). num_frames: frames per clip (default 1).
        augment: random frames, crop and flip (use for training). frames_dir: frame folder name.
    """

    modalities = ("audio", "visual")
    class_names = EMOTIONS

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 224, num_frames: int = 1,
                 augment: bool = False, frames_dir: str = "Image-01-FPS", check_files: bool = True) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if image_size < 8 or num_frames < 1:
            raise ValueError(f"image_size must be >= 8 and num_frames >= 1, got {image_size}, {num_frames}")
        self.root = require_dir(root, f"CREMA-D ({split}.csv, AudioWAV/, {frames_dir}/)")
        self.items = read_split_csv(self.root / f"{split}.csv")
        self.image_size, self.num_frames, self.augment = image_size, num_frames, augment
        self.frames_dir = frames_dir
        self.labels = torch.tensor([label for _, label in self.items])
        visual = (3, image_size, image_size) if num_frames == 1 else (num_frames, 3, image_size, image_size)
        self.input_shapes = {"audio": (1, N_FFT // 2 + 1, 1 + SAMPLE_RATE * SECONDS // HOP), "visual": visual}
        if check_files:
            for clip, _ in self.items:
                self.wav_path(clip)
                self.frame_paths(clip)

    def evaluation_view(self) -> "CremaD":
        """The same samples without train-time augmentation (for a validation split carved from it)."""
        view = copy.copy(self)
        view.augment = False
        return view

    def wav_path(self, clip: str) -> Path:
        return require_file(self.root / "AudioWAV" / f"{clip}.wav", f"the audio of clip {clip} (WAV)")

    def frame_paths(self, clip: str) -> list[Path]:
        folder = self.root / self.frames_dir / clip
        frames = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
        if len(frames) == 0:
            raise DatasetFormatError(folder, f"missing visual modality; expected .jpg frames of clip {clip}")
        return frames

    def __len__(self) -> int:
        return len(self.items)

    def verify_item(self, index: int) -> None:
        """Read every file of item ``index`` (its WAV and all its frames, not only those an item
        uses), raising :class:`DatasetFormatError` naming a file that cannot be read."""
        clip, _ = self.items[index]
        audio_features(self.wav_path(clip))
        for path in self.frame_paths(clip):
            self._frame(path, random.Random(0))

    def _frame(self, path: Path, rng: random.Random) -> np.ndarray:
        Image = require("PIL.Image", "the CREMA-D dataset (video frames)")
        try:
            with Image.open(path) as raw:
                img = raw.convert("RGB")
        except (Image.UnidentifiedImageError, OSError) as err:
            raise DatasetFormatError(path, f"cannot read as a JPEG frame: {err}") from None
        if self.augment:
            img = _random_resized_crop(img, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        x = (np.asarray(img, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return x.transpose(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        clip, label = self.items[index]
        rng = random.Random(torch.randint(2 ** 31, (1,)).item()) if self.augment else random.Random(index)
        frames = self.frame_paths(clip)
        t = self.num_frames
        if self.augment:
            chosen = (sorted(rng.sample(range(len(frames)), t)) if t <= len(frames)
                      else sorted(rng.choices(range(len(frames)), k=t)))
        else:
            chosen = np.linspace(0, len(frames) - 1, t).round().astype(int).tolist()
        visual = np.stack([self._frame(frames[i], rng) for i in chosen])
        inputs = {"audio": torch.from_numpy(audio_features(self.wav_path(clip))),
                  "visual": torch.from_numpy(visual[0] if t == 1 else visual)}
        return inputs, self.labels[index]


@DATASETS.register("cremad")
def cremad(root: str | os.PathLike | None = None, image_size: int = 224, num_frames: int = 1, augment: bool = True,
           frames_dir: str = "Image-01-FPS") -> DatasetSplits:
    """CREMA-D from ``root`` (default ``$MODBAL_CREMAD``); ``augment`` applies to the train split only."""
    root = root or os.environ.get("MODBAL_CREMAD")
    if not root:
        raise ValueError("cremad needs root=<directory with train.csv, test.csv, AudioWAV/, Image-01-FPS/> "
                         "(or $MODBAL_CREMAD)")
    kw = dict(image_size=image_size, num_frames=num_frames, frames_dir=frames_dir)
    train = CremaD(root, "train", augment=augment, **kw)
    test = CremaD(root, "test", augment=False, **kw)
    info = {"source": str(Path(root)), "layout": "OGM-GE", "num_samples": {"train": len(train), "test": len(test)},
            "audio": {"sample_rate": SAMPLE_RATE, "seconds": SECONDS, "n_fft": N_FFT, "hop": HOP},
            "visual": {"image_size": image_size, "num_frames": num_frames, "augment": augment}}
    return DatasetSplits("cremad", train=train, test=test, val=None, info=info)
