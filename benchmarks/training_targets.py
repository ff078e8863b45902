"""Benchmark: what timestamp/prompt training and truecased targets do to a fine-tune.

Two experiments on the shared tiny.en + speechocean762 (not in CI; each trains several LoRA runs,
about an hour per run on 2 CPU cores, minutes on a GPU):

    python benchmarks/training_targets.py targets     # timestamp/prompt probability 0 vs 0.3
    python benchmarks/training_targets.py text-case   # data.text_case auto vs truecase

``targets`` trains with (timestamp_probability, prompt_probability) in (0, 0), (0.3, 0),
(0, 0.3), (0.3, 0.3) and tabulates dev short-form WER and every long-form metric the run logged
(``long_form/*``, from ``evaluation.long_form``). ``text-case`` trains with ``auto`` and
``truecase`` and scores both models (and the base) on dev against ONE reference set, dev
truecased from the base model's transcripts (cased proper nouns: what users want to read), for
capitalisation F1, orthographic WER and normalised WER. Tables go to stdout and
benchmarks/results/training_targets_<experiment>.{md,csv}; runs to MLflow
(experiment ``whisper-exp-benchmarks``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import mlflow
from machine import add_training_arguments, describe_machine, save_results

from whisper_exp.config import resolve_config
from whisper_exp.data import DatasetSplit, load_eval_only
from whisper_exp.evaluation import evaluate_examples
from whisper_exp.metrics import capitalization_f1, orthographic_wer
from whisper_exp.modeling import default_device, load_for_inference
from whisper_exp.training import train
from whisper_exp.truecasing import recase_split

TARGET_GRID = [(0.0, 0.0), (0.3, 0.0), (0.0, 0.3), (0.3, 0.3)]


def _config(args, *sets: str):
    return resolve_config(args.config, {"model": args.model, "data": args.train,
                                        "eval_data": args.dev,
                                        "experiment": "whisper-exp-benchmarks"},
                          [*args.sets, *sets])


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v)
                                       for v in (row[k] for k in keys)) + " |")
    return "\n".join(lines)


def targets(args) -> list[dict]:
    rows = []
    for timestamps, prompts in TARGET_GRID:
        cfg = _config(args, f"training.timestamp_probability={timestamps}",
                      f"training.prompt_probability={prompts}",
                      f"tracking.run_name=targets-ts{timestamps}-prompt{prompts}")
        if "long_form" in {f.name for f in dataclasses.fields(cfg.evaluation)}:
            cfg.evaluation.long_form = "on"
        result = train(cfg)
        logged = mlflow.get_run(result.run_id).data.metrics
        rows.append({"timestamp_probability": timestamps, "prompt_probability": prompts,
                     "dev_wer": result.metrics["wer"],
                     **{k: v for k, v in sorted(logged.items()) if k.startswith("long_form")},
                     "run_id": result.run_id})
    return rows


def text_case(args) -> list[dict]:
    device = default_device()
    base_cfg = _config(args, "data.text_case=truecase")
    dev = load_eval_only(args.dev, base_cfg.data, language="english")
    # One reference set for every model: dev truecased from the base model's transcripts.
    recase_split(base_cfg, DatasetSplit([], dev.eval, [], dev.notices, ""), device, None,
                 "english")
    references = [e.text for e in dev.eval]
    models = {"base": args.model}
    for mode in ("auto", "truecase"):
        cfg = _config(args, f"data.text_case={mode}", f"tracking.run_name=text-case-{mode}")
        models[mode] = str(train(cfg).model_dir)
    rows = []
    for name, reference in models.items():
        model, processor = load_for_inference(reference, device)
        result = evaluate_examples(model, processor, dev.eval, base_cfg.evaluation)
        hypotheses = [row["hypothesis"] for row in result.rows]
        rows.append({"model": name, "capitalization_f1": capitalization_f1(
            references, hypotheses).f1 or float("nan"),
            "orthographic_wer": orthographic_wer(references, hypotheses),
            "wer": result.scores.wer})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["targets", "text-case"])
    add_training_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = targets(args) if args.experiment == "targets" else text_case(args)
    table = _table(rows) + f"\n\nMachine: {describe_machine()}"
    print(table)
    save_results(Path(args.out), f"training_targets_{args.experiment.replace('-', '_')}",
                 table, rows)


if __name__ == "__main__":
    main()
