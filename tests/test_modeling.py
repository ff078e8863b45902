import json

import pytest
import torch

from whisper_exp.config import FinetuningConfig, LoraConfig, ModelConfig, load_config
from whisper_exp.modeling import (
    apply_strategy,
    count_parameters,
    is_multilingual,
    load_base,
    load_for_inference,
    save_trained,
)


def _strategy(path, **finetuning):
    cfg = load_config(None, {"model": {"name": str(path)}, "finetuning": finetuning})
    model, processor = load_base(cfg.model, cfg.finetuning, torch.device("cpu"))
    return apply_strategy(model, cfg.finetuning), processor, cfg


def _trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_full_trains_everything_and_freeze_encoder_freezes_it(tiny_english_path):
    full, _, _ = _strategy(tiny_english_path, strategy="full")
    counts = count_parameters(full)
    # Whisper keeps the sinusoidal encoder positions frozen even in a full fine-tune.
    frozen = full.model.encoder.embed_positions.weight.numel()
    assert counts.trainable == counts.total - frozen
    frozen_enc, _, _ = _strategy(tiny_english_path, strategy="full", freeze_encoder=True)
    names = _trainable_names(frozen_enc)
    assert names and not any(".encoder." in n for n in names)
    enc = sum(p.numel() for p in frozen_enc.model.encoder.parameters())
    assert count_parameters(frozen_enc).trainable == counts.total - enc


def test_lora_parameter_count_matches_rank(tiny_english_path):
    model, _, _ = _strategy(tiny_english_path, strategy="lora", lora={"r": 4})
    d = 64  # tiny test model width
    n_attention = 2 + 2 * 2  # encoder self-attn x2 layers, decoder self+cross x2 layers
    expected = n_attention * 2 * (2 * 4 * d)  # q and v: A (r x d) + B (d x r)
    assert count_parameters(model).trainable == expected
    assert all("lora_" in n for n in _trainable_names(model))


def test_lora_with_frozen_encoder_targets_decoder_only(tiny_english_path):
    model, _, _ = _strategy(tiny_english_path, strategy="lora", freeze_encoder=True,
                            lora={"r": 4, "target_modules": ["q_proj", "v_proj", "fc1"]})
    names = _trainable_names(model)
    assert names and all(".decoder." in n for n in names)
    assert any("fc1" in n for n in names)


def test_qlora_quantises_base_to_nf4(tiny_english_path):
    import bitsandbytes as bnb

    model, _, cfg = _strategy(tiny_english_path, strategy="qlora", gradient_checkpointing=True)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "base linear layers are 4-bit"
    assert four_bit[0].weight.quant_state.quant_type == "nf4"
    assert all("lora_" in n for n in _trainable_names(model))
    feats = torch.randn(1, 80, 3000)
    out = model(input_features=feats, labels=torch.tensor([[50257, 400, 50256]]))
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_english_only_model_gets_no_language_prompt(tiny_english_path):
    model, processor = load_base(ModelConfig(name=str(tiny_english_path)))
    assert not is_multilingual(model)
    ids = processor.tokenizer("Hi.").input_ids
    assert processor.tokenizer.convert_ids_to_tokens(ids[:2]) == [
        "<|startoftranscript|>", "<|notimestamps|>"]
    assert getattr(model.generation_config, "language", None) is None


def test_multilingual_model_gets_language_and_task_prompt(tiny_multilingual_path):
    model, processor = load_base(ModelConfig(name=str(tiny_multilingual_path),
                                             language="german", task="transcribe"))
    assert is_multilingual(model)
    tokens = processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("Hallo.").input_ids)
    assert tokens[:4] == ["<|startoftranscript|>", "<|de|>", "<|transcribe|>",
                          "<|notimestamps|>"]
    out = model.generate(input_features=torch.randn(1, 80, 3000), max_new_tokens=3,
                         return_dict_in_generate=True)
    prompt = processor.tokenizer.convert_ids_to_tokens(out.sequences[0, :3])
    assert prompt == ["<|startoftranscript|>", "<|de|>", "<|transcribe|>"]


def test_adapter_round_trip_merges_to_same_outputs(tiny_multilingual_path, tmp_path):
    model, processor, cfg = _strategy(tiny_multilingual_path, strategy="lora",
                                      lora={"r": 4})
    with torch.no_grad():  # non-zero adapters so the merge is observable
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out_dir = save_trained(model, processor, tmp_path / "adapter", cfg)
    meta = json.loads((out_dir / "whisper_exp.json").read_text())
    assert meta["strategy"] == "lora" and meta["language"] == "english"
    assert (out_dir / "adapter_config.json").exists()
    loaded, _ = load_for_inference(str(out_dir), torch.device("cpu"))
    assert not hasattr(loaded, "peft_config"), "adapter merged into a plain model"
    feats = torch.randn(1, 80, 3000)
    decoder_ids = torch.tensor([[50257, 50258, 50358]])
    model.eval()
    with torch.no_grad():
        expected = model(input_features=feats, decoder_input_ids=decoder_ids).logits
        got = loaded(input_features=feats, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unknown_strategy_is_rejected(tiny_english_path):
    model, _ = load_base(ModelConfig(name=str(tiny_english_path)))
    with pytest.raises(ValueError, match="unknown strategy"):
        apply_strategy(model, FinetuningConfig(strategy="prefix", lora=LoraConfig()))


def _training_step(path, strategy: str, checkpointing: bool):
    """One forward/backward on fixed inputs. Returns the loss, the trainable parameters'
    gradients, the decoder/encoder layers, and how many layers ran their feed-forward again
    during backward (what checkpointing does: recompute instead of storing activations)."""
    torch.manual_seed(0)  # the same LoRA init in both runs
    model, _, _ = _strategy(path, strategy=strategy, gradient_checkpointing=checkpointing)
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [*base.model.encoder.layers, *base.model.decoder.layers]
    fc1_calls: list[int] = []
    for layer in layers:  # fc1 is called from inside the layer's forward, so also on recompute
        layer.fc1.register_forward_hook(lambda *_: fc1_calls.append(1))
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 80, 3000, generator=generator)
    torch.manual_seed(0)  # the same dropout masks in both runs
    loss = model(input_features=features, labels=torch.tensor([[50257, 400, 262, 50256]])).loss
    in_forward = len(fc1_calls)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()
             if param.requires_grad and param.grad is not None}
    return loss.item(), grads, layers, (in_forward, len(fc1_calls) - in_forward)


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_gradients(tiny_english_path,
                                                                      strategy):
    loss, grads, layers, (forward, recomputed) = _training_step(tiny_english_path, strategy,
                                                                 checkpointing=False)
    assert (forward, recomputed) == (len(layers), 0)
    assert not any(layer.gradient_checkpointing for layer in layers)

    ckpt_loss, ckpt_grads, ckpt_layers, calls = _training_step(tiny_english_path, strategy,
                                                               checkpointing=True)
    assert all(layer.gradient_checkpointing for layer in ckpt_layers)
    assert calls == (len(layers), len(layers)), "every layer is recomputed during backward"
    assert ckpt_loss == pytest.approx(loss, rel=1e-6)
    assert grads and grads.keys() == ckpt_grads.keys()
    assert any(grad.abs().sum() > 0 for grad in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")
