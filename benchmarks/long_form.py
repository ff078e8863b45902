"""Long-form transcription: dev utterances joined into recordings of a few minutes, decoded whole.

Run (not in CI; about 12 minutes on 2 CPU cores for the 260 dev utterances):
    python benchmarks/long_form.py
    python benchmarks/long_form.py --limit 40 --minutes 1     # check the script
    python benchmarks/long_form.py --model runs:/<run_id>

Consecutive utterances of ``--data`` (default: the shared speechocean762 dev set) are joined with
``--gap`` seconds of silence into recordings of about ``--minutes`` minutes
(``whisper_exp.long_form.join_recordings``, as every evaluation's long-form check does, here
regardless of speaker). The same model (``--model``, any reference) transcribes:
(a) every utterance on its own (batched short-form decoding, as ``evaluate`` does): the WER a
    perfect long-form decoder would match;
(b) each whole recording with transformers' sequential long-form generation
    (``whisper_exp.transcribe``: 30 s windows moved by the model's timestamps): plain greedy,
    previous-text conditioning, temperature fallback, and both (the default);
(c) each whole recording with faster-whisper on a CTranslate2 int8 export (its own window walk),
    greedy and with both.
WER of (b)/(c) is scored on each recording's joined reference against its whole transcript, so
words dropped or repeated at window edges count. Writes benchmarks/results/long_form.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jiwer
import numpy as np
from machine import bar_chart, describe_machine, save_results

from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.config import EvaluationConfig
from whisper_exp.decoding import DecodeOptions
from whisper_exp.long_form import join_recordings
from whisper_exp.metrics import english_normalizer, score

ROOT = Path(__file__).resolve().parent.parent
GREEDY = DecodeOptions(condition_on_prev_tokens=False, temperature_fallback=False)
SHARED = ROOT.parent / "shared"


@dataclass
class Row:
    name: str
    unit: str
    wer: float
    substitutions_deletions_insertions: str
    hypothesis_words: int
    rtfx: float
    wall_s: float


def read_utterances(data: Path, limit: int | None) -> tuple[list[np.ndarray], list[str]]:
    """The first ``limit`` utterances of ``data/metadata.csv`` (audio and transcript)."""
    with (data / "metadata.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:limit or None]
    return ([load_audio(data / row["file_name"]) for row in rows],
            [row["transcription"] for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"))
    parser.add_argument("--data", type=Path, default=SHARED / "data/speechocean762/dev")
    parser.add_argument("--limit", type=int, default=None, help="First N utterances only.")
    parser.add_argument("--minutes", type=float, default=3.0, help="Length of each recording.")
    parser.add_argument("--gap", type=float, default=EvaluationConfig().long_form_gap_s,
                        help="Silence between utterances (s).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()

    from whisper_exp.ctranslate2_backend import FasterWhisperTranscriber
    from whisper_exp.export import convert_to_ctranslate2, save_merged_hf
    from whisper_exp.transcribe import Transcriber

    command = "python benchmarks/long_form.py " + shlex.join(sys.argv[1:])
    utterances, utterance_refs = read_utterances(args.data, args.limit)
    # Consecutive utterances regardless of speaker (no speakers passed), as the published
    # figures were made; a last bit too short for long-form joins the recording before.
    joined, _ = join_recordings(utterances, utterance_refs, None, minutes=args.minutes,
                                gap_s=args.gap)
    recordings = [r.audio for r in joined]
    references = [r.references for r in joined]
    audio_s = sum(len(r) for r in recordings) / SAMPLE_RATE
    speech_s = sum(len(u) for u in utterances) / SAMPLE_RATE
    normalize = english_normalizer()
    joined_refs = [" ".join(texts) for texts in references]
    rows: list[Row] = []

    def add(name: str, unit: str, refs: list[str], texts: list[str], wall: float,
            seconds: float) -> None:
        scores = score(refs, texts, normalize)
        pairs = [(normalize(r), normalize(t)) for r, t in zip(refs, texts, strict=True)]
        edits = jiwer.process_words([r for r, _ in pairs], [t for _, t in pairs])
        counts = f"{edits.substitutions}/{edits.deletions}/{edits.insertions}"
        words = sum(len(normalize(t).split()) for t in texts)
        rows.append(Row(name, unit, scores.wer, counts, words, seconds / wall, wall))
        print(f"{name}: WER {100 * scores.wer:.2f}% (S/D/I {counts}), RTFx {seconds / wall:.1f}",
              flush=True)

    transcriber = Transcriber.load(args.model)
    transcriber.transcribe_audio(utterances[:1], DecodeOptions())  # warm-up, untimed
    start = time.perf_counter()
    texts = [d.text for d in transcriber.transcribe_audio(utterances, DecodeOptions())]
    add("transformers, utterance by utterance (batched)", "utterances", utterance_refs, texts,
        time.perf_counter() - start, speech_s)
    long_form_options = {
        "transformers long-form, greedy": GREEDY,
        "transformers long-form, previous text": DecodeOptions(temperature_fallback=False),
        "transformers long-form, fallback": DecodeOptions(condition_on_prev_tokens=False),
        "transformers long-form, previous text + fallback (default)": DecodeOptions(),
    }
    for name, options in long_form_options.items():
        start = time.perf_counter()
        texts = [d.text for d in transcriber.transcribe_audio(recordings, options)]
        add(name, f"{len(recordings)} recordings", joined_refs, texts,
            time.perf_counter() - start, audio_s)
    del transcriber

    with tempfile.TemporaryDirectory(prefix="whisper-exp-long-form-") as workdir:
        merged = save_merged_hf(args.model, Path(workdir) / "merged", source=args.model)
        export = convert_to_ctranslate2(merged, Path(workdir) / "ct2-int8", "int8")
        fast = FasterWhisperTranscriber.load(export)
        fast.transcribe_audio(utterances[:1], DecodeOptions())  # warm-up, untimed
        for name, options in {"greedy": GREEDY,
                              "previous text + fallback (default)": DecodeOptions()}.items():
            start = time.perf_counter()
            texts = [d.text for d in fast.transcribe_audio(recordings, options)]
            add(f"faster-whisper int8 long-form, {name}", f"{len(recordings)} recordings",
                joined_refs, texts, time.perf_counter() - start, audio_s)

    header = [
        f"Machine: {describe_machine()}.",
        f"Data: {sum(len(t) for t in references)} utterances of {args.data.name} joined with "
        f"{args.gap:g} s pauses into {len(recordings)} recordings of about {args.minutes:g} min "
        f"({audio_s / 60:.1f} min in all); model {args.model}.",
        f"Command: `{command}`",
        "",
        "WER: Whisper English normaliser; recording rows score each recording's joined "
        "reference against its whole transcript. RTFx: audio seconds (pauses included for "
        "recordings) per wall second.",
    ]
    table = write_report(rows, header, args.out)
    print(table)


def write_report(rows: list[Row], header: list[str], out: Path) -> str:
    lines = [*header, "", "| decoding | unit | WER | S/D/I | words out | RTFx | wall s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.unit} | {100 * r.wer:.2f}% | "
              f"{r.substitutions_deletions_insertions} | {r.hypothesis_words} | {r.rtfx:.1f} | "
              f"{r.wall_s:.1f} |" for r in rows]
    table = "\n".join(lines)
    save_results(out, "long_form", table, [asdict(r) for r in rows])
    bar_chart(out / "long_form.png", [r.name for r in rows], [100 * r.wer for r in rows],
              ["#999"] + ["#27a"] * (len(rows) - 1), "WER % (lower is better)",
              "Long-form decoding vs the same utterances one by one", size=(8, 3.5))
    return table


if __name__ == "__main__":
    main()
