import numpy as np
import pytest
import soundfile as sf
from conftest import copy_sample, write_metadata, write_tone

from whisper_exp.config import DataConfig
from whisper_exp.data import (
    DataError,
    load_eval_only,
    load_splits,
    prepare_folder,
    read_source,
    split_examples,
    write_metadata_from_txt,
)
from whisper_exp.text_case import apply_text_case, is_all_caps


def _folder(tmp_path, n=4, speakers=None):
    rows = []
    for i in range(n):
        write_tone(tmp_path / f"c{i}.wav", seconds=1.0)
        row = (f"c{i}.wav", f"Clip number {i}.")
        rows.append(row + ((speakers[i],) if speakers else ()))
    header = ("file_name", "transcription") + (("speaker",) if speakers else ())
    write_metadata(tmp_path, rows, header)
    return tmp_path


def test_metadata_csv_with_extra_columns(sample_dir):
    loaded = read_source(sample_dir, DataConfig())
    assert len(loaded.examples) == 16
    first = loaded.examples[0]
    assert first.speaker == "0135" and first.text == "HE IS A BIG BOY"
    assert "line 2" in first.where


def test_txt_transcripts_generate_metadata_never_overwrite(tmp_path):
    for i in range(3):
        write_tone(tmp_path / f"u{i}.flac")
        (tmp_path / f"u{i}.txt").write_text(f"  hello   world {i}\n")
    write_tone(tmp_path / "orphan.wav")
    loaded = read_source(tmp_path, DataConfig())
    assert [e.text for e in loaded.examples] == [f"hello world {i}" for i in range(3)]
    assert any("generated" in n for n in loaded.notices)
    before = (tmp_path / "metadata.csv").read_bytes()
    with pytest.raises(DataError, match="never overwritten"):
        write_metadata_from_txt(tmp_path)
    assert (tmp_path / "metadata.csv").read_bytes() == before


def test_every_bad_row_is_reported_with_file_and_line(tmp_path):
    write_tone(tmp_path / "ok.wav")
    write_tone(tmp_path / "long.wav", seconds=31.0, rate=8_000)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16_000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....garbage")
    write_tone(tmp_path / "silent_text.wav")
    write_metadata(tmp_path, [
        ("ok.wav", "Fine."),
        ("missing.wav", "Where am I?"),
        ("long.wav", "Too long."),
        ("empty.wav", "Nothing."),
        ("broken.wav", "Broken."),
        ("silent_text.wav", "   "),
    ])
    cfg = DataConfig(train=str(tmp_path), eval=str(tmp_path))
    with pytest.raises(DataError) as err:
        load_splits(cfg, seed=0)
    message = str(err.value)
    assert "nothing was trained" in message
    for expected in ("line 3: missing.wav: audio file not found",
                     "line 4: long.wav: audio is 31.0 s, over the 30 s",
                     "line 5: empty.wav: audio is empty",
                     "line 6: broken.wav: unreadable audio",
                     "line 7: silent_text.wav: transcript is empty"):
        assert expected in message
    assert "ok.wav" not in message


def test_label_longer_than_decoder_allows(tmp_path):
    _folder(tmp_path, n=2)
    cfg = DataConfig(train=str(tmp_path), eval=str(tmp_path))
    with pytest.raises(DataError, match="over the decoder's 2-token limit"):
        load_splits(cfg, seed=0, count_label_tokens=lambda t: len(t.split()),
                    max_label_tokens=2)


def test_skip_mode_drops_and_reports(tmp_path):
    _folder(tmp_path, n=4)
    with (tmp_path / "metadata.csv").open("a") as handle:
        handle.write("gone.wav,Missing file.\n")
    cfg = DataConfig(train=str(tmp_path), eval_split=0.25, on_invalid="skip")
    split = load_splits(cfg, seed=0)
    assert len(split.train) + len(split.eval) == 4
    assert [p.file for p in split.skipped] == ["gone.wav"]


def test_non_utf8_csv_names_the_line(tmp_path):
    write_tone(tmp_path / "a.wav")
    write_metadata(tmp_path, [("a.wav", "plain"), ("a.wav", "caf\u00e9")], encoding="latin-1")
    with pytest.raises(DataError, match=r"metadata.csv line 3: not valid UTF-8"):
        read_source(tmp_path, DataConfig())


def test_missing_columns(tmp_path):
    write_metadata(tmp_path, [("a.wav", "x")], header=("path", "text"))
    with pytest.raises(DataError, match=r"missing column\(s\) \['file_name', 'transcription'\]"):
        read_source(tmp_path, DataConfig())


def test_folder_without_transcripts(tmp_path):
    write_tone(tmp_path / "a.wav")
    with pytest.raises(DataError, match="no metadata.csv and no .txt"):
        read_source(tmp_path, DataConfig())


