"""The long-form check (issue 11): joining utterances into recordings, timestamp validity on
hand-made segments, scoring on hand-made transcripts, and the check logged by a real `evaluate`
run of the tiny random model on the shipped sample."""

import math

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from whisper_exp import long_form
from whisper_exp.audio import SAMPLE_RATE
from whisper_exp.config import ConfigError, EvaluationConfig, load_config
from whisper_exp.data import load_eval_only
from whisper_exp.decoding import Decoded, Segment
from whisper_exp.evaluation import evaluate_examples, run_evaluation
from whisper_exp.long_form import (
    check_timestamps,
    decision,
    join_recordings,
    plan_recordings,
    run_check,
    score_recordings,
)
from whisper_exp.metrics import english_normalizer
from whisper_exp.modeling import load_for_inference

# --------------------------------------------------------------------------- joining


def test_recordings_group_each_speaker_and_pool_the_short_ones():
    # a: 10 clips of 10 s, b: 2 of 10 s (20.5 s joined: one window, not long-form), c: 3 of
    # 10 s (31 s), d: 2 of 10 s; interleaved in the eval set.
    speakers = ["a", "b", "a", "c", "d", "a", "c", "a", "b", "c", "d"] + ["a"] * 6
    durations = [10.0] * len(speakers)
    runs, left_out = plan_recordings(durations, speakers, minutes=1, gap_s=0.5)
    a = [i for i, s in enumerate(speakers) if s == "a"]
    c = [i for i, s in enumerate(speakers) if s == "c"]
    pooled = [i for i, s in enumerate(speakers) if s in "bd"]
    # a: 6 clips reach 62.5 s and close a recording; the other 4 (41.5 s) make their own.
    assert runs == [a[:6], a[6:], c, sorted(pooled, key=lambda i: (speakers[i], i))]
    assert left_out == []
    # A short last run joins the one before: 7 clips of a = 62.5 s + a 10 s tail.
    runs, _ = plan_recordings([10.0] * 7, ["a"] * 7, minutes=1, gap_s=0.5)
    assert runs == [list(range(7))]
    # Too little audio even pooled: left out. A cap keeps the first recordings.
    assert plan_recordings([10.0, 10.0], ["a", "b"], minutes=1, gap_s=0.5) == ([], [0, 1])
    runs, left_out = plan_recordings(durations, speakers, minutes=1, gap_s=0.5,
                                     max_recordings=2)
    assert runs == [a[:6], a[6:]] and left_out == sorted(c + pooled)
    # No speaker column: consecutive clips.
    runs, _ = plan_recordings([20.0] * 5, None, minutes=0.6, gap_s=1.0)
    assert runs == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="longer than one 30 s window"):
        plan_recordings(durations, speakers, minutes=0.5, gap_s=0.5)


def test_joined_audio_has_the_gaps_and_the_references_in_order():
    clips = [np.full(SAMPLE_RATE * seconds, value, dtype=np.float32)
             for seconds, value in ((12, 0.1), (12, 0.2), (12, 0.3), (5, 0.4))]
    texts = ["One.", "two", "Three!", "four"]
    recordings, left_out = join_recordings(clips, texts, ["s1", "s1", None, "s2"],
                                           minutes=0.55, gap_s=0.25)
    # s1's 24.25 s, the speakerless 12 s and s2's 5 s fit one window each: pooled in order.
    assert left_out == []
    (recording,) = recordings
    assert recording.indices == [0, 1, 2, 3]
    assert recording.reference == "One. two Three! four"
    assert recording.speakers == ["s1", "s2"]
    assert recording.duration_s == pytest.approx(12 + 12 + 12 + 5 + 3 * 0.25)
    assert recording.starts_s == pytest.approx([0, 12.25, 24.5, 36.75])
    gap = recording.audio[12 * SAMPLE_RATE:int(12.25 * SAMPLE_RATE)]
    assert len(gap) == SAMPLE_RATE // 4 and not gap.any()
    assert recording.audio[int(36.75 * SAMPLE_RATE)] == pytest.approx(0.4)
    assert recording.audio[int(36.75 * SAMPLE_RATE) - 1] == 0.0
    with pytest.raises(ValueError, match="one of each per utterance"):
        join_recordings(clips, texts[:2], minutes=1, gap_s=0.5)


