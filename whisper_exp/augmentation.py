"""Training-time augmentation that composes with the mel and encoder caches (``augmentation.*``).

SpecAugment masks the input where the trainable part of the encoder starts: the log-mel
features when the whole encoder trains (transformers' own ``apply_spec_augment``), else the
frozen prefix's output (time axis of 1500 steps, ``d_model`` channels), so the frozen prefix
stays a pure function of the audio and its cache stays valid. Masks are drawn with
transformers' ``_compute_mask_indices`` from the global NumPy stream that the Trainer seeds
(``training.seed``), as Whisper's own SpecAugment does, and only in training.

Speed perturbation and noise are extra copies of each training utterance, decided before
training: each copy has its own cache key (audio key + what was done to it), so its log-mel
features and frozen-prefix output are computed once and cached like the originals.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import torch
from transformers.models.whisper.modeling_whisper import _compute_mask_indices

from whisper_exp.audio import SAMPLE_RATE, AudioError, find_audio_files, load_audio
from whisper_exp.cache import audio_fingerprint
from whisper_exp.config import AugmentationConfig, ConfigError

log = logging.getLogger(__name__)

# Part of every copy's cache key: bump it when a perturbation's arithmetic changes, so caches
# written by the old code miss instead of serving the old copies.
PERTURBATION_VERSION = "aug1"
# Batch item key: the Perturbation to apply to the decoded audio (None: the recording as is).
PERTURBATION = "perturbation"


def check_config(aug: AugmentationConfig) -> None:
    """Reject values that would fail mid-training or silently do nothing, naming the key."""
    for name in ("mask_time_prob", "mask_feature_prob"):
        value = getattr(aug, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"augmentation.{name} must be between 0 and 1, got {value}")
    for name in ("mask_time_length", "mask_feature_length"):
        if getattr(aug, name) < 1:
            raise ConfigError(f"augmentation.{name} must be at least 1, got {getattr(aug, name)}")
    for factor in aug.speed_factors:
        if not 0.5 <= factor <= 2.0 or factor == 1.0:
            raise ConfigError(f"augmentation.speed_factors: {factor} is not a speed change; use "
                              "factors between 0.5 and 2 other than 1, e.g. [0.9, 1.1]")
    if len(set(aug.speed_factors)) != len(aug.speed_factors):
        raise ConfigError(f"augmentation.speed_factors lists a factor twice: {aug.speed_factors}")
    if aug.noise_dir and aug.noise_snr_db is None:
        raise ConfigError("augmentation.noise_dir is set but augmentation.noise_snr_db is not: "
                          "set the SNR in dB (e.g. 10) or remove noise_dir")


# --------------------------------------------------------------------------- SpecAugment


@dataclass(frozen=True)
class SpecAugment:
    """SpecAugment's time and channel masks for a (batch, time, channels) hidden state."""

    time_prob: float
    time_length: int
    feature_prob: float
    feature_length: int
    time_min_masks: int = 2  # WhisperConfig's defaults, which the uncached path uses too
    feature_min_masks: int = 0

    def draw(self, batch: int, time: int, channels: int
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(batch, time) and (batch, channels) boolean masks (None when that axis is off)."""
        time_mask = feature_mask = None
        if self.time_prob > 0:
            time_mask = torch.from_numpy(_compute_mask_indices(
                (batch, time), self.time_prob, self.time_length,
                min_masks=self.time_min_masks))
        if self.feature_prob > 0:
            feature_mask = torch.from_numpy(_compute_mask_indices(
                (batch, channels), self.feature_prob, self.feature_length,
                min_masks=self.feature_min_masks))
        return time_mask, feature_mask

    @staticmethod
    def apply(hidden: torch.Tensor, masks: tuple[torch.Tensor | None, torch.Tensor | None]
              ) -> torch.Tensor:
        """Zero the masked time steps and channels (out of place), as Whisper zeroes features."""
        time_mask, feature_mask = masks
        keep = torch.ones(hidden.shape, dtype=torch.bool, device=hidden.device)
        if time_mask is not None:
            keep &= ~time_mask.to(hidden.device)[:, :, None]
        if feature_mask is not None:
            keep &= ~feature_mask.to(hidden.device)[:, None, :]
        return hidden * keep.to(hidden.dtype)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.apply(hidden, self.draw(*hidden.shape))


def spec_augment(aug: AugmentationConfig, model_config: Any = None) -> SpecAugment | None:
    """The configured masking, or None when both probabilities are 0."""
    if not (aug.mask_time_prob or aug.mask_feature_prob):
        return None
    return SpecAugment(aug.mask_time_prob, aug.mask_time_length, aug.mask_feature_prob,
                       aug.mask_feature_length,
                       int(getattr(model_config, "mask_time_min_masks", 2)),
                       int(getattr(model_config, "mask_feature_min_masks", 0)))


@dataclass
class SpecAugmentInUse:
    """Where the masks apply in this run; ``hidden`` goes to ``CachedEncoderTrainer``."""

    where: str
    hidden: SpecAugment | None = None
    _undo: list[Any] = field(default_factory=list)

    def detach(self) -> None:
        """Remove hooks and restore the model config, so the saved model masks nothing and a
        later run can cache its encoder."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def attach_spec_augment(model: torch.nn.Module, encoder: torch.nn.Module, k: int,
                        cached: bool, aug: AugmentationConfig) -> SpecAugmentInUse | None:
    """Turn SpecAugment on where the trainable encoder starts: in the model config for k = 0
    (transformers masks the log-mel features), for the cached trainer (k > 0, cache on), or by
    hooks on the encoder (k > 0, cache off) so training is the same with the cache off."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = spec_augment(aug, base.config)
    if spec is None:
        return None
    if k == 0:
        if spec.feature_prob and spec.feature_length > base.config.num_mel_bins:
            raise ConfigError(f"augmentation.mask_feature_length={spec.feature_length} is over "
                              f"the {base.config.num_mel_bins} mel bins it masks")
        config = base.model.config  # what WhisperModel._mask_input_features reads
        names = ("apply_spec_augment", "mask_time_prob", "mask_time_length",
                 "mask_feature_prob", "mask_feature_length")
        before = {name: getattr(config, name) for name in names}
        for name, value in zip(names, (True, spec.time_prob, spec.time_length, spec.feature_prob,
                                       spec.feature_length), strict=True):
            setattr(config, name, value)
        use = SpecAugmentInUse("log-mel features (transformers' apply_spec_augment)")
        use._undo.append(lambda: [setattr(config, n, v) for n, v in before.items()])
        return use
    d_model = encoder.layer_norm.normalized_shape[0]
    if spec.feature_prob and spec.feature_length > d_model:
        raise ConfigError(f"augmentation.mask_feature_length={spec.feature_length} is over the "
                          f"{d_model} channels of the hidden states it masks")
    where = f"hidden states entering encoder layer {k} (the frozen prefix's output)"
    if cached:
        return SpecAugmentInUse(where + ", from the encoder cache", hidden=spec)
    return _hook_hidden_masking(encoder, k, spec, where)


def _hook_hidden_masking(encoder: torch.nn.Module, k: int, spec: SpecAugment,
                         where: str) -> SpecAugmentInUse:
    """Masks drawn once per encoder call and applied to the input of the first trainable
    module: drawn outside the layers, so gradient checkpointing's recompute reuses them."""
    drawn: dict[str, Any] = {}
    time_steps = encoder.embed_positions.num_embeddings

    def draw(module, args, kwargs):
        features = args[0] if args else kwargs["input_features"]
        drawn["masks"] = (spec.draw(features.shape[0], time_steps,
                                    encoder.layer_norm.normalized_shape[0])
                          if module.training else None)

    def apply(module, args):
        if drawn.get("masks") is not None:  # drawn in training only
            return (spec.apply(args[0], drawn["masks"]), *args[1:])
        return None

    target = encoder.layers[k] if k < len(encoder.layers) else encoder.layer_norm
    handles = [encoder.register_forward_pre_hook(draw, with_kwargs=True),
               target.register_forward_pre_hook(apply)]
    use = SpecAugmentInUse(where + ", by hooks (encoder cache off)")
    use._undo.extend(handle.remove for handle in handles)
    return use


