"""``Seq2SeqTrainer`` with whisper_exp's decoding policy for the evaluations during training.

The learning curve's ``eval/wer`` (the Trainer's ``eval_wer``) must measure what the run's final
``wer`` measures, or the pruning signal and the objective disagree: each evaluation batch gets
the token budget of its longest clip (``decoding.default_max_new_tokens``, as ``evaluate``,
``transcribe`` and the served model use) instead of one flat ``generation_max_length``, which
also counts the prompt.

``layer_lr_decay`` < 1 gives the optimizer one parameter group per encoder depth (layer-wise
learning-rate decay): lower encoder layers, which hold the most general acoustic features, move
less than the decoder. It works for full fine-tuning and adapters alike, since groups are found
by parameter name.

The evaluation at the last step computes the loss only: the run's final evaluation decodes the
eval set once more from audio, through the saved model, and logs ``eval/wer`` at that step, so
the eval set is decoded once at the end, not twice.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import Seq2SeqTrainer

from whisper_exp.decoding import default_max_new_tokens

# Batch key the collators fill with each clip's length (seconds); never reaches the model.
AUDIO_SECONDS = "audio_seconds"


# An encoder block's parameters, plain (model.encoder.layers.3.fc1.weight) or inside peft
# (base_model.model.model.encoder.layers.3.fc1.lora_A.default.weight).
_ENCODER_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")
_ENCODER_STEM = re.compile(r"(?:^|\.)encoder\.(?:conv1|conv2|embed_positions)\.")
_ENCODER_TOP_NORM = re.compile(r"(?:^|\.)encoder\.layer_norm\.")


def encoder_depth(name: str, n_layers: int) -> int:
    """How many decay steps below the decoder a parameter sits: 0 outside the encoder, 1 for the
    top encoder layer (and the encoder's final layer norm above it), n_layers for layer 0 and
    n_layers + 1 for the conv stem and positions."""
    if match := _ENCODER_LAYER.search(name):
        return n_layers - int(match.group(1))
    if _ENCODER_STEM.search(name):
        return n_layers + 1
    if _ENCODER_TOP_NORM.search(name):
        return 1
    return 0


def layer_lr_groups(model: torch.nn.Module, learning_rate: float, decay: float,
                    weight_decay: float, decay_names: set[str]) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: ``learning_rate x decay**depth`` (see
    ``encoder_depth``), each split into weight-decayed (names in ``decay_names``, as the Trainer
    picks them: no biases or norms) and not. The full-rate group comes first, so the Trainer's
    logged ``learning_rate`` (group 0's) stays the configured one. ``decay`` is checked once,
    by ``WhisperTrainer``."""
    named = list(model.named_parameters())
    n_layers = 1 + max((int(m.group(1)) for n, _ in named if (m := _ENCODER_LAYER.search(n))),
                       default=-1)
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, param in named:
        if param.requires_grad:
            key = (encoder_depth(name, n_layers), name in decay_names)
            groups.setdefault(key, []).append(param)
    return [{"params": groups[key], "lr": learning_rate * decay ** key[0],
             "weight_decay": weight_decay if key[1] else 0.0}
            for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def audio_seconds_tensor(items: list[dict[str, Any]]) -> torch.Tensor:
    """Clip lengths of a batch of ``SpeechDataset`` items, for the token budget."""
    return torch.tensor([float(item["seconds"]) for item in items])


class WhisperTrainer(Seq2SeqTrainer):
    """``max_new_tokens`` None: scaled to each evaluation batch's longest clip;
    ``layer_lr_decay`` (``training.layer_lr_decay``) 1: one learning rate for all."""

    def __init__(self, *args, max_new_tokens: int | None = None, layer_lr_decay: float = 1.0,
                 **kwargs):
        if not 0.0 < layer_lr_decay <= 1.0:
            raise ValueError(f"training.layer_lr_decay={layer_lr_decay}: use a factor in "
                             "(0, 1]; 1 is off")
        super().__init__(*args, **kwargs)
        self.max_new_tokens = max_new_tokens
        self.layer_lr_decay = layer_lr_decay

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (its class, betas, weight-decay split), with one group per
        encoder depth when ``layer_lr_decay`` < 1; per-group ``lr`` overrides the default."""
        if self.layer_lr_decay == 1.0 or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = (
            self.optimizer_cls_and_kwargs
            or self.get_optimizer_cls_and_kwargs(self.args, opt_model))
        optimizer_kwargs = dict(optimizer_kwargs)
        standard = isinstance(optimizer_cls, type) and issubclass(optimizer_cls,
                                                                  torch.optim.Optimizer)
        if not standard or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            raise ValueError(f"training.layer_lr_decay needs a standard torch optimizer; "
                             f"optim={self.args.optim} builds its own parameter groups")
        groups = layer_lr_groups(opt_model, self.args.learning_rate, self.layer_lr_decay,
                                 self.args.weight_decay,
                                 set(self.get_decay_parameter_names(opt_model)))
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def is_final_step(self) -> bool:
        return self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != AUDIO_SECONDS}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None,
                        **gen_kwargs):
        inputs = dict(inputs)
        seconds = inputs.pop(AUDIO_SECONDS, None)
        if self.is_final_step():
            prediction_loss_only = True
        if not prediction_loss_only:
            gen_kwargs = dict(gen_kwargs or getattr(self, "_gen_kwargs", {}))
            gen_kwargs.pop("max_length", None)
            longest = float(seconds.max()) if seconds is not None else None
            if self.max_new_tokens is not None or longest is not None:
                gen_kwargs["max_new_tokens"] = (self.max_new_tokens
                                                or default_max_new_tokens(longest))
        return super().prediction_step(model, inputs, prediction_loss_only,
                                       ignore_keys=ignore_keys, **gen_kwargs)
