"""WER / CER the way the Whisper paper scores them: jiwer over normalised text.

English uses Whisper's ``EnglishTextNormalizer`` with the checkpoint's ``normalizer.json``
spelling map (so case, punctuation, "colour"/"color" and "four six two"/"462" are not errors);
other languages use the basic normaliser.
"""

from __future__ import annotations

import json
import math
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def normalizer_name(normalize: Normalizer) -> str:
    """What a run records as its normaliser: the class (``EnglishTextNormalizer``) or function."""
    return getattr(normalize, "__name__", type(normalize).__name__)


def _scored_pairs(references: Sequence[str], hypotheses: Sequence[str],
                  normalize: Normalizer) -> tuple[list[str], list[str]]:
    """Normalised pairs whose reference is non-empty (the rows ``score`` counts)."""
    refs, hyps = [], []
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_n = normalize(ref).strip()
        if ref_n:
            refs.append(ref_n)
            hyps.append(normalize(hyp).strip())
    return refs, hyps


# --------------------------------------------------------------------------- orthographic


def whitespace_only(text: str) -> str:
    """The orthographic 'normaliser': runs of whitespace become one space, nothing else."""
    return " ".join(text.split())


def orthographic_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """WER with case and punctuation kept ("Bear." vs "bear" is an error); NaN when no
    reference has a word."""
    refs, hyps = _scored_pairs(references, hypotheses, whitespace_only)
    return jiwer.wer(refs, hyps) if refs else math.nan


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


# Quotes and brackets (Unicode Ps/Pe/Pi/Pf and the ASCII quotes) are not scored as marks.
def _is_mark(char: str) -> bool:
    return unicodedata.category(char) in ("Po", "Pd") and char not in "\"'"


@dataclass(frozen=True)
class OrthographicWord:
    """A whitespace token split into what alignment compares and what is scored."""

    key: str  # lower-cased, leading/trailing punctuation stripped: the word jiwer aligns
    mark: str  # the punctuation marks right after it ("," "." "?!" "..."), "" when none
    capitalized: bool | None  # first letter upper-case; None when it has no cased letter


def orthographic_words(text: str) -> list[OrthographicWord]:
    """Tokens of ``text``; a token of punctuation only ("—", "...") adds its marks to the word
    before it."""
    words: list[OrthographicWord] = []
    for token in text.split():
        core = token.strip("".join(c for c in token if _is_punctuation(c)))
        if not core:
            if words:
                last = words[-1]
                extra = "".join(c for c in token if _is_mark(c))
                words[-1] = OrthographicWord(last.key, last.mark + extra, last.capitalized)
            continue
        tail = token[len(token.rstrip("".join(c for c in token if _is_punctuation(c)))):]
        first = next((c for c in core if c.isupper() or c.islower()), "")
        words.append(OrthographicWord(core.lower(), "".join(c for c in tail if _is_mark(c)),
                                      first.isupper() if first else None))
    return words


def _aligned_words(references: Sequence[str], hypotheses: Sequence[str]):
    """Per non-empty reference: its words, the hypothesis's words and the aligned index pairs
    (jiwer's equal and substituted words, on the lower-cased punctuation-free keys)."""
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_words, hyp_words = orthographic_words(ref), orthographic_words(hyp)
        if not ref_words:
            continue
        pairs: list[tuple[int, int]] = []
        if hyp_words:
            out = jiwer.process_words(" ".join(w.key for w in ref_words),
                                      " ".join(w.key for w in hyp_words))
            for chunk in out.alignments[0]:
                if chunk.type in ("equal", "substitute"):
                    pairs.extend(zip(range(chunk.ref_start_idx, chunk.ref_end_idx),
                                     range(chunk.hyp_start_idx, chunk.hyp_end_idx), strict=True))
        yield ref_words, hyp_words, pairs


@dataclass
class F1Score:
    """Pooled F1 of a word property: ``f1`` None (with ``note``) when the references do not
    carry the property, so no meaningless number is logged."""

    f1: float | None
    precision: float | None
    recall: float | None
    true_positives: int
    reference_count: int
    hypothesis_count: int
    note: str = ""


def _f1(true_positives: int, reference_count: int, hypothesis_count: int) -> F1Score:
    precision = true_positives / hypothesis_count if hypothesis_count else 0.0
    recall = true_positives / reference_count if reference_count else 0.0
    f1 = 2 * true_positives / (reference_count + hypothesis_count)
    return F1Score(f1, precision, recall, true_positives, reference_count, hypothesis_count)


