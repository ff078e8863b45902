"""Transcribe files, folders and hour-long recordings with any model reference.

Clips up to 30 s are decoded in length-sorted batches (``generation.generate_batches``); longer
recordings go through transformers' sequential long-form generation, which moves a 30 s window by
the model's own timestamps (optionally conditioned on the previous window's text) instead of
cutting at fixed 30 s boundaries that split words. A file that cannot be decoded is reported
and the others are still transcribed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from tqdm.auto import tqdm
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from whisper_exp.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioError,
    find_audio_files,
    load_audio,
    probe,
)
from whisper_exp.decoding import (
    FALLBACK_TEMPERATURES,
    PROMPT_POSITIONS,
    SHORT_FORM_MAX_S,
    Decoded,
    DecodeOptions,
    Segment,
    TranscribeError,
    Word,
    check_decode_options,
    language_code,
    window_max_new_tokens,
)
from whisper_exp.generation import generate_rows
from whisper_exp.modeling import is_multilingual, load_for_inference
from whisper_exp.transcript_formats import Transcript

log = logging.getLogger(__name__)

# Whisper paper's long-form fallback settings (as transformers documents them).
FALLBACK_SETTINGS: dict[str, Any] = {
    "temperature": FALLBACK_TEMPERATURES,
    "compression_ratio_threshold": 1.35,
    "logprob_threshold": -1.0,
    "no_speech_threshold": 0.6,
}


def default_alignment_heads(config: Any) -> list[list[int]]:
    """Every cross-attention head of the decoder's upper half: what openai-whisper and the
    CTranslate2 converter use for a model that names no alignment heads, so both backends align
    words alike (stock checkpoints ship tuned heads in their generation config)."""
    layers, heads = int(config.decoder_layers), int(config.decoder_attention_heads)
    return [[layer, head] for layer, head in
            itertools.product(range(layers // 2, layers), range(heads))]


# --------------------------------------------------------------------------- the model


class Transcriber:
    """A loaded model that turns 16 kHz arrays or files into text with segments."""

    def __init__(self, model: WhisperForConditionalGeneration, processor: WhisperProcessor,
                 name: str = "") -> None:
        self.model = model
        self.processor = processor
        self.name = name

    @classmethod
    def load(cls, reference: str, device: torch.device | None = None) -> Transcriber:
        """Hub name, local path, ``runs:/<id>`` or ``models:/<name>@<alias>`` (adapters are
        merged into their base). A request without a language decodes the one the model was
        trained for, or lets a multilingual model detect it (``default_language``)."""
        try:
            model, processor = load_for_inference(reference, device)
        except (OSError, MlflowException) as exc:
            reason = str(exc).rstrip(".")
            raise TranscribeError(
                f"cannot load model {reference!r}: {reason}. Pass a Hugging Face hub name, a "
                "local model folder, runs:/<run_id> or models:/<name>@<alias>") from None
        return cls(model, processor, reference)

    @property
    def multilingual(self) -> bool:
        return is_multilingual(self.model)

    @property
    def default_language(self) -> str | None:
        """The language decoded when a request names none; None: detected per clip (or an
        English-only model)."""
        return getattr(self.model.generation_config, "language", None) if self.multilingual \
            else None

    @property
    def known_language_codes(self) -> set[str]:
        """Codes the checkpoint has language tokens for (empty: any Whisper language)."""
        known = getattr(self.model.generation_config, "lang_to_id", None) or {}
        return {token.strip("<|>") for token in known}

    def check_options(self, options: DecodeOptions) -> None:
        """Reject options the model cannot honour, before any audio is decoded."""
        check_decode_options(options, self.multilingual,
                             int(self.model.config.max_target_positions),
                             self.known_language_codes)

    def _language_argument(self, language: str | None) -> dict[str, str]:
        """``generate`` kwargs for a language request; English-only models take none."""
        code = language_code(language, self.multilingual, self.known_language_codes)
        return {"language": code} if code else {}

    def _generate_kwargs(self, options: DecodeOptions) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_beams": options.num_beams,
                                  **self._language_argument(options.language)}
        if options.max_new_tokens is not None:
            kwargs["max_new_tokens"] = options.max_new_tokens
        if options.prompt:
            kwargs["prompt_ids"] = self._prompt_ids(options.prompt)
        if options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature)
        if options.word_timestamps:
            gen = self.model.generation_config
            if not getattr(gen, "alignment_heads", None):
                gen.alignment_heads = default_alignment_heads(self.model.config)
            kwargs["return_token_timestamps"] = True
        return kwargs

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        """``<|startofprev|>`` and the prompt's last tokens: at most half the decoder's positions,
        as openai-whisper and transformers' long-form conditioning keep."""
        ids = self.processor.get_prompt_ids(prompt, return_tensors="pt")
        keep = int(self.model.config.max_target_positions) // 2 - 1
        if len(ids) > keep:
            ids = torch.cat([ids[:1], ids[len(ids) - keep + 1:]])
        return ids.to(next(self.model.parameters()).device)

    def _token_limit(self, kwargs: dict[str, Any]) -> int:
        """New tokens that fit after the decoder prompt (and a decoder prompt text)."""
        prompt = len(kwargs["prompt_ids"]) if "prompt_ids" in kwargs else 0
        return int(self.model.config.max_target_positions) - PROMPT_POSITIONS - prompt

    def _words(self, ids: list[int], ends: list[float], duration: float,
               language: str | None) -> list[Word]:
        """Words from tokens and each token's end time (cross-attention alignment), grouped and
        punctuation-merged as transformers' ASR pipeline does; a token starts where the one
        before it ended."""
        from transformers.models.whisper.tokenization_whisper import (
            LANGUAGES,
            _collate_word_timestamps,
        )

        first_special = int(self.processor.tokenizer.eos_token_id)
        tokens, spans, previous_end = [], [], 0.0
        for token, end in zip(ids, ends, strict=True):
            if token < first_special:
                tokens.append(token)
                spans.append((previous_end, end))
            previous_end = end
        if not tokens:
            return []
        words, last_start = [], 0.0
        for item in _collate_word_timestamps(self.processor.tokenizer, tokens, spans,
                                             LANGUAGES.get(language or "", language), False):
            start = round(min(max(float(item["timestamp"][0]), last_start), duration), 3)
            end = round(min(max(float(item["timestamp"][1]), start), duration), 3)
            if item["text"].strip():
                words.append(Word(item["text"].strip(), start, end))
                last_start = start
        return words

    def _decode_row(self, row: dict[str, torch.Tensor], duration: float,
                    options: DecodeOptions) -> Decoded:
        ids = row["sequences"]
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        decoded = Decoded(text, self._segments(ids.tolist(), duration, options.temperature)
                          if options.timestamps else [], language=self._language(options))
        if "token_timestamps" in row:
            decoded.words = self._words(ids.tolist(), row["token_timestamps"].tolist(),
                                        duration, decoded.language)
        return decoded

    def _language(self, options: DecodeOptions) -> str | None:
        """The language decoded, where known without detecting it: the request's, the model's
        own, English for an English-only model (None: detected per clip and not reported)."""
        if not self.multilingual:
            return "en"
        return language_code(options.language or self.default_language, True,
                             self.known_language_codes)

    def _segments(self, ids: list[int], duration: float,
                  temperature: float = 0.0) -> list[Segment]:
        """Timed segments from ``<|t0|> text <|t1|>`` token runs.

        Parsed here rather than with ``tokenizer.decode(output_offsets=True)``: in transformers
        5 that derives the first timestamp id from ``all_special_ids``, which no longer includes
        ``<|notimestamps|>``, and shifts every time by 2.12 s for Whisper's vocabulary.
        """
        tokenizer = self.processor.tokenizer
        timestamp_begin = int(self.model.generation_config.no_timestamps_token_id) + 1
        first_special = int(tokenizer.eos_token_id)
        segments: list[Segment] = []
        start, text_ids = 0.0, []

        def close(end: float) -> None:
            text = tokenizer.decode(text_ids, skip_special_tokens=True).strip()
            if text:
                segments.append(Segment(round(min(start, duration), 3),
                                        round(min(max(end, start), duration), 3), text,
                                        tokens=list(text_ids), temperature=temperature))

        for token in ids:
            if token >= timestamp_begin:
                time = (token - timestamp_begin) * 0.02
                if text_ids:
                    close(time)
                    text_ids = []
                start = time
            elif token < first_special:
                text_ids.append(token)
        if text_ids:  # cut off before its closing timestamp
            close(duration)
        return segments

    @torch.inference_mode()
    def _long_form(self, audio: np.ndarray, options: DecodeOptions) -> Decoded:
        """Sequential long-form generation over the whole recording (timestamps required)."""
        inputs = self.processor.feature_extractor(
            [audio], sampling_rate=SAMPLE_RATE, truncation=False, padding="longest",
            return_attention_mask=True, return_tensors="pt")
        parameter = next(self.model.parameters())
        kwargs = self._generate_kwargs(options)
        kwargs["max_new_tokens"] = min(window_max_new_tokens(
            options, int(self.model.config.max_target_positions)), self._token_limit(kwargs))
        if options.temperature_fallback:
            kwargs.update(FALLBACK_SETTINGS)
            # A sampled request starts the schedule at its own temperature.
            kwargs["temperature"] = tuple(t for t in FALLBACK_TEMPERATURES
                                          if t >= options.temperature) or (options.temperature,)
            kwargs.pop("do_sample", None)
        output = self.model.generate(
            input_features=inputs.input_features.to(parameter.device, parameter.dtype),
            attention_mask=inputs.attention_mask.to(parameter.device),
            return_timestamps=True, return_segments=True,
            condition_on_prev_tokens=options.condition_on_prev_tokens, **kwargs)
        tokenizer = self.processor.tokenizer
        duration = len(audio) / SAMPLE_RATE
        segments, words = [], []
        language = self._language(options)
        for segment in output["segments"][0]:
            ids = segment["tokens"].tolist()
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if not text:
                continue
            start = round(min(float(segment["start"]), duration), 3)
            # The fallback's temperature per window is not reported: left out.
            segments.append(Segment(
                start, round(min(max(float(segment["end"]), start), duration), 3), text,
                tokens=[t for t in ids if t < int(tokenizer.eos_token_id)]))
            if "token_timestamps" in segment:
                words += self._words(ids, segment["token_timestamps"].tolist(), duration,
                                     language)
        text = tokenizer.decode(output["sequences"][0], skip_special_tokens=True).strip()
        return Decoded(text, segments, words, language)

    def transcribe_audio(self, audios: Sequence[np.ndarray], options: DecodeOptions,
                         on_done: Callable[[int], None] | None = None) -> list[Decoded]:
        """16 kHz mono arrays -> text (and segments when ``options.return_timestamps``; always
        for recordings over 30 s, whose decoding needs them; and words with
        ``options.word_timestamps``). ``on_done(n)`` reports progress."""
        self.check_options(options)
        limit = int(SHORT_FORM_MAX_S * SAMPLE_RATE)
        short = [i for i, audio in enumerate(audios) if len(audio) <= limit]
        results: list[Decoded | None] = [None] * len(audios)
        if short:
            kwargs = self._generate_kwargs(options)
            if options.timestamps:
                kwargs["return_timestamps"] = True
            rows = generate_rows(self.model, self.processor, [audios[i] for i in short],
                                 batch_size=options.batch_size, progress=False,
                                 on_batch=on_done, token_limit=self._token_limit(kwargs),
                                 **kwargs)
            for index, row in zip(short, rows, strict=True):
                results[index] = self._decode_row(row, len(audios[index]) / SAMPLE_RATE,
                                                  options)
        for index, audio in enumerate(audios):
            if len(audio) > limit:
                results[index] = self._long_form(audio, options)
                if on_done is not None:
                    on_done(1)
        return [r if r is not None else Decoded("") for r in results]

    def transcribe_files(self, files: Sequence[str | Path], options: DecodeOptions,
                         progress: bool = True) -> list[Transcript]:
        """Files in, one Transcript each (same order). Headers are read first so short files are
        batched by length and only one batch of audio is in memory at a time."""
        self.check_options(options)
        transcripts = [Transcript(str(f)) for f in files]
        durations: dict[int, float] = {}
        with tqdm(total=len(files), desc="transcribing", unit="file",
                  disable=not progress) as bar:
            for index, transcript in enumerate(transcripts):
                try:
                    durations[index] = probe(transcript.file).duration_s
                except AudioError as exc:
                    _fail(transcript, exc)
                    bar.update(1)
            order = sorted(durations, key=durations.__getitem__)
            short = [i for i in order if durations[i] <= SHORT_FORM_MAX_S]
            long = [i for i in order if durations[i] > SHORT_FORM_MAX_S]
            for start in range(0, len(short), options.batch_size):
                self._transcribe_group(transcripts, short[start:start + options.batch_size],
                                       options, bar)
            for index in long:
                self._transcribe_group(transcripts, [index], options, bar)
        return transcripts

    def _transcribe_group(self, transcripts: list[Transcript], indices: list[int],
                          options: DecodeOptions, bar: tqdm) -> None:
        audios, decoded_indices = [], []
        for index in indices:
            try:
                audio = load_audio(transcripts[index].file)
            except AudioError as exc:
                _fail(transcripts[index], exc)
                bar.update(1)
                continue
            transcripts[index].duration = round(len(audio) / SAMPLE_RATE, 3)
            audios.append(audio)
            decoded_indices.append(index)
        if not audios:
            return
        for index, result in zip(decoded_indices,
                                 self.transcribe_audio(audios, options, on_done=bar.update),
                                 strict=True):
            transcripts[index].text = result.text
            transcripts[index].segments = result.segments
            transcripts[index].words = result.words


