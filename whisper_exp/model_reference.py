"""Model references (``runs:/``, ``models:/``, ``mlflow-artifacts:``, folders, hub names) ->
local folders, without torch or transformers' models.

Kept apart from ``modeling`` (which imports torch at the top) so that serving a CTranslate2
export (``whisper-exp serve``, the registered ctranslate2 pyfunc) resolves its reference and
runs in faster-whisper with torch never imported.
"""

from __future__ import annotations

from pathlib import Path

# A PEFT adapter folder's marker (written by ``save_pretrained`` of an adapter model).
ADAPTER_CONFIG = "adapter_config.json"


def resolve_model_reference(reference: str) -> str:
    """``runs:/<id>[/path]``, ``models:/<name>@<alias>`` or ``mlflow-artifacts:`` -> local dir;
    hub names and local paths pass through."""
    if reference.startswith("runs:/") and reference.count("/") == 1:
        reference = reference.rstrip("/") + "/model"
    if reference.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(reference))
        # A registered pyfunc keeps the HF files in an artifacts sub-folder.
        for candidate in (local, local / "artifacts" / "model", local / "model"):
            if (candidate / "config.json").exists() or (candidate / ADAPTER_CONFIG).exists():
                return str(candidate)
        return str(local)
    return reference
