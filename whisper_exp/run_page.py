"""What the MLflow UI shows for a run: its datasets, description and experiment kind.

The UI is built around MLflow 3 entities (datasets with a source, digest and profile; a markdown
description; an experiment kind that picks the training views over the GenAI ones), so the
runs log those instead of loose params only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# The UI reads this experiment tag to choose its views; "custom_model_development" is what its
# own "Machine learning" choice writes (mlflow/server/js), empty means "GenAI" for new stores.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"
DIGEST_CHARS = 16  # MLflow stores up to 36


# The runs table of the 3.17 UI shows no metric column until a view selects some; a saved view
# is an experiment tag (what the UI's own "Save view" writes) opened with ?viewStateShareKey=.
SAVED_VIEW_TAG = "mlflow.sharedViewState."
WER_VIEW_KEY = "whisper-exp-wer"
WER_VIEW_COLUMNS = ("metrics.`wer`", "metrics.`cer`", "metrics.`wer_orthographic`",
                    "metrics.`base_wer`", "metrics.`wer_delta`", "metrics.`train_runtime_s`",
                    "metrics.`peak_memory_mb`", "params.`finetuning.strategy`")
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"


def wer_view_url(experiment_id: str) -> str:
    """The UI route of the runs table with the WER columns (append to the server's URL)."""
    return (f"/#/experiments/{experiment_id}/runs?viewStateShareKey={WER_VIEW_KEY}"
            "&workflowType=machine_learning")


def _wer_view() -> str:
    state = {"selectedColumns": list(WER_VIEW_COLUMNS), "columnOrder": list(WER_VIEW_COLUMNS),
             "orderByKey": "metrics.`wer`", "orderByAsc": True}
    now = int(time.time() * 1000)
    return json.dumps({"name": "WER", "createdAt": now, "updatedAt": now,
                       "state": json.dumps(state)})


def mark_model_training_experiment(experiment_id: str) -> None:
    """Open the experiment in the UI's training views (runs, charts, models), unless a user
    already chose a kind for it; add a saved runs view with the WER columns and make ``wer``
    the primary metric (the charts view leads with it)."""
    client = MlflowClient()
    try:
        tags = client.get_experiment(experiment_id).tags
        wanted = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, PRIMARY_METRIC_TAG: "wer",
                  SAVED_VIEW_TAG + WER_VIEW_KEY: None}
        for key, value in wanted.items():
            if key not in tags:
                client.set_experiment_tag(experiment_id, key, value or _wer_view())
    except mlflow.exceptions.MlflowException as exc:  # a read-only store: cosmetic only
        log.warning("could not tag experiment %s as model training: %s", experiment_id, exc)


class SpeechCorpus(MetaDataset):
    """A speech dataset as MLflow sees it: where it came from, a digest of its content (audio
    bytes and transcripts, as trained on) and a profile; the audio itself is not copied."""

    def __init__(self, source: DatasetSource, name: str, digest: str,
                 profile: Mapping[str, Any]):
        self._profile = dict(profile)
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self._profile)
        return config


def dataset_source(source: str | Path, hf_split: str | None = None) -> DatasetSource:
    """A folder (or a saved Hugging Face dataset folder) as a local source, anything else as a
    Hugging Face dataset name with its split."""
    path = Path(source)
    if path.exists():
        from mlflow.data.dataset_source_registry import get_registered_sources

        folder = path.parent if path.is_file() else path
        local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
        return local(str(folder.resolve()))
    return HuggingFaceDatasetSource(path=str(source), split=hf_split)


def content_digest(audio_keys: Sequence[str], transcripts: Sequence[str]) -> str:
    """Changes when any clip's bytes or any transcript (after text case) changes; independent of
    row order, so a reshuffled metadata.csv is the same data."""
    pairs = sorted(f"{key}\t{text}" for key, text in zip(audio_keys, transcripts, strict=True))
    digest = hashlib.sha256("\n".join(pairs).encode("utf-8"))
    return digest.hexdigest()[:DIGEST_CHARS]


