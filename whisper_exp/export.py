"""Export a model for deployment: a merged Hugging Face folder, or CTranslate2 for faster-whisper.

Every export starts from ``modeling.load_for_inference`` (LoRA/QLoRA adapters merged into their
base, fp32), so both formats carry exactly the weights ``evaluate`` scores. The CTranslate2 model
is converted from that merged folder with the ``ctranslate2`` package's transformers converter,
with ``tokenizer.json`` and ``preprocessor_config.json`` copied in so
``faster_whisper.WhisperModel`` loads it offline (without them it fetches a tokenizer from the
hub). An export of a model that came from an MLflow run is logged back to that run as
``exports/<format>-<precision>/``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

# The faster-whisper runtime lives in the torch-free ctranslate2_backend (a ctranslate2-backend
# server imports it without torch); its functions stay importable from here.
from whisper_exp.ctranslate2_backend import (  # noqa: F401
    is_ctranslate2_model,
    load_faster_whisper,
    transcribe_with_faster_whisper,
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

EXPORT_FORMATS = ("hf", "ctranslate2")
# Weight types the CTranslate2 converter accepts (ctranslate2.specs.model_spec).
CTRANSLATE2_QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                             "float16", "bfloat16", "float32")
HF_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Files faster-whisper reads next to model.bin: the tokenizer (else it downloads one from the
# hub) and the feature extractor settings (mel bins: 80 for tiny..large-v2, 128 for large-v3).
CTRANSLATE2_COPY_FILES = ("tokenizer.json", "preprocessor_config.json")
EXPORTS_ARTIFACT_DIR = "exports"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ExportError(ValueError):
    """A user error (bad format, quantization, model reference or output folder)."""


def export_model(
    model_ref: str,
    output_dir: str | Path,
    fmt: str = "hf",
    quantization: str | None = None,
    log_to_run: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model_ref`` (hub name, path, ``runs:/<id>``, ``models:/<name>@<alias>``) to
    ``output_dir`` as a merged Hugging Face model (``fmt="hf"``, ``quantization`` picks the
    saved dtype, fp32 by default) or a CTranslate2 model (``fmt="ctranslate2"``, ``quantization``
    is the converter's weight type, the model's fp32 by default).

    With ``log_to_run`` the result is also logged to the source run (see ``source_run_id``) as
    ``exports/<fmt>-<quantization or float32>/``. ``overwrite`` replaces an earlier export in
    ``output_dir``; any other non-empty folder is refused rather than deleted.
    """
    precision = check_export_options(fmt, quantization)
    output = Path(output_dir).expanduser()
    replace_existing = _check_output(output, overwrite)
    local_model = _resolve_local_model(model_ref)
    run_id = source_run_id(model_ref) if log_to_run else None
    if replace_existing:  # only now that the model is known to exist
        shutil.rmtree(output)

    if fmt == "hf":
        save_merged_hf(local_model, output, dtype=HF_DTYPES[precision], source=model_ref)
    else:
        with tempfile.TemporaryDirectory(prefix="whisper-exp-merged-") as merged:
            save_merged_hf(local_model, Path(merged), dtype=torch.float32, source=model_ref)
            convert_to_ctranslate2(merged, output, quantization)
    log.info("exported %s as %s (%s) to %s", model_ref, fmt, precision, output)

    if run_id is not None:
        artifact_path = f"{EXPORTS_ARTIFACT_DIR}/{fmt}-{precision}"
        from mlflow.tracking import MlflowClient

        MlflowClient().log_artifacts(run_id, str(output), artifact_path)
        log.info("logged the export to runs:/%s/%s", run_id, artifact_path)
    elif log_to_run:
        log.info("%s is not from an MLflow run; the export is not logged", model_ref)
    return output


def check_export_options(fmt: str, quantization: str | None) -> str:
    """Validate before any model is loaded; returns the precision that names the export."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    allowed = tuple(HF_DTYPES) if fmt == "hf" else CTRANSLATE2_QUANTIZATIONS
    if quantization is not None and quantization not in allowed:
        hint = (" (int8 weights need --format ctranslate2)"
                if fmt == "hf" and quantization in CTRANSLATE2_QUANTIZATIONS else "")
        raise ExportError(f"quantization {quantization!r} is not available for {fmt}; use one "
                          f"of {', '.join(allowed)}{hint}")
    return quantization or "float32"


def _check_output(output: Path, overwrite: bool) -> bool:
    """Whether an earlier export must be removed first; refuses anything else in the way."""
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {output} exists and is not a folder")
    if not output.exists() or not any(output.iterdir()):
        return False
    if not overwrite:
        raise ExportError(f"output folder {output} is not empty; pass overwrite "
                          "(--overwrite) to replace an earlier export")
    if not (output / "config.json").exists():
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
    return output
