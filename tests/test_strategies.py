"""Issue 13's fine-tuning levers on a 4-layer tiny random Whisper: all-linear LoRA above a frozen
prefix, DoRA, full fine-tuning of the top encoder layers on the cached path, and layer-wise
learning rates as the Trainer's optimizer groups."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import (
    GenerationConfig,
    Seq2SeqTrainingArguments,
    WhisperConfig,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from whisper_exp.config import load_config
from whisper_exp.export import save_merged_hf
from whisper_exp.modeling import (
    ALL_LINEAR,
    apply_strategy,
    load_base,
    load_for_inference,
    save_trained,
)
from whisper_exp.trainer import WhisperTrainer

FEATURES = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
DECODER_IDS = torch.tensor([[50257, 50362, 400, 262]])


@pytest.fixture(scope="module")
def four_layer_path(tmp_path_factory, whisper_tokenizer_path) -> Path:
    """tiny.en's shape in miniature: 4 encoder layers (as tiny.en), 2 decoder layers, width 64,
    no dropout (so the frozen prefix may be cached)."""
    processor = WhisperProcessor.from_pretrained(whisper_tokenizer_path)
    tok = processor.tokenizer
    start = tok.convert_tokens_to_ids("<|startoftranscript|>")
    config = WhisperConfig(
        vocab_size=51864, d_model=64, encoder_layers=4, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
        decoder_ffn_dim=128, num_mel_bins=80, decoder_start_token_id=start,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    gen = GenerationConfig.from_pretrained(whisper_tokenizer_path)
    gen.is_multilingual, gen.alignment_heads = False, None
    model.generation_config = gen
    out = tmp_path_factory.mktemp("models") / "tiny-random-4-layer"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _strategy(path: Path, **finetuning):
    torch.manual_seed(0)
    cfg = load_config(None, {"model": {"name": str(path)}, "finetuning": finetuning})
    model, processor = load_base(cfg.model, cfg.finetuning, torch.device("cpu"))
    return apply_strategy(model, cfg.finetuning), processor, cfg


def _perturb_adapters(model: torch.nn.Module) -> None:
    """Non-zero LoRA B (and, for DoRA, a magnitude off its initial norm) so merging shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.5)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_features=FEATURES, decoder_input_ids=DECODER_IDS).logits


def _adapted(model: torch.nn.Module) -> set[tuple[str, int, str]]:
    """(encoder|decoder, layer, module path inside the layer) of every module given LoRA."""
    found = set()
    for name, module in model.named_modules():
        match = re.search(r"(encoder|decoder)\.layers\.(\d+)\.(\S+)$", name)
        if match and hasattr(module, "lora_A"):
            found.add((match.group(1), int(match.group(2)), match.group(3)))
    return found


def _expected_all_linear(encoder_layers, decoder_layers=(0, 1)) -> set[tuple[str, int, str]]:
    attention = ("q_proj", "k_proj", "v_proj", "out_proj")
    enc = {("encoder", i, f"self_attn.{m}") for i in encoder_layers for m in attention}
    enc |= {("encoder", i, m) for i in encoder_layers for m in ("fc1", "fc2")}
    dec = {("decoder", i, f"{attn}.{m}") for i in decoder_layers
           for attn in ("self_attn", "encoder_attn") for m in attention}
    dec |= {("decoder", i, m) for i in decoder_layers for m in ("fc1", "fc2")}
    return enc | dec


@pytest.mark.parametrize("targets", [list(ALL_LINEAR), ["all-linear"]])
def test_all_linear_lora_goes_only_above_the_frozen_layers_and_round_trips(
        four_layer_path, tmp_path, targets):
    model, processor, cfg = _strategy(four_layer_path, strategy="lora", freeze_encoder_layers=2,
                                      lora={"r": 4, "target_modules": targets})
    assert _adapted(model) == _expected_all_linear(encoder_layers=(2, 3))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("proj_out" in n for n, _ in model.named_modules()
                   if "lora" in n), "the tied output projection stays plain"

    _perturb_adapters(model)
    expected = _logits(model)
    out_dir = save_trained(model, processor, tmp_path / "adapter", cfg)
    loaded, _ = load_for_inference(str(out_dir), torch.device("cpu"))
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-4, rtol=1e-4)


