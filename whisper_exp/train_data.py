"""The training set as the Trainer sees it: tokenised labels, audio content keys (the caches'
keys, one per augmented copy), durations, and the collator that turns items into model inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import WhisperProcessor

from whisper_exp import augmentation
from whisper_exp.audio import probe
from whisper_exp.cache import audio_fingerprint
from whisper_exp.cache_training import MelFeatures
from whisper_exp.data import Example
from whisper_exp.labels import TrainingTargets, collate_labels, previous_utterances
from whisper_exp.trainer import AUDIO_SECONDS, audio_seconds_tensor


class SpeechDataset(torch.utils.data.Dataset):
    """Examples with tokenised labels, audio content keys and lengths (for the token budget of
    evaluation batches); audio is decoded lazily.

    ``perturbations`` (training set): one extra copy of every utterance per perturbation, after
    the originals, under its own cache key and with the original transcript; copies longer than
    ``max_duration_s`` are left out (counted in ``dropped``)."""

    def __init__(self, examples: list[Example], processor: WhisperProcessor,
                 targets: dict[str, Any] | None = None,
                 perturbations: Sequence[augmentation.Perturbation] = (),
                 max_duration_s: float = math.inf):
        labels = [processor.tokenizer(e.text).input_ids for e in examples]
        copies = augmentation.expand(perturbations, [audio_fingerprint(e.audio) for e in examples],
                                     [probe(e.audio).duration_s for e in examples], max_duration_s)
        self.examples = [examples[i] for i in copies.source]
        self.labels = [labels[i] for i in copies.source]
        self.keys, self.seconds = copies.keys, copies.seconds
        self.perturbations, self.dropped = copies.perturbations, copies.dropped
        # Training set: timestamp / prompt targets drawn per example per epoch (labels.py).
        self.targets = (TrainingTargets(self.examples, self.labels, self.seconds,
                                        processor.tokenizer, **targets) if targets else None)
        if self.targets is not None and len(self.examples) > len(examples):
            # A copy is prompted with its original's previous utterance, never with itself or
            # another copy of its own row (same row number: the default order would pick those).
            previous = previous_utterances(examples)
            self.targets.previous = [previous[i] for i in copies.source]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"audio": self.examples[index].audio, "labels": self.labels[index],
                "key": self.keys[index], "seconds": self.seconds[index],
                augmentation.PERTURBATION: self.perturbations[index]}
        return {**item, **self.targets(index)} if self.targets else item


@dataclass
class SpeechCollator:
    """Log-mel features (cached) + padded labels: the standard path for any strategy."""

    features: MelFeatures
    decoder_start_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"input_features": self.features(items),
                **collate_labels(items, self.decoder_start_token_id),
                AUDIO_SECONDS: audio_seconds_tensor(items)}
