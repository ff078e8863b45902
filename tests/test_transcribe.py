"""Transcription of files and folders: batched short clips, long-form recordings, a corrupt file
among good ones, output formats and the CLI (with --compare)."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.cli import main
from whisper_exp.decoding import DecodeOptions, window_max_new_tokens
from whisper_exp.metrics import english_normalizer, score
from whisper_exp.transcribe import (
    Segment,
    TranscribeError,
    Transcriber,
    collect_audio_files,
    transcribe_paths,
)
from whisper_exp.transcript_formats import (
    Transcript,
    format_json,
    format_srt,
    format_vtt,
    write_transcripts,
)

LONG_FORM_TARGET_S = 60.0
GAP_S = 0.5


def _dev_rows(dev_dir, limit=None):
    rows = list(csv.DictReader((dev_dir / "metadata.csv").open(encoding="utf-8")))
    return rows[:limit] if limit else rows


@pytest.fixture(scope="module")
def long_form_case(tmp_path_factory, dev_dir):
    """A folder with consecutive dev utterances, one recording made of all of them (with short
    pauses, over a minute), and a corrupt file."""
    folder = tmp_path_factory.mktemp("long_form")
    rows, pieces, total = [], [], 0.0
    for row in _dev_rows(dev_dir):
        audio = load_audio(dev_dir / row["file_name"])
        shutil.copy(dev_dir / row["file_name"], folder / row["file_name"])
        rows.append(row)
        pieces += [audio, np.zeros(int(GAP_S * SAMPLE_RATE), dtype=np.float32)]
        total += len(audio) / SAMPLE_RATE + GAP_S
        if total >= LONG_FORM_TARGET_S:
            break
    sf.write(folder / "recording.wav", np.concatenate(pieces), SAMPLE_RATE)
    (folder / "broken.flac").write_bytes(b"fLaC this is not really flac")
    return folder, rows, total


@pytest.fixture(scope="module")
def long_form_result(long_form_case, tiny_en_path):
    folder, rows, _ = long_form_case
    transcripts = transcribe_paths([folder], str(tiny_en_path), batch_size=8,
                                   return_timestamps=True, progress=False)
    return {t.file.rsplit("/", 1)[-1]: t for t in transcripts}


def test_long_recording_scores_like_its_utterances(long_form_case, long_form_result,
                                                    tiny_en_path):
    """Sequential long-form decoding must not drop or garble words at 30 s window edges: its WER
    over the whole recording stays close to the WER of the same utterances one by one."""
    _, rows, duration = long_form_case
    normalize = english_normalizer(json.loads((tiny_en_path / "normalizer.json").read_text()))
    references = [row["transcription"] for row in rows]
    per_utterance = score(references, [long_form_result[r["file_name"]].text for r in rows],
                          normalize)
    recording = long_form_result["recording.wav"]
    whole = score([" ".join(references)], [recording.text], normalize)
    assert per_utterance.wer < 0.5, "stock tiny.en understands these clips"
    assert whole.wer <= per_utterance.wer + 0.10, (whole.wer, per_utterance.wer)
    words = len(normalize(" ".join(references)).split())
    assert 0.8 * words <= len(normalize(recording.text).split()) <= 1.25 * words
    assert recording.duration == pytest.approx(duration, abs=0.01)
    starts = [s.start for s in recording.segments]
    assert len(recording.segments) >= 5 and starts == sorted(starts)
    assert all(0 <= s.start <= s.end <= recording.duration for s in recording.segments)
    assert recording.segments[-1].end > duration - 10, "timestamps span the whole recording"
    assert max(s.end for s in recording.segments) > 30, "more than one 30 s window"


def test_corrupt_file_is_reported_and_the_rest_transcribed(long_form_case, long_form_result):
    _, rows, _ = long_form_case
    broken = long_form_result["broken.flac"]
    assert not broken.ok and "broken.flac" in broken.file
    assert "cannot read audio header" in broken.error
    assert broken.text == "" and broken.segments == []
    assert all(long_form_result[r["file_name"]].ok and long_form_result[r["file_name"]].text
               for r in rows)
    assert len(long_form_result) == len(rows) + 2


def test_short_clips_get_timestamps_from_zero(long_form_case, long_form_result):
    """transformers 5's ``decode(output_offsets=True)`` shifts Whisper timestamps by 2.12 s;
    ours start where the speech starts (clips are trimmed, so near 0)."""
    _, rows, _ = long_form_case
    for row in rows[:4]:
        transcript = long_form_result[row["file_name"]]
        assert transcript.segments, row["file_name"]
        assert transcript.segments[0].start < 1.0
        assert transcript.segments[-1].end <= transcript.duration


def test_timestamp_tokens_become_segments(tiny_english_path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_english_path)
    processor = WhisperProcessor.from_pretrained(tiny_english_path)
    transcriber = Transcriber(model, processor)
    tok = processor.tokenizer
    first = model.generation_config.no_timestamps_token_id + 1

    def stamp(seconds):
        return first + round(seconds / 0.02)

    ids = [tok.convert_tokens_to_ids("<|startoftranscript|>"), stamp(0.0),
           *tok(" Hello there.", add_special_tokens=False).input_ids, stamp(1.5), stamp(1.5),
           *tok(" General Kenobi.", add_special_tokens=False).input_ids, stamp(3.2),
           *tok(" Cut", add_special_tokens=False).input_ids, tok.eos_token_id]
    segments = transcriber._segments(ids, duration=4.0)
    assert segments == [Segment(0.0, 1.5, "Hello there."), Segment(1.5, 3.2, "General Kenobi."),
                        Segment(3.2, 4.0, "Cut")]


def _sample_transcripts(tmp_path):
    audio = tmp_path / "a" / "talk.wav"
    audio.parent.mkdir()
    return [
        Transcript(str(audio), "Hello there. General Kenobi.",
                   [Segment(0.0, 1.5, "Hello there."), Segment(61.25, 3723.5, "General Kenobi.")],
                   3724.0),
        Transcript(str(tmp_path / "b" / "short.flac"), "No timestamps.", [], 2.5),
        Transcript(str(tmp_path / "bad.flac"), error="cannot read audio header"),
    ]


def test_srt_vtt_and_json_parse(tmp_path):
    long, short, _ = _sample_transcripts(tmp_path)
    srt = format_srt(long)
    blocks = [b.splitlines() for b in srt.strip().split("\n\n")]
    assert [b[0] for b in blocks] == ["1", "2"]
    assert blocks[1][1] == "00:01:01,250 --> 01:02:03,500" and blocks[1][2] == "General Kenobi."
    stamp = r"\d\d:\d\d:\d\d[,.]\d{3}"
    assert all(re.fullmatch(f"{stamp} --> {stamp}", b[1]) for b in blocks)
    vtt = format_vtt(short)
    assert vtt.startswith("WEBVTT\n\n")
    assert "00:00:00.000 --> 00:00:02.500\nNo timestamps.\n" in vtt, "one cue without timestamps"
    data = json.loads(format_json(long))
    assert data["text"] == long.text and data["duration"] == 3724.0 and data["error"] is None
    assert data["segments"][1] == {"start": 61.25, "end": 3723.5, "text": "General Kenobi."}


def test_writers_mirror_folders_and_skip_failed_files(tmp_path):
    transcripts = _sample_transcripts(tmp_path)
    written = write_transcripts(transcripts, "srt", tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == \
        ["a/talk.srt", "b/short.srt"]
    beside = write_transcripts(transcripts, "txt")
    assert beside[0] == tmp_path / "a" / "talk.txt"
    assert beside[0].read_text() == "Hello there. General Kenobi.\n"
    with pytest.raises(TranscribeError, match="unknown format 'doc'"):
        write_transcripts(transcripts, "doc")


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(TranscribeError, match="nope.wav: no such file or folder"):
        collect_audio_files([tmp_path / "nope.wav"])
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "x.wav", np.zeros(1600, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(TranscribeError, match="add --recursive"):
        collect_audio_files([tmp_path])
    assert collect_audio_files([tmp_path, tmp_path / "sub" / "x.wav"], recursive=True) == \
        [(tmp_path / "sub" / "x.wav").resolve()]


def test_english_only_model_refuses_other_languages(tiny_english_path):
    from whisper_exp.transcribe import DecodeOptions

    transcriber = Transcriber.load(str(tiny_english_path))
    transcriber.check_options(DecodeOptions(language="en"))
    with pytest.raises(TranscribeError, match="English-only"):
        transcriber.check_options(DecodeOptions(language="german"))
    with pytest.raises(TranscribeError, match="max_new_tokens must be between 1 and 444"):
        transcriber.check_options(DecodeOptions(max_new_tokens=1000))


def test_cli_compare_writes_json_and_flags_the_broken_file(tmp_path, dev_dir, tiny_en_path):
    rows = _dev_rows(dev_dir, 2)
    folder = tmp_path / "clips"
    folder.mkdir()
    for row in rows:
        shutil.copy(dev_dir / row["file_name"], folder / row["file_name"])
        (folder / row["file_name"]).with_suffix(".txt").write_text(row["transcription"])
    (folder / "broken.wav").write_bytes(b"RIFF....WAVE")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "transcribe", str(folder), "--model", str(tiny_en_path), "--compare", str(tiny_en_path),
        "--format", "json", "--output-dir", str(out)])
    assert result.exit_code == 1, result.output
    assert "reference: " + rows[0]["transcription"] in result.output
    assert "WER over 2 file(s) with references: base" in result.output
    assert "broken.wav" in result.stderr and "1 of 3 file(s) failed" in result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(r["file_name"].replace(".flac", ".json") for r in rows)
    data = json.loads((out / written[0]).read_text())
    assert data["text"] and data["segments"] and data["duration"] > 0


def test_cli_unknown_model_is_one_clear_line(tmp_path, sample_dir):
    result = CliRunner().invoke(main, ["transcribe", str(sample_dir), "--model",
                                       str(tmp_path / "no-such-model")])
    assert result.exit_code == 2
    assert "error: cannot load model" in result.stderr and "no-such-model" in result.stderr


def test_token_cap_scales_with_clip_length():
    from whisper_exp.decoding import MIN_NEW_TOKENS, default_max_new_tokens

    assert default_max_new_tokens(0.0) == MIN_NEW_TOKENS
    assert default_max_new_tokens(3.0) < default_max_new_tokens(10.0) < default_max_new_tokens(30)
    assert default_max_new_tokens(30.0) <= 444, "the prompt needs its 4 of 448 positions"
    assert default_max_new_tokens(3600.0) == 444


def test_long_form_window_budget_leaves_room_for_previous_text():
    """With previous-text conditioning transformers (and faster-whisper) prepend up to
    448 // 2 - 1 = 223 earlier tokens plus a start token and the prompt, and raise when the
    window's budget no longer fits: found by benchmarks/long_form.py on 3-minute recordings
    (148 + 324 > 448)."""
    conditioned = window_max_new_tokens(DecodeOptions(condition_on_prev_tokens=True))
    assert conditioned + (448 // 2 - 1) + 1 + 3 <= 448
    assert conditioned == 220
    assert window_max_new_tokens(DecodeOptions(condition_on_prev_tokens=False)) == 324
    assert window_max_new_tokens(DecodeOptions(max_new_tokens=50)) == 50
    assert window_max_new_tokens(DecodeOptions(max_new_tokens=400)) == 220
    assert window_max_new_tokens(DecodeOptions(max_new_tokens=400,
                                               condition_on_prev_tokens=False)) == 400


def test_inference_modules_do_not_import_evaluation_and_formats_need_no_torch():
    """Module boundaries: transcription shares batched decoding with evaluation through
    ``whisper_exp.generation`` instead of importing the evaluate entry point (and with it MLflow
    run logging and dataset loading), and writing transcripts does not load torch."""
    import subprocess
    import sys

    probe = ("import sys, whisper_exp.transcribe, whisper_exp.comparison; "
             "print('whisper_exp.evaluation' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    probe = "import sys, whisper_exp.transcript_formats; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# --------------------------------------------------------------------------- language defaults


def _with_recorded_language(model_dir, tmp_path, language):
    """A copy of a model folder whose whisper_exp.json says it was trained for ``language``
    (as ``modeling.save_trained`` writes it)."""
    copy = shutil.copytree(model_dir, tmp_path / f"trained-{language}")
    (copy / "whisper_exp.json").write_text(json.dumps({"language": language,
                                                        "task": "transcribe"}))
    return copy


def _spy_decoder_prompts(model, monkeypatch):
    """The decoder prompt (start, language, task, ...) of every row, per ``generate`` call."""
    prompts = []
    original = model._retrieve_init_tokens

    def spy(*args, **kwargs):
        tokens = original(*args, **kwargs)
        prompts.append(tokens.tolist())
        return tokens

    monkeypatch.setattr(model, "_retrieve_init_tokens", spy)
    return prompts


def _language_ids(transcriber):
    return {code.strip("<|>"): token_id
            for code, token_id in transcriber.model.generation_config.lang_to_id.items()}


CLIPS = [np.zeros(SAMPLE_RATE // 2, dtype=np.float32),
         (0.1 * np.sin(np.arange(SAMPLE_RATE) / 5)).astype(np.float32)]


def test_multilingual_model_without_a_recorded_language_detects_it(tiny_multilingual_path,
                                                                   monkeypatch):
    """The CLI help says --language defaults to the model's own: a checkpoint that records none
    must not be forced to English, Whisper detects the language per clip."""
    transcriber = Transcriber.load(str(tiny_multilingual_path))
    assert transcriber.model.generation_config.language is None
    assert transcriber.default_language is None
    detections = []
    original_detect = transcriber.model.detect_language

    def detect(*args, **kwargs):
        detections.append(original_detect(*args, **kwargs))
        return detections[-1]

    monkeypatch.setattr(transcriber.model, "detect_language", detect)
    prompts = _spy_decoder_prompts(transcriber.model, monkeypatch)
    ids = _language_ids(transcriber)
    transcriber.transcribe_audio(CLIPS, DecodeOptions(max_new_tokens=3))
    assert len(detections) == 1, "one detection pass for the batch"
    assert [row[1] for row in prompts[0]] == detections[0].tolist()
    assert all(row[1] in ids.values() for row in prompts[0])
    transcriber.transcribe_audio(CLIPS, DecodeOptions(max_new_tokens=3, language="german"))
    assert len(detections) == 1, "a requested language is forced, not detected"
    assert [row[1] for row in prompts[1]] == [ids["de"], ids["de"]]


def test_a_model_trained_for_german_decodes_german_unless_told_otherwise(
        tiny_multilingual_path, tmp_path, monkeypatch):
    from whisper_exp.modeling import load_for_inference

    german = _with_recorded_language(tiny_multilingual_path, tmp_path, "german")
    transcriber = Transcriber.load(str(german))
    assert transcriber.default_language == "german"
    prompts = _spy_decoder_prompts(transcriber.model, monkeypatch)
    ids = _language_ids(transcriber)
    recording = np.zeros(int(31 * SAMPLE_RATE), dtype=np.float32)  # long-form path too
    quick = DecodeOptions(max_new_tokens=3, temperature_fallback=False)
    transcriber.transcribe_audio([CLIPS[1], recording], quick)
    transcriber.transcribe_audio([CLIPS[1]], DecodeOptions(max_new_tokens=3, language="en"))
    assert [[row[1] for row in call] for call in prompts] == [[ids["de"]], [ids["de"]],
                                                             [ids["en"]]]
    # An explicit language at load time overrides the recorded one too (evaluate's option).
    model, _ = load_for_inference(str(german), language="english")
    assert model.generation_config.language == "english"
