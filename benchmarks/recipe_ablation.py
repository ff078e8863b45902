"""Recipe ablation: stock tiny.en, the shipped LoRA recipe, and each lever added, scored on dev.

Run (not in CI; each full-data recipe takes 25-60 min on 2 CPU cores):
    python benchmarks/recipe_ablation.py                                   # every recipe
    python benchmarks/recipe_ablation.py --recipes stock,lora,k2_all_e4     # a few
    python benchmarks/recipe_ablation.py --recipes k2 --train-samples 16 --dev-samples 8  # check

Every recipe is a list of config overrides on ``--config`` (default ``experiments/lora.yaml``),
trained on the shared speechocean762 train set and scored on the whole dev set (13 speakers unseen
in training), each in a fresh process so its peak memory is its own, with a cold encoder cache of
its own (the fill counts in its time). ``wall s`` is the whole ``train`` call as a user waits for
it: cache fill, training, evaluations during training and the final evaluation with its report.
Writes benchmarks/results/recipe_ablation.{md,csv,png}; every run is in MLflow (experiment
``whisper-exp-benchmarks``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import add_training_arguments, bar_chart, describe_machine, save_results

ALL_LINEAR = "finetuning.lora.target_modules=q_proj,k_proj,v_proj,out_proj,fc1,fc2"
K2 = "finetuning.freeze_encoder_layers=2"
FULL_BF16 = ["finetuning.strategy=full", "training.learning_rate=5e-5", "training.epochs=3",
             "training.warmup_steps=50", "training.mixed_precision=bf16"]
# id -> (what it adds, overrides on --config). "stock" is the base model, not trained.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "stock": ("stock tiny.en, no training", []),
    "lora": ("LoRA r=32 on q/v of encoder + decoder, 2 epochs (lora.yaml)", []),
    "k2": ("+ bottom 2 encoder layers frozen and cached", [K2]),
    "k2_all": ("+ LoRA on all linear layers (q,k,v,out,fc1,fc2)", [K2, ALL_LINEAR]),
    "k2_all_e4": ("+ 4 epochs, best epoch kept", [K2, ALL_LINEAR, "training.epochs=4"]),
    "k2_all_e4_bf16": ("+ bf16 autocast (CPU: AVX512-BF16/AMX)",
                       [K2, ALL_LINEAR, "training.epochs=4", "training.mixed_precision=bf16"]),
    "lora_bf16": ("lora.yaml under bf16 autocast", ["training.mixed_precision=bf16"]),
    "full_bf16": ("full fine-tune of encoder + decoder, lr 5e-5, 3 epochs, bf16", FULL_BF16),
    "full_bf16_specaug": ("full_bf16 + SpecAugment (10% of frames, ~10 of 80 mel bins)",
                          [*FULL_BF16, "augmentation.mask_time_prob=0.1",
                           "augmentation.mask_feature_prob=0.1"]),
    "k2_all_dora": ("all-linear DoRA instead of LoRA", [K2, ALL_LINEAR,
                                                         "finetuning.lora.use_dora=true"]),
    "k2_full": ("full fine-tune of the top 2 encoder layers + decoder, lr 1e-4",
                [K2, "finetuning.strategy=full", "training.learning_rate=1e-4"]),
    "k2_all_specaug": ("all-linear + SpecAugment on the cached states",
                       [K2, ALL_LINEAR, "augmentation.mask_time_prob=0.05",
                        "augmentation.mask_feature_prob=0.05"]),
    "k2_all_speed": ("all-linear + speed perturbation 0.9/1.1",
                     [K2, ALL_LINEAR, "augmentation.speed_factors=0.9,1.1"]),
    "k2_all_lrdecay": ("all-linear + layer-wise lr decay 0.8", [K2, ALL_LINEAR,
                                                                "training.layer_lr_decay=0.8"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated ids out of: {', '.join(RECIPES)}")
    parser.add_argument("--train-samples", type=int, default=0, help="0 = the whole train set")
    parser.add_argument("--dev-samples", type=int, default=0, help="0 = the whole dev set")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: run one recipe
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.one:
        args.result.write_text(json.dumps(run_recipe(args.one, args)), encoding="utf-8")
        return

    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    rows: list[dict[str, Any]] = []
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", name,
                            "--result", result.name], check=True)
            rows.append(json.loads(Path(result.name).read_text(encoding="utf-8")))
        print(rows[-1], flush=True)
        write(rows, args)  # a table after every recipe: a long run that dies keeps the rest


def _config(name: str, args: argparse.Namespace, cache_dir: str):
    from whisper_exp.config import resolve_config

    overrides = [f"training.cache_dir={cache_dir}", "training.checkpoint_steps=-1",
                 *RECIPES[name][1], *args.sets]
    if args.train_samples:
        overrides.append(f"data.max_train_samples={args.train_samples}")
    if args.dev_samples:
        overrides.append(f"data.max_eval_samples={args.dev_samples}")
    cfg = resolve_config(args.config, {"model": args.model, "data": args.train,
                                       "eval_data": args.dev,
                                       "experiment": "whisper-exp-benchmarks"}, overrides)
    cfg.tracking.run_name = f"recipe:{name}"
    return cfg


def run_recipe(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import mlflow

    from whisper_exp.evaluation import run_evaluation
    from whisper_exp.training import train

    with tempfile.TemporaryDirectory(prefix="whisper-exp-cache-") as cache_dir:
        cfg = _config(name, args, cache_dir)
        start = time.perf_counter()
        if name == "stock":
            report = run_evaluation(args.model, args.dev, cfg)
            run_id, scores, metrics = report.run_id, report.results[""].scores, {}
        else:
            result = train(cfg)
            run_id, scores, metrics = result.run_id, result.final.scores, result.metrics
        wall = time.perf_counter() - start
    logged = mlflow.get_run(run_id).data
    return {
        "recipe": name,
        "adds": RECIPES[name][0],
        "dev_wer": scores.wer,
        "dev_cer": scores.cer,
        "dev_wer_orthographic": logged.metrics.get("wer_orthographic"),
        "loop_share": logged.metrics.get("loop_share"),
        "wall_s": wall,
        "train_s": metrics.get("train_runtime_s", 0.0),
        "cache_fill_s": logged.metrics.get("cache_encoder_fill_s", 0.0),
        "best_step": metrics.get("best_step"),
        "global_steps": metrics.get("global_steps"),
        "peak_mb": metrics.get("peak_memory_mb"),
        "trainable_params": int(logged.metrics.get("trainable_params", 0)),
        "n_train": logged.params.get("data.n_train"),
        "run_id": run_id,
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    lines = [
        f"Machine: {describe_machine()}.",
        f"Command: `python benchmarks/recipe_ablation.py {shlex.join(sys.argv[1:])}`",
        f"Base config {Path(args.config).name}; train: "
        f"{args.train_samples or 'all'} utterances of {args.train}; dev: "
        f"{args.dev_samples or 'all'} utterances of {args.dev}. WER/CER after Whisper's English "
        "normaliser; orthographic WER against the sentence-cased references; wall = the whole "
        "train call (cold cache fill, training, per-epoch and final evaluation).",
        "",
        "| recipe | adds | dev WER | dev CER | ortho WER | loop share | wall s | train s | "
        "peak MB | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['recipe']} | {r['adds']} | {_pct(r['dev_wer'])} | {_pct(r['dev_cer'])} | "
              f"{_pct(r['dev_wer_orthographic'])} | {_pct(r['loop_share'])} | "
              f"{r['wall_s']:.0f} | {r['train_s']:.0f} | "
              f"{r['peak_mb'] or 0:.0f} | {r['trainable_params']:,} |" for r in rows]
    table = "\n".join(lines)
    print(table, flush=True)
    save_results(args.out, "recipe_ablation", table, rows)
    bar_chart(args.out / "recipe_ablation.png",
              [f"{r['recipe']} ({r['wall_s'] / 60:.0f} min)" for r in rows],
              [100 * r["dev_wer"] for r in rows],
              ["#999" if r["recipe"] == "stock" else "#2a7" for r in rows],
              "dev WER % (speechocean762, 13 unseen speakers)", "Recipe ablation")


if __name__ == "__main__":
    main()