def test_speaker_disjoint_seeded_split(tmp_path):
    speakers = ["s1", "s1", "s2", "s2", "s3", "s3", "s4", "s4", "s5", "s5"]
    _folder(tmp_path, n=10, speakers=speakers)
    examples = read_source(tmp_path, DataConfig()).examples
    train, evals, method = split_examples(examples, 0.2, seed=1)
    assert method.startswith("speaker-disjoint")
    assert not {e.speaker for e in train} & {e.speaker for e in evals}
    assert len(evals) == 2
    again = split_examples(examples, 0.2, seed=1)
    assert [e.name for e in again[1]] == [e.name for e in evals]
    other = [split_examples(examples, 0.2, seed=s)[1][0].speaker for s in range(8)]
    assert len(set(other)) > 1, "different seeds pick different speakers"


def test_random_split_without_speakers(tmp_path):
    _folder(tmp_path, n=10)
    train, evals, method = split_examples(read_source(tmp_path, DataConfig()).examples, 0.3, 0)
    assert (len(train), len(evals), method) == (7, 3, "random utterances")


def test_split_rows_are_loggable(sample_dir):
    split = load_splits(DataConfig(train=str(sample_dir)), seed=0)
    rows = split.split_rows()
    assert {r["split"] for r in rows} == {"train", "eval"} and len(rows) == 16


def test_text_case_modes(sample_dir):
    def fresh():
        return read_source(sample_dir, DataConfig()).examples

    examples = fresh()
    assert all(is_all_caps(e.text) for e in examples)
    changed, notice = apply_text_case(examples, "auto")
    assert changed == 16 and "sentence-cased" in notice
    assert examples[0].text == "He is a big boy."
    examples = fresh()
    assert apply_text_case(examples, "keep") == (0, None)
    assert examples[0].text == "HE IS A BIG BOY"
    examples = fresh()
    apply_text_case(examples, "lower")
    assert examples[0].text == "he is a big boy"


def test_auto_leaves_mixed_case_corpora_alone(tmp_path):
    _folder(tmp_path, n=3)
    examples = read_source(tmp_path, DataConfig()).examples
    assert apply_text_case(examples, "auto") == (0, None)


def test_hugging_face_dataset_with_audio_feature(tmp_path):
    import datasets

    paths = [str(write_tone(tmp_path / f"h{i}.wav")) for i in range(4)]
    ds = datasets.Dataset.from_dict({"audio": paths, "sentence": [f"Line {i}." for i in
                                                                   range(4)]})
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(tmp_path / "hf")
    cfg = DataConfig(train=str(tmp_path / "hf"), eval=str(tmp_path / "hf"),
                     text_column="sentence")
    split = load_splits(cfg, seed=0)
    assert len(split.train) == 4 and len(split.eval) == 2
    assert split.train[0].text == "Line 0."
    with pytest.raises(DataError, match="no column 'transcription'"):
        load_eval_only(tmp_path / "hf", DataConfig())


def test_prepare_folder_reports_problems(tmp_path, tiny_en_path):
    copy_sample(tmp_path, n=3)
    with (tmp_path / "metadata.csv").open("a") as handle:
        handle.write("nope.flac,HELLO,0000,1,f,1.0\n")
    report = prepare_folder(tmp_path, model=str(tiny_en_path))
    assert len(report.examples) == 3
    assert [p.file for p in report.problems] == ["nope.flac"]


def test_load_splits_passes_the_language_on(tmp_path):
    for i in range(4):
        write_tone(tmp_path / f"c{i}.wav", seconds=1.0)
    write_metadata(tmp_path, [(f"c{i}.wav", "SONO I MIEI") for i in range(4)])
    cfg = DataConfig(train=str(tmp_path), eval=str(tmp_path))
    split = load_splits(cfg, seed=0, language="italian")
    assert {e.text for e in split.train} == {"Sono i miei."}
    evals = load_eval_only(tmp_path, cfg, language="italian").eval
    assert {e.text for e in evals} == {"Sono i miei."}
    assert {e.text for e in load_splits(cfg, seed=0).train} == {"Sono I miei."}


