"""Benchmark: Optuna search over LoRA rank x learning rate on speechocean762, with and without
pruning, against experiments/lora.yaml's default.

Run (not in CI; hours on 2 CPU cores, well under one on a GPU):
    python benchmarks/tune_lora.py
The CPU run behind the README's table (decoder-only LoRA, so every trial reuses the cached
encoder outputs; about an hour on 2 cores):
    python benchmarks/tune_lora.py --dev-samples 60 --evals-per-trial 2 \
        --set finetuning.freeze_encoder=true
Check that it starts (tiny settings, a few minutes on 2 cores):
    python benchmarks/tune_lora.py --n-trials 2 --train-samples 4 --dev-samples 2 \
        --set training.max_steps=2 --set training.batch_size=2 --out /tmp/tune_check

Trains the default config once (with the same ``--set`` overrides as the trials, so it is the
search's starting point), then runs two studies of ``--n-trials`` trials each on a seeded
subset of the shared train set, scored on a dev subset (13 speakers unseen in training): one with
the median pruner, one without. Prints each study's trials, its best configuration and a table of
best dev WER and wall time (how much time pruning saved), and writes them under ``--out``.
Everything is also in MLflow (experiment ``whisper-exp-benchmarks``). The best trial is picked
on the same dev subset it is scored on, so its WER is optimistic against a held-out test set.
Studies live in ``--storage``; re-running resumes them (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from machine import ROOT, add_training_arguments, describe_machine, pyplot, write_csv

from whisper_exp.config import ExperimentConfig, resolve_config
from whisper_exp.training import train
from whisper_exp.tuning import StudyResult, format_trials, tune

MODES = {"pruned": "median", "unpruned": "none"}


def evaluation_cadence(cfg: ExperimentConfig, n_train: int, evals: int) -> int:
    """Evaluate ``evals`` times per trial, so the pruner has points to compare trials at."""
    t = cfg.training
    if t.max_steps > 0:
        steps = t.max_steps
    else:
        per_epoch = math.ceil(n_train / (t.batch_size * t.gradient_accumulation_steps))
        steps = math.ceil(per_epoch * t.epochs)
    return max(1, steps // evals)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
                 for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_rows(result: StudyResult) -> list[dict[str, Any]]:
    return [{"trial": t.number, "state": t.state, "dev_wer": t.value, "seconds": t.duration_s,
             **t.params, "run_id": t.run_id} for t in result.trials]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    parser.add_argument("--space", default=str(ROOT / "experiments/search/lora.yaml"))
    parser.add_argument("--train-samples", type=int, default=300,
                        help="seeded subset of the train set per trial")
    parser.add_argument("--dev-samples", type=int, default=100,
                        help="dev utterances every trial is scored on")
    parser.add_argument("--n-trials", type=int, default=12, help="trials per study")
    parser.add_argument("--evals-per-trial", type=int, default=4,
                        help="dev evaluations during each trial (pruning points)")
    parser.add_argument("--modes", default="pruned,unpruned",
                        help=f"comma-separated subset of {list(MODES)}")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("--storage", default="",
                        help="Optuna storage (default: sqlite in --out)")
    parser.add_argument("--study-prefix", default="bench-tune-lora")
    parser.add_argument("--fresh", action="store_true", help="delete earlier studies first")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not train the default config")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {list(MODES)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(out / 'tune_lora.db').resolve()}"
    cfg = resolve_config(args.config, {"model": args.model, "data": args.train,
                                       "eval_data": args.dev,
                                       "experiment": "whisper-exp-benchmarks"},
                         [f"data.max_train_samples={args.train_samples}",
                          f"data.max_eval_samples={args.dev_samples}", *args.sets])
    if not any(s.startswith("training.eval_steps=") for s in args.sets):
        cfg.training.eval_steps = evaluation_cadence(cfg, args.train_samples,
                                                     args.evals_per_trial)

    summary: list[dict[str, Any]] = []
    if not args.skip_baseline:
        started = time.perf_counter()
        baseline = train(cfg)
        summary.append({"run": "experiments/lora.yaml default",
                        "best_dev_wer": baseline.final.scores.wer,
                        "wall_s": time.perf_counter() - started, "trials": 1,
                        "complete": 1, "pruned": 0, "failed": 0,
                        "best_params": f"finetuning.lora.r={cfg.finetuning.lora.r}, "
                                       f"training.learning_rate={cfg.training.learning_rate}",
                        "run_id": baseline.run_id})

    sections = []
    walls: dict[str, float] = {}
    for mode in modes:
        name = f"{args.study_prefix}-{mode}"
        if args.fresh:
            with contextlib.suppress(KeyError):  # nothing to delete yet
                optuna.delete_study(study_name=name, storage=storage)
        started = time.perf_counter()
        result = tune(cfg, args.space, n_trials=args.n_trials, study_name=name, storage=storage,
                      pruner=MODES[mode], sampler="tpe", seed=args.seed)
        wall = walls[mode] = time.perf_counter() - started
        print(f"\n## study {name} (pruner: {MODES[mode]})\n\n{format_trials(result)}\n")
        rows = study_rows(result)
        if rows:
            sections.append(f"## {name} (pruner: {MODES[mode]})\n\n{markdown_table(rows)}\n")
            write_csv(out / f"tune_lora_{mode}_trials.csv", rows)
        summary.append({"run": f"search, {mode} ({MODES[mode]})",
                        "best_dev_wer": result.best_value, "wall_s": wall,
                        "trials": len(result.trials), "complete": result.count("COMPLETE"),
                        "pruned": result.count("PRUNED"), "failed": result.count("FAIL"),
                        "best_params": ", ".join(f"{k}={v}" for k, v in
                                                 result.best_params.items()),
                        "run_id": result.best_run_id})
        if result.interrupted:
            break

    if not summary:
        return
    note = ""
    if "pruned" in walls and "unpruned" in walls and walls["unpruned"] > 0:
        note = (f"\nPruning saved {100 * (1 - walls['pruned'] / walls['unpruned']):.0f}% of the "
                f"search's wall time (this session's trials only, if a study was resumed).\n")
    report = "\n".join([
        "# LoRA search on speechocean762 (tiny.en)",
        f"train subset {args.train_samples}, dev subset {args.dev_samples}, "
        f"{args.n_trials} trials per study, eval every {cfg.training.eval_steps} steps; "
        f"overrides on every run: {', '.join(args.sets) or 'none'}",
        f"Machine: {describe_machine()}",
        f"Command: `python benchmarks/tune_lora.py {shlex.join(sys.argv[1:])}`\n",
        markdown_table(summary), note, *sections])
    print(report)
    (out / "tune_lora.md").write_text(report + "\n", encoding="utf-8")
    (out / "tune_lora.json").write_text(json.dumps(summary, indent=2, default=str),
                                        encoding="utf-8")
    plot_search(out, modes)


def plot_search(out: Path, modes: list[str]) -> None:
    """Dev WER of every trial against its learning rate (marker size: LoRA rank), one panel per
    study, from the trials CSVs written above; pruned trials show their last reported WER."""
    plt = pyplot()
    if plt is None:
        return
    studies = {m: out / f"tune_lora_{m}_trials.csv" for m in modes}
    studies = {m: list(csv.DictReader(f.open(encoding="utf-8")))
               for m, f in studies.items() if f.exists()}
    if not studies:
        return
    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4), sharey=True,
                             squeeze=False)
    for ax, (mode, rows) in zip(axes[0], studies.items(), strict=True):
        for state, color in (("COMPLETE", "#27a"), ("PRUNED", "#d62"), ("FAIL", "#999")):
            chosen = [r for r in rows if r["state"] == state and r["dev_wer"]]
            ax.scatter([float(r["training.learning_rate"]) for r in chosen],
                       [100 * min(float(r["dev_wer"]), 1.0) for r in chosen],
                       s=[8 * float(r["finetuning.lora.r"]) ** 0.8 for r in chosen],
                       color=color, label=state.lower(), alpha=0.8)
        seconds = sum(float(r["seconds"] or 0) for r in rows)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (marker size: LoRA r)")
        ax.set_title(f"{mode} ({MODES[mode]}): {len(rows)} trials, {seconds / 60:.1f} min")
        ax.legend()
    axes[0][0].set_ylabel("dev WER % (capped at 100)")
    fig.tight_layout()
    fig.savefig(out / "tune_lora.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
