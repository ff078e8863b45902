"""Batched Whisper decoding of clips up to 30 s with transformers: shared by evaluation (scoring
a dataset) and inference (``transcribe.Transcriber``), so neither imports the other and both
decode a clip with the same batches and token cap."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from whisper_exp.audio import SAMPLE_RATE
from whisper_exp.decoding import default_max_new_tokens


@torch.inference_mode()
def generate_batches(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    **generate_kwargs: Any,
) -> list[torch.Tensor]:
    """Generated token ids per clip (each up to 30 s), in input order.

    Batches are length-sorted so padding is rare; ``generate_kwargs`` go to ``model.generate``
    (``num_beams``, ``return_timestamps``, ``language`` ...); without a ``max_new_tokens`` each
    batch gets ``decoding.default_max_new_tokens`` of its longest clip. ``on_batch(n)`` is
    called after each batch of ``n`` clips (for progress over files).
    """
    max_new_tokens = generate_kwargs.pop("max_new_tokens", None)
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    ids: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(audios)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="transcribing", unit="batch", disable=not progress):
        features = processor.feature_extractor(
            [audios[i] for i in batch], sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(device, dtype)
        longest_s = max(len(audios[i]) for i in batch) / SAMPLE_RATE
        generated = model.generate(
            input_features=features, **generate_kwargs,
            max_new_tokens=max_new_tokens or default_max_new_tokens(longest_s))
        for index, row in zip(batch, generated.cpu(), strict=True):
            ids[index] = row
        if on_batch is not None:
            on_batch(len(batch))
    return ids


def transcribe_arrays(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Batched greedy (or beam) decoding of clips up to 30 s to plain text (``max_new_tokens``
    None: scaled to the clip length, as in ``generate_batches``)."""
    ids = generate_batches(model, processor, audios, batch_size=batch_size, progress=progress,
                           num_beams=num_beams, max_new_tokens=max_new_tokens)
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