# --------------------------------------------------------------------------- timestamps


def _segments(*spans):
    return [Segment(start, end, f"text {n}") for n, (start, end) in enumerate(spans)]


def test_increasing_segments_inside_the_audio_are_valid():
    check = check_timestamps(_segments((0.0, 4.2), (4.2, 9.0), (9.5, 60.0)), duration_s=60.0)
    assert (check.segments, check.valid, check.problems) == (3, 3, [])


def test_overlapping_backwards_outside_and_empty_segments_are_not():
    check = check_timestamps(
        _segments((0.0, 5.0), (3.0, 8.0),      # overlaps the first
                  (8.0, 8.0),                  # zero length
                  (9.0, 12.0), (2.0, 4.0),     # goes back in time
                  (12.0, 31.0),                # ends past the audio
                  (30.0, 30.0)),               # clamped to the end by transcribe
        duration_s=30.0)
    assert check.segments == 7 and check.valid == 2
    assert check.problems == [
        "segment 2 (3.00-8.00 s) starts before the previous segment ends (5.00 s)",
        "segment 3 (8.00-8.00 s) does not end after it starts",
        "segment 5 (2.00-4.00 s) starts before the previous segment ends (12.00 s)",
        "segment 6 (12.00-31.00 s) lies outside the 30.00 s of audio",
        "segment 7 (30.00-30.00 s) lies outside the 30.00 s of audio",
    ]


def test_auto_turns_the_check_off_under_60_s():
    assert decision("auto", 59.9)[0] is False
    assert "59 s of audio, under 60 s" in decision("auto", 59.4)[1]
    assert decision("auto", 60.0) == (True, "")
    assert decision("on", 1.0) == (True, "")
    assert decision("off", 3600.0)[0] is False


def test_config_takes_on_and_off_as_yaml_reads_them():
    assert load_config(None, ["evaluation.long_form=on"]).evaluation.long_form == "on"
    assert load_config(None, {"evaluation": {"long_form": False}}).evaluation.long_form == "off"
    assert EvaluationConfig().long_form == "auto"
    with pytest.raises(ConfigError, match="evaluation.long_form"):
        load_config(None, ["evaluation.long_form=sometimes"])


# --------------------------------------------------------------------------- scoring


def _two_recordings():
    clips = [np.zeros(SAMPLE_RATE * 20, dtype=np.float32) for _ in range(4)]
    references = ["the cat sat", "on the mat", "a dog ran", "far away"]
    return join_recordings(clips, references, ["a", "a", "b", "b"], minutes=0.6, gap_s=0.5)[0]


def test_scores_on_hand_made_transcripts():
    recordings = _two_recordings()
    short = ["the cat sat", "on the mat", "a dog ran", "far away"]  # perfect one by one
    looped = "far away " * 20
    decoded = [
        # a: the window edge drops "on" and the segments are fine
        Decoded("the cat sat the mat", _segments((0.0, 19.0), (20.5, 40.0))),
        # b: loops on the second window; its last segment overlaps the first
        Decoded("a dog ran " + looped, [Segment(0.0, 20.0, "a dog ran"),
                                        Segment(15.0, 40.0, looped)]),
    ]
    result = score_recordings(recordings, decoded, short, english_normalizer())
    values = result.metrics
    # 11 reference words; a: 1 deletion, b: 38 insertions ("far away" 20x for 2 words).
    assert values["long_form/wer"] == pytest.approx((1 + 38) / 11)
    assert values["long_form/short_form_wer"] == 0.0
    assert values["long_form/wer_increase"] == pytest.approx(39 / 11)
    assert values["long_form/del_rate"] == pytest.approx(1 / 11)
    assert values["long_form/ins_rate"] == pytest.approx(38 / 11)
    assert values["long_form/timestamp_valid_share"] == 3 / 4
    assert values["long_form/loop_share"] == 1 / 4, "the looping segment only"
    assert values["long_form/repeated_ngram_rate"] > 0.5
    assert values["long_form/short_form_repeated_ngram_rate"] == 0.0
    assert values["long_form/recordings"] == 2 and values["long_form/segments"] == 4
    first, second = result.rows
    assert (first["speaker"], first["n_utterances"], first["wer"]) == ("a", 2, 1 / 6)
    assert first["timestamp_problems"] == ""
    assert second["timestamp_problems"].startswith("segment 2 (15.00-40.00 s) starts before")


