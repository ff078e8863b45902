"""The per-run evaluation report: built from known results (metric values counted by hand),
logged with its tables, chart and the worst utterances' audio, and wired into `evaluate`."""

import json
import math
from pathlib import Path

import mlflow
import pytest
from conftest import write_metadata

from whisper_exp.config import DataConfig, load_config
from whisper_exp.data import Example, read_source
from whisper_exp.evaluation import EvalResult, run_evaluation
from whisper_exp.metrics import english_normalizer, score, utterance_wer
from whisper_exp.report import (
    audio_file_name,
    build_report,
    log_evaluation_report,
    merge_slices,
)

REFERENCES = ["He is a big boy.", "Ready to be at the lake.", "At the top of the charts.",
              "I never wanted to be cool."]
HYPOTHESES = ["he is a big boy", "Ready to be at the lake.", "",
              "I never wanted to be cool" + " cool" * 14 + "."]  # a loop: 14 insertions


def _examples(sample_dir, genders=("f", "f", "m", "m")) -> list[Example]:
    files = sorted(sample_dir.glob("*.flac"))[:4]
    return [Example(str(f), ref, f.name, metadata={"gender": g, "speaker": f"s{i}"})
            for i, (f, ref, g) in enumerate(zip(files, REFERENCES, genders, strict=True))]


def _result(examples, hypotheses, durations=(1.5, 3.0, 3.5, 12.0), budget=None) -> EvalResult:
    normalize = english_normalizer()
    rows = [{"file": e.name, "reference": e.text, "hypothesis": h,
             "wer": utterance_wer(e.text, h, normalize), "duration_s": d}
            for e, h, d in zip(examples, hypotheses, durations, strict=True)]
    for row, hit in zip(rows, budget or [None] * len(rows), strict=True):
        if hit is not None:
            row["budget_hit"] = hit
    return EvalResult(score([e.text for e in examples], hypotheses, normalize), rows,
                      sum(durations), 1.0, normalize=normalize)


def test_report_figures_on_known_results(sample_dir):
    examples = _examples(sample_dir)
    report = build_report(_result(examples, HYPOTHESES, budget=[False, False, False, True]),
                          examples, worst_n=2)
    values = report.metrics
    assert report.normalizer == "EnglishTextNormalizer"
    # Normalised words: 5 + 6 + 6 + 6 = 23; row 3 is 6 deletions, row 4 14 insertions.
    assert (values["substitutions"], values["deletions"], values["insertions"]) == (0, 6, 14)
    assert values["ins_rate"] == pytest.approx(14 / 23)
    assert values["del_rate"] == pytest.approx(6 / 23)
    # Orthographic: "He"->"he", "boy."->"boy" (2 substitutions), 6 deleted, 14 inserted.
    assert values["wer_orthographic"] == pytest.approx((2 + 6 + 14) / 23)
    assert values["empty_share"] == 1 / 4
    assert values["budget_hit_share"] == 1 / 4
    assert values["loop_share"] == 1 / 4, "only the 'cool cool ...' output compresses > 2.4"
    # 3-grams: 3 + 4 + 0 + 18 = 25; "cool cool cool" appears 13 times, 12 of them repeats.
    assert values["repeated_ngram_rate"] == pytest.approx(12 / 25)
    # Marks: 4 reference full stops, 2 in hypotheses ("lake." and "cool."); "lake." is a true
    # positive, "cool." is not: the reference's "cool." aligns with the first "cool".
    assert values["punctuation_f1"] == pytest.approx(2 * 1 / (4 + 2))
    # Capitalised reference words: He, Ready, At, I (4); hypotheses: Ready, I (2), both aligned.
    assert values["capitalization_f1"] == pytest.approx(2 * 2 / (4 + 2))

    by_group = {(r["column"], r["value"]): (r["n_utterances"], r["wer"]) for r in report.slices}
    assert by_group[("gender", "f")] == (2, 0.0)
    assert by_group[("gender", "m")] == (2, pytest.approx(20 / 12))
    assert by_group[("duration", "<2 s")] == (1, 0.0)
    assert by_group[("duration", "2-5 s")] == (2, pytest.approx(6 / 12))
    assert by_group[("duration", "10-20 s")] == (1, pytest.approx(14 / 6))
    assert any("column 'speaker' not sliced" in n for n in report.notes), report.notes
    assert report.worst == [3, 2], "the 14 insertions, then the empty output"
    # No substitutions: the deletions ("the" twice) come first, then the insertions.
    assert report.errors[0] == {"kind": "deletion", "reference": "the", "hypothesis": "",
                                "count": 2}
    assert report.errors[-1] == {"kind": "insertion", "reference": "", "hypothesis": "cool",
                                 "count": 14}


