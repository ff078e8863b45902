"""Training speed, side by side: the plain Hugging Face recipe vs whisper_exp's strategies.

Run (not in CI; ~15-25 min on 2 CPU cores, minutes on a GPU):
    python benchmarks/train_speed.py
    python benchmarks/train_speed.py --steps 10 --batch-size 8 --subset 128   # bigger

(a) `reference`: the recipe of the Hugging Face "fine-tune Whisper" blog: Seq2SeqTrainer, full
    fine-tune, log-mel features computed in the collator, nothing cached.
(b) whisper_exp: full, lora, qlora, lora + freeze_encoder (encoder cache cold and warm), each
    with and without gradient checkpointing; bf16 autocast (CPU too) for full, lora and the
    cached top-2-layer path, and all-linear LoRA above 2 frozen layers in fp32 and bf16:
    python benchmarks/train_speed.py --configs "lora,lora+bf16,\
all-linear+freeze_encoder_layers=2,all-linear+freeze_encoder_layers=2+bf16"
Every configuration trains the same fixed subset of the shared train set with the same batch
size and number of steps, each in a fresh subprocess (so peak memory is its own). s/step is the
median of wall time between consecutive optimizer steps (data loading included), skipping the
first step. Then a 3-epoch LoRA + frozen-encoder run (cache cold at start) is compared with the
reference overall and for epochs after the first.
Writes benchmarks/results/train_speed.{md,csv,png} and logs them to MLflow.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import bar_chart, describe_machine, save_results

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

CONFIGS: dict[str, dict] = {
    "reference": {},
    "full": {"strategy": "full"},
    "full+gc": {"strategy": "full", "gradient_checkpointing": True},
    "lora": {"strategy": "lora"},
    "lora+gc": {"strategy": "lora", "gradient_checkpointing": True},
    "qlora": {"strategy": "qlora"},
    "qlora+gc": {"strategy": "qlora", "gradient_checkpointing": True},
    "lora+freeze_encoder (cold)": {"strategy": "lora", "freeze_encoder": True},
    "lora+freeze_encoder+gc (cold)": {"strategy": "lora", "freeze_encoder": True,
                                      "gradient_checkpointing": True},
    "lora+freeze_encoder_layers=2": {"strategy": "lora", "freeze_encoder_layers": 2},
    # bf16 autocast (training.mixed_precision=bf16): on CPUs with AVX512-BF16 / AMX.
    "full+bf16": {"strategy": "full", "training": {"mixed_precision": "bf16"}},
    "lora+bf16": {"strategy": "lora", "training": {"mixed_precision": "bf16"}},
    "lora+freeze_encoder_layers=2+bf16": {"strategy": "lora", "freeze_encoder_layers": 2,
                                          "training": {"mixed_precision": "bf16"}},
    # the issue-13 recipe's adapters: all six linear kinds above 2 frozen layers, fp32 and bf16
    "all-linear+freeze_encoder_layers=2": {"strategy": "lora", "freeze_encoder_layers": 2,
                                           "lora": {"target_modules": ["all-linear"]}},
    "all-linear+freeze_encoder_layers=2+bf16": {"strategy": "lora", "freeze_encoder_layers": 2,
                                                "lora": {"target_modules": ["all-linear"]},
                                                "training": {"mixed_precision": "bf16"}},
}


# --------------------------------------------------------------------------- one configuration


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time between consecutive optimizer steps (includes the collator's work)."""

        def __init__(self):
            self.ends: list[float] = []
            self.started = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def step_seconds(self) -> list[float]:
            return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]

    return StepTimer()


def _peak_memory_mb() -> tuple[float, str]:
    import torch

    from whisper_exp.tracking import peak_memory_mb

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return peak_memory_mb(device)


