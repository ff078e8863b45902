"""Decoding options and their validation, shared by both inference backends.

``transcribe.Transcriber`` (transformers) and ``ctranslate2_backend.FasterWhisperTranscriber``
(faster-whisper) check a request with the same rules and messages, so the registered model
answers bad params alike whichever backend it carries. Kept free of torch: a ctranslate2-backend
server imports this module and never loads torch.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

# Written next to every saved model, adapter and export (base model, language, task); defined
# here so torch-free code reads it too.
METADATA_FILE = "whisper_exp.json"
MAX_NUM_BEAMS = 16
# Positions the decoder prompt takes (start, language, task, no-timestamps): max_new_tokens must
# leave room for them within the model's max_target_positions (448 for every Whisper size).
PROMPT_POSITIONS = 4
ENGLISH_NAMES = frozenset({"en", "english", "<|en|>"})
# One Whisper window; longer recordings take long-form decoding.
SHORT_FORM_MAX_S = 30.0
# Default token budget of a clip, scaled to its length. Fast read English is about 5 tokens a
# second (the shared speechocean762 set peaks at 3), timestamps add 2 per segment; 10 a second
# plus a floor leaves room for all of it. Without a cap, a clip the model loops on ("jaw, jaw,
# ...") runs to the 444-token limit: on the first 130 dev clips one such loop cost stock tiny.en
# 20 WER points and seconds of decoding. Every backend and entry point uses this same cap, so
# evaluate, transcribe and the served model score a clip alike.
TOKENS_PER_SECOND = 10
MIN_NEW_TOKENS = 24
# Long-form temperature fallback: a window that loops or looks silent is re-decoded at the next
# temperature (the Whisper paper's schedule; each engine keeps its own thresholds).
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def default_max_new_tokens(duration_s: float, limit: int = 448 - PROMPT_POSITIONS) -> int:
    """Token budget for a clip of ``duration_s`` seconds when the caller sets none."""
    return min(limit, MIN_NEW_TOKENS + math.ceil(max(duration_s, 0.0) * TOKENS_PER_SECOND))


class TranscribeError(ValueError):
    """Bad input to transcription: a missing path, an empty folder, an impossible option."""


@dataclass
class Word:
    """One word's timing from cross-attention alignment (both backends)."""

    word: str
    start: float
    end: float


@dataclass
class Segment:
    """A timed stretch of text. The decoder's details (``tokens`` ... ``no_speech_prob``) are
    filled where the backend reports them; they stay out of equality and of ``to_dict`` unless
    asked for, so transcripts and served segments keep their start/end/text shape."""

    start: float
    end: float
    text: str
    tokens: list[int] | None = field(default=None, compare=False)
    temperature: float | None = field(default=None, compare=False)
    avg_logprob: float | None = field(default=None, compare=False)
    compression_ratio: float | None = field(default=None, compare=False)
    no_speech_prob: float | None = field(default=None, compare=False)

    def to_dict(self, details: bool = False) -> dict[str, Any]:
        """start/end/text, plus the decoder details the backend filled when ``details``."""
        data = {"start": self.start, "end": self.end, "text": self.text}
        if details:
            data.update({key: value for key, value in vars(self).items()
                         if key not in data and value is not None})
        return data


@dataclass
class Decoded:
    """What the model made of one recording (``words`` with ``DecodeOptions.word_timestamps``)."""

    text: str
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    # The language it was decoded in (Whisper code), where the backend reports it.
    language: str | None = None


@dataclass
class DecodeOptions:
    """How to decode. ``language`` None keeps the model's own (English for ``.en`` models)."""

    batch_size: int = 16
    num_beams: int = 1
    # None: ``default_max_new_tokens`` of each clip's (short form) or window's (long form) length.
    max_new_tokens: int | None = None
    return_timestamps: bool = False
    # Long-form only (clips up to 30 s are always one greedy pass): the Whisper paper's recipe,
    # as openai-whisper and faster-whisper default to. Each 30 s window gets the previous
    # window's text, and a window that loops or looks silent is re-decoded at temperatures
    # 0.2 ... 1.0. Measured by benchmarks/long_form.py on 3-minute recordings of dev speech:
    # 28.5% WER with both against 47.5% with neither (greedy windows loop and hallucinate).
    # The fallback samples, so long-form output can vary between calls.
    condition_on_prev_tokens: bool = True
    temperature_fallback: bool = True
    language: str | None = None
    # Word timings by cross-attention alignment; implies timestamps (segments) too.
    word_timestamps: bool = False
    # Decoder prompt (earlier text, names, spelling): transformers' prompt_ids, faster-whisper's
    # initial_prompt.
    prompt: str | None = None
    # 0: greedy (or beam). Above 0: sampled at that temperature (OpenAI's 0-1 range).
    temperature: float = 0.0

    @property
    def timestamps(self) -> bool:
        """Timed segments are decoded: asked for, or needed for word timings."""
        return self.return_timestamps or self.word_timestamps


def window_max_new_tokens(options: DecodeOptions, max_target_positions: int = 448) -> int:
    """New tokens per long-form 30 s window. With previous-text conditioning both engines
    prepend up to half the decoder's positions of earlier text and refuse a budget that no
    longer fits, so the budget shrinks to the other half (220 for Whisper's 448)."""
    budget = options.max_new_tokens or default_max_new_tokens(SHORT_FORM_MAX_S)
    if options.condition_on_prev_tokens:
        budget = min(budget, max_target_positions - max_target_positions // 2 - PROMPT_POSITIONS)
    return budget


def language_code(language: str | None, multilingual: bool,
                  known_codes: Collection[str] | None = None) -> str | None:
    """A requested language (name, code or ``<|code|>``) -> Whisper's code, or None for the
    model's own. ``known_codes`` narrows the accepted codes to what the checkpoint has."""
    if not language:
        return None
    wanted = language.strip().lower()
    if not multilingual:
        if wanted in ENGLISH_NAMES:
            return None
        raise TranscribeError(
            f"the model is English-only; it cannot transcribe language {language!r}. "
            "Use a multilingual checkpoint (e.g. openai/whisper-tiny) or drop "
            "the language option.")
    # The language table only: this module does not import torch or transformers' models.
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    code = wanted.strip("<|>")
    code = TO_LANGUAGE_CODE.get(code, code)
    if code not in LANGUAGES or (known_codes and code not in known_codes):
        raise TranscribeError(
            f"unknown language {language!r}; use a Whisper language name or code such as "
            "'english'/'en', 'german'/'de', 'french'/'fr'.")
    return code


def check_decode_options(options: DecodeOptions, multilingual: bool, max_target_positions: int,
                         known_codes: Collection[str] | None = None) -> None:
    """Reject options the model cannot honour, before any audio is decoded."""
    if options.batch_size < 1:
        raise TranscribeError(f"batch_size must be at least 1, got {options.batch_size}")
    if not 1 <= options.num_beams <= MAX_NUM_BEAMS:
        raise TranscribeError(f"num_beams must be between 1 and {MAX_NUM_BEAMS}, got "
                              f"{options.num_beams}")
    limit = max_target_positions - PROMPT_POSITIONS
    if options.max_new_tokens is not None and not 1 <= options.max_new_tokens <= limit:
        raise TranscribeError(f"max_new_tokens must be between 1 and {limit} for this "
                              f"model, got {options.max_new_tokens}")
    if not 0.0 <= options.temperature <= 1.0:
        raise TranscribeError(f"temperature must be between 0 and 1, got {options.temperature}")
    language_code(options.language, multilingual, known_codes)
