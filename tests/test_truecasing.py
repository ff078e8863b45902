"""text_case=truecase in training: base-model transcripts cached by (model, audio), marked rows
re-cased from them, and a training run that logs how many words took the base model's case."""

from types import SimpleNamespace

import mlflow
import torch

import whisper_exp.truecasing as truecasing
from whisper_exp.config import load_config
from whisper_exp.data import DataConfig, DatasetSplit, read_source
from whisper_exp.text_case import apply_text_case
from whisper_exp.training import train


def _split(sample_dir, n=3):
    examples = read_source(sample_dir, DataConfig()).examples[:n]
    apply_text_case(examples, "truecase")
    return DatasetSplit(examples[:-1], examples[-1:], [], [], "test")


def _fake_base(monkeypatch, says):
    """The base model 'transcribes' each clip as ``says(reference)``; returns the decode log."""
    decoded = []

    def evaluate(model, processor, examples, cfg, language=None):
        decoded.append([e.name for e in examples])
        return SimpleNamespace(rows=[{"hypothesis": says(e.text)} for e in examples])

    monkeypatch.setattr(truecasing, "load_for_inference", lambda *a, **k: (object(), object()))
    monkeypatch.setattr(truecasing, "evaluate_examples", evaluate)
    return decoded


def test_marked_rows_take_the_base_models_case_and_the_decode_is_cached(
        sample_dir, tmp_path, monkeypatch):
    decoded = _fake_base(monkeypatch, lambda text: text.upper().title() + " Extra")
    cfg = load_config(None, {"data": {"text_case": "truecase"}, "model": {"name": "base-a"},
                             "training": {"cache_dir": str(tmp_path / "cache")}})
    split = _split(sample_dir)
    first = split.train[0].text
    assert first == "He is a big boy." and split.train[0].recase
    counts = truecasing.recase_split(cfg, split, torch.device("cpu"), None, "english")
    assert split.train[0].text == "He Is A Big Boy.", "every word took the base's title case"
    assert not any(e.recase for e in (*split.train, *split.eval))
    words = sum(len(e.text.split()) for e in (*split.train, *split.eval))
    assert counts["data.truecase_rows"] == 3 and counts["data.truecase_decoded"] == 3
    assert counts["data.truecase_words_from_base"] == words == counts["data.truecase_words"]
    assert "took the base model's case" in split.notices[-1]
    assert len(decoded) == 1 and len(decoded[0]) == 3

    again = _split(sample_dir)
    counts = truecasing.recase_split(cfg, again, torch.device("cpu"), None, "english")
    assert counts["data.truecase_decoded"] == 0 and len(decoded) == 1, "read from the cache"
    assert again.train[0].text == "He Is A Big Boy."
    other = load_config(None, {"data": {"text_case": "truecase"}, "model": {"name": "base-b"},
                               "training": {"cache_dir": str(tmp_path / "cache")}})
    truecasing.recase_split(other, _split(sample_dir), torch.device("cpu"), None, "english")
    assert len(decoded) == 2, "another base model decodes again"


def test_other_text_case_modes_do_not_decode(sample_dir, tmp_path, monkeypatch):
    decoded = _fake_base(monkeypatch, str)
    cfg = load_config(None, {"data": {"text_case": "auto"},
                             "training": {"cache_dir": str(tmp_path)}})
    assert truecasing.recase_split(cfg, _split(sample_dir), torch.device("cpu"), None,
                                   "english") == {}
    assert decoded == []


def test_training_run_with_truecase_logs_the_words_recased(tiny_english_path, sample_dir,
                                                           tmp_path):
    """The real base decode (a tiny random model) on every train and eval clip."""
    cfg = load_config(None, {
        "model": {"name": str(tiny_english_path)},
        "data": {"train": str(sample_dir), "max_eval_samples": 2, "max_train_samples": 2,
                 "text_case": "truecase"},
        "training": {"max_steps": 1, "batch_size": 2, "output_dir": str(tmp_path / "out"),
                     "cache_dir": str(tmp_path / "cache")},
        "evaluation": {"batch_size": 4, "max_new_tokens": 4},
        "tracking": {"experiment_name": "test"},
    })
    run = mlflow.get_run(train(cfg).run_id)
    metrics = run.data.metrics
    # only the rows used (the max_*_samples subsets: 2 train + 2 eval) are decoded
    assert metrics["data.truecase_rows"] == metrics["data.truecase_decoded"] == 4
    assert "data.truecase_words_from_base" in metrics
    assert list((tmp_path / "cache" / "base-transcripts").glob("*.json"))
