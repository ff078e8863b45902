"""Register a training run's model in the MLflow Model Registry as a servable pyfunc.

The model is a models-from-code ``PythonModel`` (``pyfunc_model.py``) rather than the transformers
flavor: that flavor's pyfunc decodes audio through an ffmpeg binary and its ``log_model`` infers
requirements such as torchvision, while this one decodes with soundfile + soxr and lists exactly
what it imports. LoRA/QLoRA adapters are merged into an fp32 base by default, so serving needs
neither peft nor the base checkpoint; ``adapter_only`` keeps the small adapter and records the
base it needs. ``backend="ctranslate2"`` registers a CTranslate2 export of the merged model
instead, served by faster-whisper without torch (tiny.en in int8: 41 MB of weights against
151 MB in fp32).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient

from whisper_exp.export import (
    ExportError,
    check_export_options,
    convert_to_ctranslate2,
    save_merged_hf,
)
from whisper_exp.modeling import ADAPTER_CONFIG, METADATA_FILE, load_for_inference
from whisper_exp.safety import WEIGHT_FILES_KEY, WEIGHTS_DIGEST_KEY, weights_digest, weights_sha256
from whisper_exp.serving import BACKENDS, MODEL_ARTIFACT, SIGNATURE

log = logging.getLogger(__name__)

DEFAULT_NAME = "whisper-exp"
PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CODE = PACKAGE_DIR / "pyfunc_model.py"
# Distributions the pyfunc imports at serving time (whisper_exp itself travels as code).
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "transformers", "numpy", "pandas", "soundfile",
                         "soxr", "jiwer", "pyyaml", "tqdm")
# The ctranslate2 backend: no torch; transformers only for its language table (it imports
# without torch).
CTRANSLATE2_SERVING_DISTRIBUTIONS = ("mlflow", "numpy", "pandas", "soundfile", "soxr",
                                     "ctranslate2", "faster-whisper", "transformers")
# Metrics whose values also go into the version's description (all metrics become tags).
HEADLINE_METRICS = ("wer", "cer", "base_wer", "wer_delta")
# MLflow's system metrics sampler (CPU, memory, GPU) logs under this prefix: not model facts.
SYSTEM_METRIC_PREFIX = "system/"
# The LoggedModel each `train` run logs, and the tags saying how a logged pyfunc was packaged.
TRAINED_MODEL_NAME = "whisper"
MODEL_TYPE = "speech-to-text"
PACKAGING_TAG = "whisper_exp.packaging"
BACKEND_TAG = "whisper_exp.backend"
BASE_MODEL_TAG = "whisper_exp.base_model"
WEIGHTS_TAG = "whisper_exp.weights_sha256"  # LoggedModel tag; versions get "weights_sha256"


class RegistryError(ValueError):
    """The run cannot be registered: missing, unfinished, or without a model artifact."""


def serving_requirements(adapter_only: bool = False, backend: str = "transformers"
                         ) -> list[str]:
    """Pinned to the versions installed here (local tags such as ``+cpu`` dropped, so pip on
    another machine picks its own build)."""
    if backend == "ctranslate2":
        names = CTRANSLATE2_SERVING_DISTRIBUTIONS
    else:
        names = SERVING_DISTRIBUTIONS + (("peft",) if adapter_only else ())
    pins = []
    for name in names:
        version = importlib.metadata.version(name).split("+", 1)[0]
        pins.append(f"{name}=={version}")
    return pins


def _checked_run(client: MlflowClient, run_id: str):
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RegistryError(
            f"run {run_id!r} not found at tracking URI {mlflow.get_tracking_uri()}; pass the "
            "run id printed by `whisper-exp train` (or --tracking-uri for another store)"
        ) from None
    active = mlflow.active_run()
    if run.info.status != "FINISHED" and not (active and active.info.run_id == run_id):
        raise RegistryError(f"run {run_id} is {run.info.status}; only finished runs can be "
                            "registered (train again, or pick a finished run)")
    if not client.list_artifacts(run_id, "model"):
        raise RegistryError(f"run {run_id} has no 'model' artifact; register a `whisper-exp "
                            "train` run (evaluate runs log no model)")
    return run


def _merged_copy(adapter_dir: Path, out_dir: Path) -> dict:
    """Adapter + base -> one fp32 Hugging Face model folder; returns its metadata."""
    model, processor = load_for_inference(str(adapter_dir), device=None)
    model.to("cpu").float()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    meta_file = adapter_dir / METADATA_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    meta["merged_adapter"] = True
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def _log_pyfunc(staged: Path, model_name: str, *, source_run_id: str, packaging: str,
                base_model: str | None, backend: str, precision: str, adapter_only: bool,
                registered_model_name: str | None = None,
                params: Mapping[str, Any] | None = None) -> ModelInfo:
    """Log ``staged`` (a folder named ``model``) as the serving pyfunc, a LoggedModel of the
    active run, tagged with how it was packaged and the sha256 of its weights (the pyfunc
    refuses to load a folder that no longer matches them)."""
    hashes = weights_sha256(staged)
    with warnings.catch_warnings():
        # No input example on purpose: validating one would load the model and decode audio
        # at logging time; the explicit signature already describes the input.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name=model_name,
            python_model=str(MODEL_CODE),
            artifacts={MODEL_ARTIFACT: str(staged)},
            code_paths=[str(PACKAGE_DIR)],
            signature=SIGNATURE,
            pip_requirements=serving_requirements(adapter_only, backend),
            registered_model_name=registered_model_name,
            metadata={"whisper_exp": {"source_run_id": source_run_id, "packaging": packaging,
                                      "base_model": base_model, "backend": backend,
                                      "precision": precision, WEIGHT_FILES_KEY: hashes,
                                      WEIGHTS_DIGEST_KEY: weights_digest(hashes)}},
            params={k: "" if v is None else str(v) for k, v in (params or {}).items()},
            tags={PACKAGING_TAG: packaging, BACKEND_TAG: backend,
                  WEIGHTS_TAG: weights_digest(hashes),
                  **({BASE_MODEL_TAG: base_model} if base_model else {})},
            model_type=MODEL_TYPE,
        )


def _model_metadata(model_dir: Path) -> tuple[bool, str | None]:
    """(is a LoRA adapter, base model it needs)."""
    is_adapter = (model_dir / ADAPTER_CONFIG).exists()
    meta_file = model_dir / METADATA_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    base_model = meta.get("base_model")
    if is_adapter and not base_model:
        adapter_cfg = json.loads((model_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base_model = adapter_cfg.get("base_model_name_or_path")
    return is_adapter, base_model


def log_trained_model(model_dir: Path, params: Mapping[str, Any] | None = None) -> ModelInfo:
    """The active `train` run's model as its LoggedModel: the pyfunc ``register`` ships.

    A LoRA/QLoRA run logs its adapter only (megabytes; serving loads the base it records), so
    a study of many trials does not store a merged full copy per trial; ``register`` merges
    when it registers. A full fine-tune logs the model itself.
    """
    run_id = mlflow.active_run().info.run_id
    is_adapter, base_model = _model_metadata(model_dir)
    packaging = "adapter only" if is_adapter else "full model"
    with tempfile.TemporaryDirectory(prefix="whisper-exp-model-") as tmp:
        staged = model_dir
        if model_dir.name != MODEL_ARTIFACT:  # MLflow names the artifact after the folder
            staged = Path(tmp) / MODEL_ARTIFACT
            shutil.copytree(model_dir, staged)
        return _log_pyfunc(staged, TRAINED_MODEL_NAME, source_run_id=run_id,
                           packaging=packaging, base_model=base_model, backend="transformers",
                           precision="float32", adapter_only=is_adapter, params=params)


def trained_model(run_id: str) -> LoggedModel | None:
    """The LoggedModel `train` logged for ``run_id`` (None for runs from before it did)."""
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{TRAINED_MODEL_NAME}'",
        output_format="list", max_results=1,
        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    return found[0] if found else None


def _ships_as_is(model: LoggedModel, backend: str, adapter_only: bool) -> bool:
    packaging = model.tags.get(PACKAGING_TAG)
    return backend == "transformers" and (
        packaging == "full model" or (packaging == "adapter only" and adapter_only))


def _metric_text(value: float) -> str:
    """Counts stay exact (``38350080``, not ``3.83501e+07``); rates keep 6 digits."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _description(run, packaging: str, base_model: str | None) -> str:
    metrics = run.data.metrics
    scores = ", ".join(f"{k} {metrics[k]:.4f}" for k in HEADLINE_METRICS if k in metrics)
    strategy = run.data.params.get("finetuning.strategy", "unknown")
    text = f"Whisper ({strategy}, {packaging}) from run {run.info.run_id}"
    if base_model:
        text += f"; base model {base_model}"
    return text + (f". Eval: {scores}." if scores else ".")


