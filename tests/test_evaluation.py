"""`evaluate --compare`: two different models scored on identical data, per run and per
utterance."""

import csv
import io

import jiwer
import mlflow
import pytest

from whisper_exp.config import load_config
from whisper_exp.evaluation import run_evaluation
from whisper_exp.metrics import english_normalizer

CFG = {"data": {"max_eval_samples": 4}, "evaluation": {"batch_size": 4, "max_new_tokens": 6}}
THE = " ".join(["the"] * 6)  # says_the_path's transcript of anything, at 6 new tokens


def _table(run_id: str, name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{name}"))))


def test_compare_scores_base_and_tuned_on_the_same_data(tiny_english_path, says_the_path,
                                                        sample_dir):
    cfg = load_config(None, CFG)
    report = run_evaluation(str(says_the_path), str(sample_dir), cfg,
                            compare_with=str(tiny_english_path))
    run = mlflow.get_run(report.run_id)
    metrics = run.data.metrics
    assert run.data.params["data.n_utterances"] == "4"
    tuned_rows = _table(report.run_id, "predictions.csv")
    base_rows = _table(report.run_id, "base_predictions.csv")
    assert [r["hypothesis"] for r in tuned_rows] == [THE] * 4, "the tuned side is says_the"
    assert all(r["hypothesis"] != THE for r in base_rows), "the base side is the other model"

    normalize = english_normalizer()
    references = [normalize(r["reference"]) for r in tuned_rows]
    expected_wer = jiwer.wer(references, [THE] * 4)
    assert expected_wer > 1.0, "six words against shorter references: insertions"
    assert metrics["wer"] == pytest.approx(expected_wer)
    base_expected = jiwer.wer(references, [normalize(r["hypothesis"]) for r in base_rows])
    assert metrics["base_wer"] == pytest.approx(base_expected)
    assert metrics["wer_delta"] == pytest.approx(expected_wer - base_expected)
    assert metrics["wer_delta"] != 0

    comparison = _table(report.run_id, "comparison.csv")
    assert list(comparison[0]) == ["file", "reference", "base_hypothesis", "tuned_hypothesis",
                                   "base_wer", "tuned_wer", "delta_wer"]
    assert len(comparison) == 4
    for row, base, tuned in zip(comparison, base_rows, tuned_rows, strict=True):
        assert row["file"] == base["file"] == tuned["file"]
        assert row["reference"] == base["reference"]
        assert row["base_hypothesis"] == base["hypothesis"]
        assert row["tuned_hypothesis"] == tuned["hypothesis"]
        assert float(row["base_wer"]) == pytest.approx(float(base["wer"]))
        assert float(row["tuned_wer"]) == pytest.approx(float(tuned["wer"]))
        assert float(tuned["wer"]) == pytest.approx(jiwer.wer(normalize(row["reference"]), THE))
        assert float(row["delta_wer"]) == pytest.approx(float(tuned["wer"]) - float(base["wer"]))


def test_evaluation_reads_transcripts_in_the_models_language(tiny_multilingual_path, sample_dir,
                                                             tmp_path):
    """Text case follows the language decoded: an all-caps Italian reference keeps its "i"
    (the English "I" rule is English-only)."""
    import shutil

    from conftest import write_metadata

    data = tmp_path / "italian"
    data.mkdir()
    shutil.copy(sample_dir / "001350134.flac", data / "a.flac")
    write_metadata(data, [("a.flac", "SONO I MIEI AMICI")])
    # tiny random multilingual model: only <|en|> and <|de|> tokens, so German stands in for
    # any non-English language here.
    cfg = load_config(None, {"model": {"language": "german"},
                             "evaluation": {"max_new_tokens": 4}})
    report = run_evaluation(str(tiny_multilingual_path), str(data), cfg)
    (row,) = _table(report.run_id, "predictions.csv")
    assert row["reference"] == "Sono i miei amici."


def test_rows_without_a_reference_are_left_out_and_counted(tmp_path, sample_dir):
    from conftest import copy_sample

    from whisper_exp.config import DataConfig
    from whisper_exp.data import NO_REFERENCE, DataError, load_eval_only

    folder = copy_sample(tmp_path / "set", n=4)
    path = folder / "metadata.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    for row in rows[1:3]:
        row["transcription"] = "  "
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    split = load_eval_only(folder, DataConfig(on_invalid="error"))  # not an error here
    assert [e.name for e in split.eval] == [rows[0]["file_name"], rows[3]["file_name"]]
    assert [(p.file, p.message) for p in split.skipped] == [
        (rows[1]["file_name"], NO_REFERENCE), (rows[2]["file_name"], NO_REFERENCE)]
    assert any(n.startswith("2 of 4 rows have no reference transcript: not scored")
               for n in split.notices), split.notices
    for row in rows:
        row["transcription"] = ""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match="none of its 4 rows has a reference transcript"):
        load_eval_only(folder, DataConfig())
