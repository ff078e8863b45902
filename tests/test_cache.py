"""The encoder/mel caches: storage, keys, exactness against the uncached path, and reuse."""

import os

import mlflow
import numpy as np
import pytest
import torch

from whisper_exp.audio import load_audio
from whisper_exp.cache import (
    ArrayCache,
    EncoderSplit,
    audio_fingerprint,
    feature_settings_fingerprint,
    modules_fingerprint,
)
from whisper_exp.config import load_config
from whisper_exp.modeling import apply_strategy, load_base, whisper_encoder


def test_memory_then_disk_with_counters(tmp_path):
    cache = ArrayCache(tmp_path, memory_budget_mb=1, dtype="float16")
    small, big = np.ones((10, 10)), np.ones((1000, 1000))  # 200 B, 2 MB in fp16
    cache.put("small", small)
    cache.put("big", big)
    assert "small" in cache.memory and "big" not in cache.memory
    loaded = cache.get("big")
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.float16
    assert cache.get("nope") is None
    assert (cache.hits, cache.misses) == (1, 1)
    cache._path("torn").write_bytes(b"\x93NUMPY garbage")
    assert cache.get("torn") is None, "a torn file from a killed run is a miss, not a crash"


def test_shared_caches_draw_on_one_memory_budget(tmp_path, monkeypatch):
    """Two encoder caches (say k=2 and k=3 in one Optuna search) together stay within the
    run's memory budget; what does not fit goes to disk."""
    from whisper_exp import cache as cache_module

    monkeypatch.setattr(cache_module, "_CACHES", {})
    monkeypatch.setattr(cache_module, "_POOL", cache_module.MemoryPool(0))
    three_quarters = np.ones((384, 1024))  # 0.75 MiB in fp16
    first = cache_module.shared_cache("encoder-k2", tmp_path, 1, "float16")
    second = cache_module.shared_cache("encoder-k3", tmp_path, 1, "float16")
    first.put("a", three_quarters)
    second.put("a", three_quarters)
    assert "a" in first.memory and "a" not in second.memory
    assert isinstance(second.get("a"), np.memmap), "over the shared budget: on disk"


def test_no_directory_means_memory_only(tmp_path):
    cache = ArrayCache(None, memory_budget_mb=0, dtype="float32")
    cache.put("x", np.ones(4))
    assert cache.get("x") is None


def test_keys_change_with_audio_weights_and_features(tmp_path, tiny_en_path, sample_dir):
    files = sorted(sample_dir.glob("*.flac"))[:2]
    assert audio_fingerprint(files[0]) != audio_fingerprint(files[1])
    assert audio_fingerprint(files[0]) == audio_fingerprint(files[0].read_bytes())
    layer = torch.nn.Linear(2, 2)
    before = modules_fingerprint([layer])
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3
    assert modules_fingerprint([layer]) != before
    assert modules_fingerprint([layer], "k=1") != modules_fingerprint([layer], "k=2")
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(tiny_en_path)
    other = WhisperFeatureExtractor.from_pretrained(tiny_en_path, n_fft=512)
    assert feature_settings_fingerprint(fe) != feature_settings_fingerprint(other)


def _batch(tiny_en_path, sample_dir):
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_en_path)
    files = sorted(sample_dir.glob("*.flac"))[:2]
    features = processor.feature_extractor([load_audio(f) for f in files], sampling_rate=16_000,
                                           return_tensors="pt").input_features
    processor.tokenizer.set_prefix_tokens(predict_timestamps=False)
    ids = [processor.tokenizer(t).input_ids[1:] for t in ("He is a big boy.", "Ready.")]
    labels = torch.full((2, max(map(len, ids))), -100)
    for row, seq in enumerate(ids):
        labels[row, :len(seq)] = torch.tensor(seq)
    return features, labels


@pytest.mark.parametrize("k", [0, 2, 4])
def test_prefix_plus_top_is_the_encoder(tiny_en_path, sample_dir, k):
    model, _ = load_base(load_config(None, {"model": {"name": str(tiny_en_path)}}).model)
    features, _ = _batch(tiny_en_path, sample_dir)
    split = EncoderSplit(model.model.encoder.eval(), k)
    with torch.no_grad():
        expected = model.model.encoder(features).last_hidden_state
        got = split.top(split.prefix(features)).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype, tolerance", [("float32", 1e-4), ("float16", 3e-2)])