# --------------------------------------------------------------------------- extra copies


def speed_perturb(samples: np.ndarray, factor: float) -> np.ndarray:
    """Play ``factor`` times as fast, pitch and tempo together (sox ``speed``): the samples are
    read as if recorded at 16 kHz x factor and resampled to 16 kHz."""
    return np.ascontiguousarray(soxr.resample(samples, SAMPLE_RATE * factor, SAMPLE_RATE,
                                              quality="HQ"), dtype=np.float32)


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``signal`` + ``noise`` scaled so their power ratio is ``snr_db`` (over the whole clip)."""
    signal_power = float(np.mean(np.square(signal, dtype=np.float64)))
    noise_power = float(np.mean(np.square(noise, dtype=np.float64)))
    if signal_power == 0.0:
        return signal.copy()  # a silent clip has no SNR to meet; it stays silent
    if noise_power == 0.0:
        raise AudioError("the noise is silent (all zeros); it cannot be mixed at an SNR")
    scale = math.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return (signal + scale * noise).astype(np.float32)


def _rng(key: str) -> np.random.Generator:
    """A generator seeded by a copy's key: the same copy of the same clip gets the same noise in
    every run, process and dataloader worker, whatever order it is read in."""
    return np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))


class NoiseBank:
    """Noise clips from ``augmentation.noise_dir``, decoded to 16 kHz once per process."""

    def __init__(self, directory: str | Path):
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise ConfigError(f"augmentation.noise_dir: {root} is not a folder; point it at a "
                              "folder of noise clips (wav/flac) or remove it for Gaussian noise")
        self.files = find_audio_files(root, recursive=True)
        if not self.files:
            raise ConfigError(f"augmentation.noise_dir: no audio files (wav/flac) in {root}; add "
                              "noise clips or remove the key for Gaussian noise")
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(f"{path.relative_to(root).as_posix()}:{audio_fingerprint(path)};"
                          .encode())
        self.fingerprint = digest.hexdigest()[:16]
        self._clips: dict[int, np.ndarray] = {}

    def clip(self, index: int) -> np.ndarray:
        if index not in self._clips:
            try:
                self._clips[index] = load_audio(self.files[index])
            except AudioError as exc:
                raise AudioError(f"augmentation.noise_dir: {self.files[index]}: {exc}") from None
        return self._clips[index]

    def noise(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """A seeded choice of clip from a seeded offset, looped or cropped to ``length``."""
        clip = self.clip(int(rng.integers(len(self.files))))
        start = int(rng.integers(len(clip)))
        return np.resize(np.roll(clip, -start), length)


@dataclass(frozen=True, eq=False)
class Perturbation:
    """What one training copy does to its recording; ``key`` names the result in the caches."""

    speed: float | None = None
    snr_db: float | None = None
    noise: NoiseBank | None = None  # with snr_db: clips from it, else Gaussian noise
    seed: int = 0

    def suffix(self) -> str:
        if self.speed is not None:
            return f"{PERTURBATION_VERSION}-speed{self.speed:g}"
        source = f"dir{self.noise.fingerprint}" if self.noise else "gauss"
        return f"{PERTURBATION_VERSION}-noise{self.snr_db:g}db-{source}-seed{self.seed}"

    def key(self, audio_key: str) -> str:
        return f"{audio_key}-{self.suffix()}"

    def seconds(self, seconds: float) -> float:
        return seconds / self.speed if self.speed is not None else seconds

    def apply(self, samples: np.ndarray, key: str) -> np.ndarray:
        """The copy of ``samples`` (16 kHz mono) whose cache key is ``key``."""
        if self.speed is not None:
            return speed_perturb(samples, self.speed)
        rng = _rng(key)
        noise = (self.noise.noise(len(samples), rng) if self.noise is not None
                 else rng.standard_normal(len(samples)).astype(np.float32))
        return mix_at_snr(samples, noise, float(self.snr_db))


def training_perturbations(aug: AugmentationConfig, seed: int) -> list[Perturbation]:
    """One Perturbation per extra copy of each utterance (checked, noise folder read)."""
    check_config(aug)
    copies = [Perturbation(speed=factor) for factor in aug.speed_factors]
    if aug.noise_snr_db is not None:
        bank = NoiseBank(aug.noise_dir) if aug.noise_dir else None
        copies.append(Perturbation(snr_db=aug.noise_snr_db, noise=bank, seed=seed))
    return copies


@dataclass
class Expanded:
    """Originals first (in order), then the copies; ``source`` maps each back to its original."""

    source: list[int]
    perturbations: list[Perturbation | None]
    keys: list[str]
    seconds: list[float]
    dropped: int = 0


def expand(perturbations: Sequence[Perturbation], keys: Sequence[str],
           seconds: Sequence[float], max_duration_s: float) -> Expanded:
    """Every utterance plus one copy per perturbation; copies longer than ``max_duration_s``
    (slowed down past the Whisper window) are dropped and counted."""
    out = Expanded(list(range(len(keys))), [None] * len(keys), list(keys), list(seconds))
    for perturbation in perturbations:
        for index, (key, length) in enumerate(zip(keys, seconds, strict=True)):
            copy_seconds = perturbation.seconds(length)
            if copy_seconds > max_duration_s:
                out.dropped += 1
                continue
            out.source.append(index)
            out.perturbations.append(perturbation)
            out.keys.append(perturbation.key(key))
            out.seconds.append(copy_seconds)
    if out.dropped:
        log.info("augmentation: %d copies dropped, over data.max_duration_s=%g s",
                 out.dropped, max_duration_s)
    return out


def training_audio(item: dict[str, Any]) -> np.ndarray:
    """A dataset item's audio at 16 kHz mono, with its perturbation applied if it is a copy."""
    samples = load_audio(item["audio"])
    perturbation = item.get(PERTURBATION)
    return perturbation.apply(samples, item["key"]) if perturbation is not None else samples
