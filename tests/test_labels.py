"""Training targets: timestamp tokens, previous-utterance prompts masked out of the loss, prompt
truncation, the seeded per-epoch draw and the batches both collators build from them."""

import pytest
import torch
from transformers import WhisperTokenizer

from whisper_exp.config import ConfigError, TrainingConfig
from whisper_exp.data import Example
from whisper_exp.labels import (
    IGNORE,
    SpecialTokens,
    TrainingTargets,
    collate_labels,
    previous_utterances,
    time_token,
    with_prompt,
    with_timestamps,
)


@pytest.fixture(scope="module")
def tokenizer(whisper_tokenizer_path):
    return WhisperTokenizer.from_pretrained(whisper_tokenizer_path)


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return SpecialTokens.from_tokenizer(tokenizer)


def _names(tokenizer, ids):
    """Token names, timestamps as ``<|1.00|>`` (tiny.en's vocabulary has no entries for them)."""
    time_zero = SpecialTokens.from_tokenizer(tokenizer).time_zero
    return [f"<|{(i - time_zero) * 0.02:.2f}|>" if i >= time_zero
            else tokenizer.convert_ids_to_tokens(i) for i in ids if i != IGNORE]


def test_special_tokens_are_whispers(tokenizer, tokens, whisper_tokenizer_path):
    from transformers import GenerationConfig

    assert _names(tokenizer, [tokens.start, tokens.previous, tokens.no_timestamps,
                              tokens.end]) == [
        "<|startoftranscript|>", "<|startofprev|>", "<|notimestamps|>", "<|endoftext|>"]
    # where generate looks for timestamps (and OpenAI's tiny.en has <|0.00|>: 50363)
    generation = GenerationConfig.from_pretrained(whisper_tokenizer_path)
    assert tokens.time_zero == generation.no_timestamps_token_id + 1 == 50363


@pytest.mark.parametrize("seconds, expected", [
    (0.0, "<|0.00|>"), (2.5, "<|2.50|>"), (2.509, "<|2.50|>"), (2.511, "<|2.52|>"),
    (29.99, "<|30.00|>"), (41.0, "<|30.00|>"),
])
def test_time_token_on_the_002_grid_capped_at_30(tokenizer, tokens, seconds, expected):
    assert _names(tokenizer, [time_token(seconds, tokens)]) == [expected]


def test_timestamp_labels_are_one_segment_of_the_utterance(tokenizer, tokens):
    plain = tokenizer("Hello world.").input_ids
    ids = with_timestamps(plain, 3.456, tokens)
    assert _names(tokenizer, ids) == [
        "<|startoftranscript|>", "<|0.00|>", "Hello", "Ġworld", ".", "<|3.46|>",
        "<|endoftext|>"]


def test_prompt_precedes_the_labels_as_get_prompt_ids_builds_it(tokenizer, tokens):
    plain = tokenizer("Yes.").input_ids
    prompt_text = tokenizer(" We met John.", add_special_tokens=False).input_ids
    ids, n = with_prompt(plain, prompt_text, tokens, max_positions=448)
    assert ids[:n] == tokenizer.get_prompt_ids("We met John.", return_tensors=None)
    assert _names(tokenizer, ids) == [
        "<|startofprev|>", "ĠWe", "Ġmet", "ĠJohn", ".", "<|startoftranscript|>",
        "<|notimestamps|>", "Yes", ".", "<|endoftext|>"]
    assert n == 5


def test_prompt_keeps_its_end_and_fits_the_decoder(tokens):
    label = [tokens.start, tokens.no_timestamps, *range(100, 110), tokens.end]  # 13 tokens
    prompt = list(range(1000, 1300))
    ids, n = with_prompt(label, prompt, tokens, max_positions=448)
    assert n == 1 + 223 and ids[1:n] == prompt[-223:], "at most 448 // 2 - 1, as generate cuts"
    ids, n = with_prompt(label, prompt, tokens, max_positions=20)
    # the decoder input (all but the last id) holds exactly 20 positions
    assert len(ids) - 1 == 20 and ids[1:n] == prompt[-(20 - 13):]
    assert with_prompt(label, prompt, tokens, max_positions=13) == (label, 0), "no room"


def test_a_prompted_batch_carries_decoder_inputs_and_masks_the_prompt(tokenizer, tokens):
    plain = tokenizer("Yes.").input_ids  # sot notimestamps Yes . eot
    prompted, n = with_prompt(tokenizer("No.").input_ids, [400, 401], tokens, 448)
    batch = collate_labels([{"labels": plain}, {"labels": prompted, "prompt_length": n}],
                           tokens.start)
    decoder, labels = batch["decoder_input_ids"].tolist(), batch["labels"].tolist()
    assert decoder[1] == [tokens.previous, 400, 401, *tokenizer("No.").input_ids[:-1]]
    assert labels[1] == [IGNORE, IGNORE, IGNORE, *tokenizer("No.").input_ids[1:]]
    # the unprompted row: what the model's own shift of its labels would give
    assert decoder[0][:len(plain) - 1] == plain[:-1]
    assert labels[0] == [*plain[1:], IGNORE, IGNORE, IGNORE]
    # the loss sees exactly the transcript tokens of the prompted row
    trained = [t for t in labels[1] if t != IGNORE]
    assert _names(tokenizer, trained) == ["<|notimestamps|>", "No", ".", "<|endoftext|>"]


