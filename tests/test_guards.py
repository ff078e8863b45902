"""Issue 11's guards: named eval sets with their own metrics and reports, the regression guard
against the base model (tag, delta, exit code 3) and keeping the best checkpoint. Tiny random
models on the shipped sample; it says "1982 1982" to every clip, so a set whose references say
so is one the base model scores perfectly on."""

import csv
import re

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import copy_sample
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from whisper_exp import cli
from whisper_exp.config import load_config
from whisper_exp.data import DataError
from whisper_exp.evaluation import EvalResult, run_evaluation
from whisper_exp.guards import Regression, check_regression, failure_line
from whisper_exp.metrics import Scores
from whisper_exp.training import TrainResult, train

BASE_SAYS = "1982 1982"  # the tiny random English model's transcript of any sample clip


def _echo_set(folder, n=2):
    """Sample clips whose references are what the base model says: base WER 0."""
    copy_sample(folder, n)
    path = folder / "metadata.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{**row, "transcription": BASE_SAYS} for row in rows])
    return folder


def _cfg(model, train_data, tmp_path, **overrides):
    tree = {
        "model": {"name": str(model)},
        "data": {"train": str(train_data), "max_eval_samples": 2, "max_train_samples": 4},
        "training": {"max_steps": 1, "batch_size": 2, "logging_steps": 1, "warmup_steps": 0,
                     "checkpoint_steps": -1, "output_dir": str(tmp_path / "outputs")},
        "evaluation": {"batch_size": 2, "max_new_tokens": 8, "worst_n": 1},
        "tracking": {"experiment_name": "test"},
    }
    for section, values in overrides.items():
        tree[section] = {**tree.get(section, {}), **values}
    return load_config(None, tree)