def punctuation_f1(references: Sequence[str], hypotheses: Sequence[str]) -> F1Score:
    """Punctuation F1 over words.

    Each text is split at whitespace; a word's mark is the run of punctuation right after it
    (quotes and brackets ignored). Words are aligned with jiwer on their lower-cased,
    punctuation-free form. A reference mark counts once; a hypothesis mark is a true positive
    when its word is aligned (same or substituted word) to a reference word with the identical
    mark. precision = TP / hypothesis marks, recall = TP / reference marks, F1 = 2 TP /
    (reference marks + hypothesis marks), pooled over the set. Absent when no reference has a
    mark.
    """
    tp = ref_count = hyp_count = 0
    for ref_words, hyp_words, pairs in _aligned_words(references, hypotheses):
        ref_count += sum(bool(w.mark) for w in ref_words)
        hyp_count += sum(bool(w.mark) for w in hyp_words)
        tp += sum(bool(ref_words[i].mark) and ref_words[i].mark == hyp_words[j].mark
                  for i, j in pairs)
    if not ref_count:
        return F1Score(None, None, None, tp, 0, hyp_count,
                       "references carry no punctuation: punctuation F1 not computed")
    return _f1(tp, ref_count, hyp_count)


def capitalization_f1(references: Sequence[str], hypotheses: Sequence[str]) -> F1Score:
    """Capitalisation F1 over words: a word is positive when its first cased letter is
    upper-case. Words are aligned as in :func:`punctuation_f1`; a capitalised hypothesis word is
    a true positive when aligned to a capitalised reference word. F1 = 2 TP / (capitalised
    reference words + capitalised hypothesis words). Absent when the references carry no case,
    i.e. they lack either capitalised or lower-case words (all caps, all lower case)."""
    tp = ref_count = hyp_count = ref_lower = 0
    for ref_words, hyp_words, pairs in _aligned_words(references, hypotheses):
        ref_count += sum(w.capitalized is True for w in ref_words)
        ref_lower += sum(w.capitalized is False for w in ref_words)
        hyp_count += sum(w.capitalized is True for w in hyp_words)
        tp += sum(bool(ref_words[i].capitalized and hyp_words[j].capitalized) for i, j in pairs)
    if not ref_count or not ref_lower:
        kind = "all upper-case" if ref_count else "all lower-case or uncased"
        return F1Score(None, None, None, tp, ref_count, hyp_count,
                       f"references carry no case ({kind}): capitalization F1 not computed")
    return _f1(tp, ref_count, hyp_count)


# --------------------------------------------------------------------------- error breakdown


@dataclass
class ErrorBreakdown:
    """jiwer's edit counts on normalised text, and which words they hit. Rates are per
    reference word, so ``sub_rate + del_rate + ins_rate`` is the WER."""

    substitutions: int
    deletions: int
    insertions: int
    hits: int
    substituted: Counter[tuple[str, str]] = field(default_factory=Counter)
    deleted: Counter[str] = field(default_factory=Counter)
    inserted: Counter[str] = field(default_factory=Counter)

    @property
    def reference_words(self) -> int:
        return self.substitutions + self.deletions + self.hits

    def _rate(self, count: int) -> float:
        return count / self.reference_words if self.reference_words else math.nan

    @property
    def sub_rate(self) -> float:
        return self._rate(self.substitutions)

    @property
    def del_rate(self) -> float:
        return self._rate(self.deletions)

    @property
    def ins_rate(self) -> float:
        return self._rate(self.insertions)

    def table(self, top: int = 20) -> list[dict[str, Any]]:
        """The ``top`` most frequent substitution pairs, deleted and inserted words."""
        rows = [{"kind": "substitution", "reference": r, "hypothesis": h, "count": n}
                for (r, h), n in self.substituted.most_common(top)]
        rows += [{"kind": "deletion", "reference": w, "hypothesis": "", "count": n}
                 for w, n in self.deleted.most_common(top)]
        rows += [{"kind": "insertion", "reference": "", "hypothesis": w, "count": n}
                 for w, n in self.inserted.most_common(top)]
        return rows


def error_breakdown(references: Sequence[str], hypotheses: Sequence[str],
                    normalize: Normalizer) -> ErrorBreakdown:
    """Substitutions, deletions and insertions over the pairs ``score`` counts."""
    refs, hyps = _scored_pairs(references, hypotheses, normalize)
    if not refs:
        return ErrorBreakdown(0, 0, 0, 0)
    out = jiwer.process_words(refs, hyps)
    result = ErrorBreakdown(out.substitutions, out.deletions, out.insertions, out.hits)
    for ref_words, hyp_words, chunks in zip(out.references, out.hypotheses, out.alignments,
                                            strict=True):
        for chunk in chunks:
            ref_part = ref_words[chunk.ref_start_idx:chunk.ref_end_idx]
            hyp_part = hyp_words[chunk.hyp_start_idx:chunk.hyp_end_idx]
            if chunk.type == "substitute":
                result.substituted.update(zip(ref_part, hyp_part, strict=True))
            elif chunk.type == "delete":
                result.deleted.update(ref_part)
            elif chunk.type == "insert":
                result.inserted.update(hyp_part)
    return result