def test_a_column_with_thousands_of_values_is_not_sliced_and_the_report_says_so(sample_dir):
    clip = str(sorted(sample_dir.glob("*.flac"))[0])
    n = 1000
    examples = [Example(clip, "he is a big boy", f"u{i}", metadata={
        "utterance_id": f"id-{i:05d}", "gender": "fm"[i % 2]}) for i in range(n)]
    hypotheses = ["he is a big boy" if i % 2 else "he is a boy" for i in range(n)]
    report = build_report(_result(examples, hypotheses, durations=[2.5] * n), examples,
                          worst_n=0)
    assert {r["column"] for r in report.slices} == {"gender", "duration"}
    assert ("column 'utterance_id' not sliced: 1000 distinct values in 1000 rows (more than 50 "
            "or half the rows)") in report.notes
    by_gender = {r["value"]: r["wer"] for r in report.slices if r["column"] == "gender"}
    assert by_gender == {"f": pytest.approx(1 / 5), "m": 0.0}


def test_references_without_punctuation_or_case_log_no_f1_and_say_why(sample_dir):
    examples = _examples(sample_dir)
    for example in examples:
        example.text = example.text.upper().rstrip(".")
    report = build_report(_result(examples, HYPOTHESES), examples)
    assert "punctuation_f1" not in report.metrics
    assert "capitalization_f1" not in report.metrics
    assert "budget_hit_share" not in report.metrics, "rows without budget_hit: unknown"
    assert any("no punctuation" in n for n in report.notes)
    assert any("no case" in n for n in report.notes)