def test_cached_path_matches_uncached_loss_and_gradients(tiny_en_path, sample_dir,
                                                         cache_dtype, tolerance):
    """LoRA in the top 2 encoder layers + decoder, bottom 2 encoder layers frozen and cached.
    Seeded: the adapters are drawn from the global RNG, which earlier tests leave anywhere."""
    torch.manual_seed(0)
    cfg = load_config(None, {"model": {"name": str(tiny_en_path)},
                             "finetuning": {"strategy": "lora", "freeze_encoder_layers": 2,
                                            "lora": {"r": 8, "dropout": 0.0}}})
    model, _ = load_base(cfg.model, cfg.finetuning)
    model = apply_strategy(model, cfg.finetuning)
    with torch.no_grad():  # make adapters non-zero so encoder-top gradients are meaningful
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    features, labels = _batch(tiny_en_path, sample_dir)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".encoder.layers.3." in n for n in trainable)
    assert not any(".encoder.layers.1." in n for n in trainable)

    model.zero_grad()
    uncached = model(input_features=features, labels=labels).loss
    uncached.backward()
    expected = {n: p.grad.clone() for n, p in trainable.items()}

    split = EncoderSplit(whisper_encoder(model), k=2)
    store = ArrayCache(None, memory_budget_mb=64, dtype=cache_dtype)
    for i, array in enumerate(split.prefix(features).numpy()):
        store.put(str(i), array)
    prefix = torch.from_numpy(np.stack([store.get(str(i)).astype(np.float32)
                                        for i in range(2)]))
    model.zero_grad()
    cached = model(encoder_outputs=split.top(prefix), labels=labels).loss
    cached.backward()
    torch.testing.assert_close(cached, uncached, rtol=tolerance, atol=tolerance)
    for name, param in trainable.items():
        scale = expected[name].abs().max().item() + 1e-8
        diff = (param.grad - expected[name]).abs().max().item()
        assert diff <= tolerance * scale, f"{name}: {diff} vs scale {scale}"


def _train_cfg(model, data, tmp_path, **training):
    return load_config(None, {
        "model": {"name": str(model)}, "data": {"train": str(data), "max_eval_samples": 2},
        "finetuning": {"strategy": "lora", "freeze_encoder": True},
        "training": {"max_steps": 2, "batch_size": 2, "output_dir": str(tmp_path / "out"),
                     "cache_dir": str(tmp_path / "cache"), **training},
        "evaluation": {"batch_size": 2, "max_new_tokens": 4},
        "tracking": {"experiment_name": "cache"},
    })


def test_training_reuses_the_cache_across_runs(tiny_multilingual_path, sample_dir, tmp_path):
    from whisper_exp.training import train

    first = mlflow.get_run(train(_train_cfg(tiny_multilingual_path, sample_dir, tmp_path,
                                            cache_memory_mb=0)).run_id)  # all on disk
    assert first.data.params["cache.encoder_active"] == "True"
    n = int(first.data.params["data.n_train"]) + int(first.data.params["data.n_eval"])
    assert first.data.metrics["cache_encoder_computed"] == n
    assert first.data.metrics["cache_disk_entries"] >= n and first.data.metrics[
        "cache_disk_mb"] > 0
    second = mlflow.get_run(train(_train_cfg(tiny_multilingual_path, sample_dir,
                                             tmp_path)).run_id)
    assert second.data.metrics["cache_encoder_computed"] == 0, "warm: nothing recomputed"
    assert second.data.metrics["cache_encoder_hit_rate"] > first.data.metrics[
        "cache_encoder_hit_rate"]
    off = mlflow.get_run(train(_train_cfg(tiny_multilingual_path, sample_dir, tmp_path,
                                          cache_encoder=False)).run_id)
    assert off.data.params["cache.encoder_active"] == "False"
    assert off.data.tags["cache.encoder_refusal"] == "training.cache_encoder is false"


