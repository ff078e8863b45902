"""The project's own files agree with each other: conda.yaml vs pyproject, MLproject vs CLI."""

import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_conda_env_matches_pip_requirements():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(deps)
    assert "pip" in conda["dependencies"]


# MLproject parameters whose click option has another name; every other parameter <name> must
# be forwarded as --<name with dashes>.
OPTION_FOR = {"set": "--sets", "compare_with": "--compare"}


def _forwarded_options(entry_point: str):
    """Run MLflow's own parameter substitution (with its quoting) on an entry point, every
    parameter set to a distinct value with a space in it, and parse the resulting command with
    the click command it calls. Returns the parameter values, the arguments after the command
    name, the string values click parsed from them (by click param name) and the command."""
    import shlex

    from mlflow.projects._project_spec import load_project

    from whisper_exp.cli import main

    entry = load_project(str(ROOT)).get_entry_point(entry_point)
    values = {name: f"value of {name}" for name in entry.parameters}
    argv = shlex.split(entry.compute_command(values, storage_dir=None))
    assert argv[:4] == ["python", "-m", "whisper_exp.cli", entry_point], argv
    command = main.commands[entry_point]
    context = command.make_context(entry_point, argv[4:])
    return values, argv[4:], {name: value for name, value in context.params.items()
                              if isinstance(value, str)}, command


@pytest.mark.parametrize("entry_point", ["train", "evaluate", "tune"])
def test_every_mlproject_parameter_reaches_its_cli_option(entry_point):
    values, argv, parsed, command = _forwarded_options(entry_point)
    options = {opt: param.name for param in command.params for opt in param.opts}
    for name, value in values.items():
        option = OPTION_FOR.get(name, "--" + name.replace("_", "-"))
        assert option in options, f"{entry_point}: click command has no {option} for {name}"
        assert argv[argv.index(value) - 1] == option, f"{name} is passed as {option}"
        assert parsed[options[option]] == value, f"{name} arrives whole in {option}"
    assert "set" in values, "every entry point takes a `set` string of KEY=VALUE overrides"


def test_mlproject_defaults_point_at_shipped_files():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml" and (ROOT / "conda.yaml").is_file()
    points = project["entry_points"]
    assert (ROOT / points["tune"]["parameters"]["space"]["default"]).is_file()
    for name in ("train", "tune"):
        assert (ROOT / points[name]["parameters"]["config"]["default"]).is_file()
    assert all(points[name]["parameters"]["set"]["default"] == "" for name in points)


def test_sample_data_ships_with_attribution():
    sample = ROOT / "data" / "sample"
    rows = (sample / "metadata.csv").read_text().splitlines()
    assert rows[0].startswith("file_name,transcription,speaker")
    assert 12 <= len(rows) - 1 <= 20
    assert "CC BY 4.0" in (sample / "ATTRIBUTION.md").read_text()
