"""Optuna hyperparameter search over an experiment config, tracked in MLflow."""

from whisper_exp.tuning.runs import (
    DEFAULT_N_TRIALS,
    DEFAULT_SPACE,
    DEFAULT_STORAGE,
    SearchSpaceError,
    StudyResult,
    TuningError,
    apply_params,
    format_trials,
    load_search_space,
    open_storage,
    tune,
)

__all__ = ["DEFAULT_N_TRIALS", "DEFAULT_SPACE", "DEFAULT_STORAGE", "SearchSpaceError",
           "StudyResult", "TuningError", "apply_params", "format_trials", "load_search_space",
           "open_storage", "tune"]
