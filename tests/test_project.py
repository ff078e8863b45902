"""The project's own files agree with each other: conda.yaml vs pyproject, MLproject vs CLI."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_conda_env_matches_pip_requirements():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(deps)
    assert "pip" in conda["dependencies"]


def test_mlproject_entry_points_use_the_cli():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(project["entry_points"]) >= {"train", "evaluate"}
    train = project["entry_points"]["train"]
    required = {"config", "strategy", "model", "data", "eval_data", "learning_rate", "lora_r",
                "epochs", "max_steps", "freeze_encoder", "gradient_checkpointing"}
    assert required <= set(train["parameters"])
    for name in train["parameters"]:
        assert f"{{{name}}}" in train["command"], name
    assert train["command"].startswith("python -m whisper_exp.cli train")
    assert project["conda_env"] == "conda.yaml"


def test_mlproject_tune_entry_point_forwards_every_parameter():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    tune = project["entry_points"]["tune"]
    required = {"config", "space", "model", "data", "eval_data", "n_trials", "timeout",
                "study_name", "storage", "direction", "sampler", "pruner", "register_best"}
    assert required <= set(tune["parameters"])
    for name in tune["parameters"]:
        assert f"{{{name}}}" in tune["command"], name
    assert tune["command"].startswith("python -m whisper_exp.cli tune")
    assert (ROOT / tune["parameters"]["space"]["default"]).is_file()
    assert (ROOT / tune["parameters"]["config"]["default"]).is_file()


def test_sample_data_ships_with_attribution():
    sample = ROOT / "data" / "sample"
    rows = (sample / "metadata.csv").read_text().splitlines()
    assert rows[0].startswith("file_name,transcription,speaker")
    assert 12 <= len(rows) - 1 <= 20
    assert "CC BY 4.0" in (sample / "ATTRIBUTION.md").read_text()