def test_a_batch_without_prompts_is_plain_labels(tokenizer, tokens):
    plain = [tokenizer(t).input_ids for t in ("Yes.", "A longer one.")]
    batch = collate_labels([{"labels": plain[0]}, {"labels": plain[1], "prompt_length": 0}],
                           tokens.start)
    assert set(batch) == {"labels"}
    assert batch["labels"][1].tolist() == plain[1][1:]
    assert batch["labels"][0].tolist() == plain[0][1:] + [IGNORE] * (len(plain[1]) - len(plain[0]))


def test_decoder_inputs_match_the_models_shift_of_labels(tokenizer, tokens):
    """Rows without a prompt get the decoder input transformers would build itself."""
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    plain = tokenizer("Hello there.").input_ids
    prompted, n = with_prompt(plain, [400], tokens, 448)
    batch = collate_labels([{"labels": plain}, {"labels": prompted, "prompt_length": n}],
                           tokens.start)
    shifted = shift_tokens_right(torch.tensor([plain[1:]]), tokens.end, tokens.start)
    assert batch["decoder_input_ids"][0, :len(plain) - 1].tolist() == shifted[0].tolist()


def _example(i, speaker=None, folder="a", line=None):
    return Example(audio=f"/data/{folder}/{i}.wav", text=f"Text {i}.", name=f"{i}.wav",
                   speaker=speaker, where=f"metadata.csv line {line if line else i + 2}")


def test_previous_utterance_is_the_same_speakers_in_source_order():
    rows = [_example(0, "s1"), _example(1, "s2"), _example(2, "s1"), _example(3, "s2")]
    assert previous_utterances(rows) == [None, None, 0, 1]
    shuffled = [rows[3], rows[0], rows[2], rows[1]]  # a subset's order: lines decide
    assert previous_utterances(shuffled) == [3, None, 1, None]


def test_previous_utterance_without_speakers_is_the_previous_row_of_the_folder():
    rows = [_example(0, folder="a"), _example(1, folder="b"), _example(2, folder="a")]
    assert previous_utterances(rows) == [None, None, 0]


def _targets(tokenizer, examples, **options):
    labels = [tokenizer(e.text).input_ids for e in examples]
    return TrainingTargets(examples, labels, [1.0] * len(examples), tokenizer,
                           **{"timestamp_probability": 0.0, "prompt_probability": 0.0,
                              "seed": 7, "max_positions": 448, **options})


def test_targets_at_probability_one(tokenizer, tokens):
    rows = [_example(0, "s1"), _example(1, "s1")]
    targets = _targets(tokenizer, rows, timestamp_probability=1.0, prompt_probability=1.0)
    first, second = targets(0), targets(1)
    assert first["prompt_length"] == 0, "the first utterance has no previous one"
    assert tokens.time_zero in first["labels"] and tokens.no_timestamps not in first["labels"]
    n = second["prompt_length"]
    assert _names(tokenizer, second["labels"][:n]) == ["<|startofprev|>", "ĠText", "Ġ0", "."]
    assert _names(tokenizer, second["labels"][n:]) == [
        "<|startoftranscript|>", "<|0.00|>", "Text", "Ġ1", ".", "<|1.00|>", "<|endoftext|>"]


def test_targets_at_probability_zero_are_the_plain_labels(tokenizer):
    rows = [_example(0, "s1"), _example(1, "s1")]
    targets = _targets(tokenizer, rows)
    assert targets(1) == {"labels": tokenizer("Text 1.").input_ids, "prompt_length": 0}


def test_draws_are_seeded_per_example_and_epoch(tokenizer, tokens):
    rows = [_example(i, "s1") for i in range(200)]

    def draws(seed, epoch):
        targets = _targets(tokenizer, rows, timestamp_probability=0.3, seed=seed)
        targets.set_epoch(epoch)
        return [tokens.time_zero in targets(i)["labels"] for i in range(len(rows))]

    assert draws(7, 0) == draws(7, 0), "a run reproduces"
    assert draws(7, 0) != draws(7, 1), "each epoch draws again"
    assert draws(7, 0) != draws(8, 0)
    assert 40 <= sum(draws(7, 0)) <= 80, "about 30% of 200"


def test_probabilities_outside_0_1_are_config_errors():
    with pytest.raises(ConfigError, match="training.prompt_probability must be between 0 and 1"):
        TrainingConfig(prompt_probability=1.5)


@pytest.mark.parametrize("state_epoch, epoch", [(None, 0), (0.0, 0), (1.0, 1), (0.9999999, 1),
                                                (1.5, 1)])
def test_epoch_callback_passes_the_starting_epoch(tokenizer, state_epoch, epoch):
    """At an epoch's start Trainer's state.epoch is the epochs done (a float; mid-epoch on a
    resumed run): the draws of that epoch continue."""
    from types import SimpleNamespace

    from whisper_exp.labels import EpochCallback

    targets = _targets(tokenizer, [_example(0, "s1")])
    EpochCallback(targets).on_epoch_begin(None, SimpleNamespace(epoch=state_epoch), None)
    assert targets.epoch == epoch
