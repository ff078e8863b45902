"""Optuna hyperparameter search over an experiment config, tracked in MLflow.

One MLflow parent run per study and one nested run per trial (a normal ``train`` run plus the
trial's number and final state). The study itself lives in Optuna's storage (``sqlite:///optuna.db``
by default), which is what makes a study resumable (same ``study_name``) and shareable: any number
of worker processes pointed at one RDB URL draw trial numbers from the same table.

Modules by concern: :mod:`.space` (which keys are searched, validated against the config),
:mod:`.study` (storage, samplers, pruners, creating/resuming a study), :mod:`.runs` (the MLflow
parent and trial runs, summary, plots) and :mod:`.search` (``tune()`` itself).
"""

from whisper_exp.tuning.runs import StudyResult, TrialSummary
from whisper_exp.tuning.search import DEFAULT_N_TRIALS, format_trials, tune
from whisper_exp.tuning.space import (
    DEFAULT_SPACE,
    ParamSpec,
    SearchSpace,
    SearchSpaceError,
    apply_params,
    load_search_space,
)
from whisper_exp.tuning.study import (
    DEFAULT_STORAGE,
    PRUNERS,
    SAMPLERS,
    PruningCallback,
    TuningError,
    config_fingerprint,
    default_study_name,
    make_pruner,
    make_sampler,
    open_storage,
    redact_storage,
    storage_url,
)

__all__ = [
    "DEFAULT_N_TRIALS", "DEFAULT_SPACE", "DEFAULT_STORAGE", "PRUNERS", "SAMPLERS", "ParamSpec",
    "PruningCallback", "SearchSpace", "SearchSpaceError", "StudyResult", "TrialSummary",
    "TuningError", "apply_params", "config_fingerprint", "default_study_name", "format_trials",
    "load_search_space", "make_pruner", "make_sampler", "open_storage", "redact_storage",
    "storage_url", "tune",
]
