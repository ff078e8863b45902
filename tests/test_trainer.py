"""One decoding policy during training: the learning curve's evaluations decode with the same
length-scaled token budget as the final evaluation, and the eval set is decoded once at the end."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from transformers import WhisperForConditionalGeneration

from whisper_exp.audio import probe
from whisper_exp.config import load_config
from whisper_exp.decoding import default_max_new_tokens
from whisper_exp.training import train


@pytest.fixture
def generate_calls(monkeypatch):
    calls = []
    original = WhisperForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        features = kwargs.get("input_features")
        calls.append({"batch": None if features is None else int(features.shape[0]),
                      "max_new_tokens": kwargs.get("max_new_tokens"),
                      "max_length": kwargs.get("max_length")})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WhisperForConditionalGeneration, "generate", spy)
    return calls


def test_eval_during_training_uses_the_final_budget_and_the_end_decodes_once(
        tiny_english_path, sample_dir, tmp_path, generate_calls):
    cfg = load_config(None, {
        "model": {"name": str(tiny_english_path)},
        "data": {"train": str(sample_dir), "max_eval_samples": 4},
        "finetuning": {"freeze_encoder": True},
        "training": {"max_steps": 2, "eval_steps": 1, "batch_size": 2, "logging_steps": 1,
                     "checkpoint_steps": -1, "output_dir": str(tmp_path / "out"),
                     "cache_dir": str(tmp_path / "cache")},
        "evaluation": {"batch_size": 2},
        "tracking": {"experiment_name": "budget"},
    })
    result = train(cfg)
    eval_seconds = sorted(probe(row_audio).duration_s for row_audio in
                          (sample_dir / row["file"] for row in result.final.rows))
    batches = [eval_seconds[i:i + 2] for i in range(0, len(eval_seconds), 2)]
    expected = sorted(default_max_new_tokens(max(batch)) for batch in batches)

    assert all(call["max_length"] is None for call in generate_calls), \
        "no flat generation_max_length (it counts the prompt too)"
    # Step 1: the curve's evaluation (2 batches); step 2 (the last): loss only; then the final
    # evaluation decodes the eval set once (2 batches). Never a third pass.
    assert len(generate_calls) == 2 * len(batches)
    by_pass = [generate_calls[:len(batches)], generate_calls[len(batches):]]
    for decoded in by_pass:
        assert sorted(call["max_new_tokens"] for call in decoded) == expected

    client = MlflowClient()
    eval_wer = client.get_metric_history(result.run_id, "eval/wer")
    eval_loss = client.get_metric_history(result.run_id, "eval/loss")
    assert sorted(m.step for m in eval_wer) == [1, 2]
    assert sorted(m.step for m in eval_loss) == [1, 2], "the last step still logs its loss"
    final_point = next(m for m in eval_wer if m.step == 2)
    assert final_point.value == mlflow.get_run(result.run_id).data.metrics["wer"]
