"""Load Whisper, apply a fine-tuning strategy, and load trained models back for inference.

Strategies compose: ``full`` | ``lora`` | ``qlora`` (4-bit NF4 base via bitsandbytes + LoRA),
each with optional ``freeze_encoder`` (LoRA then goes into the decoder only) or
``freeze_encoder_layers`` (adapters only above the frozen layers) and
``gradient_checkpointing``; LoRA may be DoRA (``lora.use_dora``) and target ``all-linear``.
Multilingual checkpoints get ``<|lang|><|transcribe|>`` in the decoder prompt for training and
generation; English-only ``.en`` checkpoints get none.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from whisper_exp.config import (
    DEFAULT_TRAINING_LANGUAGE,
    ExperimentConfig,
    FinetuningConfig,
    ModelConfig,
)
from whisper_exp.ctranslate2_backend import is_ctranslate2_model
from whisper_exp.decoding import METADATA_FILE

# Also imported from here by callers; resolution lives in the torch-free model_reference.
from whisper_exp.model_reference import ADAPTER_CONFIG, resolve_model_reference
from whisper_exp.safety import check_model_folder, use_safetensors

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_multilingual(model: WhisperForConditionalGeneration) -> bool:
    flag = getattr(model.generation_config, "is_multilingual", None)
    return bool(flag) if flag is not None else model.config.vocab_size >= 51865


@dataclass
class ParamCounts:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    """peft's counts for adapter models, transformers' otherwise: both count a 4-bit packed
    weight as the parameters it stands for (two per stored byte)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    return ParamCounts(int(trainable), int(total))


def configure_prompt(model: WhisperForConditionalGeneration, processor: WhisperProcessor,
                     cfg: ModelConfig) -> None:
    """Language/task tokens for multilingual models, none for English-only ones.

    The tokenizer's prefix tokens make training labels start with the same prompt that
    ``generate`` forces, so training and inference agree.
    """
    gen = model.generation_config
    if is_multilingual(model):
        gen.language = cfg.language
        gen.task = cfg.task
        processor.tokenizer.set_prefix_tokens(language=cfg.language, task=cfg.task,
                                              predict_timestamps=False)
    else:
        for attr in ("language", "task"):
            if getattr(gen, attr, None) is not None:
                setattr(gen, attr, None)
        processor.tokenizer.set_prefix_tokens(predict_timestamps=False)
    # Legacy forced ids conflict with language/task handling in generate().
    gen.forced_decoder_ids = None
    model.config.forced_decoder_ids = None


