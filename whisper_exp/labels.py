"""Decoder targets for training: plain labels, labels with timestamp tokens, and labels after
a previous-utterance prompt (masked out of the loss), drawn per example per epoch.

Whisper's formats, as OpenAI trained it and transformers decodes it:

- plain: ``<|startoftranscript|> [lang task] <|notimestamps|> text <|endoftext|>``
- timestamps: ``<|startoftranscript|> [lang task] <|0.00|> text <|T|> <|endoftext|>`` with T the
  utterance's duration on the 0.02 s grid (one segment = the utterance)
- prompt: ``<|startofprev|> previous text <|startoftranscript|> ...`` (``get_prompt_ids``)

Without a prompt the model builds ``decoder_input_ids`` itself by shifting the labels right
behind ``decoder_start_token_id``; with one the decoder input must start with
``<|startofprev|>``, so a batch holding a prompted example carries explicit
``decoder_input_ids`` and labels with the prompt positions set to -100.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from whisper_exp.config import ConfigError
from whisper_exp.data import Example

IGNORE = -100
TIME_STEP_S = 0.02
MAX_TIME_S = 30.0
# Batch item key: how many leading tokens of ``labels`` are prompt (not trained on).
PROMPT_LENGTH = "prompt_length"


@dataclass(frozen=True)
class SpecialTokens:
    start: int  # <|startoftranscript|>
    previous: int  # <|startofprev|>
    no_timestamps: int  # <|notimestamps|>
    time_zero: int  # <|0.00|>; <|t|> is time_zero + t / 0.02
    end: int  # <|endoftext|>

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
            ("start", "<|startoftranscript|>"), ("previous", "<|startofprev|>"),
            ("no_timestamps", "<|notimestamps|>"))}
        missing = [name for name, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ConfigError(f"the tokenizer has no Whisper special token(s) {missing}; "
                              "timestamp and prompt training need a Whisper tokenizer")
        # Timestamps follow <|notimestamps|> (generation's timestamp_begin); older tokenizers
        # such as tiny.en's have no <|0.00|> entry in their vocabulary, the model does.
        return cls(**ids, time_zero=ids["no_timestamps"] + 1, end=tokenizer.eos_token_id)


def time_token(seconds: float, tokens: SpecialTokens) -> int:
    """``<|T|>`` for ``seconds`` rounded to Whisper's 0.02 s grid, capped at 30.00."""
    steps = round(min(max(seconds, 0.0), MAX_TIME_S) / TIME_STEP_S)
    return tokens.time_zero + steps


def with_timestamps(label_ids: Sequence[int], seconds: float,
                    tokens: SpecialTokens) -> list[int]:
    """Plain labels -> the one-segment timestamp form: ``<|notimestamps|>`` becomes
    ``<|0.00|>`` and ``<|T|>`` goes before ``<|endoftext|>``."""
    ids = list(label_ids)
    if tokens.no_timestamps not in ids or ids[-1] != tokens.end:
        raise ValueError("labels must hold <|notimestamps|> and end with <|endoftext|> "
                         f"(tokenizer(text).input_ids), got {ids[:6]}...")
    ids[ids.index(tokens.no_timestamps)] = tokens.time_zero
    return [*ids[:-1], time_token(seconds, tokens), tokens.end]


