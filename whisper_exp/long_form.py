"""The long-form check of every evaluation: eval utterances joined into recordings of a few
minutes, transcribed whole with timestamps (``transcribe.Transcriber``'s sequential long-form
decoding, as ``transcribe`` does for a long file) and scored.

Fine-tuning on short clips without timestamp tokens can break what short-form WER never sees: the
window walk (words dropped or repeated at 30 s edges), the timestamps it moves by, and loops over
a long context. The check reports, as ``long_form/*`` metrics: the long-form WER against the
joined reference, the short-form WER of the same utterances (their one-by-one transcripts, already
decoded, joined alike) and the increase, the share of segments whose timestamps are valid (inside
the audio, increasing, not overlapping), and loop indicators on the long-form output.
``evaluation.long_form`` (auto/on/off; auto: on from ``AUTO_MIN_AUDIO_S`` of eval audio) decides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from whisper_exp import metrics as m
from whisper_exp.audio import SAMPLE_RATE
from whisper_exp.config import EvaluationConfig
from whisper_exp.decoding import SHORT_FORM_MAX_S, DecodeOptions, Segment

# evaluation.long_form=auto: on when the eval set holds at least this much audio.
AUTO_MIN_AUDIO_S = 60.0
# Whisper's timestamp resolution: a segment may start where the previous one ended, give or
# take one step.
TIMESTAMP_TOLERANCE_S = 0.02
# Metric names (the report prefixes them like every other: ``base_``, ``<set>/``).
PREFIX = "long_form/"
# Decoded as ``transcribe`` decodes a long file by default: previous-text conditioning and
# temperature fallback (DecodeOptions' defaults; a window that loops is re-decoded up to 5 times).
DECODING: dict[str, bool] = {"condition_on_prev_tokens": True, "temperature_fallback": True}


# --------------------------------------------------------------------------- joining


@dataclass
class Recording:
    """Utterances ``indices`` (of the eval set) joined with silence, in order."""

    audio: np.ndarray
    indices: list[int]
    references: list[str]
    speakers: list[str]  # distinct speakers, in order (empty: no speaker column)
    starts_s: list[float]  # where each utterance starts in the recording

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def reference(self) -> str:
        return " ".join(r.strip() for r in self.references)


def _length(indices: Sequence[int], durations: Sequence[float], gap_s: float) -> float:
    return sum(durations[i] for i in indices) + gap_s * max(len(indices) - 1, 0)


def _cut(indices: Sequence[int], durations: Sequence[float], target_s: float,
         gap_s: float) -> list[list[int]]:
    """Consecutive runs of about ``target_s``: a run closes once it reaches it; a last run
    shorter than half of it, or than one window, joins the run before."""
    runs: list[list[int]] = []
    current: list[int] = []
    for index in indices:
        current.append(index)
        if _length(current, durations, gap_s) >= target_s:
            runs.append(current)
            current = []
    if current:
        length = _length(current, durations, gap_s)
        if runs and (length < target_s / 2 or length <= SHORT_FORM_MAX_S):
            runs[-1] += current
        else:
            runs.append(current)
    return runs


def plan_recordings(durations_s: Sequence[float], speakers: Sequence[str | None] | None, *,
                    minutes: float, gap_s: float, max_recordings: int = 0
                    ) -> tuple[list[list[int]], list[int]]:
    """Which utterances each recording joins, and those left out.

    Utterances are grouped by speaker (order of first appearance; no speaker: one group) and
    each group is cut into consecutive runs of about ``minutes``. A run that would still fit one
    30 s window is not long-form: such runs are pooled across speakers and cut again; what is
    still too short is left out. ``max_recordings`` > 0 keeps the first that many recordings.
    """
    if minutes * 60 <= SHORT_FORM_MAX_S:
        raise ValueError(f"evaluation.long_form_minutes={minutes:g}: a recording must be longer "
                         f"than one {SHORT_FORM_MAX_S:g} s window; use more than "
                         f"{SHORT_FORM_MAX_S / 60:g}")
    target = minutes * 60
    groups: dict[str | None, list[int]] = {}
    for index in range(len(durations_s)):
        speaker = speakers[index] if speakers is not None else None
        groups.setdefault(speaker or None, []).append(index)
    runs, pool = [], []
    for indices in groups.values():
        for run in _cut(indices, durations_s, target, gap_s):
            if _length(run, durations_s, gap_s) > SHORT_FORM_MAX_S:
                runs.append(run)
            else:
                pool += run
    left_out = []
    for run in _cut(pool, durations_s, target, gap_s):
        if _length(run, durations_s, gap_s) > SHORT_FORM_MAX_S:
            runs.append(run)
        else:
            left_out += run
    if max_recordings > 0:
        left_out += [i for run in runs[max_recordings:] for i in run]
        runs = runs[:max_recordings]
    return runs, sorted(left_out)


def join_recordings(audios: Sequence[np.ndarray], references: Sequence[str],
                    speakers: Sequence[str | None] | None = None, *, minutes: float,
                    gap_s: float, max_recordings: int = 0) -> tuple[list[Recording], list[int]]:
    """16 kHz utterances joined with ``gap_s`` of silence into recordings of about
    ``minutes`` (see :func:`plan_recordings`); returns them and the indices left out."""
    if len(audios) != len(references) or (speakers is not None
                                          and len(speakers) != len(audios)):
        raise ValueError(f"{len(audios)} audios, {len(references)} references and "
                         f"{len(speakers or [])} speakers: one of each per utterance")
    durations = [len(a) / SAMPLE_RATE for a in audios]
    plan, left_out = plan_recordings(durations, speakers, minutes=minutes, gap_s=gap_s,
                                     max_recordings=max_recordings)
    silence = np.zeros(round(gap_s * SAMPLE_RATE), dtype=np.float32)
    recordings = []
    for indices in plan:
        pieces, starts, offset = [], [], 0
        for position, index in enumerate(indices):
            if position:
                pieces.append(silence)
                offset += len(silence)
            starts.append(offset / SAMPLE_RATE)
            pieces.append(np.asarray(audios[index], dtype=np.float32))
            offset += len(audios[index])
        named = [s for s in (speakers[i] if speakers is not None else None for i in indices)
                 if s]
        recordings.append(Recording(np.concatenate(pieces), list(indices),
                                    [references[i] for i in indices],
                                    list(dict.fromkeys(named)), starts))
    return recordings, left_out


# --------------------------------------------------------------------------- timestamps


@dataclass
class TimestampCheck:
    """Segments of one transcript and how many have valid timestamps; the first problems."""

    segments: int = 0
    valid: int = 0
    problems: list[str] = field(default_factory=list)


def check_timestamps(segments: Sequence[Segment], duration_s: float,
                     tolerance_s: float = TIMESTAMP_TOLERANCE_S) -> TimestampCheck:
    """A segment is valid when it lies inside the audio, ends after it starts and does not
    start before the previous segment ended (timestamps increase). ``transcribe`` clamps times
    to the audio, so a segment the model placed past the end shows as zero-length at the end."""
    check = TimestampCheck(len(segments))
    previous_end = 0.0
    for number, segment in enumerate(segments, start=1):
        start, end = float(segment.start), float(segment.end)
        if not (math.isfinite(start) and math.isfinite(end)):
            problem = "has no time"
        elif start < -tolerance_s or end > duration_s + tolerance_s or start >= duration_s:
            problem = f"lies outside the {duration_s:.2f} s of audio"
        elif start < previous_end - tolerance_s:
            problem = f"starts before the previous segment ends ({previous_end:.2f} s)"
        elif end <= start:
            problem = "does not end after it starts"
        else:
            problem = ""
        if problem:
            check.problems.append(f"segment {number} ({start:.2f}-{end:.2f} s) {problem}")
        else:
            check.valid += 1
        if math.isfinite(end) and 0 <= end <= duration_s + tolerance_s:
            previous_end = max(previous_end, end)
    return check


# --------------------------------------------------------------------------- the check


@dataclass
class LongFormResult:
    """The check's metrics (``long_form/...``, unprefixed), one table row per recording, and
    a note when it did not run or left utterances out."""

    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def decision(mode: str, audio_s: float) -> tuple[bool, str]:
    """Whether ``evaluation.long_form`` runs the check on an eval set of ``audio_s``, and the
    note that says why not."""
    if mode == "off":
        return False, "long-form check off (evaluation.long_form=off)"
    if mode == "auto" and audio_s < AUTO_MIN_AUDIO_S:
        return False, (f"long-form check skipped: the eval set has {audio_s:.0f} s of audio, "
                       f"under {AUTO_MIN_AUDIO_S:.0f} s (evaluation.long_form=on forces it)")
    return True, ""


Transcribe = Callable[[list[np.ndarray], DecodeOptions], list[Any]]


def _transcriber(model: torch.nn.Module, processor: Any) -> Transcribe:
    from whisper_exp.transcribe import Transcriber  # inference: loaded only when the check runs

    transcriber = Transcriber(model, processor)

    def run(audios: list[np.ndarray], options: DecodeOptions) -> list[Any]:
        transcriber.check_options(options)
        return transcriber.transcribe_audio(audios, options)
    return run


def run_check(model: torch.nn.Module, processor: Any, audios: Sequence[np.ndarray],
              references: Sequence[str], speakers: Sequence[str | None],
              short_hypotheses: Sequence[str], normalize: m.Normalizer,
              cfg: EvaluationConfig, *, language: str | None = None,
              transcribe: Transcribe | None = None) -> LongFormResult:
    """The long-form check of one model on one eval set (``audios`` in the set's order, with
    the model's short-form transcripts ``short_hypotheses``). ``language``: a multilingual
    model's decoding language (None for English-only models). ``transcribe`` replaces the
    model's long-form decoding (tests)."""
    audio_s = sum(len(a) for a in audios) / SAMPLE_RATE
    run, note = decision(cfg.long_form, audio_s)
    if not run:
        return LongFormResult(notes=[note])
    recordings, left_out = join_recordings(
        audios, references, speakers, minutes=cfg.long_form_minutes,
        gap_s=cfg.long_form_gap_s, max_recordings=cfg.long_form_recordings)
    if not recordings:
        return LongFormResult(notes=[f"long-form check skipped: {audio_s:.0f} s of eval audio "
                                     f"cannot make a recording over {SHORT_FORM_MAX_S:g} s"])
    options = DecodeOptions(batch_size=1, num_beams=cfg.num_beams,
                            max_new_tokens=cfg.max_new_tokens, return_timestamps=True,
                            language=language, **DECODING)
    transcribe = transcribe or _transcriber(model, processor)
    started = time.perf_counter()
    with torch.random.fork_rng():  # the temperature fallback samples: same draws every run
        torch.manual_seed(0)
        decoded = transcribe([r.audio for r in recordings], options)
    wall = time.perf_counter() - started
    result = score_recordings(recordings, decoded, short_hypotheses, normalize)
    recorded_s = sum(r.duration_s for r in recordings)
    result.metrics[f"{PREFIX}rtfx"] = recorded_s / wall if wall else math.nan
    if left_out:
        result.notes.append(
            f"long-form check: {len(left_out)} of {len(audios)} utterances not joined "
            f"(evaluation.long_form_recordings={cfg.long_form_recordings} recordings of about "
            f"{cfg.long_form_minutes:g} min, or too little audio of their own)")
    return result


def score_recordings(recordings: Sequence[Recording], decoded: Sequence[Any],
                     short_hypotheses: Sequence[str], normalize: m.Normalizer
                     ) -> LongFormResult:
    """Metrics and table of decoded recordings (``decoded[i].text`` / ``.segments``), beside the
    short-form transcripts of the same utterances joined the same way."""
    references = [r.reference for r in recordings]
    long_texts = [d.text for d in decoded]
    short_texts = [" ".join(short_hypotheses[i].strip() for i in r.indices) for r in recordings]
    long_scores = m.score(references, long_texts, normalize)
    short_scores = m.score(references, short_texts, normalize)
    errors = m.error_breakdown(references, long_texts, normalize)
    checks = [check_timestamps(d.segments, r.duration_s)
              for r, d in zip(recordings, decoded, strict=True)]
    segments = sum(c.segments for c in checks)
    segment_texts = [s.text for d in decoded for s in d.segments] or long_texts
    metrics = {
        "wer": long_scores.wer, "short_form_wer": short_scores.wer,
        "wer_increase": long_scores.wer - short_scores.wer,
        "timestamp_valid_share": (sum(c.valid for c in checks) / segments if segments
                                  else math.nan),
        "segments": segments,
        "recordings_without_segments": sum(c.segments == 0 for c in checks),
        "ins_rate": errors.ins_rate, "del_rate": errors.del_rate,
        "loop_share": m.loop_share(segment_texts),
        "repeated_ngram_rate": m.repeated_ngram_rate(long_texts, normalize=normalize),
        "short_form_repeated_ngram_rate": m.repeated_ngram_rate(short_texts,
                                                                normalize=normalize),
        "recordings": len(recordings),
        "audio_s": sum(r.duration_s for r in recordings),
    }
    rows = [{"recording": number, "speaker": "+".join(r.speakers),
             "n_utterances": len(r.indices), "duration_s": round(r.duration_s, 2),
             "wer": m.utterance_wer(r.reference, d.text, normalize),
             "short_form_wer": m.utterance_wer(r.reference, short, normalize),
             "segments": c.segments, "valid_segments": c.valid,
             "timestamp_problems": "; ".join(c.problems[:3]) + (
                 f"; ... {len(c.problems) - 3} more" if len(c.problems) > 3 else ""),
             "reference": r.reference, "hypothesis": d.text}
            for number, (r, d, c, short) in enumerate(
                zip(recordings, decoded, checks, short_texts, strict=True), start=1)]
    return LongFormResult({f"{PREFIX}{k}": float(v) for k, v in metrics.items()}, rows)
