"""Optuna search (whisper_exp.tuning): space validation, studies on a tiny random Whisper read back
through Optuna and the MLflow client, resume, failures, pruning, Ctrl-C, and two workers sharing
one SQLite storage."""

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from whisper_exp import tracking, tuning
from whisper_exp.cli import main
from whisper_exp.config import load_config
from whisper_exp.tuning import SearchSpaceError, apply_params, load_search_space, tune

ROOT = Path(__file__).resolve().parent.parent
LORA_SPACE = ROOT / "experiments" / "search" / "lora.yaml"
RECIPE_SPACE = ROOT / "experiments" / "search" / "recipe.yaml"
EXPERIMENT = "tune-test"


def _tree(model, data, tmp_path):
    return {
        "model": {"name": str(model)},
        "data": {"train": str(data), "max_train_samples": 4, "max_eval_samples": 2},
        "training": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "eval_steps": 1,
                     "output_dir": str(tmp_path / "outputs")},
        "evaluation": {"batch_size": 2, "max_new_tokens": 8},
        "tracking": {"experiment_name": EXPERIMENT},
    }


def _cfg(model, data, tmp_path):
    return load_config(ROOT / "experiments" / "lora.yaml", _tree(model, data, tmp_path))


def _space(tmp_path, params, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"params": params}))
    return path


def _storage(tmp_path):
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def _children(parent_run_id):
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def _artifacts(run_id, path=""):
    files = []
    for item in MlflowClient().list_artifacts(run_id, path):
        files += _artifacts(run_id, item.path) if item.is_dir else [item.path]
    return files


def _by_number(runs):
    return {int(r.data.tags["optuna.trial_number"]): r for r in runs}


# --------------------------------------------------------------------------- search space

BAD_SPACES = [
    ({"finetuning.lora.rank": {"type": "categorical", "choices": [4, 8]}},
     r"params\.finetuning\.lora\.rank: not a config key \(did you mean 'finetuning\.lora\.r'"),
    ({"training.learning_rate": {"type": "float", "low": 1e-2, "high": 1e-5, "log": True}},
     r"params\.training\.learning_rate: low \(0\.01\) must be below high"),
    ({"training.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-3}},
     r"params\.training\.learning_rate: low .* must be below high"),
    ({"finetuning.lora.r": {"type": "categorical", "choices": []}},
     r"params\.finetuning\.lora\.r: choices must be a non-empty list"),
    ({"finetuning.lora.r": {"type": "uniform", "low": 4, "high": 64}},
     r"params\.finetuning\.lora\.r: type 'uniform' is not one of"),
    ({"finetuning.lora.r": {"type": "float", "low": 4, "high": 64}},
     r"params\.finetuning\.lora\.r: .*integer setting; use type: int"),
    ({"finetuning.lora.dropout": {"type": "float", "low": 0.0, "high": 0.2, "scale": "log"}},
     r"params\.finetuning\.lora\.dropout: unknown field\(s\) \['scale'\]"),
    ({"training.learning_rate": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}},
     r"params\.training\.learning_rate: a log scale needs low > 0"),
    ({"finetuning.strategy": {"type": "categorical", "choices": ["lora", "adapters"]}},
     r"params\.finetuning\.strategy: value 'adapters' is rejected by the config"),
    ({"finetuning.lora.alpha": {"type": "int", "low": 8, "high": 128.5}},
     r"params\.finetuning\.lora\.alpha: low and high must both be integers"),
    ({"model.name": {"type": "int", "low": 1, "high": 2}},
     r"params\.model\.name: model\.name is not a numeric setting"),
]


@pytest.mark.parametrize("params, message", BAD_SPACES, ids=[
    "unknown-key", "low-above-high", "low-equals-high", "empty-choices", "unknown-type",
    "float-on-int-key", "unknown-field", "log-from-zero", "rejected-choice", "int-bounds",
    "numeric-on-text-key"])
