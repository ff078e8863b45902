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
    rows = generate_rows(model, processor, audios, batch_size=batch_size, progress=progress,
                         on_batch=on_batch, **generate_kwargs)
    return [row["sequences"] for row in rows]


@torch.inference_mode()
def generate_rows(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    token_limit: int | None = None,
    **generate_kwargs: Any,
) -> list[dict[str, torch.Tensor]]:
    """``generate_batches`` per clip as ``{"sequences": ids, "budget": max_new_tokens}``, plus
    ``"token_timestamps"``
    (each token's end time in seconds, by cross-attention alignment) when ``generate_kwargs``
    asks for ``return_token_timestamps``; the attention mask then bounds the alignment to the
    clip's own frames. ``token_limit`` caps the token budget (a decoder prompt takes room)."""
    max_new_tokens = generate_kwargs.pop("max_new_tokens", None)
    with_timings = bool(generate_kwargs.get("return_token_timestamps"))
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    rows: list[dict[str, torch.Tensor]] = [
        {"sequences": torch.empty(0, dtype=torch.long)} for _ in audios]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="transcribing", unit="batch", disable=not progress):
        inputs = processor.feature_extractor(
            [audios[i] for i in batch], sampling_rate=SAMPLE_RATE, return_tensors="pt",
            return_attention_mask=with_timings)
        if with_timings:
            generate_kwargs["attention_mask"] = inputs.attention_mask.to(device)
        longest_s = max(len(audios[i]) for i in batch) / SAMPLE_RATE
        budget = min(max_new_tokens or default_max_new_tokens(longest_s),
                     token_limit or int(model.config.max_target_positions))
        generated = model.generate(
            input_features=inputs.input_features.to(device, dtype), **generate_kwargs,
            max_new_tokens=budget)
        outputs = generated if isinstance(generated, dict) else {"sequences": generated}
        for position, index in enumerate(batch):
            rows[index] = {key: outputs[key][position].cpu()
                           for key in ("sequences", "token_timestamps") if key in outputs}
            rows[index]["budget"] = torch.tensor(budget)
        if on_batch is not None:
            on_batch(len(batch))
    return rows


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
    return transcribe_arrays_with_budget(model, processor, audios, batch_size=batch_size,
                                         num_beams=num_beams, max_new_tokens=max_new_tokens,
                                         progress=progress)[0]


def hit_budget(row: dict[str, torch.Tensor], end_ids: set[int]) -> bool:
    """Whether the decoder stopped at its token budget rather than at end-of-text.

    transformers' Whisper ``generate`` returns the generated tokens without the prompt and
    without the final end-of-text (shorter rows of a batch are padded with it), so a clip
    that ended on its own holds fewer than ``budget`` other tokens."""
    tokens = sum(int(token) not in end_ids for token in row["sequences"])
    return tokens >= int(row["budget"])


def transcribe_arrays_with_budget(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> tuple[list[str], list[bool]]:
    """``transcribe_arrays`` and, per clip, whether it hit the token budget (a loop that
    only the cap stopped: the report's ``budget_hit_share``)."""
    rows = generate_rows(model, processor, audios, batch_size=batch_size, progress=progress,
                         num_beams=num_beams, max_new_tokens=max_new_tokens)
    end_ids: set[int] = set()
    for value in (model.generation_config.eos_token_id, model.generation_config.pad_token_id):
        end_ids.update(value if isinstance(value, list) else [] if value is None else [value])
    texts = [processor.tokenizer.decode(row["sequences"], skip_special_tokens=True).strip()
             for row in rows]
    return texts, [hit_budget(row, end_ids) for row in rows]
