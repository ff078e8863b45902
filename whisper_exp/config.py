"""Experiment configuration: typed defaults, YAML files and ``key=value`` overrides.

A config is a tree of dataclasses so every knob has a visible default and a type: the defaults
here ARE the default recipe (``whisper-exp train`` with no ``--config``). The strategy YAMLs
shipped in ``whisper_exp/configs/`` (``lora``, ``full``, ``qlora``; ``experiments/`` in a checkout
links there) hold only what differs from these defaults. CLI/MLproject overrides
(``training.learning_rate=1e-4``) override the file. The resolved tree is what gets logged to
MLflow, flattened to dotted keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_MODEL = "openai/whisper-tiny"
# Strategy configs and the search space ship inside the package, so a non-editable install
# has them too: ``load_config("lora")`` or ``--config qlora`` finds ``configs/qlora.yaml``.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
# Used when a multilingual model is trained with no model.language set (logged as a notice).
DEFAULT_TRAINING_LANGUAGE = "english"


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    # Multilingual checkpoints only (``.en`` models get no language token). Training: the
    # language of the data (empty: English, with a notice). Inference and evaluate: empty keeps
    # the language the model was trained for, else Whisper detects it per clip.
    language: str | None = None
    task: str = "transcribe"


@dataclass
class EvalSetConfig:
    """A named eval set of ``data.eval_sets`` (YAML ``name: path`` or ``name: {source: ...}``)."""

    source: str = ""
    # Also score the base model (model.name) here; tuned worse by more than
    # evaluation.max_regression tags the run ``regression.<name>``.
    guard: bool = False
    # Hugging Face datasets: the split (empty: data.eval_split_name, else data.train_split_name).
    split: str | None = None


@dataclass
class DataConfig:
    train: str = "data/sample"
    # A separate eval folder / dataset. When empty, ``eval_split`` of ``train`` is held out.
    eval: str | None = None
    eval_split: float = 0.2
    # More eval sets, scored after training with metrics prefixed by name (``general/wer``):
    # e.g. {general: {source: data/librispeech-clean-300, guard: true}}. data.eval (or the
    # held-out split) stays the primary set: the unprefixed ``wer`` that tuning optimises.
    eval_sets: dict[str, EvalSetConfig] = field(default_factory=dict)
    # For Hugging Face datasets: split names and column names.
    train_split_name: str = "train"
    eval_split_name: str | None = None
    audio_column: str = "audio"
    text_column: str = "transcription"
    speaker_column: str = "speaker"
    # keep | lower | sentence | auto | truecase (auto: sentence-case all-caps corpora;
    # truecase: also take each word's case from the base model's transcript of the clip)
    text_case: Literal["keep", "lower", "sentence", "auto", "truecase"] = "auto"
    # error: stop before training and list every bad row; skip: drop them and log a report.
    on_invalid: Literal["error", "skip"] = "error"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_duration_s: float = 30.0
    # metadata.csv rows must name audio inside the data folder (no absolute paths, no "..", no
    # symlinks leading out); true lets them point anywhere.
    allow_outside_paths: bool = False


@dataclass
class LoraConfig:
    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # DoRA (peft's weight-decomposed LoRA): magnitude + direction, same targets and rank.
    use_dora: bool = False


@dataclass
class QuantizationConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


@dataclass
class FinetuningConfig:
    strategy: Literal["full", "lora", "qlora"] = "lora"
    freeze_encoder: bool = False
    # Freeze the conv stem and the bottom k encoder layers only (None: freeze_encoder decides).
    # The frozen part's output is cached, so adapting the top layers + decoder stays cheap.
    freeze_encoder_layers: int | None = None
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


@dataclass
class AugmentationConfig:
    """Training-time augmentation; every lever is off by default and kept only where it pays.

    SpecAugment masks the log-mel input on the uncached path and, when the bottom encoder layers
    are frozen and cached, the cached hidden states that enter the trainable layers (so
    augmentation and caching compose). Speed perturbation and noise add extra copies of each
    training utterance, each cached under its own key."""

    # SpecAugment: share of time steps starting a mask of mask_time_length steps, and of
    # feature channels starting a mask of mask_feature_length channels (0: off).
    mask_time_prob: float = 0.0
    mask_time_length: int = 10
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    # Extra copies of every training utterance resampled at these speeds, e.g. [0.9, 1.1].
    speed_factors: list[float] = field(default_factory=list)
    # An extra copy of every training utterance with noise mixed in at this SNR in dB (None:
    # off): Gaussian noise, or clips drawn from noise_dir when set.
    noise_snr_db: float | None = None
    noise_dir: str | None = None


@dataclass
class TrainingConfig:
    learning_rate: float = 1e-3
    # Layer-wise learning-rate decay: the top trainable encoder layer gets learning_rate x
    # decay, each layer below it x decay once more; the decoder keeps learning_rate (1: off).
    layer_lr_decay: float = 1.0
    epochs: float = 2.0
    # > 0 overrides epochs (Trainer semantics).
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    logging_steps: int = 5
    # Evaluate (loss + WER/CER) every N steps; 0 = at the end of each epoch.
    eval_steps: int = 0
    # no | fp16 | bf16 | auto (auto: bf16 on CUDA where supported, else fp16; fp32 on CPU).
    # bf16 on CPU autocasts: fast on CPUs with bf16 matrix units (AVX512-BF16, AMX); fp16 on CPU
    # is refused.
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "auto"
    seed: int = 42
    dataloader_workers: int = 0
    # Per-run outputs go to <output_dir>/<mlflow run id>/ (trainer checkpoints, final model).
    output_dir: str = "outputs"
    # Trainer checkpoints for --resume: every N optimizer steps; 0 = at the end of each epoch;
    # -1 = none (short runs, Optuna trials, benchmarks).
    checkpoint_steps: int = 0
    checkpoints_kept: int = 2
    # With evaluations during training, ship the weights of the evaluation with the best dev WER
    # (the final decode included), not the last step's; the run says which (``best_step``).
    keep_best: bool = True
    # Cache log-mel features, and the frozen encoder part's output when the encoder (or its
    # bottom k layers) is frozen: computed once per utterance, reused by later epochs and trials.
    cache_encoder: bool = True
    cache_features: bool = True
    cache_memory_mb: int = 4096
    # Beyond the memory budget, arrays go to disk here (fp16 .npy, memory-mapped).
    cache_dir: str = "~/.cache/whisper_exp"
    # Cap on cache_dir's arrays; the least recently used are evicted (and recomputed if needed
    # again). 0 or null: unlimited.
    cache_max_gb: float | None = 20.0
    cache_dtype: Literal["float16", "float32"] = "float16"
    # Share of training examples (drawn per example per epoch, seeded) trained with timestamp
    # tokens (<|0.00|> text <|duration|>), so the model keeps predicting timestamps.
    timestamp_probability: float = 0.0
    # Share conditioned on the previous utterance of the same speaker as the decoder prompt
    # (<|startofprev|> ...), masked out of the loss, so prompting keeps working.
    prompt_probability: float = 0.0

    def __post_init__(self) -> None:
        for name in ("timestamp_probability", "prompt_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"training.{name} must be between 0 and 1, got {value}")


@dataclass
class EvaluationConfig:
    batch_size: int = 16
    num_beams: int = 1
    # None: scaled to each clip's length (decoding.default_max_new_tokens), as transcribe and
    # the served model do, so all of them score a clip alike.
    max_new_tokens: int | None = None
    # The report logs this many worst utterances (by WER) with their audio; 0: none.
    worst_n: int = 20
    # Guard sets (data.eval_sets with guard: true, and the primary set when guard_primary):
    # tuned WER worse than the base model's by more than this (absolute) tags the run.
    max_regression: float = 0.02
    guard_primary: bool = False
    # Long-form check (whisper_exp.long_form): eval utterances of one speaker joined with
    # long_form_gap_s of silence into recordings of about long_form_minutes, transcribed whole
    # with timestamps and scored (long_form/* metrics). auto: on when the eval set holds at least
    # 60 s of audio. Cost: one more decode of at most long_form_recordings x long_form_minutes of
    # audio per model scored (0 recordings: all the eval audio).
    long_form: Literal["auto", "on", "off"] = "auto"
    long_form_minutes: float = 2.0
    long_form_recordings: int = 4
    long_form_gap_s: float = 0.5


@dataclass
class TrackingConfig:
    experiment_name: str = "whisper-exp"
    # Empty: MLflow's own resolution (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).
    tracking_uri: str | None = None
    run_name: str | None = None
    # MLflow's system metrics (CPU, memory, disk, network; GPU on CUDA) for train and tune runs.
    system_metrics: bool = True


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetuning: FinetuningConfig = field(default_factory=FinetuningConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys (``finetuning.lora.r``) for MLflow params."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert YAML/CLI values to the annotated type, with a message that names the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str)
                                    and value.lower() in ("", "none", "null"))
        if is_null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, str) and "source" in {f.name for f in dataclasses.fields(annotation)}:
            value = {"source": value}  # the short form: ``general: data/general``
        return _build(annotation, value or {}, f"{where}.")
    if origin is list:
        if value is None:  # ``key=`` on the command line: the empty list
            value = []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float, str):
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got "
                              f"{type(value).__name__} {value!r} (no such sub-keys here)")
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: expected {annotation.__name__}, got {value!r}"
            ) from None
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(f'{where}{k}' for k in unknown)}; "
            f"valid keys here: {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["training.learning_rate=1e-4", "finetuning.lora.r=8"]`` -> nested dict."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        dotted, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({problem}); "
                              "quote it, e.g. key='[text'") from None
        node = tree
        *parents, leaf = dotted.strip().split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parents[:depth + 1])
                raise ConfigError(f"override {pair!r}: {section} was already set to a value, "
                                  "so it has no keys to set")
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"override {pair!r}: {dotted.strip()} is a section; set its keys "
                              f"instead ({dotted.strip()}.<key>=...)")
        node[leaf] = value
    return tree


def config_path(name_or_path: str | Path) -> Path:
    """A YAML path as given, or a packaged config by name (``lora``, ``search/lora``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / (str(name_or_path).removesuffix(".yaml") + ".yaml")
    if not path.is_absolute() and packaged.is_file():
        return packaged
    shipped = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"config file {name_or_path} does not exist; give a YAML path or one of "
                      f"the shipped configs: {', '.join(shipped)}")


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | tuple[str, ...] | None = None,
) -> ExperimentConfig:
    """Defaults <- YAML file (a path or a shipped name such as ``lora``) <- overrides (a nested
    dict or ``key=value`` strings)."""
    tree: dict[str, Any] = {}
    if path:
        path = config_path(path)
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded
    if overrides:
        if not isinstance(overrides, dict):
            overrides = parse_overrides(overrides)
        tree = _deep_merge(tree, overrides)
    return _build(ExperimentConfig, tree, "")