def check_backend_options(backend: str, quantization: str | None, adapter_only: bool) -> str:
    """Refuse impossible combinations before anything is downloaded; returns the precision
    (``float32`` for the transformers backend)."""
    if backend not in BACKENDS:
        raise RegistryError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "transformers":
        if quantization:
            raise RegistryError(f"quantization {quantization!r} needs backend ctranslate2 "
                                "(CLI: --backend ctranslate2); the transformers backend "
                                "serves the fp32 model")
        return "float32"
    if adapter_only:
        raise RegistryError("adapter_only (--adapter-only) registers a LoRA adapter for "
                            "transformers; backend ctranslate2 needs the merged model")
    try:
        return check_export_options("ctranslate2", quantization)
    except ExportError as exc:
        raise RegistryError(str(exc)) from None


def _package_run_artifact(run_id: str, name: str, *, backend: str, adapter_only: bool,
                          precision: str, quantization: str | None) -> tuple[str, str, str | None]:
    """The run's ``model/`` folder -> a new pyfunc LoggedModel of the run (merged adapter,
    CTranslate2 conversion, or a run logged before train logged its own model), registered
    under ``name``; returns (version, packaging, base model)."""
    with tempfile.TemporaryDirectory(prefix="whisper-exp-register-") as tmp:
        downloaded = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="model", dst_path=str(Path(tmp) / "download")))
        # MLflow names the artifact folder after the source folder: keep it "model".
        staged = Path(tmp) / "stage" / MODEL_ARTIFACT
        is_adapter, base_model = _model_metadata(downloaded)
        if backend == "ctranslate2":
            log.info("converting run %s's model to CTranslate2 (%s)", run_id, precision)
            merged = Path(tmp) / "merged"
            try:
                save_merged_hf(str(downloaded), merged, source=f"runs:/{run_id}")
                convert_to_ctranslate2(merged, staged, quantization)
            except ExportError as exc:
                raise RegistryError(f"cannot convert run {run_id}'s model to CTranslate2: "
                                    f"{exc}; make its base model available or register with "
                                    "the transformers backend") from None
            packaging = f"ctranslate2 {precision}" + (", merged adapter" if is_adapter else "")
        elif is_adapter and not adapter_only:
            log.info("merging the LoRA adapter of run %s into its fp32 base %s", run_id,
                     base_model)
            try:
                _merged_copy(downloaded, staged)
            except OSError as exc:
                raise RegistryError(
                    f"cannot merge run {run_id}'s adapter: its base model {base_model!r} does not "
                    f"load here ({exc}); make the base available or pass adapter_only=True "
                    "(CLI: --adapter-only)") from None
            packaging = "merged adapter, fp32"
        else:
            shutil.copytree(downloaded, staged)
            packaging = "adapter only" if is_adapter else "full model"
            if is_adapter and base_model and Path(base_model).exists():
                log.warning("the adapter's base model is the local folder %s: serving needs "
                            "it at that path", base_model)

        active = mlflow.active_run()
        resume = active is None or active.info.run_id != run_id
        if resume:
            mlflow.start_run(run_id=run_id, nested=active is not None)
        try:
            info = _log_pyfunc(staged, "registered_model", source_run_id=run_id,
                               packaging=packaging, base_model=base_model, backend=backend,
                               precision=precision, adapter_only=is_adapter and adapter_only,
                               registered_model_name=name)
        finally:
            if resume:
                mlflow.end_run()
        return str(info.registered_model_version), packaging, base_model



