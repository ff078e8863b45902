"""modeling.count_parameters (logged as ``trainable_params``) on tiny random Whispers: the counts
transformers/peft give must stay the project's rule, a 4-bit packed weight counting as the two
parameters each stored byte holds, for every strategy and for a bare 4-bit base."""

import pytest
import torch

from whisper_exp.config import load_config
from whisper_exp.modeling import apply_strategy, count_parameters, load_base


def _reference(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) counted by hand over the model's unique parameters."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def _load(path, apply: bool, **finetuning):
    cfg = load_config(None, {"model": {"name": str(path)}, "finetuning": finetuning})
    model, _ = load_base(cfg.model, cfg.finetuning, torch.device("cpu"))
    return apply_strategy(model, cfg.finetuning) if apply else model


@pytest.mark.parametrize("apply, finetuning", [
    (True, {"strategy": "full"}),
    (True, {"strategy": "full", "freeze_encoder": True}),
    (True, {"strategy": "lora", "lora": {"r": 4}}),
    (True, {"strategy": "qlora", "lora": {"r": 4}}),
    (False, {"strategy": "qlora"}),
], ids=["full", "full-frozen-encoder", "lora", "qlora", "4bit-base-without-adapter"])
def test_counts_follow_the_packed_4bit_rule(tiny_english_path, apply, finetuning):
    model = _load(tiny_english_path, apply, **finetuning)
    packed = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert bool(packed) == (finetuning["strategy"] == "qlora"), "the rule is exercised"
    counts = count_parameters(model)
    assert (counts.trainable, counts.total) == _reference(model)
    assert 0 <= counts.trainable <= counts.total


def test_4bit_base_counts_as_many_parameters_as_the_fp32_model(tiny_english_path):
    """Quantising must not change the reported size: only the storage shrinks."""
    fp32 = count_parameters(_load(tiny_english_path, False, strategy="full"))
    four_bit = count_parameters(_load(tiny_english_path, False, strategy="qlora"))
    assert four_bit.total == fp32.total
