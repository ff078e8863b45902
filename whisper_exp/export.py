"""Export a model for deployment: a merged Hugging Face folder, CTranslate2 for faster-whisper,
or a whisper.cpp (GGML) model file.

Every export starts from ``modeling.load_for_inference`` (LoRA/QLoRA adapters merged into their
base, fp32), so every format carries exactly the weights ``evaluate`` scores. The CTranslate2 model
is converted from that merged folder with the ``ctranslate2`` package's transformers converter,
with ``tokenizer.json`` and ``preprocessor_config.json`` copied in so
``faster_whisper.WhisperModel`` loads it offline (without them it fetches a tokenizer from the
hub). The GGML file is written from the same merged folder by ``ggml_export``. An export of a
model that came from an MLflow run is logged back to that run as ``exports/<format>-<precision>/``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.entities import Metric

# The faster-whisper runtime lives in the torch-free ctranslate2_backend (a ctranslate2-backend
# server imports it without torch); its functions stay importable from here.
from whisper_exp.ctranslate2_backend import (  # noqa: F401
    is_ctranslate2_model,
    load_faster_whisper,
    transcribe_with_faster_whisper,
)
from whisper_exp.data import language_code
from whisper_exp.export_check import (
    DEFAULT_CHECK_CLIPS,
    DEFAULT_MAX_WER_INCREASE,
    CheckClips,
    ExportCheck,
    check_export,
    folder_clips,
    run_eval_clips,
)
from whisper_exp.ggml_export import (
    GGML_MODEL_FILE,
    GGML_PRECISIONS,
    GGMLExportError,
    convert_to_ggml,
)
from whisper_exp.modeling import (
    ADAPTER_CONFIG,
    METADATA_FILE,
    is_multilingual,
    load_for_inference,
    resolve_model_reference,
)
from whisper_exp.storage import (
    DiskFullError,
    check_free_space,
    folder_bytes,
    removed_on_disk_full,
)

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("hf", "ctranslate2", "ggml")
# Weight types the CTranslate2 converter accepts (ctranslate2.specs.model_spec).
CTRANSLATE2_QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                             "float16", "bfloat16", "float32")
HF_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Files faster-whisper reads next to model.bin: the tokenizer (else it downloads one from the
# hub) and the feature extractor settings (mel bins: 80 for tiny..large-v2, 128 for large-v3).
CTRANSLATE2_COPY_FILES = ("tokenizer.json", "preprocessor_config.json")
EXPORTS_ARTIFACT_DIR = "exports"
# The license OpenAI publishes the Whisper checkpoints under on the Hugging Face hub.
MODEL_CARD_LICENSE = "apache-2.0"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ExportError(ValueError):
    """A user error (bad format, quantization, model reference or output folder)."""


class ExportRefused(ExportError):
    """The written export scores far worse than its source model: removed, not logged."""


def export_model(
    model_ref: str,
    output_dir: str | Path,
    fmt: str = "hf",
    quantization: str | None = None,
    log_to_run: bool = True,
    overwrite: bool = False,
    check_data: str | Path | None = None,
    check_clips: int = DEFAULT_CHECK_CLIPS,
    max_wer_increase: float = DEFAULT_MAX_WER_INCREASE,
    force: bool = False,
) -> Path:
    """Write ``model_ref`` (hub name, path, ``runs:/<id>``, ``models:/<name>@<alias>``) to
    ``output_dir`` as a merged Hugging Face model (``fmt="hf"``, ``quantization`` picks the
    saved dtype, fp32 by default), a CTranslate2 model (``fmt="ctranslate2"``, ``quantization``
    is the converter's weight type, the model's fp32 by default) or a whisper.cpp file
    (``fmt="ggml"``, f16 by default, or q8_0 / q5_0 / f32).

    The written export then proves itself (``export_check``): ``check_clips`` clips from
    ``check_data`` when given, else from the source run's eval rows, are decoded by the export
    and by the source model; more than ``max_wer_increase`` (absolute WER) worse and the export
    is removed and refused (``ExportRefused``) unless ``force``. The outcome is recorded in the
    export's ``whisper_exp.json`` (``export_check``). With ``log_to_run`` the export is logged
    to the source run (see ``source_run_id``) as ``exports/<fmt>-<precision>/`` with
    ``export_wer/<fmt>-<precision>`` and ``export_wer/source`` beside its ``wer``.
    ``overwrite`` replaces an earlier export in ``output_dir``; any other non-empty folder is
    refused rather than deleted.
    """
    precision = check_export_options(fmt, quantization)
    output = Path(output_dir).expanduser()
    replace_existing = _check_output(output, overwrite)
    local_model = _resolve_local_model(model_ref)
    source_run = source_run_id(model_ref)
    run_id = source_run if log_to_run else None
    if replace_existing:  # only now that the model is known to exist
        shutil.rmtree(output)

    if fmt == "hf":
        save_merged_hf(local_model, output, dtype=HF_DTYPES[precision], source=model_ref)
    else:
        with tempfile.TemporaryDirectory(prefix="whisper-exp-merged-") as merged:
            save_merged_hf(local_model, Path(merged), dtype=torch.float32, source=model_ref)
            if fmt == "ggml":
                write_ggml_export(merged, output, precision)
            else:
                convert_to_ctranslate2(merged, output, quantization)
    log.info("exported %s as %s (%s) to %s", model_ref, fmt, precision, output)
    check = _prove_export(fmt, precision, output, local_model, source_run, check_data,
                          check_clips, max_wer_increase, force)

    if run_id is not None:
        artifact_path = f"{EXPORTS_ARTIFACT_DIR}/{fmt}-{precision}"
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.log_artifacts(run_id, str(output), artifact_path)
        if check is not None:
            client.log_batch(run_id, metrics=[
                Metric(key, value, int(time.time() * 1000), 0)
                for key, value in check.metrics().items()])
        log.info("logged the export to runs:/%s/%s", run_id, artifact_path)
    elif log_to_run:
        log.info("%s is not from an MLflow run; the export is not logged", model_ref)
    return output


def _prove_export(fmt: str, precision: str, output: Path, source_model: str,
                  source_run: str | None, check_data: str | Path | None, check_clips: int,
                  max_wer_increase: float, force: bool) -> ExportCheck | None:
    """Score the written export against its source model (see ``export_model``), record the
    outcome in its ``whisper_exp.json``, and remove and refuse one that is far worse."""
    clips: CheckClips | None = None
    if check_data:
        clips = folder_clips(check_data, check_clips)
    elif source_run is not None:
        clips = run_eval_clips(source_run, check_clips)
    meta_file = output / METADATA_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    if clips is None:
        note = ("export not checked: no clips (the model comes from no run with "
                "eval/predictions.csv whose audio is here; pass --check-data FOLDER)")
        log.warning(note)
        meta["export_check"] = {"skipped": note}
        meta_file.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return None
    check = check_export(fmt, precision, output, source_model, clips)
    if check.increase > max_wer_increase and not force:
        shutil.rmtree(output)
        raise ExportRefused(
            f"refused the {check.key} export: {check.summary()} is {100 * check.increase:.1f} "
            f"WER points worse (limit {100 * max_wer_increase:.1f}, --max-wer-increase); the "
            f"export was removed and nothing was logged (--force keeps and logs it)")
    meta["export_check"] = {"export_wer": check.export_wer, "source_wer": check.source_wer,
                            "clips": check.n_clips, "clips_from": check.clips_source,
                            "forced": bool(force and check.increase > max_wer_increase)}
    meta_file.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return check


def check_export_options(fmt: str, quantization: str | None) -> str:
    """Validate before any model is loaded; returns the precision that names the export."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    allowed = {"hf": tuple(HF_DTYPES), "ctranslate2": CTRANSLATE2_QUANTIZATIONS,
               "ggml": tuple(GGML_PRECISIONS)}[fmt]
    if quantization is not None and quantization not in allowed:
        hint = (" (int8 weights need --format ctranslate2)"
                if fmt == "hf" and quantization in CTRANSLATE2_QUANTIZATIONS else "")
        raise ExportError(f"quantization {quantization!r} is not available for {fmt}; use one "
                          f"of {', '.join(allowed)}{hint}")
    return quantization or ("f16" if fmt == "ggml" else "float32")


