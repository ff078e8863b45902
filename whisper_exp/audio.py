"""Audio decoding without torchaudio/torchcodec: soundfile decodes, soxr resamples.

On a CPU-only torch 2.13, torchaudio and torchcodec fail to import (and installing torchaudio
breaks transformers' Whisper imports), so everything here is libsndfile + soxr, the same fallback
transformers' own ``audio_utils.load_audio`` uses.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus")


class AudioError(ValueError):
    """The file is missing, cannot be decoded, or holds no samples."""


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    sample_rate: int
    channels: int
    frames: int


def probe(source: str | Path | bytes) -> AudioInfo:
    """Read only the header: cheap enough to validate a whole dataset before training."""
    try:
        info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except Exception as exc:  # libsndfile raises several types; all mean "cannot decode"
        raise AudioError(f"cannot read audio header: {exc}") from None
    frames = int(info.frames)
    return AudioInfo(frames / info.samplerate if info.samplerate else 0.0, info.samplerate,
                     info.channels, frames)


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def load_audio(source: str | Path | bytes) -> np.ndarray:
    """Decode a file path or raw file bytes to 16 kHz mono float32 in [-1, 1]."""
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        samples, sample_rate = sf.read(handle, dtype="float32", always_2d=False)
    except Exception as exc:
        raise AudioError(f"cannot decode audio: {exc}") from None
    if samples.size == 0:
        raise AudioError("audio holds no samples")
    return to_mono_16k(samples, sample_rate)


def find_audio_files(root: str | Path, recursive: bool = False) -> list[Path]:
    root = Path(root)
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.suffix.lower() in AUDIO_EXTENSIONS)