def test_all_linear_without_frozen_layers_adapts_every_block(four_layer_path):
    model, _, _ = _strategy(four_layer_path, strategy="lora",
                            lora={"r": 4, "target_modules": ["all-linear", "q_proj"]})
    assert _adapted(model) == _expected_all_linear(encoder_layers=range(4))


def test_unknown_target_module_names_the_key(four_layer_path):
    with pytest.raises(ValueError, match=r"finetuning\.lora\.target_modules.*'qproj'"):
        _strategy(four_layer_path, strategy="lora", lora={"target_modules": ["q_proj", "qproj"]})


def test_dora_trains_saves_loads_and_exports_merged(four_layer_path, tmp_path):
    model, processor, cfg = _strategy(four_layer_path, strategy="lora", freeze_encoder_layers=2,
                                      lora={"r": 4, "use_dora": True, "dropout": 0.0})
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters()
                  if "lora_magnitude_vector" in n}
    assert magnitudes, "DoRA adds a trainable magnitude per adapted layer"
    assert all(".encoder.layers.0." not in n and ".encoder.layers.1." not in n
               for n in magnitudes)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps: lora_B leaves zero after the first, then A gets gradients
        loss = model(input_features=FEATURES, labels=DECODER_IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = [n for n, p in model.named_parameters()
             if n in magnitudes and not torch.equal(p, magnitudes[n])]
    assert moved, "training updates the DoRA magnitudes"
    expected = _logits(model)

    out_dir = save_trained(model, processor, tmp_path / "dora", cfg)
    assert '"use_dora": true' in (out_dir / "adapter_config.json").read_text()
    loaded, _ = load_for_inference(str(out_dir), torch.device("cpu"))
    assert not hasattr(loaded, "peft_config"), "merged into a plain Whisper"
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-4, rtol=1e-4)

    merged_dir = tmp_path / "merged"
    save_merged_hf(str(out_dir), merged_dir)
    merged = WhisperForConditionalGeneration.from_pretrained(merged_dir)
    torch.testing.assert_close(_logits(merged), expected, atol=1e-4, rtol=1e-4)


def test_full_fine_tuning_of_the_top_layers_trains_on_the_encoder_cache(four_layer_path,
                                                                        sample_dir, tmp_path):
    """strategy full + freeze_encoder_layers=2: the conv stem and layers 0-1 are cached and stay
    bitwise unchanged; layers 2-3, the encoder's layer norm and the decoder learn."""
    from whisper_exp.training import train

    cfg = load_config(None, {
        "model": {"name": str(four_layer_path)},
        "data": {"train": str(sample_dir), "max_eval_samples": 2},
        "finetuning": {"strategy": "full", "freeze_encoder_layers": 2},
        "training": {"max_steps": 2, "batch_size": 2, "warmup_steps": 0, "learning_rate": 1e-3,
                     "checkpoint_steps": -1, "output_dir": str(tmp_path / "out"),
                     "cache_dir": str(tmp_path / "cache")},
        "evaluation": {"batch_size": 2, "max_new_tokens": 4},
        "tracking": {"experiment_name": "full-top"},
    })
    result = train(cfg)
    run = mlflow.get_run(result.run_id)
    assert run.data.params["cache.encoder_active"] == "True"
    assert run.data.metrics["cache_encoder_hit_rate"] > 0

    before = WhisperForConditionalGeneration.from_pretrained(four_layer_path).state_dict()
    after = WhisperForConditionalGeneration.from_pretrained(result.model_dir).state_dict()
    frozen = ("model.encoder.conv", "model.encoder.embed_positions", "model.encoder.layers.0.",
              "model.encoder.layers.1.")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert not {name for name in changed if name.startswith(frozen)}
    for part in ("model.encoder.layers.2.", "model.encoder.layers.3.",
                 "model.encoder.layer_norm.", "model.decoder.layers.0.", "model.decoder.layers.1."):
        assert any(name.startswith(part) for name in changed), f"{part} did not train"


def _trainer(model: torch.nn.Module, tmp_path: Path, decay: float) -> WhisperTrainer:
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "trainer"), learning_rate=1e-3,
                                    weight_decay=0.01, use_cpu=True, report_to=[])
    return WhisperTrainer(model=model, args=args, layer_lr_decay=decay)


