"""The per-run evaluation report: what one normalised WER hides, logged with every ``train``
final evaluation, ``evaluate`` run and tune trial.

Per model scored (prefix ``""``, or ``base_`` for the base under ``evaluate --compare``):
orthographic WER, punctuation and capitalisation F1 (absent, with a note, when the references
carry none), the substitution / deletion / insertion breakdown with its most frequent words,
loop and hallucination indicators, WER by metadata column and duration bucket (table and bar
chart; base beside tuned under ``--compare``), the N worst utterances with their audio, the
per-utterance predictions as an MLflow table, and the long-form check's ``long_form/*`` metrics
and table (computed by ``long_form`` during the evaluation). Metric definitions live in
``metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jiwer
import mlflow

from whisper_exp import metrics as m
from whisper_exp.audio import AUDIO_EXTENSIONS
from whisper_exp.data import Example
from whisper_exp.tracking import log_csv

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from whisper_exp.evaluation import EvalResult

REPORT_DIR = "eval"
# The predictions CSV keeps the columns users and tests already read.
CSV_COLUMNS = ("file", "reference", "hypothesis", "wer")
DURATION_COLUMN = "duration"
TOP_ERRORS = 20


@dataclass
class Report:
    """One model's report over one eval set; ``metrics`` and names are unprefixed."""

    normalizer: str
    metrics: dict[str, float]
    notes: list[str]
    predictions: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    slices: list[dict[str, Any]]
    worst: list[int] = field(default_factory=list)  # row indices, worst first


def _utterance_orthographic_wer(reference: str, hypothesis: str) -> float:
    reference, hypothesis = m.whitespace_only(reference), m.whitespace_only(hypothesis)
    return jiwer.wer(reference, hypothesis) if reference else math.nan


def slice_columns(examples: Sequence[Example], durations: Sequence[float | None],
                  ) -> tuple[dict[str, list[str | None]], list[str]]:
    """Labels per sliced column (every metadata column, then the duration bucket) and a note
    for each column left out."""
    names: dict[str, None] = {}
    for example in examples:
        names.update(dict.fromkeys(example.metadata))
    columns: dict[str, list[str | None]] = {}
    notes = []
    for name in names:
        labels, how = m.slice_labels([e.metadata.get(name) for e in examples])
        if labels is None:
            notes.append(f"column {name!r} {how}")
        else:
            columns[name] = labels
    if any(d is not None for d in durations):
        columns[DURATION_COLUMN] = [None if d is None else m.duration_bucket(d)
                                    for d in durations]
    return columns, notes


def build_report(result: EvalResult, examples: Sequence[Example], *,
                 worst_n: int = 20) -> Report:
    """Every figure of the report for one model's result on ``examples`` (same order)."""
    rows = result.rows
    if len(rows) != len(examples):
        raise ValueError(f"{len(rows)} results for {len(examples)} examples")
    normalize = result.normalize or m.english_normalizer()
    references = [r["reference"] for r in rows]
    hypotheses = [r["hypothesis"] for r in rows]
    notes = []
    values: dict[str, float | None] = {"wer_orthographic": m.orthographic_wer(references,
                                                                               hypotheses)}
    for name, f1 in (("punctuation_f1", m.punctuation_f1(references, hypotheses)),
                     ("capitalization_f1", m.capitalization_f1(references, hypotheses))):
        values[name] = f1.f1
        if f1.note:
            notes.append(f1.note)
    errors = m.error_breakdown(references, hypotheses, normalize)
    values.update({
        "substitutions": errors.substitutions, "deletions": errors.deletions,
        "insertions": errors.insertions, "sub_rate": errors.sub_rate,
        "del_rate": errors.del_rate, "ins_rate": errors.ins_rate,
        "loop_share": m.loop_share(hypotheses),
        "repeated_ngram_rate": m.repeated_ngram_rate(hypotheses, normalize=normalize),
        "empty_share": m.empty_share(hypotheses),
    })
    hits = [r.get("budget_hit") for r in rows]
    if rows and all(h is not None for h in hits):
        values["budget_hit_share"] = sum(bool(h) for h in hits) / len(rows)
    else:
        notes.append("token budget hits unknown: budget_hit_share not computed")
    skipped = result.scores.n_empty_references
    if skipped:
        notes.append(f"{skipped} utterance(s) with an empty normalised reference not scored")
    if result.long_form is not None:  # long_form/* metrics, beside the short-form ones
        values.update(result.long_form.metrics)
        notes += result.long_form.notes

    durations = [r.get("duration_s") for r in rows]
    columns, column_notes = slice_columns(examples, durations)
    notes += column_notes
    slices = [dict(column=name, **row) for name, labels in columns.items()
              for row in m.slice_wer(references, hypotheses, labels, normalize)]

    predictions = []
    for row, example in zip(rows, examples, strict=True):
        predictions.append({
            **{k: row.get(k) for k in CSV_COLUMNS},
            "wer_orthographic": _utterance_orthographic_wer(row["reference"], row["hypothesis"]),
            "compression_ratio": m.compression_ratio(row["hypothesis"]),
            "duration_s": row.get("duration_s"), "budget_hit": row.get("budget_hit"),
            **{f"meta_{k}": v for k, v in example.metadata.items()},
        })
    ranked = sorted((i for i, r in enumerate(rows) if not math.isnan(r["wer"])),
                    key=lambda i: -rows[i]["wer"])
    return Report(m.normalizer_name(normalize),
                  {k: float(v) for k, v in values.items() if v is not None},
                  notes, predictions, errors.table(TOP_ERRORS), slices, ranked[:max(worst_n, 0)])