# --------------------------------------------------------------------------- hallucinations

# Whisper's own threshold: above it a decoded window is treated as a repetition loop.
LOOP_COMPRESSION_RATIO = 2.4


def compression_ratio(text: str) -> float:
    """Whisper's gzip ratio: UTF-8 bytes over zlib-compressed bytes (0 for empty text)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def loop_share(hypotheses: Sequence[str], threshold: float = LOOP_COMPRESSION_RATIO) -> float:
    """Share of outputs whose compression ratio exceeds ``threshold`` (NaN with none)."""
    if not hypotheses:
        return math.nan
    return sum(compression_ratio(h) > threshold for h in hypotheses) / len(hypotheses)


def repeated_ngram_rate(hypotheses: Sequence[str], n: int = 3,
                        normalize: Normalizer = str.lower) -> float:
    """Pooled share of word ``n``-grams that repeat an earlier ``n``-gram of the same output:
    repeated n-grams / all n-grams over every output (words: ``normalize(text).split()``);
    0 when no output has ``n`` words."""
    total = repeated = 0
    for text in hypotheses:
        words = normalize(text).split()
        seen: set[tuple[str, ...]] = set()
        for start in range(len(words) - n + 1):
            gram = tuple(words[start:start + n])
            total += 1
            repeated += gram in seen
            seen.add(gram)
    return repeated / total if total else 0.0


def empty_share(hypotheses: Sequence[str]) -> float:
    """Share of outputs with no text (NaN with none)."""
    if not hypotheses:
        return math.nan
    return sum(not h.strip() for h in hypotheses) / len(hypotheses)


# --------------------------------------------------------------------------- slices

MAX_SLICE_VALUES = 50
QUANTILE_BINS = 4
# A numeric column with at most this many values is sliced per value (age 20/21/..), not binned.
MAX_NUMERIC_CATEGORIES = 6
DURATION_BUCKETS_S = (2.0, 5.0, 10.0, 20.0)


def duration_bucket(seconds: float) -> str:
    """Fixed buckets (``<2 s``, ``2-5 s`` ... ``>=20 s``), comparable across runs."""
    lower = 0.0
    for upper in DURATION_BUCKETS_S:
        if seconds < upper:
            return f"<{upper:g} s" if lower == 0 else f"{lower:g}-{upper:g} s"
        lower = upper
    return f">={lower:g} s"


def _as_float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def slice_labels(values: Sequence[str | None],
                 max_values: int = MAX_SLICE_VALUES) -> tuple[list[str | None] | None, str]:
    """Per row, the group a metadata column puts it in (None: no value), and how.

    Numeric columns with more than ``MAX_NUMERIC_CATEGORIES`` values go into ``QUANTILE_BINS``
    quantile bins; other columns are grouped by value unless they have more than
    ``max_values`` distinct values or more than half as many as rows (an id, not a category):
    then the labels are None and the string says why the column is not sliced.
    """
    present = [v.strip() if v is not None else "" for v in values]
    distinct = {v for v in present if v}
    if not distinct:
        return None, "no values"
    numbers = [_as_float(v) for v in present if v]
    if all(n is not None for n in numbers) and len(distinct) > MAX_NUMERIC_CATEGORIES:
        import pandas as pd

        series = pd.Series([_as_float(v) if v else None for v in present], dtype="float64")
        codes = pd.qcut(series, QUANTILE_BINS, labels=False, duplicates="drop")
        ranges = series.groupby(codes).agg(["min", "max"])  # a bin is named by its own values
        names = {code: f"{low:g}-{high:g}" for code, (low, high) in ranges.iterrows()}
        labels = [None if pd.isna(code) else names[code] for code in codes]
        return labels, f"numeric: {len(names)} quantile bins"
    if len(distinct) > max_values or 2 * len(distinct) > len(present):
        return None, (f"not sliced: {len(distinct)} distinct values in {len(present)} rows "
                      f"(more than {max_values} or half the rows)")
    return [v or None for v in present], f"categorical: {len(distinct)} values"


def _label_order(label: str) -> tuple:
    number = _as_float(label.split("-")[0].lstrip("<>=").split()[0]) if label else None
    return (0, number, label) if number is not None else (1, 0.0, label)


def slice_wer(references: Sequence[str], hypotheses: Sequence[str],
              labels: Sequence[str | None], normalize: Normalizer) -> list[dict[str, Any]]:
    """Corpus WER per group (rows labelled None are left out), groups in natural order."""
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        if label is not None:
            groups.setdefault(label, []).append(index)
    rows = []
    for label in sorted(groups, key=_label_order):
        members = groups[label]
        scores = score([references[i] for i in members], [hypotheses[i] for i in members],
                       normalize)
        rows.append({"value": label, "n_utterances": scores.n_scored, "wer": scores.wer})
    return rows