def test_disk_entries_are_kept_apart_by_dtype(tmp_path, monkeypatch):
    """An fp32 run and an fp16 run on the same cache_dir/namespace each get their own dtype."""
    from whisper_exp import cache as cache_module

    monkeypatch.setattr(cache_module, "_CACHES", {})
    monkeypatch.setattr(cache_module, "_POOL", cache_module.MemoryPool(0))
    values = np.full((4, 4), 1 / 3)
    full = cache_module.shared_cache("encoder-x", tmp_path, 0, "float32")
    full.put("a", values)
    half = cache_module.shared_cache("encoder-x", tmp_path, 0, "float16")
    assert half.get("a") is None, "an fp32 entry is not an fp16 hit"
    half.put("a", values)
    assert full.get("a").dtype == np.float32 and half.get("a").dtype == np.float16
    np.testing.assert_array_equal(full.get("a"), values.astype(np.float32))


def _frozen_tiny_encoder(**config) -> torch.nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    encoder = WhisperEncoder(WhisperConfig(
        d_model=8, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=8,
        num_mel_bins=4, max_source_positions=4, **config))
    return encoder.requires_grad_(False)


@pytest.mark.parametrize("config, k, reason", [
    ({}, 2, None),
    ({"apply_spec_augment": True, "mask_time_prob": 0.05}, 2, "SpecAugment"),
    ({"apply_spec_augment": True, "mask_time_prob": 0.0, "mask_feature_prob": 0.1}, 2,
     "SpecAugment"),
    ({"apply_spec_augment": True, "mask_time_prob": 0.0, "mask_feature_prob": 0.0}, 2, None),
    ({"apply_spec_augment": False, "mask_time_prob": 0.05}, 2, None),
    ({"attention_dropout": 0.1}, 2, "attention_dropout"),
    ({"activation_dropout": 0.1}, 1, "activation_dropout"),
])
def test_cache_refused_when_the_frozen_prefix_is_random_in_training(config, k, reason):
    """SpecAugment masks the features before the encoder, and dropout inside a frozen layer
    still fires in train mode: either way the prefix output is not a pure function of audio."""
    from whisper_exp.cache import cache_refusal

    refusal = cache_refusal(_frozen_tiny_encoder(**config), k, enabled=True)
    if reason is None:
        assert refusal is None
    else:
        assert refusal is not None and reason in refusal


def test_dropout_above_the_frozen_layers_does_not_refuse():
    from whisper_exp.cache import cache_refusal

    encoder = _frozen_tiny_encoder()
    encoder.layers[1].activation_dropout = 0.1
    encoder.layers[1].self_attn.dropout = 0.1
    assert cache_refusal(encoder, 1, enabled=True) is None
    assert "layer 1" in cache_refusal(encoder, 2, enabled=True)


def _entry_bytes(tmp_path) -> int:
    probe = ArrayCache(tmp_path / "probe", memory_budget_mb=0, dtype="float32")
    probe.put("x", np.ones((16, 16)))
    return probe._path("x").stat().st_size


def test_disk_cap_evicts_the_least_recently_used(tmp_path):
    from whisper_exp.cache import DiskCap

    size = _entry_bytes(tmp_path)
    root = tmp_path / "cache"
    cache = ArrayCache(root / "ns", memory_budget_mb=0, dtype="float32",
                       disk_cap=DiskCap(root, max_bytes=int(3.5 * size)))
    for age, key in enumerate("abc"):
        cache.put(key, np.full((16, 16), age))
        os.utime(cache._path(key), (1000 + age, 1000 + age))  # a oldest, c newest
    assert cache.get("a") is not None  # reading "a" makes "b" the least recently used
    cache.put("d", np.zeros((16, 16)))
    assert [key for key in "abcd" if cache._path(key).exists()] == ["a", "c", "d"]


