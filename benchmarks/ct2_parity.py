"""Does the CTranslate2 engine score a model as transformers does? Dev WER of one model in
transformers and in its CTranslate2 exports (float32 and int8), before and after the engine
was fed transformers' features.

Run (not in CI; the whole dev set takes several minutes on 2 idle cores):
    python benchmarks/ct2_parity.py --limit 40                        # check the script
    python benchmarks/ct2_parity.py                                   # all 260 dev clips
    python benchmarks/ct2_parity.py --model runs:/<run_id>            # a fine-tuned run

``--model`` is any model reference (folder, ``runs:/<id>``, ``models:/<name>@<alias>``;
adapters merged), stock tiny.en from ../shared by default. Every row decodes the same clips
greedily with the default token budget, batched (``--batch-size``), audio decoded before the
clock starts:
- transformers fp32 (``transcribe.Transcriber``: WhisperFeatureExtractor, audio padded with
  silence to 30 s);
- faster-whisper on the CTranslate2 export, float32 and int8, ``features=transformers``
  (the backend's default: each clip padded with silence to 30 s before the log-mel, so the
  encoder sees the features the model was trained on) and ``features=faster-whisper`` (the
  old path: the clip's own log-mel padded with zeros, ``FasterWhisperTranscriber(pad=False)``).
``same`` counts transcripts identical to transformers'. Writes
benchmarks/results/ct2_parity.{md,csv}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from machine import SHARED, describe_machine, save_results

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"))
    parser.add_argument("--dev", type=Path, default=SHARED / "data/speechocean762/dev")
    parser.add_argument("--limit", type=int, default=None, help="first N dev clips")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precisions", default="float32,int8")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()

    import csv

    import ctranslate2
    import faster_whisper

    from whisper_exp.audio import SAMPLE_RATE, load_audio
    from whisper_exp.ctranslate2_backend import FasterWhisperTranscriber
    from whisper_exp.decoding import DecodeOptions
    from whisper_exp.export import export_model
    from whisper_exp.metrics import english_normalizer, score
    from whisper_exp.transcribe import Transcriber

    if not (args.dev / "metadata.csv").exists():
        raise SystemExit(f"{args.dev}/metadata.csv not found: pass --dev (see ../shared)")
    with (args.dev / "metadata.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:args.limit]
    audios = [load_audio(args.dev / row["file_name"]) for row in rows]
    references = [row["transcription"] for row in rows]
    seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    normalize = english_normalizer()
    options = DecodeOptions(batch_size=args.batch_size)

    def measure(engine: str, weights: str, features: str, backend) -> dict:
        backend.transcribe_audio(audios[:1], options)  # warm-up
        start = time.perf_counter()
        texts = [d.text for d in backend.transcribe_audio(audios, options)]
        wall = time.perf_counter() - start
        result = {"engine": engine, "weights": weights, "features": features,
                  "wer": score(references, texts, normalize).wer, "wall_s": wall,
                  "rtfx": seconds / wall, "texts": texts}
        print(f"{engine} {weights} features={features}: WER {100 * result['wer']:.2f}% "
              f"RTFx {result['rtfx']:.1f}", flush=True)
        return result

    results = [measure("transformers", "float32", "transformers",
                       Transcriber.load(args.model))]
    with tempfile.TemporaryDirectory(prefix="ct2-parity-") as scratch:
        for precision in args.precisions.split(","):
            folder = export_model(args.model, Path(scratch) / precision, fmt="ctranslate2",
                                  quantization=precision, log_to_run=False, force=True)
            for pad, features in ((False, "faster-whisper"), (True, "transformers")):
                backend = FasterWhisperTranscriber.load(folder, compute_type="default",
                                                        pad=pad)
                results.append(measure("faster-whisper", precision, features, backend))

    reference_texts = results[0]["texts"]
    for result in results:
        texts = result.pop("texts")
        result["same"] = sum(a == b for a, b in zip(texts, reference_texts, strict=True))
        result["wer_vs_transformers_pts"] = 100 * (result["wer"] - results[0]["wer"])
    lines = [
        f"{describe_machine()}; ctranslate2 {ctranslate2.__version__}, faster-whisper "
        f"{faster_whisper.__version__}",
        f"model {args.model}; {len(audios)} dev clips ({seconds / 60:.1f} min), greedy, "
        f"batch {args.batch_size}",
        "",
        "| engine | weights | features | WER | vs transformers | same text | RTFx |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['engine']} | {r['weights']} | {r['features']} | "
                     f"{100 * r['wer']:.2f}% | {r['wer_vs_transformers_pts']:+.2f} pts | "
                     f"{r['same']}/{len(audios)} | {r['rtfx']:.1f} |")
    table = "\n".join(lines)
    print(table)
    save_results(args.out, "ct2_parity", table, results)


if __name__ == "__main__":
    main()