def speech_corpus(examples: Sequence[Any], *, source: str | Path, hf_split: str | None,
                  role: str, audio_keys: Sequence[str], seconds: float, text_case: str,
                  rows_skipped: int) -> SpeechCorpus:
    """``examples`` are ``data.Example`` rows as used (after text case and validation)."""
    speakers = {e.speaker for e in examples if e.speaker}
    profile = {
        "utterances": len(examples),
        "hours": round(seconds / 3600, 4),
        "speakers": len(speakers) if speakers else None,
        "text_case": text_case,
        "rows_skipped": rows_skipped,
    }
    label = Path(source).name if Path(source).exists() else str(source)
    name = f"{label}-{role}" if role else label
    digest = content_digest(audio_keys, [e.text for e in examples])
    return SpeechCorpus(dataset_source(source, hf_split), name, digest, profile)


def skipped_in(problems: Iterable[Any], source: str | Path) -> int:
    """Rows of ``source`` left out (problems name their file or dataset first)."""
    prefixes = {str(source), str(Path(source).resolve())} if Path(source).exists() \
        else {str(source)}
    return sum(any(p.where.startswith(prefix) for prefix in prefixes) for p in problems)


def text_case_applied(mode: str, notices: Iterable[str]) -> str:
    """The config's mode plus what it did (the data loader's notice), e.g.
    ``auto: 12 transcript(s) sentence-cased``."""
    done = [n.split(": ", 1)[-1] for n in notices if n.startswith("text_case=")]
    return f"{mode}: {'; '.join(done)}" if done else f"{mode}: unchanged"


def log_dataset(dataset: SpeechCorpus, context: str) -> None:
    mlflow.log_input(dataset, context=context)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def training_description(*, strategy: str, base_model: str, train: SpeechCorpus | None,
                         evaluation: SpeechCorpus | None, wer: float | None,
                         base_wer: float | None = None, cer: float | None = None,
                         runtime_s: float | None = None, peak_memory_mb: float | None = None,
                         trainable_params: int | None = None, extra: str = "") -> str:
    """The run page's markdown description: what was trained on what, and how it scored."""
    lines = [f"**{strategy}** fine-tune of `{base_model}`", ""]
    for label, corpus in (("Train", train), ("Eval", evaluation)):
        if corpus is not None:
            p = corpus.profile
            lines.append(f"- {label}: `{corpus.name}` ({p['utterances']} utterances, "
                         f"{p['hours'] * 60:.1f} min, digest `{corpus.digest}`)")
    if wer is not None:
        score = f"{_percent(base_wer)} → {_percent(wer)}" if base_wer is not None \
            else _percent(wer)
        lines.append(f"- WER: {score}" + (f", CER {_percent(cer)}" if cer is not None else ""))
    if runtime_s is not None:
        lines.append(f"- Training time: {runtime_s:.1f} s")
    if peak_memory_mb is not None:
        lines.append(f"- Peak memory: {peak_memory_mb:.0f} MiB")
    if trainable_params is not None:
        lines.append(f"- Trainable parameters: {trainable_params:,}")
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def evaluation_description(*, model: str, data: SpeechCorpus, wer: float,
                           base_model: str | None = None, base_wer: float | None = None,
                           cer: float | None = None) -> str:
    lines = [f"Evaluation of `{model}`" + (f" against `{base_model}`" if base_model else ""),
             "", f"- Data: `{data.name}` ({data.profile['utterances']} utterances, "
             f"{data.profile['hours'] * 60:.1f} min, digest `{data.digest}`)"]
    score = f"{_percent(base_wer)} → {_percent(wer)}" if base_wer is not None else _percent(wer)
    lines.append(f"- WER: {score}" + (f", CER {_percent(cer)}" if cer is not None else ""))
    return "\n".join(lines) + "\n"


def set_description(markdown: str) -> None:
    mlflow.set_tag(DESCRIPTION_TAG, markdown)