def run_reference(args) -> dict:
    """The blog recipe, written plainly: no whisper_exp code on the training path."""
    import soundfile as sf
    import soxr
    import torch
    from transformers import (
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    rows = list(csv.DictReader((Path(args.train) / "metadata.csv").open(encoding="utf-8")))
    rows = rows[: args.subset]
    processor = WhisperProcessor.from_pretrained(args.model)
    model = WhisperForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    model.generation_config.forced_decoder_ids = None

    def load(path):
        audio, rate = sf.read(path, dtype="float32")
        return soxr.resample(audio, rate, 16_000) if rate != 16_000 else audio

    dataset = [{"path": str(Path(args.train) / r["file_name"]),
                "labels": processor.tokenizer(r["transcription"].capitalize() + ".").input_ids}
               for r in rows]

    def collate(items):
        features = processor.feature_extractor([load(i["path"]) for i in items],
                                               sampling_rate=16_000,
                                               return_tensors="pt").input_features
        labels = processor.tokenizer.pad({"input_ids": [i["labels"] for i in items]},
                                         return_tensors="pt")
        ids = labels["input_ids"].masked_fill(labels.attention_mask.ne(1), -100)
        if (ids[:, 0] == model.config.decoder_start_token_id).all():
            ids = ids[:, 1:]
        return {"input_features": features, "labels": ids}

    timer = _step_timer()
    trainer = Seq2SeqTrainer(
        model=model, data_collator=collate, train_dataset=dataset, callbacks=[timer],
        args=Seq2SeqTrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
            learning_rate=1e-5, max_steps=args.steps, report_to=[], save_strategy="no",
            remove_unused_columns=False, logging_steps=1000, seed=0,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
            fp16=torch.cuda.is_available(),
        ),
    )
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_seconds": timer.step_seconds(), "trainable_params": trainable,
            "fill_seconds": 0.0}


def run_whisper_exp(args, name: str) -> dict:
    import mlflow

    from whisper_exp.config import load_config
    from whisper_exp.training import train

    options = dict(CONFIGS[name])
    training_options = options.pop("training", {})
    lora_options = {"r": 32, **options.pop("lora", {})}
    overrides = {
        "model": {"name": args.model},
        "data": {"train": args.train, "max_train_samples": args.subset, "max_eval_samples": 2,
                 "eval_split": 0.1},
        "finetuning": {**options, "lora": lora_options},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "seed": 0,
                     "learning_rate": 1e-5 if options["strategy"] == "full" else 1e-3,
                     "cache_dir": args.cache_dir, "logging_steps": 1000,
                     # like the reference: no evaluation or checkpoints inside the timed loop
                     "eval_steps": 10**9, "checkpoint_steps": -1, **training_options},
        "evaluation": {"batch_size": 2, "max_new_tokens": 4},
        "tracking": {"experiment_name": "whisper-exp-benchmarks", "run_name": f"speed {name}"},
    }
    results = {}
    # A "(cold)" config runs twice in one process: the second run finds the cache warm.
    for label in ("cold", "warm") if "(cold)" in name else ("",):
        timer = _step_timer()
        cfg = load_config(None, overrides)
        started = time.perf_counter()
        result = train(cfg, callbacks=[timer])
        run = mlflow.get_run(result.run_id)
        results[label] = {
            "step_seconds": timer.step_seconds(),
            "trainable_params": int(run.data.metrics["trainable_params"]),
            "fill_seconds": run.data.metrics.get("cache_encoder_fill_s", 0.0),
            "total_seconds": time.perf_counter() - started,
        }
    if "cold" in results:
        results["cold"]["warm"] = results["warm"]
        return results["cold"]
    return results[""]


def run_epochs(args) -> dict:
    """3 epochs of LoRA + frozen encoder with a cold cache: overall and after-first-epoch."""
    import mlflow

    from whisper_exp.config import load_config
    from whisper_exp.training import train

    timer = _step_timer()
    cfg = load_config(None, {
        "model": {"name": args.model},
        "data": {"train": args.train, "max_train_samples": args.subset, "max_eval_samples": 2,
                 "eval_split": 0.1},
        "finetuning": {"strategy": "lora", "freeze_encoder": True},
        "training": {"epochs": 3, "batch_size": args.batch_size, "seed": 0,
                     "cache_dir": tempfile.mkdtemp(), "logging_steps": 1000,
                     "eval_steps": 10**9, "checkpoint_steps": -1},
        "evaluation": {"batch_size": 2, "max_new_tokens": 4},
        "tracking": {"experiment_name": "whisper-exp-benchmarks", "run_name": "speed 3 epochs"},
    })
    result = train(cfg, callbacks=[timer])
    run = mlflow.get_run(result.run_id)
    n_train = int(run.data.params["data.n_train"])
    fill = run.data.metrics["cache_encoder_fill_s"]
    steps = timer.step_seconds()
    training_s = timer.ends[-1] - timer.started
    steps_per_epoch = len(timer.ends) // 3
    after_first_s = timer.ends[-1] - timer.ends[steps_per_epoch - 1]
    return {"samples": 3 * n_train, "fill_seconds": fill, "training_seconds": training_s,
            "overall_samples_per_s": 3 * n_train / (fill + training_s),
            "after_first_samples_per_s": 2 * n_train / after_first_s,
            "step_seconds": steps}


