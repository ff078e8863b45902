"""whisper_exp: MLflow-tracked fine-tuning of OpenAI Whisper (full, LoRA, QLoRA).

The public API, shared by the ``whisper-exp`` CLI and the MLproject entry points::

    from whisper_exp import load_config, train, run_evaluation
    result = train(load_config("experiments/lora.yaml", ["model.name=openai/whisper-tiny"]))

Heavy modules (torch, transformers) load on first use, so ``whisper-exp --help`` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "ExperimentConfig": "whisper_exp.config",
    "load_config": "whisper_exp.config",
    "resolve_config": "whisper_exp.config",
    "train": "whisper_exp.training",
    "TrainResult": "whisper_exp.training",
    "run_evaluation": "whisper_exp.evaluation",
    "evaluate_examples": "whisper_exp.evaluation",
    "transcribe_arrays": "whisper_exp.generation",
    "load_splits": "whisper_exp.data",
    "prepare_folder": "whisper_exp.data",
    "load_for_inference": "whisper_exp.modeling",
    "transcribe_paths": "whisper_exp.transcribe",
    "Transcriber": "whisper_exp.transcribe",
    "register_run": "whisper_exp.registry",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'whisper_exp' has no attribute {name!r}")
