"""augmentation.*: SpecAugment on both encoder paths, speed and noise copies with their own cache
keys, and a tiny training run with every lever on and the encoder cache active."""

import mlflow
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import copy_sample, write_tone
from transformers import Seq2SeqTrainingArguments, WhisperProcessor
from transformers.models.whisper.modeling_whisper import _compute_mask_indices

from whisper_exp import augmentation
from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.augmentation import Perturbation, SpecAugment, attach_spec_augment
from whisper_exp.cache import ArrayCache, EncoderSplit, audio_fingerprint, cache_refusal
from whisper_exp.cache_training import CachedEncoderTrainer, MelFeatures
from whisper_exp.config import AugmentationConfig, ConfigError, load_config
from whisper_exp.modeling import apply_strategy, load_base, whisper_encoder

SPEC = SpecAugment(time_prob=0.05, time_length=10, feature_prob=0.1, feature_length=4)
MASKS = AugmentationConfig(mask_time_prob=0.05, mask_time_length=10, mask_feature_prob=0.1,
                           mask_feature_length=4)


def _model(path, k: int):
    """The tiny random model, full fine-tuning with the bottom k encoder layers frozen."""
    torch.manual_seed(0)
    cfg = load_config(None, {"model": {"name": str(path)},
                             "finetuning": {"strategy": "full", "freeze_encoder_layers": k}})
    model, _ = load_base(cfg.model, cfg.finetuning)
    return apply_strategy(model, cfg.finetuning)