def _scramble_adapters(model) -> None:
    """LoRA B matrices start at zero (adapter = no-op); large random ones wreck the output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(5 * torch.randn(param.shape, generator=generator))


class ScrambleAfter(TrainerCallback):
    """Wrecks the adapters once step ``step`` is done (evaluated and saved), or at the end of
    training when ``step`` is None."""

    def __init__(self, step: int | None = None):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.step is not None and state.global_step == self.step:
            _scramble_adapters(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.step is None:
            _scramble_adapters(model)


def _result(wer: float) -> EvalResult:
    return EvalResult(Scores(wer=wer, cer=wer, n_scored=1, n_empty_references=0), [], 1.0, 1.0)


def test_regression_is_tuned_minus_base_beyond_the_threshold():
    worse = check_regression("general", _result(0.30), _result(0.25), max_regression=0.02)
    assert worse.delta == pytest.approx(0.05) and worse.exceeded
    assert "worse by 5.00 points" in worse.message()
    within = check_regression("general", _result(0.26), _result(0.25), max_regression=0.02)
    assert not within.exceeded
    assert failure_line([within]) is None
    assert failure_line([within, worse]).startswith("regression: general: tuned is worse by 5.00")


def test_eval_sets_short_and_long_forms_in_config():
    cfg = load_config(None, ["data.eval_sets.general=/data/general",
                             "data.eval_sets.noisy.source=/data/noisy",
                             "data.eval_sets.noisy.guard=true"])
    assert cfg.data.eval_sets["general"].source == "/data/general"
    assert not cfg.data.eval_sets["general"].guard
    assert cfg.data.eval_sets["noisy"].guard
    assert cfg.flat()["data.eval_sets.noisy.source"] == "/data/noisy"


def test_missing_eval_set_fails_before_training(tiny_english_path, sample_dir, tmp_path):
    missing = tmp_path / "no-such-set"
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path,
               data={"eval_sets": {"general": {"source": str(missing), "guard": True}}})
    with pytest.raises(DataError, match=rf"eval set 'general' \({missing}\)"):
        train(cfg)
    (run,) = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"
    assert "train/loss" not in run.data.metrics, "it failed before any training step"


def test_guard_set_that_regresses_is_tagged_with_its_delta(tiny_english_path, sample_dir,
                                                           tmp_path):
    guard = _echo_set(tmp_path / "general")
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path,
               data={"eval_sets": {"general": {"source": str(guard), "guard": True}}})
    result = train(cfg, callbacks=[ScrambleAfter()])
    run = mlflow.get_run(result.run_id)
    metrics = run.data.metrics
    assert metrics["general/base_wer"] == 0.0, "the base says exactly the references"
    assert metrics["general/wer"] > 0.02, "the wrecked adapters say something else"
    assert metrics["general/wer_delta"] == pytest.approx(metrics["general/wer"])
    assert run.data.tags["regression.general"].startswith("tuned is worse by ")
    assert "general/wer_orthographic" in metrics, "the set has its own report"
    assert "wer" in metrics and "wer_delta" not in metrics, "the primary set is no guard here"
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.run_id, "eval/general")}
    assert {"eval/general/predictions.csv", "eval/general/base_predictions.csv",
            "eval/general/report.md"} <= artifacts
    assert [r.name for r in result.regressions] == ["general"]
    assert result.regressions[0].exceeded
    # The long-form check runs in train's final evaluation too: auto, on 2 clips, says why not.
    report = mlflow.artifacts.load_text(f"runs:/{result.run_id}/eval/general/report.md")
    assert re.search(r"long-form check skipped: the eval set has \d+ s of audio, under 60 s",
                     report), report


def test_train_fail_on_regression_exits_3_after_the_run(monkeypatch, tmp_path):
    regressed = Regression("general", tuned_wer=0.4, base_wer=0.1, max_regression=0.02)
    final = _result(0.4)
    monkeypatch.setattr("whisper_exp.training.train",
                        lambda cfg: TrainResult("abc", tmp_path, final, {}, [regressed]))
    runner = CliRunner()
    failed = runner.invoke(cli.main, ["train", "--fail-on-regression"])
    assert failed.exit_code == 3, failed.output
    assert "run_id=abc" in failed.stdout, "the run is reported before the exit"
    assert failed.stderr.strip() == (
        "error: regression: general: tuned is worse by 30.00 points (WER 40.00% vs base 10.00%, "
        "evaluation.max_regression 2.00)")
    warned = runner.invoke(cli.main, ["train"])
    assert warned.exit_code == 0 and "warning: regression: general" in warned.stderr


def test_evaluate_compare_fail_on_regression(tiny_english_path, says_the_path, sample_dir,
                                             tmp_path):
    # says_the answers eight words to every clip, the base two: the tuned side is worse, on the
    # primary data and on the named guard set, whose references are what the base says. Its
    # third row has no reference: scored on the other two, and the run says so.
    general = _echo_set(tmp_path / "general", n=3)
    rows = list(csv.DictReader((general / "metadata.csv").open(encoding="utf-8")))
    rows[2]["transcription"] = ""
    with (general / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    args = ["evaluate", "--model", str(says_the_path), "--data", str(sample_dir),
            "--compare", str(tiny_english_path), "--set", "data.max_eval_samples=2",
            "--set", "evaluation.max_new_tokens=8", "--fail-on-regression",
            "--set", f"data.eval_sets.general.source={general}",
            "--set", "data.eval_sets.general.guard=true",
            "--set", f"data.eval_sets.plain={general}"]
    outcome = CliRunner().invoke(cli.main, args)
    assert outcome.exit_code == 3, outcome.output
    assert outcome.stderr.strip().splitlines()[-1].startswith(
        "error: regression: eval: tuned is worse by ")
    assert "; general: tuned is worse by " in outcome.stderr
    assert "plain:" not in outcome.stderr, "not a guard: scored, not compared"
    run_id = outcome.stdout.split("run_id=")[1].split()[0]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED", "everything was logged before the exit"
    metrics = run.data.metrics
    assert metrics["wer_delta"] > 0.02
    assert "regression.eval" in run.data.tags
    assert metrics["general/base_wer"] == 0.0 and metrics["general/wer_delta"] > 0.02
    assert run.data.tags["regression.general"].startswith("tuned is worse by ")
    assert "plain/wer" in metrics and "plain/base_wer" not in metrics
    assert "regression.plain" not in run.data.tags
    assert run.data.params["data.n_eval.general"] == "2"
    assert metrics["general/n_utterances"] == 2 and metrics["general/unscored_rows"] == 1
    assert metrics["unscored_rows"] == 0
    report = mlflow.artifacts.load_text(f"runs:/{run_id}/eval/general/report.md")
    assert "1 of 3 rows have no reference transcript: not scored" in report
    skipped = mlflow.artifacts.load_text(f"runs:/{run_id}/data/general/skipped_rows.csv")
    assert "no reference transcript" in skipped


def test_evaluate_names_a_missing_eval_set_before_decoding(tiny_english_path, sample_dir,
                                                           tmp_path, monkeypatch):
    missing = tmp_path / "no-such-set"
    cfg = load_config(None, {"data": {"eval_sets": {"general": str(missing)}}})
    decoded = []
    monkeypatch.setattr("whisper_exp.evaluation.evaluate_examples",
                        lambda *args, **kwargs: decoded.append(1))
    with pytest.raises(DataError, match=rf"eval set 'general' \({missing}\): no such folder"):
        run_evaluation(str(tiny_english_path), str(sample_dir), cfg)
    assert decoded == []


@pytest.mark.parametrize("checkpoint_steps", [-1, 1], ids=["in-memory", "checkpoint"])
def test_best_evaluation_is_the_model_kept(tiny_english_path, sample_dir, tmp_path,
                                           checkpoint_steps):
    # Dev set = what the base says; a negligible learning rate keeps step 1 at the base, then
    # the adapters are wrecked: steps 2 and 3 are worse, so step 1's weights must ship.
    dev = _echo_set(tmp_path / "dev")
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path,
               data={"eval": str(dev)},
               training={"max_steps": 3, "eval_steps": 1, "learning_rate": 1e-9,
                         "checkpoint_steps": checkpoint_steps, "checkpoints_kept": 1})
    result = train(cfg, callbacks=[ScrambleAfter(1)])
    run = mlflow.get_run(result.run_id)
    curve = {m.step: m.value for m in MlflowClient().get_metric_history(result.run_id,
                                                                         "eval/wer")}
    assert curve[1] == 0.0 and curve[3] > curve[1], "the last step is worse than step 1"
    assert run.data.metrics["best_step"] == 1
    assert run.data.tags["best_step"] == "1"
    assert run.data.metrics["wer"] == 0.0, "the final report describes step 1's weights"
    assert result.final.scores.wer == 0.0
    from whisper_exp.data import load_eval_only
    from whisper_exp.evaluation import evaluate_examples
    from whisper_exp.modeling import load_for_inference

    saved, processor = load_for_inference(str(result.model_dir))
    examples = load_eval_only(str(dev), cfg.data, language=None).eval
    assert evaluate_examples(saved, processor, examples, cfg.evaluation,
                             progress=False).scores.wer == 0.0, "the saved model is step 1's"
