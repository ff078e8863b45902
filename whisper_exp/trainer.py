"""``Seq2SeqTrainer`` with whisper_exp's decoding policy for the evaluations during training.

The learning curve's ``eval/wer`` (the Trainer's ``eval_wer``) must measure what the run's final
``wer`` measures, or the pruning signal and the objective disagree: each evaluation batch gets
the token budget of its longest clip (``decoding.default_max_new_tokens``, as ``evaluate``,
``transcribe`` and the served model use) instead of one flat ``generation_max_length``, which
also counts the prompt.

The evaluation at the last step computes the loss only: the run's final evaluation decodes the
eval set once more from audio, through the saved model, and logs ``eval/wer`` at that step, so
the eval set is decoded once at the end, not twice.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Seq2SeqTrainer

from whisper_exp.decoding import default_max_new_tokens

# Batch key the collators fill with each clip's length (seconds); never reaches the model.
AUDIO_SECONDS = "audio_seconds"


def audio_seconds_tensor(items: list[dict[str, Any]]) -> torch.Tensor:
    """Clip lengths of a batch of ``SpeechDataset`` items, for the token budget."""
    return torch.tensor([float(item["seconds"]) for item in items])


class WhisperTrainer(Seq2SeqTrainer):
    """``max_new_tokens`` None: scaled to each evaluation batch's longest clip."""

    def __init__(self, *args, max_new_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_new_tokens = max_new_tokens

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
