"""Offline speech synthesis with eSpeak NG through ctypes (library and data from ``espeakng-loader``).

No system package and no network: the ``espeakng-loader`` wheel ships ``libespeak-ng`` and its
voice data. The library is process-global, so one :class:`Synthesizer` drives it at a time.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..extras import require

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

#: English accents shipped with eSpeak NG and voice variants (speaker timbres) used by default.
ENGLISH_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
                   "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "croak")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_STATE: dict[str, Any] = {}


def _library() -> tuple[ctypes.CDLL, int]:
    """Load and initialise libespeak-ng once; returns the library and its sample rate."""
    if "lib" not in _STATE:
        espeakng_loader = require("espeakng_loader", "speech synthesis (the avdigits dataset)")
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate})")
        chunks: list[np.ndarray] = []

        def collect(wav, n, events):  # called by the library for each block of samples
            if n > 0 and wav:
                chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        callback = _CALLBACK(collect)
        lib.espeak_SetSynthCallback(callback)
        _STATE.update(lib=lib, rate=rate, chunks=chunks, callback=callback)  # keep the callback alive
    return _STATE["lib"], _STATE["rate"]


def sample_rate() -> int:
    return _library()[1]


def synthesize(text: str, voice: str = "en", pitch: int = 50, rate: int = 175, pitch_range: int = 50) -> np.ndarray:
    """Speak ``text`` with eSpeak NG; float32 samples in [-1, 1] at :func:`sample_rate` Hz.

    Args:
        voice: eSpeak voice name, optionally with a variant (``"en-us+f2"``).
        pitch: base pitch 0..100 (default 50). rate: words per minute 80..450 (default 175).
        pitch_range: pitch variation 0..100 (default 50).
    """
    lib, _ = _library()
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"eSpeak NG has no voice {voice!r}")
    for param, value in ((_PITCH, pitch), (_RATE, rate), (_RANGE, pitch_range)):
        lib.espeak_SetParameter(param, int(value), 0)
    chunks = _STATE["chunks"]
    chunks.clear()
    data = text.encode() + b"\0"
    status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if status != 0 or not chunks:
        raise RuntimeError(f"eSpeak NG failed to synthesize {text!r} with voice {voice!r} (status {status})")
    return np.concatenate(chunks).astype(np.float32) / 32768.0