def _hf_bytes_dataset(tmp_path, n=5):
    """A ``save_to_disk`` dataset whose audio column holds the file bytes (as hub datasets do)."""
    import datasets

    clips = [write_tone(tmp_path / f"b{i}.flac", seconds=0.5 + 0.1 * i).read_bytes()
             for i in range(n)]
    features = datasets.Features({
        "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
        "transcription": datasets.Value("string"), "speaker": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({
        "audio": [{"bytes": clip, "path": None} for clip in clips],
        "transcription": [f"Line {i}." for i in range(n)],
        "speaker": [f"s{i % 2}" for i in range(n)]}, features=features)
    ds = ds.cast_column("audio", datasets.Audio(decode=False))  # as the hub stores it
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "hf")
    return tmp_path / "hf", clips


def test_hugging_face_audio_bytes_are_read_lazily(tmp_path):
    import pickle

    from whisper_exp.audio import AudioRef, load_audio, probe
    from whisper_exp.cache import audio_fingerprint

    folder, clips = _hf_bytes_dataset(tmp_path)
    examples = read_source(folder, DataConfig()).examples
    assert [e.text for e in examples] == [f"Line {i}." for i in range(5)]
    assert [e.speaker for e in examples] == ["s0", "s1", "s0", "s1", "s0"]
    for example, clip in zip(examples, clips, strict=True):
        assert isinstance(example.audio, AudioRef) and not isinstance(example.audio, bytes)
        assert example.audio.read_bytes() == clip
        np.testing.assert_array_equal(load_audio(example.audio), load_audio(clip))
        assert probe(example.audio) == probe(clip)
        assert audio_fingerprint(example.audio) == audio_fingerprint(clip)
    # a path (which also has .name and .read_bytes) is hashed as the file: same key as its row
    assert audio_fingerprint(tmp_path / "b0.flac") == audio_fingerprint(examples[0].audio)
    # the rows point into the memory-mapped dataset: pickling them (DataLoader workers) carries
    # no audio, and the copy still reads every clip
    pickled = pickle.dumps(examples)
    assert len(pickled) < sum(map(len, clips)) / 2
    assert [e.audio.read_bytes() for e in pickle.loads(pickled)] == clips


def test_hugging_face_bytes_rows_feed_training(tmp_path, tiny_english_path):
    import torch
    from transformers import WhisperProcessor

    from whisper_exp.audio import AudioRef
    from whisper_exp.training import MelFeatures, SpeechCollator, SpeechDataset

    folder, clips = _hf_bytes_dataset(tmp_path, n=6)
    split = load_splits(DataConfig(train=str(folder), eval_split=0.34), seed=0)
    assert all(isinstance(e.audio, AudioRef) for e in split.train + split.eval)
    processor = WhisperProcessor.from_pretrained(tiny_english_path)
    dataset = SpeechDataset(split.train, processor)
    start = processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, collate_fn=SpeechCollator(MelFeatures(processor), start))
    batches = list(loader)
    assert sum(len(b["input_features"]) for b in batches) == len(split.train)
    assert batches[0]["input_features"].shape[1:] == (80, 3000)
    assert len(set(dataset.keys)) == len(split.train)


def _outside_layout(tmp_path):
    """data/ with one good clip, and a clip outside it that rows try to reach."""
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    outside.mkdir()
    write_tone(data / "ok.wav")
    write_tone(outside / "secret.wav")
    return data, outside


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "symlinked_folder"])
def test_rows_may_not_leave_the_data_folder(tmp_path, kind):
    data, outside = _outside_layout(tmp_path)
    if kind == "absolute":
        name, expected = str(outside / "secret.wav"), "is an absolute path"
    elif kind == "dotdot":
        name, expected = "sub/../../elsewhere/secret.wav", "climbs out of the data folder"
    elif kind == "symlink":
        (data / "link.wav").symlink_to(outside / "secret.wav")
        name, expected = "link.wav", "is a symlink leading outside the data folder"
    else:
        (data / "linked").symlink_to(outside, target_is_directory=True)
        name, expected = "linked/secret.wav", "is a symlink leading outside the data folder"
    write_metadata(data, [("ok.wav", "Fine."), (name, "Secret."), ("ok.wav", "Again.")])
    loaded = read_source(data, DataConfig())
    assert [e.name for e in loaded.examples] == ["ok.wav", "ok.wav"]
    [problem] = loaded.problems
    assert problem.file == name and "metadata.csv line 3" in problem.where
    assert expected in problem.message and "allow_outside_paths" in problem.message
    with pytest.raises(DataError, match=f"line 3: .*{expected}"):
        load_splits(DataConfig(train=str(data), eval=str(data)), seed=0)
    allowed = read_source(data, DataConfig(allow_outside_paths=True))
    assert len(allowed.examples) == 3 and not allowed.problems


def test_paths_that_stay_inside_are_fine(tmp_path):
    data, _ = _outside_layout(tmp_path)
    (data / "sub").mkdir()
    write_tone(data / "sub" / "a.wav")
    (data / "alias.wav").symlink_to(data / "sub" / "a.wav")
    write_metadata(data, [("sub/../ok.wav", "One."), ("./sub/a.wav", "Two."),
                          ("alias.wav", "Three.")])
    loaded = read_source(data, DataConfig())
    assert len(loaded.examples) == 3 and not loaded.problems
