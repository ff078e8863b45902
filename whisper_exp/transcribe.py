"""Transcribe files, folders and hour-long recordings with any model reference.

Clips up to 30 s are decoded in length-sorted batches (``evaluation.generate_batches``); longer
recordings go through transformers' sequential long-form generation, which moves a 30 s window by
the model's own timestamps (optionally conditioned on the previous window's text) instead of
cutting at fixed 30 s boundaries that split words. A file that cannot be decoded is reported
and the others are still transcribed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
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
    SHORT_FORM_MAX_S,
    Decoded,
    DecodeOptions,
    Segment,
    TranscribeError,
    check_decode_options,
    language_code,
    window_max_new_tokens,
)
from whisper_exp.evaluation import generate_batches
from whisper_exp.metrics import Scores, make_normalizer, score, utterance_wer
from whisper_exp.modeling import is_multilingual, load_for_inference

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("txt", "json", "srt", "vtt")
# Whisper paper's long-form fallback settings (as transformers documents them).
FALLBACK_SETTINGS: dict[str, Any] = {
    "temperature": FALLBACK_TEMPERATURES,
    "compression_ratio_threshold": 1.35,
    "logprob_threshold": -1.0,
    "no_speech_threshold": 0.6,
}


@dataclass
class Transcript:
    """One input file: its text and timed segments, or the error that stopped it."""

    file: str
    text: str = ""
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def cues(self) -> list[Segment]:
        """Segments for subtitles; one cue for the whole file when there are no timestamps."""
        if self.segments:
            return self.segments
        return [Segment(0.0, self.duration, self.text)] if self.text else []

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        merged into their base). The language is a decoding option, checked per request."""
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
        return kwargs

    def _decode_ids(self, ids: torch.Tensor, duration: float, with_segments: bool) -> Decoded:
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Decoded(text, self._segments(ids.tolist(), duration) if with_segments else [])

    def _segments(self, ids: list[int], duration: float) -> list[Segment]:
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
                                        round(min(max(end, start), duration), 3), text))

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
        kwargs["max_new_tokens"] = window_max_new_tokens(
            options, int(self.model.config.max_target_positions))
        if options.temperature_fallback:
            kwargs.update(FALLBACK_SETTINGS)
        output = self.model.generate(
            input_features=inputs.input_features.to(parameter.device, parameter.dtype),
            attention_mask=inputs.attention_mask.to(parameter.device),
            return_timestamps=True, return_segments=True,
            condition_on_prev_tokens=options.condition_on_prev_tokens, **kwargs)
        tokenizer = self.processor.tokenizer
        duration = len(audio) / SAMPLE_RATE
        segments = []
        for segment in output["segments"][0]:
            text = tokenizer.decode(segment["tokens"], skip_special_tokens=True).strip()
            if text:
                segments.append(Segment(round(min(float(segment["start"]), duration), 3),
                                        round(min(float(segment["end"]), duration), 3), text))
        text = tokenizer.decode(output["sequences"][0], skip_special_tokens=True).strip()
        return Decoded(text, segments)

    def transcribe_audio(self, audios: Sequence[np.ndarray], options: DecodeOptions,
                         on_done: Callable[[int], None] | None = None) -> list[Decoded]:
        """16 kHz mono arrays -> text (and segments when ``options.return_timestamps``; always
        for recordings over 30 s, whose decoding needs them). ``on_done(n)`` reports progress."""
        self.check_options(options)
        limit = int(SHORT_FORM_MAX_S * SAMPLE_RATE)
        short = [i for i, audio in enumerate(audios) if len(audio) <= limit]
        results: list[Decoded | None] = [None] * len(audios)
        if short:
            kwargs = self._generate_kwargs(options)
            if options.return_timestamps:
                kwargs["return_timestamps"] = True
            ids = generate_batches(self.model, self.processor, [audios[i] for i in short],
                                   batch_size=options.batch_size, progress=False,
                                   on_batch=on_done, **kwargs)
            for index, row in zip(short, ids, strict=True):
                results[index] = self._decode_ids(row, len(audios[index]) / SAMPLE_RATE,
                                                  options.return_timestamps)
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
    device: torch.device | None = None,
    progress: bool = True,
) -> list[Transcript]:
    """Transcribe audio files and folders with a hub name, path, ``runs:/`` or ``models:/``
    reference. Files that fail to decode come back with ``error`` set."""
    files = collect_audio_files(paths, recursive)
    options = DecodeOptions(batch_size=batch_size, num_beams=num_beams,
                            max_new_tokens=max_new_tokens, return_timestamps=return_timestamps,
                            condition_on_prev_tokens=condition_on_prev_tokens,
                            temperature_fallback=temperature_fallback, language=language)
    transcriber = Transcriber.load(model_ref, device)
    transcriber.check_options(options)
    return transcriber.transcribe_files(files, options, progress=progress)


# --------------------------------------------------------------------------- output formats