def _lr_by_parameter(trainer: WhisperTrainer) -> dict[str, tuple[float, float]]:
    """name -> (lr, weight decay) of the group each trainable parameter landed in."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    out: dict[str, tuple[float, float]] = {}
    for group in trainer.create_optimizer().param_groups:
        for param in group["params"]:
            assert names[id(param)] not in out, f"{names[id(param)]} is in two groups"
            out[names[id(param)]] = (group["lr"], group["weight_decay"])
    return out


def _layer_of(name: str) -> int | None:
    match = re.search(r"encoder\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def test_layer_lr_decay_groups_for_full_fine_tuning(four_layer_path, tmp_path):
    model, _, _ = _strategy(four_layer_path, strategy="full", freeze_encoder_layers=1)
    trainer = _trainer(model, tmp_path, decay=0.5)
    lrs = _lr_by_parameter(trainer)
    assert set(lrs) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, (lr, weight_decay) in lrs.items():
        layer = _layer_of(name)
        if layer is not None:  # layer 3 (top): x0.5, layer 2: x0.25, layer 1: x0.125
            assert lr == pytest.approx(1e-3 * 0.5 ** (4 - layer)), name
        elif name.startswith("model.encoder.layer_norm."):
            assert lr == pytest.approx(1e-3 * 0.5), name
        else:
            assert ".encoder." not in name and lr == 1e-3, name
        no_decay = name.endswith("bias") or "layer_norm" in name
        assert weight_decay == (0.0 if no_decay else 0.01), name
    assert {_layer_of(n) for n in lrs} == {None, 1, 2, 3}, "layer 0 is frozen: no group"
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3, "the logged lr is the decoder's"

    # The scheduler scales every group alike, so the ratios hold through training.
    trainer.create_scheduler(num_training_steps=10, optimizer=trainer.optimizer)
    for _ in range(3):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    rates = [group["lr"] for group in trainer.optimizer.param_groups]
    assert max(rates) == rates[0] and min(rates) == pytest.approx(rates[0] * 0.5 ** 3)


def test_layer_lr_decay_groups_for_lora_reach_the_conv_stem_when_trainable(four_layer_path,
                                                                         tmp_path):
    model, _, _ = _strategy(four_layer_path, strategy="lora",
                            lora={"r": 4, "target_modules": ["all-linear"]})
    with torch.no_grad():  # a stem that trains (not a shipped strategy) gets the lowest rate
        model.get_base_model().model.encoder.conv1.requires_grad_(True)
    lrs = _lr_by_parameter(_trainer(model, tmp_path, decay=0.8))
    assert all("lora_" in n or ".conv1." in n for n in lrs)
    for name, (lr, _) in lrs.items():
        layer = _layer_of(name)
        expected = (1e-3 * 0.8 ** 5 if ".conv1." in name
                    else 1e-3 * 0.8 ** (4 - layer) if layer is not None else 1e-3)
        assert lr == pytest.approx(expected), name


def test_layer_lr_decay_of_one_is_the_trainers_own_optimizer(four_layer_path, tmp_path):
    model, _, _ = _strategy(four_layer_path, strategy="full")
    groups = _trainer(model, tmp_path, decay=1.0).create_optimizer().param_groups
    assert len(groups) == 2 and {g["lr"] for g in groups} == {1e-3}
    with pytest.raises(ValueError, match=r"training\.layer_lr_decay=0"):
        _trainer(model, tmp_path, decay=0.0)


def test_train_passes_layer_lr_decay_to_the_trainer(four_layer_path, sample_dir, tmp_path,
                                                    monkeypatch):
    """``training.layer_lr_decay`` reaches the optimizer of a real ``train`` run (cached path)."""
    from whisper_exp.training import train

    created: list[list[float]] = []
    create = WhisperTrainer.create_optimizer

    def recording(self, *args, **kwargs):
        optimizer = create(self, *args, **kwargs)
        created.append(sorted({group["lr"] for group in optimizer.param_groups}))
        return optimizer

    monkeypatch.setattr(WhisperTrainer, "create_optimizer", recording)
    cfg = load_config(None, {
        "model": {"name": str(four_layer_path)},
        "data": {"train": str(sample_dir), "max_eval_samples": 2},
        "finetuning": {"strategy": "lora", "freeze_encoder_layers": 2},
        "training": {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3,
                     "layer_lr_decay": 0.5, "checkpoint_steps": -1,
                     "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")},
        "evaluation": {"batch_size": 2, "max_new_tokens": 4},
        "tracking": {"experiment_name": "layer-lr"},
    })
    train(cfg)
    assert created == [pytest.approx([2.5e-4, 5e-4, 1e-3])]
