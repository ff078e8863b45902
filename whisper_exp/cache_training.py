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
from transformers import Seq2SeqTrainer, WhisperProcessor

from whisper_exp import tracking
from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.cache import (
    ArrayCache,
    EncoderSplit,
    cache_refusal,
    feature_settings_fingerprint,
    fill_encoder_cache,
    shared_cache,
)
from whisper_exp.config import ExperimentConfig
from whisper_exp.modeling import frozen_encoder_layers, whisper_encoder

log = logging.getLogger(__name__)


def pad_labels(labels: list[list[int]], start_id: int) -> torch.Tensor:
    """Pad with -100 and drop the start token (the model prepends ``decoder_start_token_id``
    when it shifts labels right)."""
    if all(ids and ids[0] == start_id for ids in labels):
        labels = [ids[1:] for ids in labels]
    width = max(len(ids) for ids in labels)
    padded = torch.full((len(labels), width), -100, dtype=torch.long)
    for row, ids in enumerate(labels):
        padded[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return padded


@dataclass
class MelFeatures:
    """Log-mel features by audio key, through the mel cache when there is one."""

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
                [load_audio(items[i]["audio"]) for i in missing], sampling_rate=SAMPLE_RATE,
                return_tensors="np").input_features
            for i, array in zip(missing, computed, strict=True):
                found[i] = array
                if self.cache is not None:
                    self.cache.put(items[i]["key"], array)
        return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in found]))


@dataclass
class CachedEncoderCollator:
    """Frozen-encoder outputs from the cache instead of audio: the encoder prefix never runs."""

    cache: ArrayCache
    decoder_start_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        hidden = []
        for item in items:
            array = self.cache.get(item["key"])
            if array is None:
                raise RuntimeError(f"encoder cache lost {item['audio']}; rerun with "
                                   "training.cache_encoder=false and report this")
            hidden.append(np.asarray(array, dtype=np.float32))
        return {"encoder_prefix": torch.from_numpy(np.stack(hidden)),
                "labels": pad_labels([item["labels"] for item in items],
                                     self.decoder_start_token_id)}


class CachedEncoderTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` fed cached frozen-prefix states: it runs only the encoder's trainable
    top (layers k.. + layer norm, with grad) and hands the result to the model as
    ``encoder_outputs``, so the loss, generation and metrics are the standard ones."""

    def __init__(self, *args, encoder_split: EncoderSplit, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder_split = encoder_split

    def _encoder_outputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = dict(inputs)
        prefix = inputs.pop("encoder_prefix", None)
        if prefix is not None:
            weight = self.encoder_split.encoder.layer_norm.weight
            inputs["encoder_outputs"] = self.encoder_split.top(prefix.to(weight.device))
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, self._encoder_outputs(inputs),
                                    return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None,
                        **gen_kwargs):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            inputs = self._encoder_outputs(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only,
                                       ignore_keys=ignore_keys, **gen_kwargs)


class KeyedDataset(Protocol):
    """What the fill needs of ``training.SpeechDataset``: audio keys and items by index."""

    keys: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclass
class EncoderCacheInUse:
    split: EncoderSplit
    store: ArrayCache


def prepare_encoder_cache(cfg: ExperimentConfig, model: torch.nn.Module,
                          datasets: Sequence[KeyedDataset], features: MelFeatures,
                          device: torch.device, mlf: tracking.Tracker
                          ) -> EncoderCacheInUse | None:
    """Fill the frozen-encoder cache for every utterance, or say (in the run) why not."""
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
                         cfg.training.cache_dtype)
    store.reset_counters()
    started = time.perf_counter()
    dtype = encoder.layer_norm.weight.dtype
    computed = 0
    for dataset in datasets:
        items = [dataset[i] for i in range(len(dataset))]
        computed += fill_encoder_cache(
            split, store, dataset.keys, lambda i, items=items: features([items[i]])[0],
            batch_size=cfg.evaluation.batch_size, device=device,
            dtype=dtype if dtype in (torch.float32, torch.float16, torch.bfloat16)
            else torch.float32)
    mlf.log_metrics({"cache_encoder_fill_s": time.perf_counter() - started,
                     "cache_encoder_computed": computed})
    missing = [key for d in datasets for key in d.keys if store.get(key) is None]
    if missing:
        mlf.set_tag("cache.encoder_refusal", "over the memory budget and no cache_dir")
        log.warning("encoder cache off: %d arrays did not fit the memory budget and "
                    "training.cache_dir is empty", len(missing))
        return None
    store.reset_counters()
    # The fill's own lookups count: a cold cache computes every utterance once.
    store.misses = computed
    store.hits = sum(len(d) for d in datasets) - computed
    return EncoderCacheInUse(split, store)
