from pathlib import Path

import pytest
import yaml

from whisper_exp.config import (
    NAMED_OPTIONS,
    ConfigError,
    ExperimentConfig,
    load_config,
    parse_overrides,
    resolve_config,
)

ROOT = Path(__file__).resolve().parent.parent


def _dotted(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", ["full", "lora", "qlora"])
def test_strategy_files_hold_exactly_their_differences_from_the_defaults(name):
    """The defaults are one recipe; a strategy file changes the keys it sets and no others,
    and sets nothing to its default value (except naming its strategy)."""
    path = ROOT / "experiments" / f"{name}.yaml"
    written = set(_dotted(yaml.safe_load(path.read_text())))
    defaults, loaded = ExperimentConfig().flat(), load_config(path).flat()
    changed = {key for key in defaults if loaded[key] != defaults[key]}
    assert changed - {"finetuning.strategy"} == written - {"finetuning.strategy"}
    assert loaded["finetuning.strategy"] == name


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 0.01\n  epochs: 5\nfinetuning:\n  lora:\n"
                    "    r: 4\n")
    cfg = load_config(path, ["training.learning_rate=1e-4", "finetuning.lora.r=16"])
    assert cfg.training.learning_rate == pytest.approx(1e-4)  # "1e-4" is a str in YAML 1.1
    assert cfg.training.epochs == 5.0
    assert cfg.finetuning.lora.r == 16


def test_flat_params_address_the_nested_config():
    cfg = load_config(None, ["training.learning_rate=0.5", "finetuning.lora.r=3",
                             "finetuning.lora.target_modules=q_proj,fc1"])
    flat = cfg.flat()
    for key, value in flat.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
    assert (flat["training.learning_rate"], flat["finetuning.lora.r"]) == (0.5, 3)
    assert flat["finetuning.lora.target_modules"] == ["q_proj", "fc1"]
    as_text = {k: ",".join(v) if isinstance(v, list) else v for k, v in flat.items()}
    assert load_config(None, [f"{k}={v}" for k, v in as_text.items()
                              if v is not None]).flat() == flat, "every key round-trips"


@pytest.mark.parametrize("override, message", [
    (["training.learnin_rate=1"], "unknown key"),
    (["finetuning.strategy=prefix"], "not one of"),
    (["training.batch_size=eight"], "expected int"),
    (["finetuning.freeze_encoder=maybe"], "expected true/false"),
    (["nonsense"], "section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_named_options_ignore_empty_strings():
    cfg = resolve_config(None, {"strategy": "", "lora_r": "8", "freeze_encoder": "true",
                                "model": None})
    assert cfg.finetuning.strategy == "lora"
    assert cfg.finetuning.lora.r == 8
    assert cfg.finetuning.freeze_encoder is True


def test_set_overrides_win_over_named_options():
    cfg = resolve_config(None, {"lora_r": "8"}, ["finetuning.lora.r=4"])
    assert cfg.finetuning.lora.r == 4


def test_lists_from_cli_strings():
    assert parse_overrides(["finetuning.lora.target_modules=[q_proj,k_proj]"]) == {
        "finetuning": {"lora": {"target_modules": ["q_proj", "k_proj"]}}}
    cfg = load_config(None, ["finetuning.lora.target_modules=q_proj,fc1"])
    assert cfg.finetuning.lora.target_modules == ["q_proj", "fc1"]


@pytest.mark.parametrize("name", ["full", "lora", "qlora"])
def test_shipped_experiment_configs(name):
    path = ROOT / "experiments" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.finetuning.strategy == name
    assert cfg.model.name == "openai/whisper-tiny"
    header = path.read_text().splitlines()[:6]
    assert any("mlflow run . -e train" in line for line in header), "run command in header"


def test_every_named_option_maps_to_a_real_key():
    keys = ExperimentConfig().flat()
    assert [dotted for dotted in NAMED_OPTIONS.values() if dotted not in keys] == []
