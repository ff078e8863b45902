"""Base vs fine-tuned: the same files transcribed by both models, with WER where references
exist (``whisper-exp transcribe --compare``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from whisper_exp.decoding import DecodeOptions
from whisper_exp.metrics import Scores, make_normalizer, score, utterance_wer
from whisper_exp.transcribe import Transcriber, collect_audio_files
from whisper_exp.transcript_formats import Transcript

log = logging.getLogger(__name__)


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
            language = options.language or transcriber.default_language
            normalize = make_normalizer(transcriber.processor.tokenizer,
                                        language if transcriber.multilingual else "english")
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
