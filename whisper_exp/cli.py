"""``whisper-exp`` command line: thin click wrappers over the library API.

The MLproject entry points call these same commands, so ``mlflow run . -e train`` and
``whisper-exp train`` behave identically.
"""

from __future__ import annotations

import logging
import sys

import click

from whisper_exp.config import ConfigError, resolve_config
from whisper_exp.data import DataError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "filelock", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Group(click.Group):
    """Turns the library's user errors into a one-line message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ConfigError, DataError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Fine-tune, evaluate and track OpenAI Whisper models with MLflow."""
    _setup_logging(verbose)


def _common(func):
    options = [
        click.option("--config", "config_path", default="", help="Experiment YAML "
                     "(experiments/lora.yaml, ...). Empty: built-in defaults."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set training.warmup_steps=50."),
        click.option("--tracking-uri", default="", help="MLflow tracking URI (default: "
                     "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."),
        click.option("--experiment", default="", help="MLflow experiment name."),
        click.option("--run-name", default="", help="MLflow run name."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command(context_settings=CONTEXT)
@_common
@click.option("--strategy", default="", help="full | lora | qlora.")
@click.option("--model", default="", help="Hub name or local path of the base model.")
@click.option("--data", default="", help="Training data: folder (metadata.csv or .txt "
              "transcripts) or Hugging Face dataset.")
@click.option("--eval-data", default="", help="Separate eval data (else data.eval_split is "
              "held out, speaker-disjoint when speakers are known).")
@click.option("--learning-rate", default="", help="Peak learning rate.")
@click.option("--lora-r", default="", help="LoRA rank.")
@click.option("--epochs", default="", help="Training epochs.")
@click.option("--max-steps", default="", help="Optimizer steps; > 0 overrides epochs.")
@click.option("--batch-size", default="", help="Per-device train batch size.")
@click.option("--freeze-encoder", default="", help="true | false.")
@click.option("--gradient-checkpointing", default="", help="true | false.")
def train(config_path, sets, **named):
    """Fine-tune Whisper and log params, curves, WER/CER, memory and the model to MLflow."""
    from whisper_exp.training import train as run_training

    cfg = resolve_config(config_path or None, named, sets)
    result = run_training(cfg)
    click.echo(f"run_id={result.run_id} wer={result.final.scores.wer:.4f} "
               f"cer={result.final.scores.cer:.4f} model={result.model_dir}")


@main.command(context_settings=CONTEXT)
@_common
@click.option("--model", required=True, help="Hub name, local path, runs:/<run_id>[/model] "
              "or models:/<name>@<alias>.")
@click.option("--data", required=True, help="Folder or Hugging Face dataset to score on.")
@click.option("--compare", "compare_with", default="", help="Base model to score side by side "
              "(logs base_wer, wer and wer_delta).")
@click.option("--num-beams", default="", help="Beam size (1 = greedy).")
@click.option("--eval-batch-size", default="", help="Decoding batch size.")
def evaluate(config_path, sets, model, data, compare_with, **named):
    """Score a model's WER/CER on a dataset (optionally against a base model)."""
    from whisper_exp.evaluation import run_evaluation

    cfg = resolve_config(config_path or None, named, sets)
    report = run_evaluation(model, data, cfg, compare_with=compare_with or None)
    for prefix, result in report.results.items():
        label = "base" if prefix else "model"
        click.echo(f"{label}: wer={result.scores.wer:.4f} cer={result.scores.cer:.4f} "
                   f"utterances={len(result.rows)}")
    click.echo(f"run_id={report.run_id}")


@main.command("prepare-data", context_settings=CONTEXT)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--model", default="", help="Tokenizer used to check label length "
              "(default: none, length not checked).")
@click.option("--max-duration", default=30.0, show_default=True, help="Longest clip, seconds.")
def prepare_data(folder, model, max_duration):
    """Build metadata.csv from .txt transcripts (never overwriting one) and validate every row."""
    from whisper_exp.data import prepare_folder

    report = prepare_folder(folder, model=model or None, max_duration_s=max_duration)
    for notice in report.notices:
        click.echo(notice)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    click.echo(f"{len(report.examples)} usable utterance(s), {len(report.problems)} problem(s)")
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
