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
