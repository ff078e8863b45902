"""Training pieces that use the caches: mel features by audio key, and the collator/trainer that
feed cached frozen-encoder outputs instead of audio.

Kept apart from ``training.py`` so the cache logic lives next to ``cache.py``; this module must
not import ``training`` (which imports it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from accelerate.utils import gather_object
from transformers import WhisperProcessor

from whisper_exp import tracking
from whisper_exp.audio import SAMPLE_RATE
from whisper_exp.augmentation import SpecAugment, training_audio
from whisper_exp.cache import (
    ArrayCache,
    EncoderSplit,
    cache_refusal,
    disk_usage,
    feature_settings_fingerprint,
    fill_encoder_cache,
    shared_cache,
)
from whisper_exp.config import ExperimentConfig
from whisper_exp.labels import collate_labels
from whisper_exp.modeling import frozen_encoder_layers, whisper_encoder
from whisper_exp.trainer import AUDIO_SECONDS, WhisperTrainer, audio_seconds_tensor

log = logging.getLogger(__name__)

# Batch key: the cache keys of a batch whose entries were evicted, for the trainer to store the
# recomputed prefix again; never reaches the model.
ENCODER_CACHE_KEYS = "encoder_cache_keys"


@dataclass
class MelFeatures:
    """Log-mel features by audio key, through the mel cache when there is one. An item that
    is an augmented copy (speed, noise) is perturbed before the features; its key says how."""

    processor: WhisperProcessor
    cache: ArrayCache | None = None

    def cache_namespace(self) -> str:
        return f"fe{feature_settings_fingerprint(self.processor.feature_extractor)}"

    def __call__(self, items: Sequence[dict[str, Any]]) -> torch.Tensor:
        found = [self.cache.get(item["key"]) if self.cache is not None else None
                 for item in items]
        missing = [i for i, array in enumerate(found) if array is None]
        if missing:
            computed = self.processor.feature_extractor(
                [training_audio(items[i]) for i in missing], sampling_rate=SAMPLE_RATE,
                return_tensors="np").input_features
            for i, array in zip(missing, computed, strict=True):
                found[i] = array
                if self.cache is not None:
                    self.cache.put(items[i]["key"], array)
        return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in found]))


@dataclass
class CachedEncoderCollator:
    """Frozen-encoder outputs from the cache instead of audio: the encoder prefix never runs.

    A batch with an entry evicted since the fill (``training.cache_max_gb``) gets log-mel
    ``input_features`` and its keys instead, from ``features``; the trainer recomputes its
    prefix and stores it again. Without ``features`` a lost entry is an error."""

    cache: ArrayCache
    decoder_start_token_id: int
    features: MelFeatures | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        found = [self.cache.get(item["key"]) for item in items]
        if all(array is not None for array in found):
            inputs: dict[str, Any] = {"encoder_prefix": torch.from_numpy(
                np.stack([np.asarray(array, dtype=np.float32) for array in found]))}
        elif self.features is not None:
            inputs = {"input_features": self.features(items),
                      ENCODER_CACHE_KEYS: [item["key"] for item in items]}
        else:
            lost = next(item for item, array in zip(items, found, strict=True) if array is None)
            raise RuntimeError(f"encoder cache lost {lost['audio']}; rerun with "
                               "training.cache_encoder=false and report this")
        return {**inputs, **collate_labels(items, self.decoder_start_token_id),
                AUDIO_SECONDS: audio_seconds_tensor(items)}


class CachedEncoderTrainer(WhisperTrainer):
    """``WhisperTrainer`` fed cached frozen-prefix states: it runs only the encoder's trainable
    top (layers k.. + layer norm, with grad) and hands the result to the model as
    ``encoder_outputs``, so the loss, generation and metrics are the standard ones.

    ``spec_augment`` masks the cached states in training steps only (``augmentation.mask_*``):
    the cache holds the unmasked prefix, so masking composes with it."""

    def __init__(self, *args, encoder_split: EncoderSplit,
                 encoder_store: ArrayCache | None = None,
                 spec_augment: SpecAugment | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder_split = encoder_split
        self.encoder_store = encoder_store
        self.spec_augment = spec_augment

    def _encoder_outputs(self, inputs: dict[str, Any], augment: bool = False) -> dict[str, Any]:
        inputs = dict(inputs)
        prefix = inputs.pop("encoder_prefix", None)
        keys = inputs.pop(ENCODER_CACHE_KEYS, None)
        if prefix is None and keys is not None:
            prefix = recompute_prefix(self.encoder_split, inputs.pop("input_features"), keys,
                                      self.encoder_store)
        if prefix is not None:
            if augment and self.spec_augment is not None:
                prefix = self.spec_augment(prefix)
            weight = self.encoder_split.encoder.layer_norm.weight
            # The top layers run outside model.forward, which is where accelerate autocasts:
            # mixed precision (bf16 on CPU or GPU) must cover them explicitly.
            with self.accelerator.autocast():
                inputs["encoder_outputs"] = self.encoder_split.top(prefix.to(weight.device))
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, self._encoder_outputs(inputs, augment=model.training),
                                    return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None,
                        **gen_kwargs):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            inputs = self._encoder_outputs(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only,
                                       ignore_keys=ignore_keys, **gen_kwargs)


def recompute_prefix(split: EncoderSplit, features: torch.Tensor, keys: Sequence[str],
                     store: ArrayCache | None) -> torch.Tensor:
    """The frozen prefix of a batch whose cache entries were evicted: computed as the fill
    does, stored again, and rounded to the cache dtype so the batch equals a cache hit."""
    weight = split.encoder.conv1.weight
    hidden = split.prefix(features.to(weight.device, split.compute_dtype())).float().cpu().numpy()
    if store is not None:
        for key, array in zip(keys, hidden, strict=True):
            store.put(key, array)
        hidden = hidden.astype(store.dtype).astype(np.float32)
    return torch.from_numpy(hidden)


class KeyedDataset(Protocol):
    """What the fill needs of ``training.SpeechDataset``: audio keys and items by index."""

    keys: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def fill_across_processes(split: EncoderSplit, store: ArrayCache,
                          datasets: Sequence[KeyedDataset], features: MelFeatures, *,
                          batch_size: int, device: torch.device) -> int:
    """Fill the cache for every utterance; returns how many this process computed.

    Under torchrun with a cache directory each process computes its share and writes it to
    disk, then all wait and read the others' shares from there, so each entry is computed once.
    What is still missing then (a memory-only cache, a directory not shared between nodes, an
    evicted entry) each process computes itself: its Trainer shard changes every epoch, so every
    process needs every entry."""
    state = tracking.distributed_state()
    shared_disk = state.num_processes > 1 and store.directory is not None
    all_items = [[dataset[i] for i in range(len(dataset))] for dataset in datasets]

    def fill(dataset: KeyedDataset, items: list[dict[str, Any]], indices: Sequence[int],
             persist: bool) -> int:
        return fill_encoder_cache(
            split, store, [dataset.keys[i] for i in indices],
            lambda j: features([items[indices[j]]])[0], batch_size=batch_size, device=device,
            dtype=split.compute_dtype(), persist=persist)

    computed = 0
    if shared_disk:
        for dataset, items in zip(datasets, all_items, strict=True):
            with state.split_between_processes(list(range(len(dataset)))) as share:
                computed += fill(dataset, items, share, persist=True)
        state.wait_for_everyone()
    for dataset, items in zip(datasets, all_items, strict=True):
        computed += fill(dataset, items, range(len(dataset)), persist=False)
    log.info("encoder cache: process %d of %d computed %d entries", state.process_index,
             state.num_processes, computed)
    return computed


@dataclass
class EncoderCacheInUse:
    split: EncoderSplit
    store: ArrayCache


def prepare_encoder_cache(cfg: ExperimentConfig, model: torch.nn.Module,
                          datasets: Sequence[KeyedDataset], features: MelFeatures,
                          device: torch.device, mlf: tracking.Tracker
                          ) -> EncoderCacheInUse | None:
    """Fill the frozen-encoder cache for every utterance, or say (in the run) why not; log the
    cache directory's size (``cache_disk_mb``, ``cache_disk_entries``) either way."""
    try:
        return _fill_or_refuse(cfg, model, datasets, features, device, mlf)
    finally:
        if mlf.enabled and cfg.training.cache_dir:
            used, entries = disk_usage(cfg.training.cache_dir)
            mlf.log_metrics({"cache_disk_mb": used / 2**20, "cache_disk_entries": entries})