def register_run(run_id: str, name: str = DEFAULT_NAME, alias: str | None = None,
                 adapter_only: bool = False, backend: str = "transformers",
                 quantization: str | None = None) -> ModelVersion:
    """Log the run's model as a pyfunc into that run, register it under ``name`` and link the
    run's metrics (as version tags and in the description); ``alias`` is moved to the new
    version.

    ``backend="ctranslate2"`` registers a CTranslate2 conversion of the (merged, fp32) model
    with weights in ``quantization`` (e.g. ``int8``; default float32), served by faster-whisper.
    """
    precision = check_backend_options(backend, quantization, adapter_only)
    client = MlflowClient()
    run = _checked_run(client, run_id)
    trained = trained_model(run.info.run_id)
    if trained is not None and _ships_as_is(trained, backend, adapter_only):
        # The pyfunc `train` logged is already what was asked for: register it, no copy.
        packaging = trained.tags[PACKAGING_TAG]
        base_model = trained.tags.get(BASE_MODEL_TAG) or None
        version = str(mlflow.register_model(trained.model_uri, name).version)
        client.set_model_version_tag(name, version, "logged_model_id", trained.model_id)
    else:
        version, packaging, base_model = _package_run_artifact(
            run_id, name, backend=backend, adapter_only=adapter_only, precision=precision,
            quantization=quantization)

    # The version's LoggedModel (its source is models:/<model_id>) carries the weights' hash.
    source = client.get_model_version(name, version).source or ""
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
    digest = client.get_logged_model(model_id).tags.get(WEIGHTS_TAG) if model_id else None
    tags = {"source_run_id": run_id, "packaging": packaging, "backend": backend,
            "precision": precision, **({WEIGHTS_DIGEST_KEY: digest} if digest else {}),
            "strategy": run.data.params.get("finetuning.strategy", ""),
            **({"base_model": base_model} if base_model else {}),
            **{key: _metric_text(value) for key, value in run.data.metrics.items()
               if not key.startswith(SYSTEM_METRIC_PREFIX)}}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version,
                                description=_description(run, packaging, base_model))
    if alias:
        client.set_registered_model_alias(name, alias, version)
        log.info("alias %s@%s -> version %s", name, alias, version)
    return client.get_model_version(name, version)