# --------------------------------------------------------------------------- audio of the worst

_MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"),
          (b"\xff\xfb", ".mp3"), (b"\xff\xf3", ".mp3"), (b"\xff\xf2", ".mp3"))


def audio_bytes(example: Example) -> bytes:
    """The clip as stored: file bytes, in-memory bytes, or a dataset row's bytes."""
    if isinstance(example.audio, str):
        return Path(example.audio).read_bytes()
    if isinstance(example.audio, bytes):
        return example.audio
    return example.audio.read_bytes()


def audio_file_name(example: Example, data: bytes) -> str:
    """A file name the MLflow UI plays: the clip's own, with an extension sniffed from its
    header when it has none (dataset rows are named ``test-000012``)."""
    name = Path(example.name).name
    if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
        return name
    suffix = next((ext for magic, ext in _MAGIC if data.startswith(magic)), ".audio")
    return name + suffix


def log_worst(report: Report, examples: Sequence[Example], artifact_dir: str) -> None:
    """``<artifact_dir>/<rank>_<file>`` (the audio, played by the MLflow UI) beside
    ``<rank>_<file>.txt`` (reference and hypothesis), and ``<artifact_dir>.json`` listing them."""
    import tempfile

    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank, index in enumerate(report.worst, start=1):
            row, example = report.predictions[index], examples[index]
            data = audio_bytes(example)
            name = f"{rank:02d}_{audio_file_name(example, data)}"
            (Path(tmp) / name).write_bytes(data)
            (Path(tmp) / f"{name}.txt").write_text(
                f"reference:  {row['reference']}\nhypothesis: {row['hypothesis']}\n"
                f"WER: {row['wer']:.3f}\n", encoding="utf-8")
            table.append({"rank": rank, "audio": f"{artifact_dir}/{name}", "file": row["file"],
                          "reference": row["reference"], "hypothesis": row["hypothesis"],
                          "wer": row["wer"]})
        if table:
            mlflow.log_artifacts(tmp, artifact_dir)
    if table:
        _log_table(table, f"{artifact_dir}.json")


# --------------------------------------------------------------------------- logging