@dataclass
class TrainingCorpora:
    train: SpeechCorpus
    eval: SpeechCorpus


def log_training_datasets(data_cfg: Any, split: Any, train_set: Any, eval_set: Any
                          ) -> TrainingCorpora:
    """Log the train and eval sets of a `train` run (``SpeechDataset``s: their audio keys and
    durations are already computed) as the run's "training" and "evaluation" inputs."""
    text_case = text_case_applied(data_cfg.text_case, split.notices)
    eval_source = data_cfg.eval or data_cfg.train
    eval_hf_split = data_cfg.eval_split_name or (
        data_cfg.train_split_name if data_cfg.eval != data_cfg.train else "test")
    corpora = TrainingCorpora(
        train=speech_corpus(train_set.examples, source=data_cfg.train,
                            hf_split=data_cfg.train_split_name, role="train",
                            audio_keys=train_set.keys, seconds=sum(train_set.seconds),
                            text_case=text_case,
                            rows_skipped=skipped_in(split.skipped, data_cfg.train)),
        eval=speech_corpus(eval_set.examples, source=eval_source,
                           hf_split=eval_hf_split if data_cfg.eval else data_cfg.train_split_name,
                           role="eval", audio_keys=eval_set.keys,
                           seconds=sum(eval_set.seconds), text_case=text_case,
                           rows_skipped=skipped_in(split.skipped, eval_source)),
    )
    log_dataset(corpora.train, "training")
    log_dataset(corpora.eval, "evaluation")
    return corpora


def log_evaluation_dataset(source: str, data_cfg: Any, split: Any) -> SpeechCorpus:
    """The dataset of an `evaluate` run (``load_eval_only``'s split), logged as its
    "evaluation" input."""
    from whisper_exp.audio import probe
    from whisper_exp.cache import audio_fingerprint

    examples = split.eval
    corpus = speech_corpus(
        examples, source=source, hf_split=data_cfg.eval_split_name or data_cfg.train_split_name,
        role="", audio_keys=[audio_fingerprint(e.audio) for e in examples],
        seconds=sum(probe(e.audio).duration_s for e in examples),
        text_case=text_case_applied(data_cfg.text_case, split.notices),
        rows_skipped=len(split.skipped))
    log_dataset(corpus, "evaluation")
    return corpus


# Final metrics of a train run that describe the model on its eval set (linked to both).
EVAL_METRICS = ("wer", "cer", "eval_rtfx")


def log_training_outcome(cfg: Any, model_dir: Path, metrics: Mapping[str, float | None],
                         corpora: TrainingCorpora | None) -> str:
    """Log the trained model as the run's LoggedModel, the final metrics linked to it (and the
    evaluation ones to the eval dataset), and the run's description; returns the model id."""
    from whisper_exp.registry import log_trained_model

    params = {k: v for k, v in cfg.flat().items()
              if k.split(".")[0] in ("model", "finetuning", "training")}
    info = log_trained_model(model_dir, params=params)
    final = {k: float(v) for k, v in metrics.items() if v is not None}
    evaluation = {k: v for k, v in final.items() if k in EVAL_METRICS}
    mlflow.log_metrics(evaluation, model_id=info.model_id,
                       dataset=corpora.eval if corpora else None)
    mlflow.log_metrics({k: v for k, v in final.items() if k not in EVAL_METRICS},
                       model_id=info.model_id)
    run = mlflow.get_run(mlflow.active_run().info.run_id)
    trainable = run.data.metrics.get("trainable_params")
    set_description(training_description(
        strategy=cfg.finetuning.strategy, base_model=cfg.model.name,
        train=corpora.train if corpora else None, evaluation=corpora.eval if corpora else None,
        wer=final.get("wer"), cer=final.get("cer"), runtime_s=final.get("train_runtime_s"),
        peak_memory_mb=final.get("peak_memory_mb"),
        trainable_params=int(trainable) if trainable is not None else None,
        extra=f"Logged model `{info.model_id}` ({info.model_uri})"))
    return info.model_id