def _check_output(output: Path, overwrite: bool) -> bool:
    """Whether an earlier export must be removed first; refuses anything else in the way."""
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {output} exists and is not a folder")
    if not output.exists() or not any(output.iterdir()):
        return False
    if not overwrite:
        raise ExportError(f"output folder {output} is not empty; pass overwrite "
                          "(--overwrite) to replace an earlier export")
    if not (output / "config.json").exists() and not (output / METADATA_FILE).exists():
        raise ExportError(f"output folder {output} is not empty and holds no model; "
                          "refusing to delete it")
    return True


def _looks_like_path(reference: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a slash is a filesystem path."""
    return reference.startswith(("/", ".", "~")) or reference.count("/") > 1


def _resolve_local_model(model_ref: str) -> str:
    """Download/resolve the reference once, with errors that name what is missing."""
    if model_ref.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        from mlflow.exceptions import MlflowException

        try:
            resolved = resolve_model_reference(model_ref)
        except (MlflowException, OSError) as exc:
            raise ExportError(f"model {model_ref} not found in MLflow: {exc}") from exc
    elif _looks_like_path(model_ref) or Path(model_ref).expanduser().exists():
        path = Path(model_ref).expanduser()
        if not path.exists():
            raise ExportError(f"model folder {model_ref} does not exist")
        resolved = str(path)
    else:
        return model_ref  # a hub name; from_pretrained reports its own errors
    folder = Path(resolved)
    if not (folder / "config.json").exists() and not (folder / ADAPTER_CONFIG).exists():
        raise ExportError(f"{model_ref} ({folder}) holds no Whisper model: no config.json or "
                          f"{ADAPTER_CONFIG}")
    return resolved


def source_run_id(model_ref: str) -> str | None:
    """The MLflow run a model came from: ``runs:/<id>``, a registered version's run, or a local
    ``<output_dir>/<run_id>/model`` folder from ``train`` whose run exists here."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if model_ref.startswith("runs:/"):
        return model_ref[len("runs:/"):].split("/", 1)[0] or None
    if model_ref.startswith("models:/"):
        name_and_version = model_ref[len("models:/"):].split("/")
        client = MlflowClient()
        try:
            if "@" in name_and_version[0]:
                name, alias = name_and_version[0].split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif len(name_and_version) >= 2 and name_and_version[1].isdigit():
                version = client.get_model_version(name_and_version[0], name_and_version[1])
            else:
                return None
        except MlflowException:
            return None
        return version.run_id or None
    path = Path(model_ref).expanduser()
    candidate = path.resolve().parent.name if path.exists() else ""
    if not _RUN_ID.match(candidate):
        return None  # not a training output folder: leave the tracking store untouched
    try:
        MlflowClient().get_run(candidate)
    except MlflowException:
        return None
    return candidate


def save_merged_hf(model_ref: str, output: Path, dtype: torch.dtype = torch.float32,
                   source: str | None = None) -> Path:
    """Adapters merged, processor and generation config (language/task) alongside, plus
    ``whisper_exp.json`` so ``load_for_inference`` restores the same prompt."""
    try:
        model, processor = load_for_inference(model_ref, torch.device("cpu"))
    except OSError as exc:  # hub name not found / unreachable, unreadable weights
        raise ExportError(f"could not load model {source or model_ref}: {exc}") from exc
    model.to(dtype)
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        check_free_space(output, needed, "the merged model")
        output.mkdir(parents=True, exist_ok=True)
        with removed_on_disk_full(output, needed, "the merged model"):
            model.save_pretrained(output)
            processor.save_pretrained(output)
            # transformers 5 folds the feature extractor into processor_config.json;
            # faster-whisper and older transformers read the standalone file.
            processor.feature_extractor.to_json_file(output / "preprocessor_config.json")
            model.generation_config.save_pretrained(output)
    except DiskFullError as exc:
        raise ExportError(str(exc)) from exc
    meta: dict[str, Any] = {}
    source_meta = Path(model_ref) / METADATA_FILE
    if source_meta.exists():
        meta = json.loads(source_meta.read_text(encoding="utf-8"))
    multilingual = is_multilingual(model)
    meta.update({
        "format": "hf",
        "exported_from": source or model_ref,
        "merged_adapter": (Path(model_ref) / ADAPTER_CONFIG).exists(),
        "language": model.generation_config.language if multilingual else None,
        "task": getattr(model.generation_config, "task", None) or meta.get("task", "transcribe"),
        "precision": str(dtype).removeprefix("torch."),
    })
    (output / METADATA_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return output


def convert_to_ctranslate2(hf_dir: str | Path, output: Path, quantization: str | None) -> Path:
    """Convert a plain (already merged) Hugging Face Whisper folder with CTranslate2's converter."""
    from ctranslate2.converters import TransformersConverter

    hf_dir = Path(hf_dir)
    missing = [name for name in CTRANSLATE2_COPY_FILES if not (hf_dir / name).exists()]
    if missing:
        raise ExportError(f"{hf_dir} lacks {', '.join(missing)}, which faster-whisper needs "
                          "next to the converted model")
    converter = TransformersConverter(str(hf_dir), copy_files=list(CTRANSLATE2_COPY_FILES))
    needed = folder_bytes(hf_dir)  # the fp32 source: an upper bound for any quantization
    try:
        check_free_space(output, needed, "the CTranslate2 model")
        with removed_on_disk_full(output, needed, "the CTranslate2 model"):
            converter.convert(str(output), quantization=quantization, force=True)
    except DiskFullError as exc:
        raise ExportError(str(exc)) from exc
    # Provenance and the language for multilingual models (transcribe_with_faster_whisper's
    # default); model.bin's config.json is CTranslate2's own and has no room for it.
    meta_file = hf_dir / METADATA_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    meta.update({"format": "ctranslate2", "precision": quantization or "float32"})
    (output / METADATA_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    write_model_card(output, meta)
    return output


def write_model_card(output: Path, meta: dict[str, Any]) -> Path:
    """README.md with the front matter OpenAI-compatible servers (speaches, faster-whisper's
    model lookup) read to accept a CTranslate2 folder as a Whisper model:
    ``library_name: ctranslate2`` and the speech-recognition tags."""
    language = meta.get("language")
    code = language_code(language) if language else "en"
    front_matter = {"library_name": "ctranslate2", "license": MODEL_CARD_LICENSE,
                    "language": [code], "tags": ["audio", "automatic-speech-recognition",
                                                 "whisper", "ctranslate2", "faster-whisper"],
                    "pipeline_tag": "automatic-speech-recognition"}
    source = meta.get("exported_from", "a Whisper model")
    body = (f"# {output.name}\n\nWhisper for [faster-whisper](https://github.com/SYSTRAN/"
            f"faster-whisper) / CTranslate2 ({meta.get('precision', 'float32')} weights), "
            f"exported by whisper-exp from `{source}` (adapters merged).\n\n"
            "```python\nfrom faster_whisper import WhisperModel\n\n"
            f"model = WhisperModel(\"{output.name}\")\n```\n")
    card = output / "README.md"
    card.write_text(f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n\n{body}",
                    encoding="utf-8")
    return card


def write_ggml_export(hf_dir: str | Path, output: Path, precision: str = "f16") -> Path:
    """A folder with the whisper.cpp model file (``ggml-model-<precision>.bin``) and the
    provenance metadata the other exports carry."""
    hf_dir = Path(hf_dir)
    try:
        model_file = convert_to_ggml(hf_dir, output / GGML_MODEL_FILE.format(precision=precision),
                                     precision)
    except GGMLExportError as exc:
        raise ExportError(str(exc)) from exc
    meta_file = hf_dir / METADATA_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    meta.update({"format": "ggml", "precision": precision, "model_file": model_file.name})
    (output / METADATA_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return model_file