def test_invalid_space_fails_before_any_trial(params, message, tmp_path):
    cfg = load_config(ROOT / "experiments" / "lora.yaml")
    with pytest.raises(SearchSpaceError, match=message):
        tune(cfg, _space(tmp_path, params), n_trials=1, study_name="never",
             storage=_storage(tmp_path))
    assert not (tmp_path / "optuna.db").exists(), "no study may be created"
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run may be opened"


def test_malformed_space_files_name_the_problem(tmp_path):
    cfg = load_config(ROOT / "experiments" / "lora.yaml")
    (tmp_path / "top.yaml").write_text("params: {}\nsampler: tpe\n")
    with pytest.raises(SearchSpaceError, match=r"single top-level key 'params'.*sampler"):
        load_search_space(tmp_path / "top.yaml", cfg)
    (tmp_path / "empty.yaml").write_text("params: {}\n")
    with pytest.raises(SearchSpaceError, match="at least one config key"):
        load_search_space(tmp_path / "empty.yaml", cfg)
    with pytest.raises(SearchSpaceError, match="does not exist"):
        load_search_space(tmp_path / "missing.yaml", cfg)


def _opened(space: Path, tmp_path: Path) -> Path:
    """The shipped space with its "open up more" block uncommented, as its header documents."""
    text = space.read_text().split("  # Open up more by uncommenting:\n", 1)
    assert len(text) == 2, f"{space.name} has no 'Open up more' block"
    opened = text[0] + "\n".join(line.replace("# ", "", 1) for line in text[1].splitlines())
    wide = tmp_path / f"opened-{space.name}"
    wide.write_text(opened)
    return wide


def test_shipped_space_and_its_commented_options_are_valid(tmp_path):
    cfg = load_config(ROOT / "experiments" / "lora.yaml")
    space = load_search_space(LORA_SPACE, cfg)
    by_key = {p.key: p for p in space.params}
    assert by_key["finetuning.lora.r"].choices == (4, 8, 16, 32, 64)
    lr = by_key["training.learning_rate"]
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-5, 1e-2, True)

    # The "open up more" block, uncommented, must load as documented.
    space = load_search_space(_opened(LORA_SPACE, tmp_path), cfg)
    assert set(space.keys) == {"finetuning.lora.r", "training.learning_rate",
                               "finetuning.lora.alpha", "finetuning.lora.dropout",
                               "finetuning.lora.target_modules", "finetuning.freeze_encoder",
                               "finetuning.freeze_encoder_layers", "training.epochs"}
    modules = next(p for p in space.params if p.key == "finetuning.lora.target_modules")
    assert modules.choices[0] == "q_proj,v_proj"
    applied = apply_params(cfg, {"finetuning.lora.target_modules": modules.choices[1],
                                 "training.epochs": 2, "finetuning.freeze_encoder": True})
    assert applied.finetuning.lora.target_modules == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert applied.training.epochs == 2.0 and applied.finetuning.freeze_encoder is True


def test_shipped_recipe_space_and_its_commented_options_are_valid(tmp_path):
    """search/recipe.yaml: issue 13's levers, valid against the default recipe, which is itself
    a point of the space (so a new study's warm start scores it beside the search)."""
    from whisper_exp.modeling import ALL_LINEAR, lora_target_modules

    cfg = load_config(ROOT / "experiments" / "lora.yaml")
    space = load_search_space(RECIPE_SPACE, cfg)
    levers = {"finetuning.freeze_encoder_layers", "finetuning.lora.target_modules",
              "finetuning.lora.r", "training.learning_rate", "training.layer_lr_decay",
              "training.epochs", "augmentation.mask_time_prob"}
    assert set(space.keys) == levers
    by_key = {p.key: p for p in space.params}
    assert by_key["training.learning_rate"].log
    assert space.config_values(cfg) == {
        "finetuning.freeze_encoder_layers": None, "finetuning.lora.target_modules":
        "q_proj,v_proj", "finetuning.lora.r": 32, "training.learning_rate": 1e-3,
        "training.layer_lr_decay": 1.0, "training.epochs": 2, "augmentation.mask_time_prob": 0.0}
    for k in by_key["finetuning.freeze_encoder_layers"].choices:
        for modules in by_key["finetuning.lora.target_modules"].choices:
            applied = apply_params(cfg, {"finetuning.freeze_encoder_layers": k,
                                         "finetuning.lora.target_modules": modules})
            assert applied.finetuning.freeze_encoder_layers == k
            assert set(lora_target_modules(applied.finetuning)) <= set(ALL_LINEAR)
    all_linear = apply_params(cfg, {"finetuning.lora.target_modules": "all-linear"})
    assert lora_target_modules(all_linear.finetuning) == list(ALL_LINEAR)

    space = load_search_space(_opened(RECIPE_SPACE, tmp_path), cfg)
    assert set(space.keys) == levers | {"finetuning.lora.use_dora", "finetuning.lora.alpha",
                                        "finetuning.lora.dropout",
                                        "augmentation.mask_feature_prob"}


