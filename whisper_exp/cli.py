"""``whisper-exp`` command line: thin click wrappers over the library API.

The MLproject entry points call these same commands, so ``mlflow run . -e train`` and
``whisper-exp train`` behave identically.
"""

from __future__ import annotations

import functools
import logging
import shlex
import sys

import click

from whisper_exp.config import ConfigError, resolve_config
from whisper_exp.data import DataError
from whisper_exp.preflight import PreflightError, check_database, check_tracking_uri, refusal
from whisper_exp.safety import UnsafeModelError, WeightsMismatchError

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
        except (ConfigError, DataError, PreflightError, UnsafeModelError,
                WeightsMismatchError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except Exception as exc:  # a 401/403 of an authenticated tracking server: one line
            refused = refusal(exc)
            if refused is None:
                raise
            click.echo(f"error: {refused}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Fine-tune, evaluate and track OpenAI Whisper models with MLflow."""
    _setup_logging(verbose)


_FAIL_ON_REGRESSION = click.option(
    "--fail-on-regression", is_flag=True, help="Exit with code 3 (after logging the whole run) "
    "when a guard set's WER is worse than the base model's by more than "
    "evaluation.max_regression: for CI.")


def _exit_on_regression(regressions, fail: bool, consequence: str = "") -> None:
    from whisper_exp.guards import REGRESSION_EXIT_CODE, failure_line

    line = failure_line(regressions)
    if line:
        click.echo(f"warning: {line}" if not fail else f"error: {line}{consequence}", err=True)
        if fail:
            sys.exit(REGRESSION_EXIT_CODE)


def _common(func):
    """Config, override and tracking options of train, evaluate and tune. ``--sets`` carries
    many overrides in one string (MLproject parameters are single strings); its pairs are split
    like a shell line and applied after the ``--set`` ones."""

    @functools.wraps(func)
    def with_all_sets(*args, sets=(), set_string="", **kwargs):
        try:
            pairs = shlex.split(set_string)
        except ValueError as exc:
            raise click.BadParameter(f"{exc}: {set_string!r}", param_hint="--sets") from None
        return func(*args, sets=(*sets, *pairs), **kwargs)

    options = [
        click.option("--config", "config_path", default="", help="Experiment YAML "
                     "(experiments/lora.yaml, ...). Empty: built-in defaults."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set training.warmup_steps=50."),
        click.option("--sets", "set_string", default="", metavar='"KEY=VALUE ..."',
                     help="Space-separated KEY=VALUE overrides in one string (quote values "
                     "with spaces), applied after --set."),
        click.option("--tracking-uri", default="", help="MLflow tracking URI (default: "
                     "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."),
        click.option("--experiment", default="", help="MLflow experiment name."),
        click.option("--run-name", default="", help="MLflow run name."),
    ]
    for option in reversed(options):
        with_all_sets = option(with_all_sets)
    return with_all_sets


def _model_and_data(func):
    """Base model and train/eval data options, shared by train and tune."""
    options = [
        click.option("--model", default="", help="Hub name or local path of the base model."),
        click.option("--data", default="", help="Training data: folder (metadata.csv or .txt "
                     "transcripts) or Hugging Face dataset."),
        click.option("--eval-data", default="", help="Separate eval/dev data (else "
                     "data.eval_split is held out, speaker-disjoint when speakers are known)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command(context_settings=CONTEXT)
@_common
@click.option("--strategy", default="", help="full | lora | qlora.")
@_model_and_data
@click.option("--learning-rate", default="", help="Peak learning rate.")
@click.option("--lora-r", default="", help="LoRA rank.")
@click.option("--epochs", default="", help="Training epochs.")
@click.option("--max-steps", default="", help="Optimizer steps; > 0 overrides epochs.")
@click.option("--batch-size", default="", help="Per-device train batch size.")
@click.option("--freeze-encoder", default="", help="true | false.")
@click.option("--gradient-checkpointing", default="", help="true | false.")
@click.option("--register", "register_name", default="", help="After training, register the "
              "run's model in the MLflow Model Registry under this name (e.g. whisper-exp).")
@click.option("--alias", default="", help="With --register: move this alias (e.g. champion) "
              "to the new version.")
@click.option("--resume", "resume_run_id", default="", help="Continue this crashed/killed run "
              "from its last checkpoint, with its own config (other options are ignored).")
@_FAIL_ON_REGRESSION
def train(config_path, sets, register_name, alias, resume_run_id, fail_on_regression, **named):
    """Fine-tune Whisper and log params, curves, WER/CER, memory and the model to MLflow."""
    from whisper_exp.training import resume
    from whisper_exp.training import train as run_training

    if alias and not register_name:
        raise click.UsageError("--alias needs --register NAME")
    if resume_run_id:
        check_tracking_uri(named.get("tracking_uri") or None)
        result = resume(resume_run_id, named.get("tracking_uri") or None)
    else:
        cfg = resolve_config(config_path or None, named, sets)
        check_tracking_uri(cfg.tracking.tracking_uri)
        result = run_training(cfg)
    if result.final is None:  # a non-main rank under torchrun: rank 0 reports and registers
        return
    click.echo(f"run_id={result.run_id} wer={result.final.scores.wer:.4f} "
               f"cer={result.final.scores.cer:.4f} model={result.model_dir}")
    _exit_on_regression(result.regressions, fail_on_regression,
                        " (the run is logged; not registered)" if register_name else "")
    if register_name:
        _register_and_report(result.run_id, register_name, alias, adapter_only=False)


@main.command(context_settings=CONTEXT)
@_common
@click.option("--model", required=True, help="Hub name, local path, runs:/<run_id>[/model] "
              "or models:/<name>@<alias>.")
@click.option("--data", required=True, help="Folder or Hugging Face dataset to score on.")
@click.option("--compare", "compare_with", default="", help="Base model to score side by side "
              "(logs base_wer, wer and wer_delta).")
@click.option("--num-beams", default="", help="Beam size (1 = greedy).")
@click.option("--eval-batch-size", default="", help="Decoding batch size.")
@_FAIL_ON_REGRESSION
def evaluate(config_path, sets, model, data, compare_with, fail_on_regression, **named):
    """Score a model's WER/CER on a dataset (optionally against a base model)."""
    from whisper_exp.evaluation import run_evaluation

    if fail_on_regression and not compare_with:
        raise click.UsageError("--fail-on-regression needs --compare BASE_MODEL")
    cfg = resolve_config(config_path or None, named, sets)
    check_tracking_uri(cfg.tracking.tracking_uri)
    report = run_evaluation(model, data, cfg, compare_with=compare_with or None)
    for prefix, result in report.results.items():
        label = "base" if prefix else "model"
        click.echo(f"{label}: wer={result.scores.wer:.4f} cer={result.scores.cer:.4f} "
                   f"utterances={len(result.rows)}")
    click.echo(f"run_id={report.run_id}")
    _exit_on_regression(report.regressions, fail_on_regression)


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


@main.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="Hub name, local path, runs:/<run_id>[/model] "
              "or models:/<name>@<alias>; LoRA/QLoRA adapters are merged into their base.")
@click.option("--format", "fmt", type=click.Choice(["hf", "ctranslate2", "ggml"]), default="hf",
              show_default=True, help="hf: merged Hugging Face model; ctranslate2: a model "
              "faster-whisper loads; ggml: a whisper.cpp model file.")
@click.option("--quantization", default="", help="ctranslate2: int8 | int8_float32 | "
              "int8_float16 | float16 | bfloat16 | float32 ...; hf: float32 | float16 | "
              "bfloat16; ggml: f16 | q8_0 | q5_0 | f32. Empty: float32 (ggml: f16).")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Folder to write the exported model to.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --output.")
@click.option("--no-log", is_flag=True, help="Do not log the export to the model's MLflow run.")
@click.option("--check-data", default="", help="Clips to check the export on (a data folder or "
              "dataset); default: the source run's eval rows; neither: the check is skipped.")
@click.option("--check-clips", default=8, show_default=True, type=click.IntRange(min=1),
              help="How many clips the export is checked on.")
@click.option("--max-wer-increase", default=0.05, show_default=True,
              type=click.FloatRange(min=0), help="Refuse an export whose WER on the check "
              "clips exceeds the source model's by more than this (0.05 = 5 points).")
@click.option("--force", is_flag=True, help="Keep and log an export the check would refuse.")
@click.option("--tracking-uri", default="", help="MLflow tracking URI (default: "
              "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
def export(model, fmt, quantization, output, overwrite, no_log, check_data, check_clips,
           max_wer_increase, force, tracking_uri):
    """Export a model as a merged Hugging Face folder, for faster-whisper (CTranslate2) or for
    whisper.cpp (GGML); the export is then scored against its source model on a few clips."""
    import json as json_lib

    from whisper_exp import tracking
    from whisper_exp.export import ExportError, export_model

    tracking.configure(tracking_uri or None, None)
    try:
        path = export_model(model, output, fmt=fmt, quantization=quantization or None,
                            log_to_run=not no_log, overwrite=overwrite,
                            check_data=check_data or None, check_clips=check_clips,
                            max_wer_increase=max_wer_increase, force=force)
    except ExportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    check = json_lib.loads((path / "whisper_exp.json").read_text()).get("export_check", {})
    if "export_wer" in check:
        click.echo(f"export_wer={check['export_wer']:.4f} source_wer={check['source_wer']:.4f} "
                   f"clips={check['clips']} ({check['clips_from']})")
    elif "skipped" in check:
        click.echo(f"note: {check['skipped']}", err=True)
    click.echo(f"exported={path}")



def _number_option(value: str, option: str, cast: type[int] | type[float],
                   default: float | None) -> float | None:
    """Empty -> default, "none" -> None (no limit), else a number (MLproject passes strings)."""
    if not value.strip():
        return default
    if value.strip().lower() == "none":
        return None
    try:
        return cast(value)
    except ValueError:
        raise click.BadParameter(f"expected a number or 'none', got {value!r}",
                                 param_hint=option) from None


@main.command(context_settings=CONTEXT)
@_common
@click.option("--space", default="", help="Search-space YAML (default: "
              "experiments/search/lora.yaml: LoRA r and learning rate).")
@_model_and_data
@click.option("--n-trials", default="", help="Total trials of the study, counted across resumes "
              "and workers (default 20; 'none': until --timeout or Ctrl-C).")
@click.option("--timeout", default="", help="Start no new trial after this many seconds.")
# --study_name: what `mlflow run -P study_name=...` passes (not an MLproject parameter).
@click.option("--study-name", "--study_name", default="", help="The same name resumes (or "
              "joins) a study (default: <space>-<hash of config and space>).")
@click.option("--storage", default="", help="Optuna storage URL (default "
              "$WHISPER_EXP_OPTUNA_STORAGE, else sqlite:///optuna.db here; postgresql://... to "
              "share a study between machines).")
@click.option("--direction", default="", help="minimize (default) | maximize the final WER.")
@click.option("--sampler", default="", help="tpe (default) | random.")
@click.option("--pruner", default="", help="median (default) | hyperband | none | "
              "threshold:<wer>.")
@click.option("--seed", default="", help="Sampler seed (reproducible suggestions).")
@click.option("--register-best", default="", help="Register the best trial's model under this "
              "name.")
@click.option("--register-alias", default="", help="Alias for that version (default challenger).")
@click.option("--warm-start/--no-warm-start", default=True, show_default=True,
              help="A new study also scores the config's own values of the searched keys "
              "(when they lie inside the space).")
def tune(config_path, sets, space, n_trials, timeout, study_name, storage, direction, sampler,
         pruner, seed, register_best, register_alias, warm_start, **named):
    """Optuna search over the config (LoRA rank, learning rate, ...), one nested run per trial."""
    from whisper_exp import tuning

    cfg = resolve_config(config_path or None, named, sets)
    check_tracking_uri(cfg.tracking.tracking_uri)
    storage = tuning.storage_url(storage)
    check_database(storage, "Optuna storage")
    try:
        result = tuning.tune(
            cfg, space or tuning.DEFAULT_SPACE,
            n_trials=_number_option(n_trials, "--n-trials", int, tuning.DEFAULT_N_TRIALS),
            timeout=_number_option(timeout, "--timeout", float, None),
            study_name=study_name or None,
            storage=storage,
            direction=direction or "minimize",
            sampler=sampler or "tpe",
            pruner=pruner or "median",
            seed=_number_option(seed, "--seed", int, None),
            register_best=register_best or None,
            register_alias=register_alias or "challenger",
            warm_start=warm_start,
        )
    except tuning.TuningError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(tuning.format_trials(result))
    click.echo(f"study={result.study_name} storage={result.storage} "
               f"parent_run_id={result.parent_run_id} best_run_id={result.best_run_id or ''}")
    if result.interrupted:
        sys.exit(130)


def _register_and_report(run_id: str, name: str, alias: str, adapter_only: bool,
                         backend: str = "transformers", quantization: str = "") -> None:
    from whisper_exp.registry import RegistryError, register_run

    try:
        version = register_run(run_id, name=name, alias=alias or None,
                               adapter_only=adapter_only, backend=backend,
                               quantization=quantization or None)
    except RegistryError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"registered={version.name} version={version.version} "
               f"alias={alias or ''} uri=models:/{version.name}/{version.version}")


@main.command(context_settings=CONTEXT)
@click.option("--run", "run_id", required=True, help="Run id of a `whisper-exp train` run.")
@click.option("--name", default="whisper-exp", show_default=True, help="Registered model name.")
@click.option("--alias", default="", help="Move this alias (e.g. champion) to the new version.")
@click.option("--adapter-only", is_flag=True, help="LoRA/QLoRA runs: register the adapter and "
              "record its base model instead of the merged fp32 model.")
@click.option("--backend", type=click.Choice(["transformers", "ctranslate2"]),
              default="transformers", show_default=True, help="What serves the model: the "
              "Hugging Face model in transformers, or a CTranslate2 export in faster-whisper "
              "(no torch at serving time).")
@click.option("--quantization", default="", help="ctranslate2 backend: weight type of the export "
              "(int8 | int8_float32 | int16 | float16 | bfloat16 | float32 ...). Empty: float32.")
@click.option("--tracking-uri", default="", help="MLflow tracking URI (default: "
              "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
def register(run_id, name, alias, adapter_only, backend, quantization, tracking_uri):
    """Register a run's model as a servable MLflow pyfunc (base64 audio in, text out)."""
    from whisper_exp import tracking

    tracking.configure(tracking_uri or None, None)
    check_tracking_uri(tracking_uri or None)
    _register_and_report(run_id, name, alias, adapter_only, backend, quantization)


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", required=True, help="Hub name, local path, runs:/<run_id>[/model] "
              "or models:/<name>@<alias>.")
@click.option("-r", "--recursive", is_flag=True, help="Also transcribe audio in sub-folders.")
@click.option("--format", "fmt", type=click.Choice(["txt", "json", "srt", "vtt"]), default=None,
              help="Also write <stem>.<format> per file (json/srt/vtt carry timed segments).")
@click.option("--output-dir", default="", help="Folder for --format files (default: next to "
              "each audio file).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Clips up to 30 s decoded together.")
@click.option("--num-beams", default=1, show_default=True, type=click.IntRange(1, 16),
              help="Beam size (1 = greedy).")
@click.option("--language", default="", help="Multilingual models: language name or code "
              "(default: the model's own).")
@click.option("--timestamps", is_flag=True, help="Timed segments for clips up to 30 s too "
              "(on for json/srt/vtt; recordings over 30 s always have them).")
@click.option("--word-timestamps", is_flag=True, help="Word timings (cross-attention "
              "alignment): json gets 'words', srt/vtt one cue per word.")
@click.option("--condition-on-prev-tokens/--no-condition-on-prev-tokens", default=True,
              show_default=True, help="Long-form: give each 30 s window the previous "
              "window's text.")
@click.option("--temperature-fallback/--no-temperature-fallback", default=True,
              show_default=True, help="Long-form: re-decode windows that loop or look silent "
              "at higher temperatures (Whisper paper's heuristics; off = deterministic).")
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1),
              help="Token limit per clip / 30 s window (default: the model's).")
@click.option("--compare", "compare_with", default="", help="Base model: print both "
              "transcripts side by side, with WER where references exist (metadata.csv in the "
              "folder or a .txt beside the audio).")
@click.option("--tracking-uri", default="", help="MLflow tracking URI for runs:/ and models:/.")
def transcribe(paths, model, recursive, fmt, output_dir, batch_size, num_beams, language,
               timestamps, word_timestamps, condition_on_prev_tokens, temperature_fallback,
               max_new_tokens, compare_with, tracking_uri):
    """Transcribe audio files and folders; recordings over 30 s use long-form generation."""
    from whisper_exp import comparison, tracking
    from whisper_exp import transcribe as tx
    from whisper_exp import transcript_formats as formats

    tracking.configure(tracking_uri or None, None)
    options = tx.DecodeOptions(
        batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens,
        return_timestamps=timestamps or fmt in ("json", "srt", "vtt"),
        condition_on_prev_tokens=condition_on_prev_tokens,
        temperature_fallback=temperature_fallback, language=language or None,
        word_timestamps=word_timestamps)
    try:
        if compare_with:
            compared = comparison.compare_models(paths, model, compare_with,
                                                 recursive=recursive, options=options)
            click.echo(comparison.format_comparison(compared))
            transcripts = compared.tuned
        else:
            files = tx.collect_audio_files(paths, recursive)
            transcriber = tx.Transcriber.load(model)
            transcripts = transcriber.transcribe_files(files, options)
            click.echo(formats.format_console(transcripts))
        if fmt:
            for path in formats.write_transcripts(transcripts, fmt, output_dir or None):
                click.echo(f"wrote {path}", err=True)
    except tx.TranscribeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    failed = [t for t in transcripts if not t.ok]
    for transcript in failed:
        click.echo(f"error: {transcript.file}: {transcript.error}", err=True)
    if failed:
        click.echo(f"{len(failed)} of {len(transcripts)} file(s) failed", err=True)
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@click.argument("model_ref")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on "
              "(0.0.0.0 exposes the server to the network; set --api-key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Server processes, each with its own copy of the model.")
@click.option("--api-key", default="", envvar="WHISPER_EXP_API_KEY", help="Require "
              "'Authorization: Bearer <key>' on /v1/ (default $WHISPER_EXP_API_KEY; none: open).")
@click.option("--max-upload-mb", default=25.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Largest audio file accepted.")
@click.option("--max-batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Most concurrent clips decoded together.")
@click.option("--batch-wait-ms", default=15.0, show_default=True, type=click.FloatRange(min=0),
              help="How long the first clip of a batch waits for others to join it.")
@click.option("--served-model-name", default="", help="Model id listed by /v1/models "
              "(default: MODEL_REF).")
@click.option("--compute-type", default="default", show_default=True, help="CTranslate2 "
              "exports: int8 | float32 | ... (default: the precision it was exported with).")
@click.option("--tracking-uri", default="", help="MLflow tracking URI for runs:/ and models:/.")
def serve(model_ref, host, port, workers, api_key, max_upload_mb, max_batch_size,
          batch_wait_ms, served_model_name, compute_type, tracking_uri):
    """Serve MODEL_REF (folder, CTranslate2 export, runs:/..., models:/name@alias) with
    OpenAI's transcription API: POST /v1/audio/transcriptions, GET /v1/models, GET /health."""
    from whisper_exp import tracking
    from whisper_exp.decoding import TranscribeError
    from whisper_exp.openai_server import ServeSettings
    from whisper_exp.openai_server import serve as run_server

    tracking.configure(tracking_uri or None, None)
    settings = ServeSettings(model=model_ref, served_name=served_model_name,
                             api_key=api_key or None, max_upload_mb=max_upload_mb,
                             max_batch_size=max_batch_size, max_wait_ms=batch_wait_ms,
                             compute_type=compute_type)
    try:
        run_server(settings, host=host, port=port, workers=workers)
    except TranscribeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@main.command(context_settings=CONTEXT)
@click.argument("run_ids", nargs=-1)
@click.option("--experiment", default="", help="Every finished train run of this experiment.")
@click.option("--tracking-uri", default="", help="MLflow tracking URI (default: "
              "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
@click.option("--no-log", is_flag=True, help="Print only; log no comparison run.")
def compare(run_ids, experiment, tracking_uri, no_log):
    """Strategies side by side: cost and quality of train runs, with a WER-vs-cost plot."""
    from whisper_exp.compare import CompareError, compare_runs, format_table

    try:
        result = compare_runs(run_ids, experiment or None, log=not no_log,
                              tracking_uri=tracking_uri or None)
    except CompareError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(format_table(result.rows))
    if result.run_id:
        click.echo(f"run_id={result.run_id}")


@main.command("upload-run", context_settings=CONTEXT)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--tracking-uri", default="", help="MLflow tracking URI (default: "
              "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
def upload_run(folder, tracking_uri):
    """Send a run kept on disk (its tracking server went away) to a tracking server."""
    from whisper_exp import tracking
    from whisper_exp.upload import upload_run as send

    tracking.configure(tracking_uri or None, None)
    check_tracking_uri(tracking_uri or None)
    done = send(folder, tracking_uri or None)
    click.echo(f"run_id={done.run_id} {'new run' if done.new_run else 'same run'} "
               f"metrics={done.metrics_sent} model={'sent' if done.model_sent else 'not sent'}")


if __name__ == "__main__":
    main()