def _log_table(rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
    import pandas as pd

    if rows:
        mlflow.log_table(pd.DataFrame(list(rows)), artifact_file)


def _finite(values: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in values.items() if math.isfinite(v)}


def merge_slices(reports: Mapping[str, Report]) -> list[dict[str, Any]]:
    """One slice table: ``wer`` per group, and ``base_wer`` and ``wer_delta`` beside it when
    a base was scored on the same data."""
    tuned = reports.get("") or next(iter(reports.values()))
    base = reports.get("base_") if len(reports) > 1 else None
    base_wer = {(r["column"], r["value"]): r["wer"] for r in base.slices} if base else {}
    rows = []
    for row in tuned.slices:
        merged = dict(row)
        if base is not None:
            merged["base_wer"] = base_wer.get((row["column"], row["value"]), math.nan)
            merged["wer_delta"] = row["wer"] - merged["base_wer"]
        rows.append(merged)
    return rows


def slice_figure(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Horizontal WER bars per group, one panel per column; base bars beside tuned ones."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    columns: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        columns.setdefault(row["column"], []).append(row)
    heights = [max(1.0, 0.3 * len(group) + 0.6) for group in columns.values()]
    figure = Figure(figsize=(7, sum(heights) + 0.5), layout="constrained")
    axes = figure.subplots(len(columns), 1, squeeze=False,
                           gridspec_kw={"height_ratios": heights})[:, 0]
    with_base = any("base_wer" in row for row in rows)
    for ax, (name, group) in zip(axes, columns.items(), strict=True):
        positions = range(len(group))
        width = 0.4 if with_base else 0.8
        ax.barh([p + (width / 2 if with_base else 0) for p in positions],
                [100 * r["wer"] for r in group], height=width, label="tuned" if with_base
                else "WER")
        if with_base:
            ax.barh([p - width / 2 for p in positions], [100 * r["base_wer"] for r in group],
                    height=width, label="base")
        ax.set_yticks(list(positions), [f"{r['value']} (n={r['n_utterances']})"
                                        for r in group])
        ax.invert_yaxis()
        ax.set_title(f"WER by {name}", fontsize=9, loc="left")
        ax.set_xlabel("WER %")
        if with_base:
            ax.legend(fontsize=7)
    return figure


def _markdown(report: Report, prefix: str) -> str:
    lines = [f"# Evaluation report{f' ({prefix.rstrip(chr(95))})' if prefix else ''}", "",
             f"Normaliser for WER/CER: `{report.normalizer}`", "", "| metric | value |",
             "|---|---|"]
    lines += [f"| {prefix}{k} | {v:.4g} |" for k, v in report.metrics.items()]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def log_evaluation_report(results: Mapping[str, EvalResult], examples: Sequence[Example], *,
                          worst_n: int = 20, csv_dir: str = "", name: str = "",
                          notes: Sequence[str] = ()) -> dict[str, Report]:
    """Build and log the report of each result (keyed by metric prefix: ``""``, ``"base_"``)
    into the active run; ``csv_dir`` is where ``<prefix>predictions.csv`` has always gone
    (``eval`` for train, the root for evaluate). ``name``: a named eval set's report, its
    metrics prefixed ``<name>/`` and its artifacts under ``eval/<name>/``. ``notes``: what
    the data loading said (rows left out, text case), repeated in each report. Returns the
    reports."""
    reports: dict[str, Report] = {}
    set_prefix = f"{name}/" if name else ""
    report_dir = f"{REPORT_DIR}/{name}" if name else REPORT_DIR
    for key, result in results.items():
        prefix = set_prefix + key
        report = build_report(result, examples, worst_n=worst_n)
        report.notes = [*notes, *report.notes]
        reports[key] = report
        log_csv(result.rows, f"{csv_dir}/{key}predictions.csv".lstrip("/"), CSV_COLUMNS)
        mlflow.log_param(f"{prefix}normalizer", report.normalizer)
        mlflow.log_metrics(_finite(report.metrics, prefix))
        _log_table(report.predictions, f"{report_dir}/{key}predictions.json")
        _log_table(report.errors, f"{report_dir}/{key}errors.json")
        log_worst(report, examples, f"{report_dir}/{key}worst")
        if result.long_form is not None:
            _log_table(result.long_form.rows, f"{report_dir}/{key}long_form.json")
        mlflow.log_text(_markdown(report, prefix), f"{report_dir}/{key}report.md")
    slices = merge_slices(reports)
    if slices:
        _log_table(slices, f"{report_dir}/slices.json")
        mlflow.log_figure(slice_figure(slices), f"{report_dir}/slices.png")
    if "" in reports and "base_" in reports:
        tuned, base = reports[""].metrics, reports["base_"].metrics
        deltas = {f"{k}_delta": tuned[k] - base[k]
                  for k in ("wer_orthographic", "ins_rate", "loop_share", "repeated_ngram_rate",
                            "long_form/wer", "long_form/timestamp_valid_share",
                            "long_form/loop_share")
                  if k in tuned and k in base}
        mlflow.log_metrics(_finite(deltas, set_prefix))
        if deltas.get("loop_share_delta", 0) > 0:
            mlflow.set_tag(f"report.{name + '.' if name else ''}loops_more_than_base", "true")
    return reports
