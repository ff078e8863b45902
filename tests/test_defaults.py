"""One home for each default: the dataclasses are the default recipe, the shipped strategy
configs only hold what differs, and they ship inside the package."""

import subprocess
from pathlib import Path

import pytest
import yaml

from whisper_exp.config import PACKAGED_CONFIGS, ConfigError, ExperimentConfig, flatten, load_config
from whisper_exp.tracking import git_commit

ROOT = Path(__file__).resolve().parent.parent


def test_train_without_a_config_trains_what_the_default_config_names():
    """`whisper-exp train` (no --config) and `mlflow run . -e train` (config lora) agree."""
    assert load_config(None).flat() == load_config("lora").flat()
    assert load_config(None).flat() == load_config(ROOT / "experiments" / "lora.yaml").flat()


@pytest.mark.parametrize("name", ["lora", "full", "qlora"])
def test_strategy_configs_hold_only_what_differs_from_the_defaults(name):
    written = flatten(yaml.safe_load((PACKAGED_CONFIGS / f"{name}.yaml").read_text()))
    defaults = ExperimentConfig().flat()
    restated = {key: value for key, value in written.items()
                if key != "finetuning.strategy" and defaults[key] == value}
    assert restated == {}, f"{name}.yaml restates defaults; drop them from the file"


def test_shipped_configs_load_by_name_from_the_package():
    assert load_config("qlora").finetuning.strategy == "qlora"
    assert load_config("full.yaml").training.learning_rate == pytest.approx(1e-5)
    assert (ROOT / "experiments").resolve() == PACKAGED_CONFIGS
    with pytest.raises(ConfigError, match="shipped configs: full, lora, qlora"):
        load_config("loar")


def test_configs_are_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"configs/*.yaml"' in text and '"configs/search/*.yaml"' in text


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_git_commit_only_inside_a_checkout_of_this_project(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    _git(other, "init", "-q")
    _git(other, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty",
         "-m", "x")
    assert git_commit(other) is None, "another project's commit is not ours"
    assert git_commit(tmp_path) is None, "not a checkout at all"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "pyproject.toml").write_text('[project]\nname = "whisper-exp"\n')
    _git(ours, "init", "-q")
    _git(ours, "add", ".")
    _git(ours, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ours, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert git_commit(ours / ".") == head and len(head) == 40


def test_default_search_space_ships_in_the_package():
    from whisper_exp.tuning import DEFAULT_SPACE, load_search_space

    assert DEFAULT_SPACE.is_relative_to(PACKAGED_CONFIGS)
    space = load_search_space("search/lora", load_config(None))
    assert {spec.key for spec in space.params} == {"finetuning.lora.r", "training.learning_rate"}