# Named options shared by the CLI and the MLproject entry points (empty/None = keep the config's).
NAMED_OPTIONS: dict[str, str] = {
    "strategy": "finetuning.strategy",
    "model": "model.name",
    "data": "data.train",
    "eval_data": "data.eval",
    "learning_rate": "training.learning_rate",
    "lora_r": "finetuning.lora.r",
    "epochs": "training.epochs",
    "max_steps": "training.max_steps",
    "batch_size": "training.batch_size",
    "freeze_encoder": "finetuning.freeze_encoder",
    "gradient_checkpointing": "finetuning.gradient_checkpointing",
    "num_beams": "evaluation.num_beams",
    "eval_batch_size": "evaluation.batch_size",
    "tracking_uri": "tracking.tracking_uri",
    "experiment": "tracking.experiment_name",
    "run_name": "tracking.run_name",
}


def resolve_config(
    path: str | Path | None = None,
    named: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> ExperimentConfig:
    """Config file <- named options (``lora_r=8``) <- ``--set key=value`` pairs.

    Named options that are None or "" are ignored, so MLproject parameters can default to ""
    meaning "the config file's value".
    """
    pairs = []
    for option, value in (named or {}).items():
        if option not in NAMED_OPTIONS:
            raise ConfigError(f"unknown option {option!r}; known: {sorted(NAMED_OPTIONS)}")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        pairs.append(f"{NAMED_OPTIONS[option]}={value}")
    return load_config(path, [*pairs, *sets])
