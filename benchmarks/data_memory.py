"""Benchmark: peak memory of loading a Hugging Face audio dataset for training, with every clip's
bytes held in memory (the reader before AudioRef) vs read on demand from the memory-mapped Arrow
data (``DatasetAudioRef``), at 1x and 10x speechocean762 train.

Run (not in CI; ~6 min on 2 CPU cores, ~2.5 GB of temporary disk, removed afterwards):
    python benchmarks/data_memory.py
Each measurement is a fresh process that does what ``train`` does before its first step:
``load_splits`` (read, validate every header), ``SpeechDataset`` (labels + a content hash of
every clip) and log-mel features for the first clips. It reports the kernel's peak RSS (VmHWM,
which also counts the memory-mapped dataset pages the process touched: clean page cache the
kernel can drop) and the peak anonymous RSS (RssAnon, sampled: memory only the process holds).
Prints a markdown table; writes it with a CSV and a PNG chart under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import SHARED, describe_machine, pyplot, save_results

STEM = "data_memory"
MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakAnonymous:
    """Samples RssAnon every few ms: the kernel keeps no high-water mark for it."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.peak_kib = _status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))
        return self.peak_kib


def build_dataset(train: Path, scale: int, target: Path, cache: Path) -> int:
    """``save_to_disk`` dataset of ``scale`` copies of every train clip, bytes in an Audio
    column as hub datasets store them; written row by row, never held in memory."""
    import datasets

    rows = list(csv.DictReader((train / "metadata.csv").open(encoding="utf-8")))

    def generate():
        for copy in range(scale):
            for row in rows:
                yield {"audio": {"bytes": (train / row["file_name"]).read_bytes(),
                                 "path": f"{copy}/{row['file_name']}"},
                       "transcription": row["transcription"], "speaker": f"{copy}-{row['speaker']}"}

    features = datasets.Features({
        "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
        "transcription": datasets.Value("string"), "speaker": datasets.Value("string")})
    dataset = datasets.Dataset.from_generator(generate, features=features, cache_dir=str(cache))
    dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
    dataset.save_to_disk(str(target))
    return len(dataset)


def measure(dataset_dir: str, mode: str, model: str, feature_clips: int) -> dict:
    """What ``train`` does with the data before step 1, in this (fresh) process."""
    from transformers import WhisperProcessor

    from whisper_exp.config import DataConfig
    from whisper_exp.data import load_splits
    from whisper_exp.training import MelFeatures, SpeechDataset

    processor = WhisperProcessor.from_pretrained(model)
    baseline_kib = _status_kib("VmRSS")
    sampler = PeakAnonymous()
    start = time.perf_counter()
    split = load_splits(
        DataConfig(train=dataset_dir, eval_split=0.05), seed=0, language=None,
        count_label_tokens=lambda text: len(processor.tokenizer(text).input_ids),
        max_label_tokens=448)
    if mode == "eager":  # what the old reader held: every clip's bytes in Example.audio
        for example in split.train + split.eval:
            example.audio = example.audio.read_bytes()
    dataset = SpeechDataset(split.train, processor)
    features = MelFeatures(processor)
    for first in range(0, min(feature_clips, len(dataset)), 16):
        features([dataset[i] for i in range(first, min(first + 16, len(dataset)))])
    seconds = time.perf_counter() - start
    return {"baseline_rss_mib": baseline_kib / 1024, "peak_rss_mib": _status_kib("VmHWM") / 1024,
            "peak_anon_mib": sampler.stop() / 1024, "rows": len(split.train) + len(split.eval),
            "seconds": seconds}


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / MIB


def plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{r['corpus']} {r['reader']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [r["peak_rss_mib"] for r in rows], height=0.4,
            color="#9ab", label="peak RSS (VmHWM, incl. mapped dataset pages)")
    ax.barh([i + 0.2 for i in y], [r["peak_anon_mib"] for r in rows], height=0.4,
            color="#c53", label="peak anonymous RSS (held by the process)")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title("Loading a HF audio dataset for training: bytes in memory vs AudioRef")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=SHARED / "data/speechocean762/train")
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"))
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--feature-clips", type=int, default=128,
                        help="clips whose log-mel features are computed, as the first steps do")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the synthetic datasets go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--measure", nargs=2, metavar=("DATASET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.model, args.feature_clips)))
        return

    work = Path(tempfile.mkdtemp(prefix="data_memory-", dir=args.workdir))
    rows = []
    try:
        for scale in args.scales:
            target = work / f"x{scale}"
            n_rows = build_dataset(args.train, scale, target, work / "cache")
            shutil.rmtree(work / "cache", ignore_errors=True)
            size = folder_mib(target)
            print(f"built {target}: {n_rows} rows, {size:.0f} MiB", flush=True)
            for reader in ("eager", "lazy"):
                done = subprocess.run(
                    [sys.executable, __file__, "--measure", str(target), reader,
                     "--model", args.model, "--feature-clips", str(args.feature_clips)],
                    check=True, capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"corpus": f"{scale}x", "reader": "bytes in memory" if reader ==
                             "eager" else "AudioRef (lazy)", "rows": result["rows"],
                             "dataset_mib": round(size), **{k: round(v, 1) for k, v in
                                                            result.items() if k != "rows"}})
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = ["corpus", "reader", "rows", "dataset MiB", "peak RSS MiB (VmHWM)",
              "peak anon MiB", "baseline MiB", "seconds"]
    keys = ["corpus", "reader", "rows", "dataset_mib", "peak_rss_mib", "peak_anon_mib",
            "baseline_rss_mib", "seconds"]
    lines = [f"Machine: {describe_machine()}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    save_results(args.out, STEM, table, rows)
    plot(args.out / f"{STEM}.png", rows)


if __name__ == "__main__":
    main()
