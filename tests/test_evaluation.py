import mlflow

from whisper_exp.config import load_config
from whisper_exp.evaluation import run_evaluation


def test_compare_base_and_tuned_on_the_same_data(tiny_en_path, sample_dir):
    cfg = load_config(None, {"data": {"max_eval_samples": 4},
                             "evaluation": {"batch_size": 4}})
    report = run_evaluation(str(tiny_en_path), str(sample_dir), cfg,
                            compare_with=str(tiny_en_path))
    run = mlflow.get_run(report.run_id)
    metrics = run.data.metrics
    assert metrics["wer"] == metrics["base_wer"] and metrics["wer_delta"] == 0.0
    assert 0.0 <= metrics["wer"] < 0.8, "stock tiny.en understands these clips"
    table = mlflow.artifacts.load_text(f"runs:/{report.run_id}/comparison.csv")
    header, *rows = table.splitlines()
    assert header.startswith("file,reference,base_hypothesis,tuned_hypothesis")
    assert len(rows) == 4
    assert run.data.params["data.n_utterances"] == "4"
