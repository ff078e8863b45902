"""Benchmark: Optuna search over LoRA rank x learning rate on speechocean762, with and without
pruning, against experiments/lora.yaml's default.

Run (not in CI; hours on 2 CPU cores, well under one on a GPU):
    python benchmarks/tune_lora.py
Check that it starts (tiny settings, a few minutes on 2 cores):
    python benchmarks/tune_lora.py --n-trials 2 --train-samples 4 --dev-samples 2 \
        --set training.max_steps=2 --set training.batch_size=2 --out /tmp/tune_check

Trains the default config once, then runs two studies of ``--n-trials`` trials each on a seeded
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
import time
from pathlib import Path
from typing import Any

import optuna

from whisper_exp.config import ExperimentConfig, resolve_config
from whisper_exp.training import train
from whisper_exp.tuning import StudyResult, format_trials, tune

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
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
    parser.add_argument("--config", default=str(ROOT / "experiments/lora.yaml"))
    parser.add_argument("--space", default=str(ROOT / "experiments/search/lora.yaml"))
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"))
    parser.add_argument("--train", default=str(SHARED / "data/speechocean762/train"))
    parser.add_argument("--dev", default=str(SHARED / "data/speechocean762/dev"))
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
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra config overrides, key=value")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
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
            with (out / f"tune_lora_{mode}_trials.csv").open("w", newline="",
                                                              encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
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
        f"{args.n_trials} trials per study, eval every {cfg.training.eval_steps} steps\n",
        markdown_table(summary), note, *sections])
    print(report)
    (out / "tune_lora.md").write_text(report + "\n", encoding="utf-8")
    (out / "tune_lora.json").write_text(json.dumps(summary, indent=2, default=str),
                                        encoding="utf-8")


if __name__ == "__main__":
    main()