def test_run_check_decodes_the_recordings_with_timestamps():
    clips = [np.zeros(SAMPLE_RATE * 20, dtype=np.float32) for _ in range(4)]
    references = ["the cat sat", "on the mat", "a dog ran", "far away"]
    calls = []

    def transcribe(audios, options):
        calls.append((len(audios), [len(a) / SAMPLE_RATE for a in audios], options))
        return [Decoded("the cat sat on the mat", _segments((0.0, 40.0)))] * len(audios)

    cfg = EvaluationConfig(long_form_minutes=0.6, long_form_recordings=1, max_new_tokens=9)
    result = run_check(None, None, clips, references, ["a", "a", "b", "b"], references,
                       english_normalizer(), cfg, transcribe=transcribe)
    ((count, seconds, options),) = calls
    assert count == 1 and seconds == [40.5], "one recording: the cap"
    assert options.return_timestamps and options.max_new_tokens == 9
    assert result.metrics["long_form/wer"] == 0.0
    assert result.notes == ["long-form check: 2 of 4 utterances not joined (evaluation."
                            "long_form_recordings=1 recordings of about 0.6 min, or too little "
                            "audio of their own)"]
    off = run_check(None, None, clips, references, [None] * 4, references,
                    english_normalizer(), EvaluationConfig(long_form="off"),
                    transcribe=transcribe)
    assert off.metrics == {} and off.notes == ["long-form check off (evaluation.long_form=off)"]
    assert len(calls) == 1


# --------------------------------------------------------------------------- end to end


def test_evaluate_logs_the_long_form_check_of_both_models(tiny_english_path, says_the_path,
                                                          sample_dir, monkeypatch):
    """The sample (16 clips, 55 s) is under 60 s: forced on, every clip joins one recording."""
    # A random model fails every fallback threshold: 6 decodes per window. Greedy windows keep
    # the test fast; the decoding is the same code either way.
    monkeypatch.setitem(long_form.DECODING, "temperature_fallback", False)
    cfg = load_config(None, {"evaluation": {"batch_size": 8, "max_new_tokens": 6,
                                            "long_form": "on", "long_form_minutes": 0.6,
                                            "worst_n": 0}})
    outcome = run_evaluation(str(says_the_path), str(sample_dir), cfg,
                             compare_with=str(tiny_english_path))
    metrics = mlflow.get_run(outcome.run_id).data.metrics
    for prefix in ("", "base_"):
        assert metrics[f"{prefix}long_form/recordings"] >= 1
        assert metrics[f"{prefix}long_form/audio_s"] > 55
        assert 0 <= metrics[f"{prefix}long_form/timestamp_valid_share"] <= 1
        for name in ("wer", "short_form_wer", "wer_increase", "loop_share", "ins_rate"):
            assert f"{prefix}long_form/{name}" in metrics, name
    assert metrics["long_form/wer_delta"] == pytest.approx(
        metrics["long_form/wer"] - metrics["base_long_form/wer"])
    artifacts = {a.path for a in MlflowClient().list_artifacts(outcome.run_id, "eval")}
    assert {"eval/long_form.json", "eval/base_long_form.json"} <= artifacts
    tuned = outcome.results[""].long_form
    assert sum(row["n_utterances"] for row in tuned.rows) == 16
    # says_the says "the the the ..." whatever it hears: the table holds it, per recording.
    assert all(set(row["hypothesis"].split()) <= {"the"} for row in tuned.rows)


def test_auto_leaves_a_short_eval_set_alone_and_says_so(tiny_english_path, sample_dir):
    model, processor = load_for_inference(str(tiny_english_path))
    examples = load_eval_only(sample_dir, load_config(None).data, language=None).eval[:4]
    result = evaluate_examples(model, processor, examples,
                               EvaluationConfig(batch_size=4, max_new_tokens=4), progress=False)
    assert result.long_form.metrics == {}
    assert result.long_form.notes[0].startswith("long-form check skipped: the eval set has 11 s")
    assert not math.isnan(result.scores.wer)