def with_prompt(label_ids: Sequence[int], prompt_text_ids: Sequence[int],
                tokens: SpecialTokens, max_positions: int) -> tuple[list[int], int]:
    """``<|startofprev|> prompt`` before the labels; returns (ids, prompt length: the tokens
    before ``<|startoftranscript|>``). The prompt keeps its end (the words nearest this
    utterance): at most ``max_positions // 2 - 1`` tokens, as transformers' generate cuts
    prompts, and few enough that the decoder input (all ids but the last) fits
    ``max_positions``. No room: no prompt (length 0)."""
    ids = list(label_ids)
    room = min(max_positions // 2 - 1, max_positions - len(ids))  # after <|startofprev|>
    prompt = list(prompt_text_ids)[-room:] if room > 0 else []
    if not prompt:
        return ids, 0
    return [tokens.previous, *prompt, *ids], 1 + len(prompt)


def previous_utterances(examples: Sequence[Example]) -> list[int | None]:
    """For each example, the index of the previous utterance of the same speaker (else of the
    same source folder) in the order rows were read; None for the first."""
    def group(e: Example) -> str:
        if e.speaker:
            return f"speaker:{e.speaker}"
        return f"folder:{Path(e.audio).parent}" if isinstance(e.audio, str) else "source"

    order = sorted(range(len(examples)), key=lambda i: (_row_number(examples[i]), i))
    last: dict[str, int] = {}
    previous: list[int | None] = [None] * len(examples)
    for i in order:
        key = group(examples[i])
        previous[i] = last.get(key)
        last[key] = i
    return previous


def _row_number(example: Example) -> float:
    """Where the row was read ("metadata.csv line 7", "...[train] row 12"): subsets and splits
    reorder examples, the source order is what "previous" means."""
    words = example.where.split()
    for word, number in zip(words, words[1:], strict=False):
        if word in ("line", "row") and number.isdigit():
            return int(number)
    return math.inf


class TrainingTargets:
    """Per-example, per-epoch draws of the target format (seeded: a run reproduces, and an
    example may get a prompt in one epoch and not the next). ``set_epoch`` before each epoch
    (``EpochCallback``); the draw is a function of (seed, epoch, index) only, so dataloader
    workers and a resumed run draw the same."""

    def __init__(self, examples: Sequence[Example], label_ids: Sequence[Sequence[int]],
                 seconds: Sequence[float], tokenizer, *, timestamp_probability: float,
                 prompt_probability: float, seed: int, max_positions: int):
        self.label_ids = label_ids
        self.seconds = seconds
        self.tokens = SpecialTokens.from_tokenizer(tokenizer)
        self.timestamp_probability = timestamp_probability
        self.prompt_probability = prompt_probability
        self.seed = seed
        self.max_positions = max_positions
        self.epoch = 0
        self.previous = previous_utterances(examples)
        # get_prompt_ids' text part (" " + text, no special tokens), per example.
        self.prompt_text_ids = ([tokenizer(" " + e.text.strip(), add_special_tokens=False)
                                 .input_ids for e in examples] if prompt_probability > 0 else [])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        use_time = rng.random() < self.timestamp_probability
        use_prompt = rng.random() < self.prompt_probability
        ids = list(self.label_ids[index])
        if use_time:
            ids = with_timestamps(ids, self.seconds[index], self.tokens)
        prompt_length = 0
        previous = self.previous[index]
        if use_prompt and previous is not None:
            ids, prompt_length = with_prompt(ids, self.prompt_text_ids[previous], self.tokens,
                                             self.max_positions)
        return {"labels": ids, PROMPT_LENGTH: prompt_length}


class EpochCallback(TrainerCallback):
    """Tells the training targets which epoch starts (accelerate's map-style data loader does
    not pass ``set_epoch`` on to the dataset); a resumed run continues the same epoch's draws."""

    def __init__(self, targets: TrainingTargets):
        self.targets = targets

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.targets.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


def collate_labels(items: Sequence[dict[str, Any]], start_id: int) -> dict[str, torch.Tensor]:
    """``labels`` (padded with -100) for a batch, plus ``decoder_input_ids`` when an item has a
    prompt. Without prompts this is what the model expects of plain labels: the start token
    dropped (the model prepends ``decoder_start_token_id`` when it shifts labels right)."""
    sequences = [list(item["labels"]) for item in items]
    prompts = [int(item.get(PROMPT_LENGTH, 0)) for item in items]
    if not any(prompts):
        if all(ids and ids[0] == start_id for ids in sequences):
            sequences = [ids[1:] for ids in sequences]
        return {"labels": _pad(sequences, IGNORE)}
    # Explicit decoder input: the sequence without its last token; labels: the sequence shifted
    # left, the prompt and its <|startoftranscript|> not trained on.
    inputs = [ids[:-1] for ids in sequences]
    labels = [[IGNORE] * n + ids[1 + n:] for ids, n in zip(sequences, prompts, strict=True)]
    # Decoder padding sits after each row's end behind a causal mask, with -100 labels: its id
    # never matters, <|endoftext|> (the row's own last token) is used.
    decoder = _pad(inputs, sequences[0][-1])
    return {"labels": _pad(labels, IGNORE), "decoder_input_ids": decoder}


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out