def _compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantized_device_map(device: torch.device) -> dict[str, int | str]:
    """Where a 4-bit model is loaded (bitsandbytes places it at load time, not Trainer): under
    torchrun/accelerate each process takes its own GPU (``LOCAL_RANK``), never all GPU 0."""
    if device.type != "cuda":
        return {"": "cpu"}
    if device.index is not None:
        return {"": device.index}
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def load_base(cfg: ModelConfig, finetuning: FinetuningConfig | None = None,
              device: torch.device | None = None
              ) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Base model in fp32 (fp16 checkpoints are upcast: fp16 training on CPU is unstable),
    or 4-bit NF4 for QLoRA."""
    device = device or default_device()
    check_model_folder(cfg.name)
    processor = WhisperProcessor.from_pretrained(cfg.name)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": use_safetensors()}
    if finetuning is not None and finetuning.strategy == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=finetuning.quantization.quant_type,
            bnb_4bit_use_double_quant=finetuning.quantization.double_quant,
            bnb_4bit_compute_dtype=_compute_dtype(device),
            # Whisper's output projection shares weights with the embeddings; keep it dense.
            llm_int8_skip_modules=["proj_out"],
        )
        kwargs["device_map"] = quantized_device_map(device)
    model = WhisperForConditionalGeneration.from_pretrained(cfg.name, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    if is_multilingual(model) and not cfg.language:
        log.warning("model.language is not set: training the multilingual %s for %s; set "
                    "model.language to your data's language if it is another one", cfg.name,
                    DEFAULT_TRAINING_LANGUAGE)
        cfg = dataclasses.replace(cfg, language=DEFAULT_TRAINING_LANGUAGE)
    configure_prompt(model, processor, cfg)
    return model, processor


def frozen_encoder_layers(cfg: FinetuningConfig, n_layers: int) -> int:
    """How many bottom encoder layers (with the conv stem) are frozen: 0 .. n_layers."""
    if cfg.freeze_encoder:
        return n_layers
    k = cfg.freeze_encoder_layers or 0
    if not 0 <= k <= n_layers:
        raise ValueError(f"finetuning.freeze_encoder_layers={k}: the encoder has {n_layers} "
                         f"layers; use 0..{n_layers}"
                         " (or freeze_encoder: true for all)")
    return k


def whisper_encoder(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.encoder


# Every linear layer inside Whisper's encoder and decoder blocks. peft's own "all-linear"
# would also adapt proj_out (tied to the token embeddings) and cannot be limited to the layers
# above a frozen prefix, so the shorthand is expanded to these names instead.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ALL_LINEAR_SHORTHAND = "all-linear"


def lora_target_modules(cfg: FinetuningConfig) -> list[str]:
    """``finetuning.lora.target_modules`` with ``all-linear`` expanded, checked against the
    linear layers of a Whisper block (a typo would otherwise surface as peft's regex error).
    A dotted name (``encoder_attn.q_proj``) narrows a kind to one place, as in peft."""
    names: list[str] = []
    for name in cfg.lora.target_modules:
        for module in ALL_LINEAR if name == ALL_LINEAR_SHORTHAND else (name,):
            if module not in names:
                names.append(module)
    unknown = [name for name in names if name.rsplit(".", 1)[-1] not in ALL_LINEAR]
    if unknown or not names:
        raise ValueError(f"finetuning.lora.target_modules={cfg.lora.target_modules}: "
                         f"{unknown or 'empty'} not a Whisper block linear layer; use names "
                         f"from {list(ALL_LINEAR)} or {ALL_LINEAR_SHORTHAND!r}")
    return names


def _lora_targets(cfg: FinetuningConfig, frozen: int, n_layers: int) -> list[str] | str:
    modules = lora_target_modules(cfg)
    if frozen == 0:
        return modules
    # peft treats a string as a full-match regex: adapters in the decoder and in the
    # encoder layers above the frozen ones only.
    places = [r"decoder\.layers\.\d+"]
    if frozen < n_layers:
        places.append(r"encoder\.layers\.(" + "|".join(str(i) for i in range(frozen, n_layers))
                      + ")")
    return r".*(" + "|".join(places) + r")\.(\S*\.)?(" + "|".join(map(re.escape, modules)) + r")$"


def _freeze_encoder_bottom(encoder: torch.nn.Module, k: int) -> None:
    if k == 0:
        return
    for module in (encoder.conv1, encoder.conv2, encoder.embed_positions, *encoder.layers[:k]):
        module.requires_grad_(False)
    if k == len(encoder.layers):
        encoder.layer_norm.requires_grad_(False)


def _enable_checkpointing(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (deprecated, removed in v6).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_strategy(model: WhisperForConditionalGeneration, cfg: FinetuningConfig
                   ) -> torch.nn.Module:
    """Return the model ready to train: adapters attached, frozen parts frozen."""
    if cfg.strategy not in ("full", "lora", "qlora"):
        raise ValueError(f"unknown strategy {cfg.strategy!r}; use full, lora or qlora")
    ckpt_kwargs = {"use_reentrant": False}
    n_layers = len(model.model.encoder.layers)
    frozen = frozen_encoder_layers(cfg, n_layers)
    if cfg.strategy == "full":
        # Whisper's encoder positions are fixed sinusoids; transformers 5 leaves them
        # trainable after from_pretrained, which silently drifts them in a full fine-tune.
        model.model.encoder.embed_positions.requires_grad_(False)
        _freeze_encoder_bottom(model.model.encoder, frozen)
        if cfg.gradient_checkpointing:
            _enable_checkpointing(model, ckpt_kwargs)
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.strategy == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    elif cfg.gradient_checkpointing:
        _enable_checkpointing(model, ckpt_kwargs)
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=_lora_targets(cfg, frozen, n_layers),
        bias="none",
        use_dora=cfg.lora.use_dora,
    )
    return get_peft_model(model, lora)


# --------------------------------------------------------------------------- saving / loading


def save_trained(model: torch.nn.Module, processor: WhisperProcessor, out_dir: str | Path,
                 cfg: ExperimentConfig) -> Path:
    """Hugging Face format: the full model, or the adapter plus everything needed to rebuild
    the base (processor, generation config with language/task, and ``whisper_exp.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.generation_config.save_pretrained(out)
    meta = {
        "base_model": resolve_model_name(cfg.model.name),
        "strategy": cfg.finetuning.strategy,
        "freeze_encoder": cfg.finetuning.freeze_encoder,
        # What the prompt was trained with: inference defaults to it.
        "language": base.generation_config.language if is_multilingual(base) else None,
        "task": cfg.model.task,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def resolve_model_name(name: str) -> str:
    """Absolute path for local folders (so a saved adapter finds its base from anywhere)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_for_inference(reference: str, device: torch.device | None = None,
                       language: str | None = None, task: str | None = None
                       ) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Any model reference -> a plain (adapter-merged) Whisper model in eval mode.

    ``language``/``task`` None keep the model's own: what it was trained for (its
    ``whisper_exp.json``, else its generation config); a multilingual model that records no
    language gets none forced, so ``generate`` detects it per clip. A value overrides both.
    """
    device = device or default_device()
    path = resolve_model_reference(reference)
    local = Path(path)
    if is_ctranslate2_model(local):
        raise OSError(f"{reference} is a CTranslate2 model (an export or a version registered "
                      "with backend ctranslate2): it runs in faster-whisper, not transformers; "
                      "use the run it came from (runs:/<run_id>, the version's source_run_id "
                      "tag) or a version registered with the transformers backend")
    check_model_folder(local)  # peft has no safetensors-only switch: this is the adapter's check
    meta = {}
    if (local / METADATA_FILE).exists():
        meta = json.loads((local / METADATA_FILE).read_text(encoding="utf-8"))
    if (local / ADAPTER_CONFIG).exists():
        from peft import PeftModel

        adapter_cfg = json.loads((local / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base_name = meta.get("base_model") or adapter_cfg["base_model_name_or_path"]
        check_model_folder(base_name)
        base = WhisperForConditionalGeneration.from_pretrained(
            base_name, dtype=torch.float32, use_safetensors=use_safetensors())
        model = PeftModel.from_pretrained(base, str(local)).merge_and_unload()
    else:
        model = WhisperForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, use_safetensors=use_safetensors())
    processor = WhisperProcessor.from_pretrained(path)
    if (local / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    gen = model.generation_config
    model_cfg = ModelConfig(
        name=path,
        language=language or meta.get("language") or getattr(gen, "language", None),
        task=task or meta.get("task") or getattr(gen, "task", None) or "transcribe")
    configure_prompt(model, processor, model_cfg)
    model.to(device).eval()
    return model, processor
