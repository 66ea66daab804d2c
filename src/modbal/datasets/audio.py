"""Audio helpers: WAV reading, resampling, silence trimming, noise mixing and log spectrograms."""
from __future__ import annotations

import os
import wave
from math import gcd

import numpy as np
import torch

from ..extras import require
from .io import DatasetFormatError, require_file


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A PCM WAV file as float32 mono in [-1, 1] and its sample rate (stdlib ``wave``)."""
    p = require_file(path, "a PCM WAV file")
    try:
        with wave.open(str(p), "rb") as w:
            rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError, OSError) as err:
        raise DatasetFormatError(p, f"cannot read as a PCM WAV file: {err}") from None
    if width not in (1, 2, 4):
        raise DatasetFormatError(p, f"expected 8-, 16- or 32-bit PCM, got {8 * width}-bit samples")
    usable = len(raw) // (width * channels) * width * channels
    if usable == 0:
        raise DatasetFormatError(p, "expected audio samples, the file holds none")
    if usable < frames * width * channels:
        raise DatasetFormatError(p, f"truncated: the header announces {frames} frames, the file holds "
                                    f"{usable // (width * channels)}")
    if width == 1:
        x = (np.frombuffer(raw[:usable], np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        dtype = np.int16 if width == 2 else np.int32
        x = np.frombuffer(raw[:usable], dtype).astype(np.float32) / float(np.iinfo(dtype).max + 1)
    return x.reshape(-1, channels).mean(axis=1), rate


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling from ``rate`` to ``target`` Hz."""
    if rate == target:
        return x.astype(np.float32)
    g = gcd(rate, target)
    signal = require("scipy.signal", "audio resampling (spoken-digit and CREMA-D datasets)")
    return signal.resample_poly(x, target // g, rate // g).astype(np.float32)


def trim_silence(x: np.ndarray, frame: int = 80, threshold: float = 0.05) -> np.ndarray:
    """Drop leading/trailing frames whose RMS is below ``threshold`` × the loudest frame's RMS."""
    n = len(x) // frame
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1))
    loud = np.flatnonzero(rms >= threshold * rms.max())
    if len(loud) == 0:
        return x
    return x[loud[0] * frame: (loud[-1] + 1) * frame]


def fit_window(x: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Place ``x`` at a random offset in ``length`` zeros, or crop its centre if longer."""
    if len(x) >= length:
        start = (len(x) - length) // 2
        return x[start: start + length].copy()
    out = np.zeros(length, np.float32)
    start = int(rng.integers(0, length - len(x) + 1))
    out[start: start + len(x)] = x
    return out


def colored_noise(length: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power spectrum ∝ 1/f^exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    freqs = np.fft.rfftfreq(length)
    freqs[0] = freqs[1]
    noise = np.fft.irfft(spectrum / freqs ** (exponent / 2), n=length)
    return (noise / (noise.std() + 1e-12)).astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech + a·noise`` with ``a`` giving the SNR (speech power over its non-silent samples)."""
    active = speech[np.abs(speech) > 1e-4]
    power = float(np.mean(active ** 2)) if len(active) else 0.0
    scale = np.sqrt(power / 10 ** (snr_db / 10)) / (float(np.sqrt(np.mean(noise ** 2))) + 1e-12)
    return (speech + scale * noise).astype(np.float32)


def log_spectrogram(waves: np.ndarray, n_fft: int, hop: int, frames: int | None = None,
                    eps: float = 1e-5) -> np.ndarray:
    """Log-magnitude STFT (Hann window, centred frames) of a batch of waveforms: N × F × T.

    ``F = n_fft // 2 + 1`` frequency bins; ``frames`` keeps the first T frames when given.
    """
    x = torch.as_tensor(np.asarray(waves, np.float32))
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop, window=torch.hann_window(n_fft),
                      center=True, return_complex=True).abs()
    if frames is not None:
        spec = spec[..., :frames]
    return torch.log(spec + eps).numpy()