def _fail(transcript: Transcript, exc: Exception) -> None:
    transcript.error = (f"{exc}; check that the file is a complete audio file "
                        f"({', '.join(AUDIO_EXTENSIONS)})")
    log.warning("%s: %s (skipped; the other files are still transcribed)", transcript.file,
                transcript.error)


# --------------------------------------------------------------------------- files


def collect_audio_files(paths: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """Files as given plus the audio files in folders (sorted), without duplicates."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files = find_audio_files(path, recursive=recursive)
            if not files:
                hint = "" if recursive else " (add --recursive to search sub-folders)"
                raise TranscribeError(
                    f"{path}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in this folder"
                    f"{hint}")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise TranscribeError(f"{path}: no such file or folder")
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


def transcribe_paths(
    paths: Iterable[str | Path],
    model_ref: str,
    *,
    recursive: bool = False,
    batch_size: int = 16,
    num_beams: int = 1,
    return_timestamps: bool = False,
    condition_on_prev_tokens: bool = True,
    temperature_fallback: bool = True,
    language: str | None = None,
    max_new_tokens: int | None = None,
    word_timestamps: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
) -> list[Transcript]:
    """Transcribe audio files and folders with a hub name, path, ``runs:/`` or ``models:/``
    reference. Files that fail to decode come back with ``error`` set."""
    files = collect_audio_files(paths, recursive)
    options = DecodeOptions(batch_size=batch_size, num_beams=num_beams,
                            max_new_tokens=max_new_tokens, return_timestamps=return_timestamps,
                            condition_on_prev_tokens=condition_on_prev_tokens,
                            temperature_fallback=temperature_fallback, language=language,
                            word_timestamps=word_timestamps)
    transcriber = Transcriber.load(model_ref, device)
    transcriber.check_options(options)
    return transcriber.transcribe_files(files, options, progress=progress)
