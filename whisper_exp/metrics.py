"""WER / CER the way the Whisper paper scores them: jiwer over normalised text.

English uses Whisper's ``EnglishTextNormalizer`` with the checkpoint's ``normalizer.json``
spelling map (so case, punctuation, "colour"/"color" and "four six two"/"462" are not errors);
other languages use the basic normaliser.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jiwer
from transformers.models.whisper.english_normalizer import (
    BasicTextNormalizer,
    EnglishTextNormalizer,
)

Normalizer = Callable[[str], str]


def english_normalizer(spelling_map: dict[str, str] | None = None) -> Normalizer:
    return EnglishTextNormalizer(spelling_map or {})


def make_normalizer(tokenizer=None, language: str | None = "english") -> Normalizer:
    """English normaliser (with the tokenizer's spelling map when it has one) or basic."""
    if language not in (None, "", "en", "english"):
        return BasicTextNormalizer()
    spelling = getattr(tokenizer, "english_spelling_normalizer", None)
    if spelling is None and tokenizer is not None:
        path = Path(getattr(tokenizer, "name_or_path", ""), "normalizer.json")
        if path.exists():
            spelling = json.loads(path.read_text(encoding="utf-8"))
    return english_normalizer(spelling)


@dataclass
class Scores:
    wer: float
    cer: float
    n_scored: int
    n_empty_references: int


def score(references: Sequence[str], hypotheses: Sequence[str], normalize: Normalizer) -> Scores:
    """Corpus WER/CER over pairs whose normalised reference is non-empty."""
    refs, hyps, empty = [], [], 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_n = normalize(ref).strip()
        if not ref_n:
            empty += 1
            continue
        refs.append(ref_n)
        hyps.append(normalize(hyp).strip())
    if not refs:
        return Scores(math.nan, math.nan, 0, empty)
    return Scores(jiwer.wer(refs, hyps), jiwer.cer(refs, hyps), len(refs), empty)


def utterance_wer(reference: str, hypothesis: str, normalize: Normalizer) -> float:
    ref_n = normalize(reference).strip()
    if not ref_n:
        return math.nan
    return jiwer.wer(ref_n, normalize(hypothesis).strip())