def _artifacts(run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in mlflow.artifacts.list_artifacts(run_id=run_id, artifact_path=path or None):
        found |= _artifacts(run_id, item.path) if item.is_dir else {item.path}
    return found


def _json_table(run_id: str, path: str) -> list[dict]:
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def test_logged_report_plays_the_worst_utterances_and_keeps_the_csv(sample_dir):
    examples = _examples(sample_dir)
    with mlflow.start_run() as run:
        log_evaluation_report({"": _result(examples, HYPOTHESES)}, examples, worst_n=2,
                              csv_dir="eval")
    run_id = run.info.run_id
    files = _artifacts(run_id)
    worst = [f"eval/worst/01_{examples[3].name}", f"eval/worst/02_{examples[2].name}"]
    for path, example in zip(worst, (examples[3], examples[2]), strict=True):
        assert path in files
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
        assert Path(local).read_bytes() == Path(example.audio).read_bytes(), "its own bytes"
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{path}.txt")
        assert f"reference:  {example.text}" in text
    assert not any(f.startswith("eval/worst/03_") for f in files), "worst_n=2"
    table = _json_table(run_id, "eval/worst.json")
    assert [r["audio"] for r in table] == worst
    assert [r["hypothesis"] for r in table] == [HYPOTHESES[3], HYPOTHESES[2]]
    for expected in ("eval/predictions.csv", "eval/predictions.json", "eval/errors.json",
                     "eval/slices.json", "eval/slices.png", "eval/report.md"):
        assert expected in files, expected
    csv_text = mlflow.artifacts.load_text(f"runs:/{run_id}/eval/predictions.csv")
    assert csv_text.splitlines()[0] == "file,reference,hypothesis,wer"
    predictions = _json_table(run_id, "eval/predictions.json")
    assert [p["hypothesis"] for p in predictions] == HYPOTHESES
    assert [p["meta_gender"] for p in predictions] == ["f", "f", "m", "m"]
    logged = mlflow.get_run(run_id)
    assert logged.data.params["normalizer"] == "EnglishTextNormalizer"
    for name in ("wer_orthographic", "punctuation_f1", "capitalization_f1", "sub_rate",
                 "del_rate", "ins_rate", "loop_share", "repeated_ngram_rate", "empty_share"):
        assert name in logged.data.metrics, name
    assert logged.data.tags.get("mlflow.loggedArtifacts"), "tables show in the UI's table view"


def test_base_beside_tuned_slices_and_loop_deltas(sample_dir):
    examples = _examples(sample_dir)
    base = _result(examples, REFERENCES)  # perfect and loop-free
    tuned = _result(examples, HYPOTHESES)
    with mlflow.start_run() as run:
        reports = log_evaluation_report({"base_": base, "": tuned}, examples, worst_n=0)
    slices = {(r["column"], r["value"]): r for r in merge_slices(reports)}
    male = slices[("gender", "m")]
    assert (male["base_wer"], male["wer"]) == (0.0, pytest.approx(20 / 12))
    assert male["wer_delta"] == pytest.approx(20 / 12)
    logged = mlflow.get_run(run.info.run_id).data
    assert logged.metrics["base_loop_share"] == 0.0 and logged.metrics["loop_share"] == 0.25
    assert logged.metrics["loop_share_delta"] == 0.25
    assert logged.tags["report.loops_more_than_base"] == "true", "a looping model stands out"
    assert {"predictions.csv", "base_predictions.csv"} <= _artifacts(run.info.run_id)
    assert logged.params["base_normalizer"] == "EnglishTextNormalizer"
    table = _json_table(run.info.run_id, "eval/slices.json")
    assert {"column", "value", "n_utterances", "wer", "base_wer", "wer_delta"} <= set(table[0])
    assert not any(f.startswith("eval/worst") for f in _artifacts(run.info.run_id))


def test_dataset_rows_get_a_playable_extension():
    flac = b"fLaC\x00\x00\x00\x22" + bytes(30)
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt "
    assert audio_file_name(Example(flac, "x", "test-000012"), flac) == "test-000012.flac"
    assert audio_file_name(Example(wav, "x", "train-000001"), wav) == "train-000001.wav"
    assert audio_file_name(Example("a/b.ogg", "x", "b.ogg"), b"OggS") == "b.ogg"


def test_every_metadata_column_is_kept_for_slices(tmp_path, sample_dir):
    import shutil

    for name in ("a.flac", "b.flac"):
        shutil.copy(next(sample_dir.glob("*.flac")), tmp_path / name)
    write_metadata(tmp_path, [("a.flac", "A", "s1", "20", "f"), ("b.flac", "B", "s2", "", "m")],
                   header=("file_name", "transcription", "speaker", "age", "gender"))
    examples = read_source(tmp_path, DataConfig()).examples
    assert [e.metadata for e in examples] == [
        {"speaker": "s1", "age": "20", "gender": "f"},
        {"speaker": "s2", "age": "", "gender": "m"}]


def test_hugging_face_scalar_and_class_label_columns_are_kept(tmp_path, sample_dir):
    import datasets

    clip = next(sample_dir.glob("*.flac")).read_bytes()
    features = datasets.Features({
        "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
        "text": datasets.Value("string"), "age": datasets.Value("int32"),
        "gender": datasets.ClassLabel(names=["f", "m"]),
        "words": [{"text": datasets.Value("string")}]})
    ds = datasets.Dataset.from_dict({
        "audio": [{"bytes": clip, "path": None}] * 2, "text": ["A", "B"], "age": [20, 31],
        "gender": [1, 0], "words": [[{"text": "a"}], [{"text": "b"}]]}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "hf")
    examples = read_source(tmp_path / "hf", DataConfig(text_column="text")).examples
    assert [e.metadata for e in examples] == [{"age": "20", "gender": "m"},
                                              {"age": "31", "gender": "f"}], \
        "scalar columns as text, class labels by name, nested columns left out"


def test_evaluate_compare_logs_both_reports(tiny_english_path, says_the_path, sample_dir):
    cfg = load_config(None, {"data": {"max_eval_samples": 4},
                             "evaluation": {"batch_size": 4, "max_new_tokens": 6,
                                            "worst_n": 1}})
    report = run_evaluation(str(says_the_path), str(sample_dir), cfg,
                            compare_with=str(tiny_english_path))
    run = mlflow.get_run(report.run_id)
    for prefix in ("", "base_"):
        for name in ("wer_orthographic", "ins_rate", "loop_share", "empty_share"):
            assert f"{prefix}{name}" in run.data.metrics, prefix + name
    # says_the writes "the the the the the the": 3 of its 4 3-grams repeat the first.
    assert run.data.metrics["repeated_ngram_rate"] == pytest.approx(3 / 4)
    assert run.data.metrics["loop_share"] == 0.0, "23 bytes do not compress 2.4 times"
    files = _artifacts(report.run_id)
    assert {"predictions.csv", "base_predictions.csv", "eval/slices.json",
            "eval/slices.png", "eval/predictions.json", "eval/base_predictions.json"} <= files
    assert sum(f.startswith("eval/worst/01_") and f.endswith(".flac") for f in files) == 1
    slices = _json_table(report.run_id, "eval/slices.json")
    assert all(not math.isnan(r["base_wer"]) for r in slices)
    assert {r["column"] for r in slices} >= {"duration"}


# --------------------------------------------------------------------------- token budget


def test_hit_budget_counts_tokens_other_than_end_of_text():
    import torch

    from whisper_exp.generation import hit_budget

    def row(ids, budget):
        return {"sequences": torch.tensor(ids), "budget": torch.tensor(budget)}

    end = {50256}
    assert hit_budget(row([318, 257, 1263, 2933], 4), end), "stopped by the cap"
    assert not hit_budget(row([318, 257, 13, 50256, 50256], 5), end), "ended, then padding"
    # The longest row of a batch comes back without its end-of-text: fewer tokens than budget.
    assert not hit_budget(row([318, 257, 13], 5), end)


@pytest.fixture(scope="module")
def says_nothing_path(tiny_english_path, tmp_path_factory):
    """tiny_english_path made to end every transcript at once: end-of-text wins each step
    after the first (where Whisper suppresses it). Its embedding row is the padding row (all
    zeros), so it gets a fixed random direction first."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_english_path)
    processor = WhisperProcessor.from_pretrained(tiny_english_path)
    end = processor.tokenizer.eos_token_id
    with torch.no_grad():
        embed = model.get_output_embeddings().weight
        direction = torch.randn(embed.shape[1], generator=torch.Generator().manual_seed(0))
        embed[end] = 100 * direction / direction.norm()
        model.model.decoder.layer_norm.weight.zero_()
        model.model.decoder.layer_norm.bias.copy_(embed[end])
    out = tmp_path_factory.mktemp("models") / "says-nothing"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_evaluation_rows_say_which_clips_hit_the_token_budget(says_the_path, says_nothing_path,
                                                              sample_dir):
    from whisper_exp.config import EvaluationConfig
    from whisper_exp.data import load_eval_only
    from whisper_exp.evaluation import evaluate_examples
    from whisper_exp.modeling import load_for_inference

    examples = load_eval_only(sample_dir, DataConfig(max_eval_samples=3)).eval
    cfg = EvaluationConfig(batch_size=2, max_new_tokens=6)
    hits = {}
    for name, path in (("loops", says_the_path), ("ends", says_nothing_path)):
        model, processor = load_for_inference(str(path), torch_device())
        result = evaluate_examples(model, processor, examples, cfg, progress=False)
        hits[name] = [row["budget_hit"] for row in result.rows]
        assert build_report(result, examples).metrics["budget_hit_share"] == \
            (1.0 if name == "loops" else 0.0)
    assert hits == {"loops": [True] * 3, "ends": [False] * 3}


def torch_device():
    import torch

    return torch.device("cpu")


def test_real_tiny_en_budget_hits(tiny_en_path, sample_dir):
    """The rule rests on how transformers returns Whisper's tokens; real weights check it."""
    from whisper_exp.audio import load_audio
    from whisper_exp.generation import transcribe_arrays_with_budget
    from whisper_exp.modeling import load_for_inference

    model, processor = load_for_inference(str(tiny_en_path), torch_device())
    clips = [load_audio(f) for f in sorted(sample_dir.glob("*.flac"))[:2]]
    texts, hits = transcribe_arrays_with_budget(model, processor, clips, progress=False)
    assert all(texts) and hits == [False, False], texts
    texts, hits = transcribe_arrays_with_budget(model, processor, clips, max_new_tokens=3,
                                                progress=False)
    assert hits == [True, True], texts