# --------------------------------------------------------------------------- driver


def _child(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--model", args.model, "--train",
           args.train, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--subset", str(args.subset), "--cache-dir", args.cache_dir]
    env = dict(os.environ, MLFLOW_TRACKING_URI=args.tracking_uri)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=args.workdir)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"configuration {name!r} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"))
    parser.add_argument("--train", default=str(SHARED / "data/speechocean762/train"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--subset", type=int, default=48)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        if args.one == "reference":
            result = run_reference(args)
        elif args.one == "epochs":
            result = run_epochs(args)
        else:
            result = run_whisper_exp(args, args.one)
        result["peak_memory_mb"], result["memory_kind"] = _peak_memory_mb()
        print(json.dumps(result))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.workdir = tempfile.mkdtemp(prefix="whisper-exp-speed-")
    args.tracking_uri = f"sqlite:///{Path(args.workdir) / 'mlflow.db'}"
    rows = []
    for name in args.configs.split(","):
        args.cache_dir = tempfile.mkdtemp(prefix="cache-", dir=args.workdir)
        print(f"running {name} ...", flush=True)
        result = _child(args, name)
        entries = [(name, result)]
        if "warm" in result:
            entries.append((name.replace("(cold)", "(warm)"), {**result["warm"],
                            "peak_memory_mb": result["peak_memory_mb"]}))
        for label, r in entries:
            step = statistics.median(r["step_seconds"])
            rows.append({"config": label, "s_per_step": step,
                         "samples_per_s": args.batch_size / step,
                         "cache_fill_s": r.get("fill_seconds", 0.0) if "(warm)" not in label
                         else 0.0,
                         "peak_memory_mb": r["peak_memory_mb"],
                         "trainable_params": r["trainable_params"]})
    reference = next(r for r in rows if r["config"] == "reference")["samples_per_s"]
    for r in rows:
        r["ratio_vs_reference"] = r["samples_per_s"] / reference
    epochs = _child(args, "epochs")
    header = (f"Machine: {describe_machine()}. {args.subset} utterances of speechocean762 "
              f"train, batch {args.batch_size}, {args.steps} steps per config, median s/step "
              "(first step skipped); peak memory: process peak RSS on CPU, max allocated on CUDA.")
    lines = [header, "", "| config | s/step | samples/s | × reference | cache fill s | "
             "peak MB | trainable params |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['s_per_step']:.2f} | {r['samples_per_s']:.2f} | "
                     f"{r['ratio_vs_reference']:.2f} | {r['cache_fill_s']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['trainable_params']:,} |")
    lines += ["", f"3-epoch LoRA + frozen encoder ({epochs['samples']} samples, cache cold): "
              f"{epochs['overall_samples_per_s']:.2f} samples/s overall "
              f"(= {epochs['overall_samples_per_s'] / reference:.1f}× reference, fill "
              f"{epochs['fill_seconds']:.0f} s); epochs 2-3: "
              f"{epochs['after_first_samples_per_s']:.2f} samples/s "
              f"(= {epochs['after_first_samples_per_s'] / reference:.1f}× reference)."]
    table = "\n".join(lines)
    print(table)
    save_results(out, "train_speed", table, rows)
    bar_chart(out / "train_speed.png", [r["config"] for r in rows],
              [r["samples_per_s"] for r in rows], ["#999"] + ["#2a7"] * (len(rows) - 1),
              "training samples / s (higher is better)",
              "Whisper fine-tuning speed, same data and batch")
    import mlflow

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("whisper-exp-benchmarks")
    with mlflow.start_run(run_name="train_speed summary"):
        mlflow.log_params({"steps": args.steps, "batch_size": args.batch_size,
                           "subset": args.subset, "machine": describe_machine()[:500]})
        for r in rows:
            key = "".join(c if c.isalnum() else "_" for c in r["config"])
            mlflow.log_metric(f"samples_per_s.{key}", r["samples_per_s"])
        mlflow.log_artifacts(str(out), "train_speed")
    print(f"results in {out}; MLflow runs in {args.tracking_uri}")


if __name__ == "__main__":
    main()