def test_disk_cap_is_respected_across_namespaces(tmp_path, monkeypatch):
    from whisper_exp import cache as cache_module

    monkeypatch.setattr(cache_module, "_CACHES", {})
    monkeypatch.setattr(cache_module, "_DISK_CAPS", {})
    monkeypatch.setattr(cache_module, "_POOL", cache_module.MemoryPool(0))
    size = _entry_bytes(tmp_path / "probe")
    cap_gb = 10 * size / 2**30
    mel = cache_module.shared_cache("mel", tmp_path / "c", 0, "float32", max_disk_gb=cap_gb)
    encoder = cache_module.shared_cache("enc", tmp_path / "c", 0, "float32", max_disk_gb=cap_gb)
    for i in range(40):
        cache = mel if i % 2 else encoder
        cache.put(str(i), np.ones((16, 16)))
        if cache._path(str(i)).exists():  # file times are coarser than this loop
            os.utime(cache._path(str(i)), (1000 + i, 1000 + i))
        used, entries = cache_module.disk_usage(tmp_path / "c")
        assert used <= 10 * size and entries <= 10
    assert cache_module.disk_usage(tmp_path / "c") == (used, entries) and entries >= 9
    assert encoder.get("38") is not None and encoder.get("0") is None, "newest kept, oldest gone"
    unlimited = cache_module.shared_cache("enc", tmp_path / "c", 0, "float32", max_disk_gb=0)
    for i in range(40, 60):
        unlimited.put(str(i), np.ones((16, 16)))
    assert cache_module.disk_usage(tmp_path / "c")[1] == entries + 20


def test_an_evicted_entry_is_recomputed_and_stored_again(tmp_path):
    """The collator hands an evicted entry's batch over as features; the trainer recomputes
    its prefix (equal to a cache hit) and puts it back."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from whisper_exp.cache import DiskCap
    from whisper_exp.cache_training import CachedEncoderCollator, CachedEncoderTrainer

    encoder = _frozen_tiny_encoder().eval()
    split = EncoderSplit(encoder, 1)
    mels = {key: torch.randn(4, 8) for key in "ab"}
    store = ArrayCache(tmp_path / "ns", memory_budget_mb=0, dtype="float16",
                       disk_cap=DiskCap(tmp_path))
    for key, mel in mels.items():
        store.put(key, split.prefix(mel[None])[0].numpy())
    items = [{"key": key, "audio": f"{key}.wav", "labels": [1, 2], "seconds": 1.0}
             for key in "ab"]
    collate = CachedEncoderCollator(store, decoder_start_token_id=0,
                                    features=lambda batch: torch.stack([mels[i["key"]]
                                                                        for i in batch]))
    hit = collate(items)
    store._path("b").unlink()  # evicted
    with pytest.raises(RuntimeError, match="b.wav"):
        CachedEncoderCollator(store, decoder_start_token_id=0)(items)
    miss = collate(items)
    assert "encoder_prefix" not in miss and miss["input_features"].shape == (2, 4, 8)
    trainer = SimpleNamespace(encoder_split=split, encoder_store=store, spec_augment=None,
                              accelerator=Accelerator(cpu=True))
    inputs = CachedEncoderTrainer._encoder_outputs(trainer, miss)
    assert set(inputs) >= {"encoder_outputs", "labels"} and "input_features" not in inputs
    expected = CachedEncoderTrainer._encoder_outputs(trainer, hit)["encoder_outputs"]
    torch.testing.assert_close(inputs["encoder_outputs"].last_hidden_state,
                               expected.last_hidden_state)
    assert store._path("b").exists(), "stored again"
    assert "encoder_prefix" in collate(items)


def test_training_finishes_when_the_disk_cap_evicts_its_own_entries(tiny_english_path,
                                                                   sample_dir, tmp_path,
                                                                   monkeypatch):
    """A cap far below the run's own cache: entries evicted between the fill and the step that
    needs them are recomputed, not an "encoder cache lost" failure."""
    from whisper_exp import cache as cache_module
    from whisper_exp.training import train

    monkeypatch.setattr(cache_module, "_CACHES", {})
    cap_gb = 1.5 * 2**20 / 2**30  # 1.5 MiB: one mel array or a few encoder arrays
    result = train(_train_cfg(tiny_english_path, sample_dir, tmp_path, cache_memory_mb=0,
                              cache_max_gb=cap_gb, max_steps=4))
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["cache.encoder_active"] == "True"
    assert run.data.metrics["global_steps"] == 4
    assert run.data.metrics["cache_disk_mb"] <= 1.5
