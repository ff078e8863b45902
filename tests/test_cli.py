import pytest
from click.testing import CliRunner
from conftest import copy_sample

from whisper_exp.cli import main


@pytest.mark.parametrize("command", ["train", "evaluate", "prepare-data"])
def test_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_config_errors_are_one_clear_line():
    result = CliRunner().invoke(main, ["train", "--set", "training.batch_sise=2"])
    assert result.exit_code == 2
    assert "error: unknown key(s) ['training.batch_sise']" in result.output


def test_prepare_data_builds_metadata_from_txt(tmp_path):
    src = copy_sample(tmp_path / "src", n=2)
    folder = tmp_path / "txt"
    folder.mkdir()
    import csv

    for row in csv.DictReader((src / "metadata.csv").open()):
        (src / row["file_name"]).rename(folder / row["file_name"])
        (folder / row["file_name"]).with_suffix(".txt").write_text(row["transcription"])
    result = CliRunner().invoke(main, ["prepare-data", str(folder)])
    assert result.exit_code == 0, result.output
    assert "2 usable utterance(s), 0 problem(s)" in result.output
    assert (folder / "metadata.csv").exists()


def test_prepare_data_exit_code_on_problems(tmp_path):
    copy_sample(tmp_path, n=1)
    with (tmp_path / "metadata.csv").open("a") as handle:
        handle.write("ghost.flac,BOO,0,0,f,1\n")
    result = CliRunner().invoke(main, ["prepare-data", str(tmp_path)])
    assert result.exit_code == 1
    assert "ghost.flac: audio file not found" in result.output


class _Stop(Exception):
    """Raised by a stand-in for the library call: the test only needs the resolved config."""


# Where each command hands its resolved config to the library.
LIBRARY_CALL = {"train": "whisper_exp.training.train",
                "evaluate": "whisper_exp.evaluation.run_evaluation",
                "tune": "whisper_exp.tuning.tune"}


@pytest.mark.parametrize("command", LIBRARY_CALL)
def test_sets_string_overrides_any_key_after_set(command, monkeypatch):
    seen = {}

    def capture(*args, **kwargs):
        seen["cfg"] = next(a for a in (*args, *kwargs.values()) if hasattr(a, "training"))
        raise _Stop

    monkeypatch.setattr(LIBRARY_CALL[command], capture)
    required = ["--model", "m", "--data", "d"] if command == "evaluate" else []
    result = CliRunner().invoke(main, [
        command, *required, "--set", "training.warmup_steps=10", "--sets",
        "training.warmup_steps=50 'tracking.run_name=two words' data.eval_split=0.3"])
    assert isinstance(result.exception, _Stop), result.output
    cfg = seen["cfg"]
    assert cfg.training.warmup_steps == 50, "--sets applies after --set"
    assert cfg.tracking.run_name == "two words"
    assert cfg.data.eval_split == pytest.approx(0.3)


def test_sets_string_errors_are_clear():
    unknown = CliRunner().invoke(main, ["train", "--sets", "training.batch_sise=2"])
    assert unknown.exit_code == 2
    assert "error: unknown key(s) ['training.batch_sise']" in unknown.output
    unbalanced = CliRunner().invoke(main, ["train", "--sets", "tracking.run_name='open"])
    assert unbalanced.exit_code == 2 and "Invalid value for --sets" in unbalanced.output


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-warm-start"], False)])
def test_tune_warm_start_flag_reaches_the_study(monkeypatch, flag, expected):
    from whisper_exp import tuning

    seen = {}

    def fake_tune(cfg, space, **kwargs):
        seen.update(kwargs)
        raise tuning.TuningError("stop here")

    monkeypatch.setattr(tuning, "tune", fake_tune)
    result = CliRunner().invoke(main, ["tune", *flag])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["warm_start"] is expected
