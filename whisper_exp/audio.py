"""Audio decoding without torchaudio/torchcodec: soundfile decodes, soxr resamples.

On a CPU-only torch 2.13, torchaudio and torchcodec fail to import (and installing torchaudio
breaks transformers' Whisper imports), so everything here is libsndfile + soxr, the same fallback
transformers' own ``audio_utils.load_audio`` uses.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeAlias, runtime_checkable

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus")


class AudioError(ValueError):
    """The file is missing, cannot be decoded, or holds no samples."""


@runtime_checkable
class AudioRef(Protocol):
    """Audio stored elsewhere (e.g. one row of a memory-mapped Arrow dataset), read only when
    decoded or hashed, so a corpus larger than RAM never has to sit in memory as bytes."""

    @property
    def name(self) -> str:
        """Stable, human-readable identity (dataset, split and row) for messages."""
        ...

    def read_bytes(self) -> bytes:
        """The encoded audio file (flac, wav, ...), exactly as stored."""
        ...


AudioSource: TypeAlias = str | os.PathLike | bytes | AudioRef


def _file_like(source: AudioSource) -> str | io.BytesIO:
    """What libsndfile opens: a path, or the bytes (read now, for a reference) in a buffer."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, AudioRef):
        return io.BytesIO(source.read_bytes())
    raise TypeError(f"not an audio source: {type(source).__name__} (path, bytes or AudioRef)")


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    sample_rate: int
    channels: int
    frames: int


def probe(source: AudioSource) -> AudioInfo:
    """Read only the header: cheap enough to validate a whole dataset before training."""
    try:
        info = sf.info(_file_like(source))
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


def load_audio(source: AudioSource) -> np.ndarray:
    """Decode a file path, raw file bytes or an AudioRef to 16 kHz mono float32 in [-1, 1]."""
    try:
        samples, sample_rate = sf.read(_file_like(source), dtype="float32", always_2d=False)
    except Exception as exc:
        raise AudioError(f"cannot decode audio: {exc}") from None
    if samples.size == 0:
        raise AudioError("audio holds no samples")
    return to_mono_16k(samples, sample_rate)


def find_audio_files(root: str | Path, recursive: bool = False) -> list[Path]:
    root = Path(root)
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.suffix.lower() in AUDIO_EXTENSIONS)
