"""The search space: which config keys a study varies, validated against the config."""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml

from whisper_exp.config import (
    PACKAGED_CONFIGS,
    ConfigError,
    ExperimentConfig,
    config_path,
    load_config,
)

# Shipped inside the package (a non-editable install has it too); `--space search/lora` names it.
DEFAULT_SPACE = PACKAGED_CONFIGS / "search" / "lora.yaml"


class SearchSpaceError(ConfigError):
    """A search-space file is malformed or names a value the experiment config rejects."""



@dataclass(frozen=True)
class ParamSpec:
    """One searched config key and its distribution."""

    key: str
    kind: Literal["categorical", "float", "int"]
    choices: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"categorical {list(self.choices)}"
        extra = " log" if self.log else (f" step {self.step}" if self.step else "")
        return f"{self.kind} [{self.low}, {self.high}]{extra}"

    def matching(self, value: Any) -> tuple[Any, ...]:
        """``(value as this distribution suggests it,)``, or ``()`` when it cannot suggest it."""
        if self.kind == "categorical":
            return tuple(c for c in self.choices
                         if c == value and isinstance(c, bool) == isinstance(value, bool))[:1]
        if not _is_number(value) or not self.low <= value <= self.high:
            return ()
        if self.kind == "int" and value != int(value):
            return ()
        if self.step is not None:
            steps = (value - self.low) / self.step
            if not math.isclose(steps, round(steps), abs_tol=1e-9):
                return ()
        return (int(value) if self.kind == "int" else value,)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        if self.kind == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                out["step"] = self.step
        return out


