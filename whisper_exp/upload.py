"""``whisper-exp upload-run <folder>``: send a run kept on disk (its tracking server went away
and never came back) to a tracking server: config as params, every metric value, the model.

The folder is the run's output folder (``outputs/<run_id>``) that the error message named. If
the server has that run (or one an earlier upload made), the missing parts go into it (metric
values it already holds are not sent twice); otherwise a new run is made in the same
experiment, tagged with the old id. Uploading twice sends nothing twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from whisper_exp.config import ConfigError, load_config
from whisper_exp.run_journal import BATCH, JOURNAL_DIR, RUN_FILE, read_metrics

log = logging.getLogger(__name__)

UPLOADED_FROM_TAG = "whisper_exp.uploaded_from"


@dataclass
class Upload:
    run_id: str
    new_run: bool
    metrics_sent: int
    model_sent: bool


def _read_folder(folder: Path) -> tuple[dict, Path]:
    journal = folder / JOURNAL_DIR
    info_path, config_path = journal / RUN_FILE, journal / "config.yaml"
    if not info_path.is_file() or not config_path.is_file():
        raise ConfigError(f"{folder} is not a run kept on disk (no {JOURNAL_DIR}/{RUN_FILE} and "
                          f"{JOURNAL_DIR}/config.yaml): pass the folder the training error "
                          "named, outputs/<run_id>")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{info_path} is not valid JSON ({exc})") from None
    return info, config_path


def _existing(client: MlflowClient, run_id: str, experiment_name: str):
    """The run itself, or the one an earlier upload of it made; None if neither is there."""
    try:
        return client.get_run(run_id)
    except MlflowException:
        pass
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    earlier = client.search_runs([experiment.experiment_id], max_results=1,
                                 filter_string=f"tags.`{UPLOADED_FROM_TAG}` = '{run_id}'")
    return earlier[0] if earlier else None


def upload_run(folder: str | Path, tracking_uri: str | None = None) -> Upload:
    """Send the run kept in ``folder`` to ``tracking_uri`` (None: MLflow's current one) and end
    it FINISHED (FAILED when training never wrote its model)."""
    folder = Path(folder).expanduser().resolve()
    info, config_path = _read_folder(folder)
    cfg = load_config(str(config_path))
    client = MlflowClient(tracking_uri or mlflow.get_tracking_uri())
    original = str(info.get("run_id", ""))
    name = info.get("experiment_name") or cfg.tracking.experiment_name
    run = _existing(client, original, name) if original else None
    metrics = read_metrics(folder)
    if run is None:
        experiment = client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment
                         else client.create_experiment(name))
        tags = {**info.get("tags", {}), UPLOADED_FROM_TAG: original}
        run = client.create_run(experiment_id, run_name=info.get("run_name"), tags=tags)
        params = [Param(k, "" if v is None else str(v)) for k, v in cfg.flat().items()]
        for start in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[start:start + 100])
        new_run = True
    else:
        held = {(m.key, m.step, m.timestamp, m.value)
                for key in {m.key for m in metrics}
                for m in client.get_metric_history(run.info.run_id, key)}
        metrics = [m for m in metrics if (m.key, m.step, m.timestamp, m.value) not in held]
        new_run = False
    run_id = run.info.run_id
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step)
                                          for m in metrics[start:start + BATCH]])
    present = {a.path for a in client.list_artifacts(run_id)}
    if "config.yaml" not in present:
        client.log_artifact(run_id, str(config_path))
    model = folder / "model"
    model_sent = model.is_dir() and "model" not in present
    if model_sent:
        client.log_artifacts(run_id, str(model), "model")
    client.set_tag(run_id, "whisper_exp.uploaded_from_folder", str(folder))
    client.set_terminated(run_id, "FINISHED" if model.is_dir() else "FAILED")
    log.info("run %s: %d metric values%s sent from %s", run_id, len(metrics),
             " and the model" if model_sent else "", folder)
    return Upload(run_id, new_run, len(metrics), model_sent)