def _clock(seconds: float, decimal: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def format_txt(transcript: Transcript) -> str:
    return transcript.text + "\n"


def format_json(transcript: Transcript) -> str:
    return json.dumps(transcript.to_dict(), ensure_ascii=False, indent=2) + "\n"


def format_srt(transcript: Transcript) -> str:
    blocks = [f"{n}\n{_clock(cue.start, ',')} --> {_clock(cue.end, ',')}\n{cue.text}\n"
              for n, cue in enumerate(transcript.cues(), start=1)]
    return "\n".join(blocks)


def format_vtt(transcript: Transcript) -> str:
    blocks = [f"{_clock(cue.start, '.')} --> {_clock(cue.end, '.')}\n{cue.text}\n"
              for cue in transcript.cues()]
    return "WEBVTT\n\n" + "\n".join(blocks)


FORMATTERS: dict[str, Callable[[Transcript], str]] = {
    "txt": format_txt, "json": format_json, "srt": format_srt, "vtt": format_vtt,
}


def write_transcripts(transcripts: Sequence[Transcript], fmt: str,
                      output_dir: str | Path | None = None) -> list[Path]:
    """One ``<stem>.<fmt>`` per transcribed file: next to the audio, or under ``output_dir``
    mirroring the inputs' folders. Failed files get none."""
    if fmt not in FORMATTERS:
        raise TranscribeError(f"unknown format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    done = [t for t in transcripts if t.ok]
    root = None
    if output_dir is not None and done:
        root = Path(os.path.commonpath([str(Path(t.file).resolve().parent) for t in done]))
    written = []
    for transcript in done:
        source = Path(transcript.file).resolve()
        if root is None:
            target = source.with_suffix(f".{fmt}")
        else:
            target = Path(output_dir, source.parent.relative_to(root), f"{source.stem}.{fmt}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(FORMATTERS[fmt](transcript), encoding="utf-8")
        written.append(target)
    return written


# --------------------------------------------------------------------------- base vs tuned


def find_references(files: Sequence[str | Path]) -> dict[str, str]:
    """Reference transcripts by resolved file path: from a ``metadata.csv`` in the file's
    folder (``file_name,transcription``) or a same-stem ``.txt`` beside the audio."""
    from whisper_exp.config import DataConfig
    from whisper_exp.data import METADATA_FILE, DataError, read_source

    references: dict[str, str] = {}
    folders = {Path(f).resolve().parent for f in files}
    for folder in sorted(folders):
        if (folder / METADATA_FILE).exists():
            try:
                loaded = read_source(folder / METADATA_FILE, DataConfig())
            except DataError as exc:
                log.warning("references in %s ignored: %s", folder / METADATA_FILE, exc)
                continue
            for example in loaded.examples:
                references[str(Path(example.audio).resolve())] = example.text
    for file in files:
        path = Path(file).resolve()
        text_file = path.with_suffix(".txt")
        if str(path) not in references and text_file.exists():
            references[str(path)] = text_file.read_text(encoding="utf-8").strip()
    return references


@dataclass
class Comparison:
    """Base and tuned transcripts of the same files, with WER where references exist."""

    rows: list[dict[str, Any]]
    base: list[Transcript]
    tuned: list[Transcript]
    base_scores: Scores | None
    tuned_scores: Scores | None


def compare_models(paths: Iterable[str | Path], model_ref: str, base_ref: str, *,
                   recursive: bool = False, options: DecodeOptions | None = None,
                   device: torch.device | None = None, progress: bool = True) -> Comparison:
    """Transcribe the same files with a base and a fine-tuned model, side by side."""
    options = options or DecodeOptions()
    files = collect_audio_files(paths, recursive)
    outputs: dict[str, list[Transcript]] = {}
    normalize = None
    for role, reference in (("base", base_ref), ("tuned", model_ref)):
        transcriber = Transcriber.load(reference, device)
        outputs[role] = transcriber.transcribe_files(files, options, progress=progress)
        if normalize is None:
            language = options.language if transcriber.multilingual else "english"
            normalize = make_normalizer(transcriber.processor.tokenizer, language or "english")
        del transcriber
    references = find_references(files)
    rows, scored = [], []
    for base, tuned in zip(outputs["base"], outputs["tuned"], strict=True):
        reference = references.get(str(Path(base.file).resolve()))
        row = {"file": base.file, "reference": reference, "base": base.text,
               "tuned": tuned.text, "base_wer": math.nan, "tuned_wer": math.nan,
               "error": base.error or tuned.error}
        if reference is not None and base.ok and tuned.ok:
            row["base_wer"] = utterance_wer(reference, base.text, normalize)
            row["tuned_wer"] = utterance_wer(reference, tuned.text, normalize)
            scored.append((reference, base.text, tuned.text))
        rows.append(row)
    base_scores = tuned_scores = None
    if scored:
        refs = [s[0] for s in scored]
        base_scores = score(refs, [s[1] for s in scored], normalize)
        tuned_scores = score(refs, [s[2] for s in scored], normalize)
    return Comparison(rows, outputs["base"], outputs["tuned"], base_scores, tuned_scores)


# --------------------------------------------------------------------------- console output


def format_console(transcripts: Sequence[Transcript]) -> str:
    """Plain text for one file (pipe-friendly), ``file: text`` lines for several."""
    done = [t for t in transcripts if t.ok]
    if len(transcripts) == 1 and done:
        return done[0].text
    return "\n".join(f"{t.file}: {t.text}" for t in done)


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def format_comparison(comparison: Comparison) -> str:
    """Per file: reference (if any), base and tuned text with WER; then corpus WER."""
    lines = []
    for row in comparison.rows:
        lines.append(row["file"])
        if row["error"]:
            lines.append(f"  error:     {row['error']}")
            continue
        if row["reference"] is not None:
            lines.append(f"  reference: {row['reference']}")
        lines.append(f"  base:      {row['base']}  (WER {_percent(row['base_wer'])})"
                     if row["reference"] is not None else f"  base:      {row['base']}")
        lines.append(f"  tuned:     {row['tuned']}  (WER {_percent(row['tuned_wer'])})"
                     if row["reference"] is not None else f"  tuned:     {row['tuned']}")
    if comparison.base_scores is not None and comparison.tuned_scores is not None:
        lines.append(f"WER over {comparison.tuned_scores.n_scored} file(s) with references: "
                     f"base {_percent(comparison.base_scores.wer)} -> tuned "
                     f"{_percent(comparison.tuned_scores.wer)}")
    else:
        lines.append("no references found (metadata.csv in the folder or a .txt beside the "
                     "audio): WER not computed")
    return "\n".join(lines)