def test_base_config_values_are_a_point_of_the_space_only_inside_it(tmp_path):
    cfg = load_config(ROOT / "experiments" / "lora.yaml")  # r 32, alpha 64, lr 1e-3, 2 epochs
    space = load_search_space(_space(tmp_path, {
        "finetuning.lora.r": {"type": "categorical", "choices": [8, 32]},
        "finetuning.lora.alpha": {"type": "int", "low": 16, "high": 128, "step": 16},
        "finetuning.lora.target_modules": {
            "type": "categorical", "choices": [["q_proj"], ["q_proj", "v_proj"]]},
        "training.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "training.epochs": {"type": "int", "low": 1, "high": 4}}), cfg)
    assert space.config_values(cfg) == {
        "finetuning.lora.r": 32, "finetuning.lora.alpha": 64,
        "finetuning.lora.target_modules": "q_proj,v_proj", "training.learning_rate": 1e-3,
        "training.epochs": 2}
    for key, outside in [("finetuning.lora.r", 16), ("finetuning.lora.alpha", 40),
                         ("finetuning.lora.target_modules", ["v_proj"]),
                         ("training.learning_rate", 0.05), ("training.epochs", 2.5)]:
        assert space.config_values(apply_params(cfg, {key: outside})) is None, key


def _fake_train(trained):
    """Stands in for ``train``: records each trial's config and scores it 0.5."""
    def train(cfg, **kwargs):
        trained.append(cfg)
        return SimpleNamespace(run_id=None, final=SimpleNamespace(scores=SimpleNamespace(wer=0.5)))
    return train


def test_new_study_scores_the_base_config_once_beside_the_search(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(tuning.search, "train", _fake_train(trained))
    cfg = load_config(ROOT / "experiments" / "lora.yaml", {"tracking": {
        "experiment_name": EXPERIMENT}})
    base = {"finetuning.lora.r": 32, "training.learning_rate": 1e-3}
    common = {"study_name": "warm", "storage": _storage(tmp_path), "sampler": "random",
              "seed": 0, "pruner": "none"}
    first = tune(cfg, LORA_SPACE, n_trials=2, **common)
    assert first.trials[0].params == base
    assert (trained[0].finetuning.lora.r, trained[0].training.learning_rate) == (32, 1e-3)
    assert first.trials[1].params != base, "then the search proper"

    resumed = tune(cfg, LORA_SPACE, n_trials=4, **common)
    assert [t.params == base for t in resumed.trials] == [True, False, False, False], \
        "a resumed study does not queue the base config again"
    study = optuna.load_study(study_name="warm", storage=_storage(tmp_path))
    assert [bool(t.user_attrs.get("base_config")) for t in study.trials] == [True] + [False] * 3

    outside = _space(tmp_path, {"finetuning.lora.r": {"type": "categorical", "choices": [4, 8]}})
    result = tune(cfg, outside, n_trials=2, **{**common, "study_name": "outside"})
    study = optuna.load_study(study_name="outside", storage=_storage(tmp_path))
    assert not any(t.user_attrs.get("base_config") for t in study.trials), \
        "r=32 is not in the space: nothing to warm-start with"
    assert {t.params["finetuning.lora.r"] for t in result.trials} <= {4, 8}


def test_cli_reports_an_invalid_space_and_exits_2(tmp_path):
    space = _space(tmp_path, {"training.lr": {"type": "float", "low": 1e-5, "high": 1e-2}})
    runner = CliRunner()
    result = runner.invoke(main, ["tune", "--space", str(space),
                                  "--storage", _storage(tmp_path), "--n-trials", "1"])
    assert result.exit_code == 2, result.output
    assert "params.training.lr: not a config key" in result.output
    assert not (tmp_path / "optuna.db").exists()


def test_unreachable_storage_fails_early_without_leaking_its_password(tmp_path):
    space = _space(tmp_path, {"finetuning.lora.r": {"type": "categorical", "choices": [4]}})
    result = CliRunner().invoke(main, ["tune", "--space", str(space), "--storage",
                                       "postgresql://alice:s3cret@127.0.0.1:9/optuna"])
    assert result.exit_code == 2, result.output
    assert ("Optuna storage postgresql://alice:***@127.0.0.1:9/optuna is unreachable"
            in result.output)
    assert "s3cret" not in result.output
    assert not (tmp_path / "mlflow.db").exists()


def test_storage_from_the_environment_keeps_its_password_out_of_the_command_line(
        tmp_path, monkeypatch):
    """`mlflow run` logs every -P value as a param; a storage URL with a password goes in
    $WHISPER_EXP_OPTUNA_STORAGE instead, which the tune command uses when --storage is empty."""
    space = _space(tmp_path, {"finetuning.lora.r": {"type": "categorical", "choices": [4]}})
    monkeypatch.setenv(tuning.study.STORAGE_ENV, "postgresql://alice:s3cret@127.0.0.1:9/optuna")
    result = CliRunner().invoke(main, ["tune", "--space", str(space), "--storage", ""])
    assert result.exit_code == 2, result.output
    assert "Optuna storage postgresql://alice:***@127.0.0.1:9/optuna is unreachable" in (
        result.output)
    assert "s3cret" not in result.output
    assert tuning.storage_url("sqlite:///given.db") == "sqlite:///given.db"
    monkeypatch.delenv(tuning.study.STORAGE_ENV)
    assert tuning.storage_url("") == tuning.DEFAULT_STORAGE


# --------------------------------------------------------------------------- tracking hooks


def test_pruned_trial_ends_its_run_killed_with_state_tag():
    with pytest.raises(optuna.TrialPruned), tracking.run(run_name="t") as active:
        mlflow.log_metric("eval/wer", 0.9, step=1)
        raise optuna.TrialPruned("pruned at step 1")
    run = mlflow.get_run(active.info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.trial_state"] == "PRUNED"


def test_cpu_peak_memory_is_reset_per_run():
    """The peak a run reports is its own: after a reset, a 256 MiB peak of the previous run no
    longer counts (the process's earlier high-water mark, however high, is forgotten)."""
    device = torch.device("cpu")
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs: CPU peak is process-wide here")
    tracking.reset_peak_memory(device)
    ballast = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched; freed back to the OS (mmap)
    del ballast
    with_ballast, kind = tracking.peak_memory_mb(device)
    assert kind == "process_peak_rss"
    tracking.reset_peak_memory(device)
    after, _ = tracking.peak_memory_mb(device)
    assert after < with_ballast - 200, (with_ballast, after)


@pytest.mark.parametrize("eval_strategy, eval_steps, expected", [
    ("epoch", 0, [1, 2, 3]),          # per-epoch evaluations report epochs: Hyperband's rungs
    ("steps", 150, [150, 300, 450]),  # per-step evaluations report the optimizer step
])
def test_pruning_reports_epochs_or_steps_as_the_resource(eval_strategy, eval_steps, expected):
    from transformers import Seq2SeqTrainingArguments, TrainerState

    from whisper_exp.tuning.study import PruningCallback

    reported = []
    trial = SimpleNamespace(number=0, report=lambda value, step: reported.append(step),
                            should_prune=lambda: False)
    args = Seq2SeqTrainingArguments(output_dir="unused", eval_strategy=eval_strategy,
                                    eval_steps=eval_steps or None, report_to=[])
    callback = PruningCallback(trial)
    for epoch in (1, 2, 3):
        state = TrainerState(epoch=float(epoch), global_step=150 * epoch, max_steps=600)
        callback.on_evaluate(args, state, None, metrics={"eval_wer": 0.5})
    assert reported == expected


def test_running_best_survives_another_worker_writing_the_same_parent_tag_first():
    """Two workers finishing trials together both insert the parent's best_trial_number; MLflow's
    SQL store rejects the second insert (UNIQUE constraint). The recorder retries and the tag ends
    up set, instead of the worker crashing (seen in CI in the PostgreSQL restart test)."""
    from whisper_exp.tuning.runs import TrialRecorder

    client = MlflowClient()
    experiment = mlflow.set_experiment(EXPERIMENT).experiment_id
    parent = client.create_run(experiment).info.run_id
    real_set_tag = MlflowClient.set_tag
    raced = []

    def set_tag_after_the_other_worker(self, run_id, key, value, *args, **kwargs):
        if key == "best_trial_number" and not raced:
            raced.append(key)
            real_set_tag(self, run_id, key, "other worker's value")
            raise mlflow.exceptions.MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid")
        return real_set_tag(self, run_id, key, value, *args, **kwargs)

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.3, params={}, distributions={}))
    recorder = TrialRecorder(parent)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MlflowClient, "set_tag", set_tag_after_the_other_worker)
        recorder(study, study.trials[0])
    assert raced
    assert client.get_run(parent).data.tags["best_trial_number"] == "0"


# --------------------------------------------------------------------------- studies


def test_study_logs_parent_and_trial_runs_then_resumes(tiny_english_path, sample_dir, tmp_path):
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path)
    common = {"study_name": "lora-search", "storage": _storage(tmp_path), "sampler": "random",
              "seed": 3, "pruner": "none"}
    first = tune(cfg, LORA_SPACE, n_trials=2, **common)

    assert [(t.number, t.state) for t in first.trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    parent = mlflow.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study_name"] == "lora-search"
    assert parent.data.params["space.finetuning.lora.r"] == "categorical [4, 8, 16, 32, 64]"
    children = _by_number(_children(first.parent_run_id))
    assert sorted(children) == [0, 1]
    per_rank = set()
    for trial in first.trials:
        run = children[trial.number]
        assert run.info.status == "FINISHED"
        assert run.info.run_id == trial.run_id
        assert run.data.tags["optuna.trial_state"] == "COMPLETE"
        params, metrics = run.data.params, run.data.metrics
        assert params["finetuning.lora.r"] == str(trial.params["finetuning.lora.r"])
        assert float(params["training.learning_rate"]) == trial.params["training.learning_rate"]
        assert params["finetuning.strategy"] == "lora", "the rest of the config is kept"
        assert metrics["wer"] == pytest.approx(trial.value)
        assert metrics["peak_memory_mb"] > 100
        curve = MlflowClient().get_metric_history(run.info.run_id, "eval/wer")
        assert [m.step for m in curve] == [1, 2], "WER curve at every evaluation"
        per_rank.add(metrics["trainable_params"] / trial.params["finetuning.lora.r"])
    assert len(per_rank) == 1, "trainable params scale with the sampled rank"

    best = min(first.trials, key=lambda t: t.value)
    assert first.best_value == best.value
    assert parent.data.tags["best_run_id"] == first.best_run_id == children[
        first.best_trial_number].info.run_id
    assert parent.data.tags["best.finetuning.lora.r"] == str(first.best_params[
        "finetuning.lora.r"])
    assert parent.data.metrics["best_value"] == pytest.approx(first.best_value)
    files = _artifacts(first.parent_run_id)
    for expected in ("plots/optimization_history.png", "plots/param_importances.png",
                     "plots/contour.png", "plots/intermediate_values.png", "trials.csv",
                     "best_params.json", "best_config.yaml", "search_space.yaml"):
        assert expected in files, expected
    best_cfg = yaml.safe_load(mlflow.artifacts.load_text(
        f"runs:/{first.parent_run_id}/best_config.yaml"))
    assert best_cfg["finetuning"]["lora"]["r"] == first.best_params["finetuning.lora.r"]

    # Same study name: numbering continues and the trials join the same parent run.
    second = tune(cfg, LORA_SPACE, n_trials=3, **common)
    assert second.parent_run_id == first.parent_run_id
    assert [t.number for t in second.trials] == [0, 1, 2]
    assert second.trials[2].params not in (first.trials[0].params, first.trials[1].params), \
        "a resumed study (same seed) does not replay its first suggestions"
    assert sorted(_by_number(_children(first.parent_run_id))) == [0, 1, 2]
    table = mlflow.artifacts.load_text(f"runs:/{first.parent_run_id}/trials.csv")
    assert len(table.strip().splitlines()) == 1 + 3
    assert mlflow.get_run(first.parent_run_id).info.status == "FINISHED"

    # n_trials is the study's total: asking for 3 again runs nothing new.
    third = tune(cfg, LORA_SPACE, n_trials=3, **common)
    assert len(third.trials) == 3 and len(_children(first.parent_run_id)) == 3


def _fake_registry(monkeypatch):
    """Stand-in for whisper_exp.registry.register_run (tested in test_registry.py): records
    what the study asked to register."""
    import whisper_exp.registry

    calls = []

    def register_run(run_id, name, alias=None):
        calls.append((run_id, name, alias))
        return SimpleNamespace(name=name, version="3")

    monkeypatch.setattr(whisper_exp.registry, "register_run", register_run)
    return calls


def test_crashing_trial_is_recorded_failed_and_the_study_goes_on(tiny_english_path, sample_dir,
                                                                 tmp_path, monkeypatch):
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path)
    cfg.training.max_steps = 1
    registered = _fake_registry(monkeypatch)
    space = _space(tmp_path, {"finetuning.lora.target_modules": {
        "type": "categorical", "choices": [["q_proj", "v_proj"], ["no_such_module"]]}})
    result = tune(cfg, space, n_trials=2, study_name="crash", storage=_storage(tmp_path),
                  pruner="none", register_best="whisper-tuned",
                  enqueue=[{"finetuning.lora.target_modules": ["no_such_module"]},
                           {"finetuning.lora.target_modules": ["q_proj", "v_proj"]}])
    assert [(t.number, t.state) for t in result.trials] == [(0, "FAIL"), (1, "COMPLETE")]
    study = optuna.load_study(study_name="crash", storage=_storage(tmp_path))
    assert "no_such_module" in study.trials[0].user_attrs["fail_reason"]
    runs = _by_number(_children(result.parent_run_id))
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["optuna.trial_state"] == "FAIL"
    assert "no_such_module" in runs[0].data.tags["optuna.fail_reason"]
    assert runs[1].info.status == "FINISHED"
    assert result.best_run_id == runs[1].info.run_id
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_trials_fail"] == 1
    assert parent.data.metrics["n_trials_complete"] == 1
    # The best trial's model is registered (once, with the default alias).
    assert registered == [(runs[1].info.run_id, "whisper-tuned", "challenger")]
    assert mlflow.get_run(result.parent_run_id).data.tags["registered_model"] == \
        "whisper-tuned/3"


def test_pruner_stops_a_trial_at_its_first_evaluation(tiny_english_path, sample_dir, tmp_path,
                                                      monkeypatch):
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path)
    # Launched like `mlflow run . -e tune`: the launcher's run is the parent, and trials must
    # still get runs of their own (MLFLOW_RUN_ID would make every start_run reopen it).
    experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    launcher = MlflowClient().create_run(experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    # A random model's WER is above 0 at the first evaluation (step 1 of 2), so this prunes.
    result = tune(cfg, LORA_SPACE, n_trials=1, study_name="prune", storage=_storage(tmp_path),
                  pruner="threshold:0.0")
    assert result.parent_run_id == launcher.info.run_id
    assert [t.state for t in result.trials] == ["PRUNED"]
    trial = optuna.load_study(study_name="prune", storage=_storage(tmp_path)).trials[0]
    assert list(trial.intermediate_values) == [1]
    (run,) = _children(launcher.info.run_id)
    assert run.info.run_id != launcher.info.run_id
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.trial_state"] == "PRUNED"
    curve = MlflowClient().get_metric_history(run.info.run_id, "eval/wer")
    assert [m.step for m in curve] == [1], "training stopped after the first evaluation"
    assert "wer" not in run.data.metrics, "a pruned trial is never scored to the end"
    assert result.best_run_id is None
    parent = mlflow.get_run(launcher.info.run_id)
    assert parent.info.status == "FINISHED" and "best_run_id" not in parent.data.tags
    assert "plots/intermediate_values.png" in _artifacts(launcher.info.run_id)


def test_median_pruner_stops_a_trial_worse_than_earlier_ones(tiny_english_path, sample_dir,
                                                              tmp_path):
    """The default pruner: three earlier trials (added to the shared study as another worker
    would) had WER 0.1 at step 1; a random model's WER there is far worse, so it is pruned."""
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path)
    study = optuna.create_study(study_name="median", storage=_storage(tmp_path))
    distributions = {
        "finetuning.lora.r": optuna.distributions.CategoricalDistribution([4, 8, 16, 32, 64]),
        "training.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    for rank in (4, 8, 16):
        study.add_trial(optuna.trial.create_trial(
            params={"finetuning.lora.r": rank, "training.learning_rate": 1e-3},
            distributions=distributions, value=0.1, intermediate_values={1: 0.1, 2: 0.1}))
    result = tune(cfg, LORA_SPACE, n_trials=4, study_name="median", storage=_storage(tmp_path),
                  sampler="random", seed=0, pruner="median")
    assert [t.state for t in result.trials] == ["COMPLETE"] * 3 + ["PRUNED"]
    trial = optuna.load_study(study_name="median", storage=_storage(tmp_path)).trials[3]
    assert list(trial.intermediate_values) == [1] and trial.intermediate_values[1] > 0.1


def test_trial_failing_before_its_run_opens_still_gets_a_failed_run(tmp_path, monkeypatch):
    def out_of_memory(cfg, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated before any run was opened)")

    monkeypatch.setattr(tuning.search, "train", out_of_memory)
    cfg = load_config(ROOT / "experiments" / "lora.yaml", {"tracking": {
        "experiment_name": EXPERIMENT}})
    result = tune(cfg, LORA_SPACE, n_trials=2, study_name="oom", storage=_storage(tmp_path))
    assert [t.state for t in result.trials] == ["FAIL", "FAIL"], "the study went on"
    runs = _by_number(_children(result.parent_run_id))
    assert sorted(runs) == [0, 1]
    for trial in result.trials:
        run = runs[trial.number]
        assert run.info.status == "FAILED"
        assert run.data.tags["optuna.trial_state"] == "FAIL"
        assert "out of memory" in run.data.tags["optuna.fail_reason"]
        assert run.data.params["finetuning.lora.r"] == str(trial.params["finetuning.lora.r"])
    assert result.best_run_id is None
    assert mlflow.get_run(result.parent_run_id).info.status == "FINISHED"


class _CtrlC(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_ctrl_c_keeps_finished_trials_and_ends_cleanly(tiny_english_path, sample_dir, tmp_path,
                                                       monkeypatch):
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path)
    cfg.training.max_steps = 1
    calls = []
    real_train = tuning.search.train

    def train_interrupted_on_second_trial(cfg, *, callbacks=(), **kwargs):
        calls.append(cfg)
        extra = [_CtrlC()] if len(calls) == 2 else []
        return real_train(cfg, callbacks=[*callbacks, *extra], **kwargs)

    monkeypatch.setattr(tuning.search, "train", train_interrupted_on_second_trial)
    registered = _fake_registry(monkeypatch)
    result = tune(cfg, LORA_SPACE, n_trials=3, study_name="ctrl-c", storage=_storage(tmp_path),
                  pruner="none", register_best="whisper-tuned")
    assert result.interrupted
    assert registered == [], "an interrupted study registers nothing"
    assert [(t.number, t.state) for t in result.trials] == [(0, "COMPLETE"), (1, "FAIL")]
    runs = _by_number(_children(result.parent_run_id))
    assert runs[0].info.status == "FINISHED"
    assert runs[1].info.status == "KILLED"
    assert runs[1].data.tags["optuna.trial_state"] == "FAIL"
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "KILLED"
    assert parent.data.tags["best_run_id"] == runs[0].info.run_id, "summary written before exit"
    assert mlflow.active_run() is None


def test_stale_trial_of_a_dead_worker_is_failed_and_queued_again(tmp_path):
    storage = tuning.open_storage(_storage(tmp_path), heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="stale")
    trial = study.ask({"finetuning.lora.r": optuna.distributions.CategoricalDistribution([4, 8])})
    storage.record_heartbeat(trial._trial_id)
    experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    run = MlflowClient().create_run(experiment_id, tags={
        "optuna.study_name": "stale", "optuna.trial_number": str(trial.number),
        "optuna.trial_state": "RUNNING"})
    time.sleep(3.5)  # grace period = 3 heartbeats
    optuna.storages.fail_stale_trials(study)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "WAITING"], "failed, and its parameters queued once more"
    dead = mlflow.get_run(run.info.run_id)
    assert dead.info.status == "FAILED"
    assert dead.data.tags["optuna.trial_state"] == "FAIL"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study(backend, tiny_english_path, sample_dir, tmp_path, request):
    """Two `whisper-exp tune` processes on one Optuna RDB storage: SQLite here, PostgreSQL as a
    team would use (a database created and dropped for this test)."""
    storage = (_storage(tmp_path) if backend == "sqlite"
               else request.getfixturevalue("postgres_url"))
    config = tmp_path / "config.yaml"
    tree = _tree(tiny_english_path, sample_dir, tmp_path)
    tree["training"]["max_steps"] = 1
    config.write_text(yaml.safe_dump(tree))
    mlflow.set_experiment(EXPERIMENT)  # create the tracking DB once, before the workers race
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "whisper_exp.cli", "tune", "--config", str(config),
               "--space", str(LORA_SPACE), "--study-name", "shared",
               "--storage", storage, "--n-trials", "3", "--sampler", "random",
               "--pruner", "none"]
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))), "trial numbers never collide"
    assert 3 <= len(numbers) <= 4, "n_trials is the shared total (each worker may overshoot 1)"
    assert {t.state.name for t in study.trials} == {"COMPLETE"}

    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string="tags.`optuna.study_name` = 'shared'")
    trial_runs = [r for r in runs if "optuna.trial_number" in r.data.tags]
    recorded = sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs)
    assert recorded == numbers, "every trial appears exactly once in MLflow"
    by_number = _by_number(trial_runs)
    for trial in study.trials:
        assert trial.user_attrs["mlflow_run_id"] == by_number[trial.number].info.run_id
    parents = {r.data.tags["mlflow.parentRunId"] for r in trial_runs}
    assert len(parents) == 1, "both workers log under the study's one parent run"
    assert len({r.data.tags["optuna.worker"] for r in trial_runs}) == 2, "both workers ran"


def test_a_joining_worker_waits_for_the_parent_even_when_trials_are_queued(monkeypatch):
    """The creating worker queues the warm-start trial before it opens the parent run: a worker
    joining then must still wait for that parent, not open a second one."""
    import threading

    from whisper_exp.tuning import runs

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({"x": 1})
    with mlflow.start_run() as parent:
        pass
    monkeypatch.setattr(runs, "PARENT_WAIT_S", 20.0)
    timer = threading.Timer(1.0, study.set_user_attr,
                            (runs.PARENT_RUN_ATTR, parent.info.run_id))
    timer.start()
    try:
        resume_id, usable = runs.parent_to_resume(study, created=False, client=MlflowClient(),
                                                  experiment_id=None)
    finally:
        timer.cancel()
    assert (resume_id, usable) == (parent.info.run_id, True)
