"""Where partial encoder freezing lands: LoRA with the bottom k encoder layers frozen and cached.

Run (not in CI; about 25 minutes on 2 CPU cores with the defaults):
    python benchmarks/freeze_layers.py
    python benchmarks/freeze_layers.py --layers 0,4 --train-samples 16 --dev-samples 8  # check

Trains ``experiments/lora.yaml`` once per k in ``--layers`` on the same seeded subset of the
shared train set, side by side in one invocation: k = 0 is LoRA on encoder + decoder (no encoder
cache), k = n_layers (4 for tiny) is ``freeze_encoder`` (LoRA in the decoder only, the whole
encoder output cached), and in between the conv stem and bottom k layers are frozen and their
output cached while LoRA adapts the top layers + decoder. Every run starts with a cold cache
(its own cache folder), so its train time includes filling it. Scored on the dev set (speakers
unseen in training). Writes benchmarks/results/freeze_layers.{md,csv,png}; every run is in
MLflow (experiment ``whisper-exp-benchmarks``).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from machine import add_training_arguments, describe_machine, pyplot, save_results

from whisper_exp.config import resolve_config
from whisper_exp.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    parser.add_argument("--layers", default="0,2,3,4",
                        help="comma-separated k values (frozen bottom encoder layers)")
    parser.add_argument("--train-samples", type=int, default=300)
    parser.add_argument("--dev-samples", type=int, default=0, help="0 = the whole dev set")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    rows: list[dict[str, Any]] = []
    for k in (int(v) for v in args.layers.split(",")):
        with tempfile.TemporaryDirectory(prefix="whisper-exp-cache-") as cache_dir:
            overrides = [f"data.max_train_samples={args.train_samples}",
                         f"finetuning.freeze_encoder_layers={k}",
                         f"training.cache_dir={cache_dir}", "training.checkpoint_steps=-1",
                         *args.sets]
            if args.dev_samples:
                overrides.append(f"data.max_eval_samples={args.dev_samples}")
            cfg = resolve_config(args.config, {"model": args.model, "data": args.train,
                                               "eval_data": args.dev,
                                               "experiment": "whisper-exp-benchmarks"},
                                 overrides)
            cfg.tracking.run_name = f"freeze_encoder_layers={k}"
            result = train(cfg)
        m = result.metrics
        import mlflow

        run = mlflow.get_run(result.run_id)
        rows.append({
            "frozen_layers": k,
            "dev_wer": result.final.scores.wer,
            "dev_cer": result.final.scores.cer,
            "train_s": m["train_runtime_s"],
            "cache_fill_s": run.data.metrics.get("cache_encoder_fill_s", 0.0),
            "samples_per_s": m["train_samples_per_second"],
            "peak_mb": m["peak_memory_mb"],
            "trainable_params": int(run.data.metrics["trainable_params"]),
            "run_id": result.run_id,
        })
        print(rows[-1], flush=True)

    base = rows[0]["train_s"]
    lines = [
        f"Machine: {describe_machine()}.",
        f"Command: `python benchmarks/freeze_layers.py {shlex.join(sys.argv[1:])}`",
        f"{args.train_samples} train utterances, {args.config} (LoRA r/alpha/lr/epochs as in the "
        f"file), dev WER with Whisper's English normaliser; train time includes the cold "
        "encoder-cache fill.",
        "",
        "| frozen encoder layers k | dev WER | dev CER | train s | × k=first | cache fill s | "
        "peak MB | trainable params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['frozen_layers']} | {100 * r['dev_wer']:.2f}% | {100 * r['dev_cer']:.2f}% | "
              f"{r['train_s']:.0f} | {base / r['train_s']:.2f} | {r['cache_fill_s']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['trainable_params']:,} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    save_results(args.out, "freeze_layers", table, rows)
    plot(rows, args.out / "freeze_layers.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["train_s"] for r in rows], [100 * r["dev_wer"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"k={r['frozen_layers']}", (r["train_s"], 100 * r["dev_wer"]),
                    textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("train time, s (cold cache included)")
    ax.set_ylabel("dev WER %")
    ax.set_title("LoRA with the bottom k encoder layers frozen and cached")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