def _batch(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(batch, 80, 3000, generator=generator)
    labels = torch.randint(300, 400, (batch, 6), generator=generator)
    return features, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_hidden_masks_zero_whole_time_steps_and_channels():
    hidden = torch.randn(3, 1500, 64) + 5  # no zeros of its own
    np.random.seed(0)
    masked = SPEC(hidden)
    assert masked.shape == hidden.shape
    zero = masked == 0
    steps = zero.all(dim=2)  # (batch, time): whole time steps zeroed
    channels = zero.all(dim=1)  # (batch, channels): whole channels zeroed
    assert steps.any(dim=1).all() and channels.any(dim=1).all(), "every utterance masked"
    assert torch.equal(zero, steps[:, :, None] | channels[:, None, :]), "nothing else touched"
    assert steps.float().mean() < 0.1 and channels.float().mean() < 0.25
    np.random.seed(0)
    assert torch.equal(SPEC(hidden), masked), "seeded by NumPy's stream, as Whisper's own"
    assert not torch.equal(SPEC(hidden), masked), "a new draw per call"


def test_uncached_path_uses_transformers_spec_augment_in_training_only(tiny_english_path):
    model = _model(tiny_english_path, 0)
    seen = []
    encoder = whisper_encoder(model)
    encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    before = model.config.to_dict()
    use = attach_spec_augment(model, encoder, 0, cached=False, aug=MASKS)
    assert use.hidden is None and "log-mel" in use.where
    assert model.config.apply_spec_augment and model.config.mask_time_prob == 0.05
    features, labels = _batch()
    model.train()
    model(input_features=features.clone(), labels=labels)
    model.eval()
    with torch.no_grad():
        model(input_features=features.clone(), labels=labels)
    train_input, eval_input = seen
    assert train_input.shape == features.shape
    assert (train_input == 0).all(dim=1).any(dim=1).all(), "time frames masked in training"
    assert (train_input == 0).all(dim=2).any(dim=1).all(), "mel bins masked in training"
    assert torch.equal(eval_input, features), "evaluation never masks"
    use.detach()
    assert model.config.to_dict() == before, "the saved model's config masks nothing"
    with pytest.raises(ConfigError, match="augmentation.mask_feature_length=100"):
        attach_spec_augment(model, encoder, 0, cached=False,
                            aug=AugmentationConfig(mask_feature_prob=0.1, mask_feature_length=100))


def test_cached_masking_equals_masking_before_the_top_layers(tiny_english_path, tmp_path):
    """Loss and gradients of the cached trainer with masking == the uncached forward with the
    same masks (same seed, drawn here with transformers' helper) zeroing the frozen prefix's
    output in a hook before encoder layer 1; the cache stays on; evaluation does not mask."""
    model = _model(tiny_english_path, 1)
    encoder = whisper_encoder(model)
    assert cache_refusal(encoder, 1, True) is None
    use = attach_spec_augment(model, encoder, 1, cached=True, aug=MASKS)
    assert use.hidden == SPEC and not model.config.apply_spec_augment, "config left alone"
    assert cache_refusal(encoder, 1, True) is None, "the cache stays on"
    features, labels = _batch()
    split = EncoderSplit(encoder, 1)
    prefix = split.prefix(features)
    trainer = CachedEncoderTrainer(
        model=model, args=Seq2SeqTrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
        encoder_split=split, spec_augment=use.hidden)

    model.train()
    np.random.seed(7)
    model.zero_grad()
    cached = trainer.compute_loss(model, {"encoder_prefix": prefix.clone(), "labels": labels})
    cached.backward()
    cached_grads = _grads(model)
    assert any(".encoder.layers.1." in name for name in cached_grads)

    np.random.seed(7)
    time_mask = torch.from_numpy(_compute_mask_indices((2, 1500), 0.05, 10, min_masks=2))
    channel_mask = torch.from_numpy(_compute_mask_indices((2, 64), 0.1, 4, min_masks=0))

    def mask_prefix_output(module, args):
        hidden = args[0].masked_fill(time_mask[:, :, None], 0.0)
        return (hidden.masked_fill(channel_mask[:, None, :], 0.0), *args[1:])

    handle = encoder.layers[1].register_forward_pre_hook(mask_prefix_output)
    model.zero_grad()
    uncached = model(input_features=features, labels=labels).loss
    uncached.backward()
    handle.remove()
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
    expected = _grads(model)
    assert expected.keys() == cached_grads.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        plain = model(input_features=features, labels=labels).loss
        assert not torch.isclose(plain, cached), "the masks change the loss"
        model.eval()
        evaluated = trainer.compute_loss(model, {"encoder_prefix": prefix.clone(),
                                                 "labels": labels})
    torch.testing.assert_close(evaluated, plain, rtol=1e-5, atol=1e-5)


def test_cache_off_with_frozen_layers_masks_the_same_states(tiny_english_path, tmp_path):
    """k > 0 with the cache off (hooks): the same loss as the cached path for the same seed."""
    model = _model(tiny_english_path, 1)
    encoder = whisper_encoder(model)
    features, labels = _batch()
    trainer = CachedEncoderTrainer(
        model=model, args=Seq2SeqTrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
        encoder_split=EncoderSplit(encoder, 1), spec_augment=SPEC)
    model.train()
    np.random.seed(3)
    with torch.no_grad():
        cached = trainer.compute_loss(model, {"encoder_prefix": EncoderSplit(encoder, 1)
                                              .prefix(features), "labels": labels})
        use = attach_spec_augment(model, encoder, 1, cached=False, aug=MASKS)
        assert use.hidden is None and "hooks" in use.where
        np.random.seed(3)
        hooked = model(input_features=features, labels=labels).loss
        model.eval()
        evaluated = model(input_features=features, labels=labels).loss
        use.detach()
        plain = model(input_features=features, labels=labels).loss
    torch.testing.assert_close(hooked, cached, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(hooked, plain)
    torch.testing.assert_close(evaluated, plain)


@pytest.fixture
def tone(tmp_path):
    return write_tone(tmp_path / "tone.wav", seconds=2.0)


def test_speed_copies_scale_duration_and_pitch(tone):
    samples = load_audio(tone)
    for factor in (0.9, 1.1):
        copy = augmentation.speed_perturb(samples, factor)
        assert abs(len(copy) - len(samples) / factor) <= 2
        spectrum = np.abs(np.fft.rfft(copy))
        peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(copy)
        assert abs(peak_hz - 440 * factor) < 2, "pitch moves with tempo (sox speed)"


def test_speed_copies_key_the_caches_apart(tmp_path, tiny_english_path):
    data = copy_sample(tmp_path / "data", n=3)
    processor = WhisperProcessor.from_pretrained(tiny_english_path)
    cfg = load_config(None, {"data": {"train": str(data)}})
    from whisper_exp.data import read_source
    from whisper_exp.training import SpeechDataset

    examples = read_source(data, cfg.data).examples
    copies = augmentation.training_perturbations(AugmentationConfig(speed_factors=[0.9, 1.1]),
                                                 seed=42)
    first = SpeechDataset(examples, processor, perturbations=copies)
    again = SpeechDataset(examples, processor, perturbations=augmentation.training_perturbations(
        AugmentationConfig(speed_factors=[0.9, 1.1]), seed=42))
    assert len(first) == 9 and len(set(first.keys)) == 9, "one key per copy"
    assert first.keys == again.keys, "same factor, same key across runs"
    original = audio_fingerprint(examples[0].audio)
    assert first.keys[0] == original and first.keys[3].startswith(original + "-")
    assert first.keys[3] != first.keys[6], "0.9 and 1.1 differ"
    assert [first[i]["labels"] for i in (0, 3, 6)] == [first.labels[0]] * 3, "same transcript"
    for i, factor in ((3, 0.9), (6, 1.1)):
        assert first.seconds[i] == pytest.approx(first.seconds[0] / factor)
        audio = augmentation.training_audio(first[i])
        assert len(audio) / SAMPLE_RATE == pytest.approx(first.seconds[i], abs=1e-3)

    features = MelFeatures(processor, ArrayCache(None, 64, "float32"))
    mel = features([first[0], first[3], first[6]])
    assert len(features.cache.memory) == 3
    assert not torch.equal(mel[0], mel[1]) and not torch.equal(mel[1], mel[2])
    assert torch.equal(features([first[3]])[0], mel[1]), "a copy is read back from the cache"

    limit = max(first.seconds[:3]) + 0.01  # the longest recording's 0.9 copy is over it
    over = sum(seconds / 0.9 > limit for seconds in first.seconds[:3])
    short = SpeechDataset(examples, processor, perturbations=copies, max_duration_s=limit)
    assert over >= 1 and short.dropped == over and len(short) == 9 - over
    assert max(short.seconds) <= limit
    assert sum(p is not None and p.speed == 1.1 for p in short.perturbations) == 3


def test_a_copy_is_prompted_like_its_original(tmp_path, tiny_english_path):
    """Prompt training: a copy's previous utterance is its original's, never its own row."""
    from whisper_exp.data import read_source
    from whisper_exp.training import SpeechDataset

    data = copy_sample(tmp_path / "data", n=3)
    examples = read_source(data, load_config(None, {"data": {"train": str(data)}}).data).examples
    processor = WhisperProcessor.from_pretrained(tiny_english_path)
    targets = {"timestamp_probability": 0.0, "prompt_probability": 1.0, "seed": 0,
               "max_positions": 448}
    plain = SpeechDataset(examples, processor, targets)
    augmented = SpeechDataset(examples, processor, targets, augmentation.training_perturbations(
        AugmentationConfig(speed_factors=[0.9], noise_snr_db=10), seed=0))
    assert len(augmented) == 9
    previous = augmented.targets.previous
    assert previous[:3] == plain.targets.previous[:3] and previous[3:6] == previous[:3]
    assert previous[6:] == previous[:3]
    assert augmented[4]["labels"] == plain[1]["labels"], "same prompt and transcript"


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    noise = noisy.astype(np.float64) - clean
    return 10 * np.log10(np.mean(np.square(clean, dtype=np.float64)) / np.mean(noise ** 2))


def test_gaussian_noise_at_the_requested_snr_and_seeded(tone):
    samples = load_audio(tone)
    copy = Perturbation(snr_db=10.0, seed=42)
    key = copy.key(audio_fingerprint(tone))
    noisy = copy.apply(samples, key)
    assert noisy.shape == samples.shape
    assert abs(_snr_db(samples, noisy) - 10.0) < 0.5
    assert np.array_equal(noisy, Perturbation(snr_db=10.0, seed=42).apply(samples, key))
    other = Perturbation(snr_db=10.0, seed=7)
    assert other.key(audio_fingerprint(tone)) != key
    assert not np.array_equal(other.apply(samples, other.key(audio_fingerprint(tone))), noisy)
    assert Perturbation(snr_db=5.0, seed=42).key(audio_fingerprint(tone)) != key


def test_noise_clips_from_a_folder(tone, tmp_path):
    folder = tmp_path / "noise"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sf.write(folder / "hum.wav", rng.uniform(-0.3, 0.3, 4000).astype(np.float32), SAMPLE_RATE)
    sf.write(folder / "hiss.flac", rng.normal(0, 0.1, 48000).astype(np.float32), SAMPLE_RATE)
    aug = AugmentationConfig(noise_snr_db=5.0, noise_dir=str(folder))
    (copy,) = augmentation.training_perturbations(aug, seed=1)
    samples = load_audio(tone)  # 2 s: the 0.25 s clip is looped, the 3 s one cropped
    keys = [copy.key(f"clip{i}") for i in range(6)]
    noisy = [copy.apply(samples, key) for key in keys]
    for mixed in noisy:
        assert mixed.shape == samples.shape and abs(_snr_db(samples, mixed) - 5.0) < 0.5
    assert np.array_equal(noisy[0], copy.apply(samples, keys[0])), "seeded"
    assert "dir" in keys[0] and copy.key("clip0") != Perturbation(snr_db=5.0, seed=1).key("clip0")
    (again,) = augmentation.training_perturbations(aug, seed=1)
    assert again.key("clip0") == keys[0], "same folder and seed, same key"
    sf.write(folder / "more.wav", rng.normal(0, 0.1, 8000).astype(np.float32), SAMPLE_RATE)
    (changed,) = augmentation.training_perturbations(aug, seed=1)
    assert changed.key("clip0") != keys[0], "another noise set, another key"


@pytest.mark.parametrize("aug, message", [
    (AugmentationConfig(noise_snr_db=10, noise_dir="missing"), "augmentation.noise_dir: .*missing"),
    (AugmentationConfig(noise_snr_db=10, noise_dir="."), "augmentation.noise_dir: no audio"),
    (AugmentationConfig(noise_dir="."), "augmentation.noise_snr_db"),
    (AugmentationConfig(speed_factors=[1.0]), "augmentation.speed_factors"),
    (AugmentationConfig(mask_time_prob=2.0), "augmentation.mask_time_prob"),
])
def test_bad_augmentation_keys_are_named(aug, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        augmentation.training_perturbations(aug, seed=0)


def test_training_with_every_lever_keeps_the_encoder_cache(tiny_english_path, tmp_path):
    from whisper_exp.training import train

    data = copy_sample(tmp_path / "data", n=8)
    cfg = load_config(None, {
        "model": {"name": str(tiny_english_path)},
        "data": {"train": str(data), "max_train_samples": 3, "max_eval_samples": 2},
        "finetuning": {"strategy": "lora", "freeze_encoder_layers": 1},
        "augmentation": {"mask_time_prob": 0.05, "mask_feature_prob": 0.05,
                         "mask_feature_length": 4, "speed_factors": [0.9, 1.1],
                         "noise_snr_db": 10},
        "training": {"max_steps": 2, "batch_size": 4, "output_dir": str(tmp_path / "out"),
                     "cache_dir": str(tmp_path / "cache"), "checkpoint_steps": -1},
        "evaluation": {"batch_size": 2, "max_new_tokens": 4, "long_form": "off"},
        "tracking": {"experiment_name": "augmentation"},
    })
    run = mlflow.get_run(train(cfg).run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["cache.encoder_active"] == "True"
    assert "encoder cache" in run.data.tags["augmentation.spec_augment"]
    n_train = int(run.data.params["data.n_train"])
    assert run.data.metrics["train_examples"] == 4 * n_train
    assert run.data.metrics["augmentation.copies_dropped"] == 0
    n_eval = int(run.data.params["data.n_eval"])
    assert run.data.metrics["cache_encoder_computed"] == 4 * n_train + n_eval
    assert run.data.params["augmentation.speed_factors"] == "[0.9, 1.1]"