def _fill_or_refuse(cfg: ExperimentConfig, model: torch.nn.Module,
                    datasets: Sequence[KeyedDataset], features: MelFeatures,
                    device: torch.device, mlf: tracking.Tracker) -> EncoderCacheInUse | None:
    encoder = whisper_encoder(model)
    k = frozen_encoder_layers(cfg.finetuning, len(encoder.layers))
    refusal = cache_refusal(encoder, k, cfg.training.cache_encoder)
    mlf.log_params({"cache.encoder_active": refusal is None})
    if refusal is not None:
        mlf.set_tag("cache.encoder_refusal", refusal)
        log.info("encoder cache off: %s", refusal)
        return None
    split = EncoderSplit(encoder, k)
    store = shared_cache(f"encoder-{split.fingerprint()}-{features.cache_namespace()}",
                         cfg.training.cache_dir, cfg.training.cache_memory_mb,
                         cfg.training.cache_dtype, max_disk_gb=cfg.training.cache_max_gb)
    store.reset_counters()
    started = time.perf_counter()
    computed = fill_across_processes(split, store, datasets, features,
                                     batch_size=cfg.evaluation.batch_size, device=device)
    counts = gather_object([computed])
    metrics = {"cache_encoder_fill_s": time.perf_counter() - started,
               "cache_encoder_computed": sum(counts)}
    if len(counts) > 1:
        metrics.update({f"cache_encoder_computed_rank{rank}": n for rank, n in enumerate(counts)})
    mlf.log_metrics(metrics)
    missing = [key for d in datasets for key in d.keys if store.get(key) is None]
    if missing and store.directory is None:
        mlf.set_tag("cache.encoder_refusal", "over the memory budget and no cache_dir")
        log.warning("encoder cache off: %d arrays did not fit the memory budget and "
                    "training.cache_dir is empty", len(missing))
        return None
    if missing:  # evicted by the disk cap: recomputed on use, every epoch
        log.warning("encoder cache: %d arrays were evicted already; training.cache_max_gb=%s "
                    "is below this run's data, so they are recomputed in every epoch",
                    len(missing), cfg.training.cache_max_gb)
    store.reset_counters()
    # The fill's own lookups count: a cold cache computes every utterance once.
    store.misses = computed
    store.hits = sum(len(d) for d in datasets) - computed
    return EncoderCacheInUse(split, store)
