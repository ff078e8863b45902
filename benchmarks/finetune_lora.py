"""Benchmark: LoRA fine-tune of Whisper on speechocean762 train, scored on dev, before vs after.

Run (not in CI; ~1 h on 2 CPU cores):
    python benchmarks/finetune_lora.py
Prints a markdown table, writes it with a CSV and a PNG chart under benchmarks/results/, and logs
everything to MLflow (experiment ``whisper-exp-benchmarks``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from machine import add_training_arguments, describe_machine, pyplot, save_results

from whisper_exp.config import resolve_config
from whisper_exp.evaluation import run_evaluation
from whisper_exp.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    cfg = resolve_config(args.config, {"model": args.model, "data": args.train,
                                       "eval_data": args.dev,
                                       "experiment": "whisper-exp-benchmarks"}, args.sets)
    before = run_evaluation(args.model, args.dev, cfg).results[""]
    result = train(cfg)
    m = result.metrics
    row = {
        "model": Path(args.model).name,
        "strategy": cfg.finetuning.strategy,
        "lora_r": cfg.finetuning.lora.r,
        "epochs": cfg.training.epochs,
        "wer_before": before.scores.wer,
        "wer_after": result.final.scores.wer,
        "relative_wer_reduction": 1 - result.final.scores.wer / before.scores.wer,
        "cer_before": before.scores.cer,
        "cer_after": result.final.scores.cer,
        "train_time_s": m["train_runtime_s"],
        "train_samples_per_s": m["train_samples_per_second"],
        "peak_memory_mb": m["peak_memory_mb"],
        "run_id": result.run_id,
        "machine": describe_machine(),
    }
    import mlflow

    run = mlflow.get_run(result.run_id)
    row["trainable_params"] = int(run.data.metrics["trainable_params"])
    row["train_utterances"] = int(run.data.params["data.n_train"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    headers = ["metric", "value"]
    lines = [f"| {headers[0]} | {headers[1]} |", "|---|---|"]
    for key, value in row.items():
        shown = f"{100 * value:.1f}%" if key.startswith(("wer", "cer", "relative")) else (
            f"{value:.1f}" if isinstance(value, float) else str(value))
        lines.append(f"| {key} | {shown} |")
    table = "\n".join(lines)
    print(table)
    save_results(out, "finetune_lora", table, [row])
    (out / "finetune_lora.json").write_text(json.dumps(row, indent=2), encoding="utf-8")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        values = [100 * row["wer_before"], 100 * row["wer_after"]]
        ax.bar(["stock", f"{row['strategy']} fine-tuned"], values, color=["#999", "#2a7"])
        for i, v in enumerate(values):
            ax.text(i, v + 0.5, f"{v:.1f}%", ha="center")
        ax.set_ylabel("WER on speechocean762 dev (%)")
        ax.set_title(f"{row['model']}: before vs after")
        fig.tight_layout()
        fig.savefig(out / "finetune_lora.png", dpi=120)
        plt.close(fig)
    with mlflow.start_run(run_id=result.run_id):
        mlflow.log_metric("wer_before", row["wer_before"])
        mlflow.log_artifacts(str(out), "benchmark")


if __name__ == "__main__":
    main()