@dataclass(frozen=True)
class SearchSpace:
    """The validated ``params`` of a search-space file."""

    params: tuple[ParamSpec, ...]
    source: str

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {p.key: p.suggest(trial) for p in self.params}

    def as_dict(self) -> dict[str, Any]:
        return {"params": {p.key: p.as_dict() for p in self.params}}

    def config_values(self, cfg: ExperimentConfig) -> dict[str, Any] | None:
        """``cfg``'s own values of the searched keys as Optuna stores them, or None when one of
        them lies outside the space (then ``cfg`` is not a point of this search)."""
        flat = cfg.flat()
        values: dict[str, Any] = {}
        for param in self.params:
            try:
                match = param.matching(_encode_choice(flat[param.key], param.key))
            except SearchSpaceError:
                return None
            if not match:
                return None
            values[param.key] = match[0]
        return values

    def encode(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Config-style values (lists for target_modules) -> the values Optuna stores."""
        unknown = set(values) - set(self.keys)
        if unknown:
            raise SearchSpaceError(f"{sorted(unknown)} are not searched in {self.source}")
        return {key: _encode_choice(value, key) for key, value in values.items()}


def _encode_choice(value: Any, where: str) -> Any:
    """Optuna stores only None/bool/int/float/str, so a list choice becomes ``"a,b"`` (which the
    config reads back as a list)."""
    if isinstance(value, list | tuple):
        if not value or not all(isinstance(v, str) and v and "," not in v for v in value):
            raise SearchSpaceError(
                f"{where}: a list choice must be non-empty names without commas, got {value!r}")
        return ",".join(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise SearchSpaceError(f"{where}: choice {value!r} must be a scalar or a list of names")


def apply_params(base_cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """The base config with dotted keys replaced, re-validated like a ``--set`` override."""
    tree = base_cfg.to_dict()
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return load_config(None, tree)


_FIELDS = {
    "categorical": {"type", "choices"},
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
}


def _is_number(value: Any, integer: bool = False) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, int | float)


def _leaf_type(cfg: ExperimentConfig, key: str) -> Any:
    """The annotated type of a dotted config key, with ``| None`` stripped."""
    owner: Any = type(cfg)
    *parents, leaf = key.split(".")
    for part in parents:
        owner = typing.get_type_hints(owner)[part]
    hint = typing.get_type_hints(owner)[leaf]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return hint


def _parse_param(key: Any, spec: Any, base_cfg: ExperimentConfig, flat: dict[str, Any],
                 source: str) -> ParamSpec:
    where = f"{source}: params.{key}"
    if not isinstance(key, str) or key not in flat:
        close = difflib.get_close_matches(str(key), list(flat), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SearchSpaceError(f"{where}: not a config key{hint}")
    if not isinstance(spec, dict):
        raise SearchSpaceError(f"{where}: expected a mapping like {{type: float, low: .., "
                               f"high: ..}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in _FIELDS:
        raise SearchSpaceError(f"{where}: type {kind!r} is not one of {sorted(_FIELDS)}")
    unknown = set(spec) - _FIELDS[kind]
    if unknown:
        raise SearchSpaceError(f"{where}: unknown field(s) {sorted(unknown)} for type {kind}; "
                               f"allowed: {sorted(_FIELDS[kind])}")
    leaf_type = _leaf_type(base_cfg, key)

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{where}: choices must be a non-empty list")
        encoded = tuple(_encode_choice(c, where) for c in choices)
        if len(set(map(repr, encoded))) != len(encoded):
            raise SearchSpaceError(f"{where}: choices contain duplicates: {choices}")
        param = ParamSpec(key, "categorical", choices=encoded)
        probes = list(encoded)
    else:
        integer = kind == "int"
        low, high = spec.get("low"), spec.get("high")
        log_scale, step = spec.get("log", False), spec.get("step")
        if not (_is_number(low, integer) and _is_number(high, integer)):
            raise SearchSpaceError(f"{where}: low and high must both be "
                                   f"{'integers' if integer else 'numbers'}, got {low!r}, {high!r}")
        if not low < high:
            raise SearchSpaceError(f"{where}: low ({low}) must be below high ({high})")
        if not isinstance(log_scale, bool):
            raise SearchSpaceError(f"{where}: log must be true or false, got {log_scale!r}")
        if log_scale and low <= 0:
            raise SearchSpaceError(f"{where}: a log scale needs low > 0, got {low}")
        if step is not None:
            if not _is_number(step, integer) or step <= 0:
                raise SearchSpaceError(f"{where}: step must be a positive "
                                       f"{'integer' if integer else 'number'}, got {step!r}")
            if log_scale:
                raise SearchSpaceError(f"{where}: step and log cannot be combined")
        if leaf_type is int and not integer:
            raise SearchSpaceError(f"{where}: {key} is an integer setting; use type: int "
                                   f"(or categorical)")
        if leaf_type not in (int, float):
            raise SearchSpaceError(f"{where}: {key} is not a numeric setting; use type: "
                                   f"categorical")
        param = ParamSpec(key, kind, low=low, high=high, log=log_scale, step=step)
        probes = [low, high]

    for value in probes:
        try:
            apply_params(base_cfg, {key: value})
        except ConfigError as exc:
            raise SearchSpaceError(f"{where}: value {value!r} is rejected by the config: {exc}"
                                   ) from None
    return param


def load_search_space(path: str | Path, base_cfg: ExperimentConfig) -> SearchSpace:
    """Read and check a search-space YAML against ``base_cfg``; every problem names its entry."""
    try:
        path = config_path(path)
    except ConfigError:
        raise SearchSpaceError(f"search space {path} does not exist; give a YAML path or "
                               "search/lora (shipped)") from None
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict) or set(loaded) != {"params"}:
        found = sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__
        raise SearchSpaceError(f"{path}: expected a single top-level key 'params', got {found}")
    params = loaded["params"]
    if not isinstance(params, dict) or not params:
        raise SearchSpaceError(f"{path}: params must map at least one config key to a "
                               f"distribution")
    flat = base_cfg.flat()
    specs = tuple(_parse_param(key, spec, base_cfg, flat, str(path))
                  for key, spec in params.items())
    return SearchSpace(specs, str(path))

