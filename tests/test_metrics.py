import math
import zlib

import jiwer
import pytest

from whisper_exp.metrics import english_normalizer, make_normalizer, score, utterance_wer


def identity(text):
    return text


def test_wer_equals_jiwer_on_known_strings():
    refs = ["the cat sat on the mat", "hello world", "a b c d"]
    hyps = ["the cat sat on mat", "hello there world", "a x c d"]
    scores = score(refs, hyps, identity)
    assert scores.wer == pytest.approx(jiwer.wer(refs, hyps))
    assert scores.wer == pytest.approx(3 / 12)  # 1 deletion + 1 insertion + 1 substitution
    assert scores.cer == pytest.approx(jiwer.cer(refs, hyps))


def test_english_normaliser_ignores_case_punctuation_numbers_spelling():
    normalize = english_normalizer({"colour": "color"})
    assert score(["FOUR SIX TWO, COLOUR!"], ["462 color"], normalize).wer == 0.0
    assert score(["WE CALL IT BEAR"], ["We call it bear."], normalize).wer == 0.0


def test_tokenizer_spelling_map_is_used(whisper_tokenizer_path):
    from transformers import WhisperTokenizer

    normalize = make_normalizer(WhisperTokenizer.from_pretrained(whisper_tokenizer_path),
                                "english")
    assert normalize("Mr. Smith's colour") == normalize("mister smith's color")


def test_basic_normaliser_for_other_languages():
    normalize = make_normalizer(None, "german")
    assert normalize("Grüße, Welt!").split() == ["grüße", "welt"]


def test_empty_references_are_not_scored():
    scores = score(["", "hello"], ["noise", "hello"], identity)
    assert (scores.wer, scores.n_scored, scores.n_empty_references) == (0.0, 1, 1)
    assert math.isnan(utterance_wer("", "x", identity))
    assert utterance_wer("a b", "a c", identity) == 0.5


# --------------------------------------------------------------------------- the run's report
# Each value below is counted by hand in the comment beside it.

from whisper_exp.metrics import (  # noqa: E402
    LOOP_COMPRESSION_RATIO,
    capitalization_f1,
    compression_ratio,
    duration_bucket,
    empty_share,
    error_breakdown,
    loop_share,
    normalizer_name,
    orthographic_wer,
    punctuation_f1,
    repeated_ngram_rate,
    slice_labels,
    slice_wer,
)


def test_orthographic_wer_counts_case_and_punctuation_the_normalised_wer_hides():
    refs, hyps = ["We call it bear."], ["we  call it bear"]
    assert score(refs, hyps, english_normalizer()).wer == 0.0
    # "We"->"we" and "bear."->"bear": 2 substitutions of 4 words; the double space is no error.
    assert orthographic_wer(refs, hyps) == pytest.approx(2 / 4)
    assert orthographic_wer(["We call it bear."], ["We call it bear."]) == 0.0
    assert math.isnan(orthographic_wer([" "], ["x"]))


def test_punctuation_f1_on_punctuation_only_differences():
    # reference marks: "hello," "world." "bye." (3); hypothesis marks: "world." "bye?" (2);
    # only "world." matches: precision 1/2, recall 1/3, F1 = 2*1 / (3+2).
    f1 = punctuation_f1(["Hello, world. Bye."], ["hello world. bye?"])
    assert (f1.true_positives, f1.reference_count, f1.hypothesis_count) == (1, 3, 2)
    assert (f1.precision, f1.recall, f1.f1) == pytest.approx((1 / 2, 1 / 3, 0.4))
    # A mark on a substituted word still counts: words are aligned, not required equal.
    assert punctuation_f1(["Hello, world."], ["Yellow, world."]).f1 == 1.0
    # Quotes and brackets are not marks; a lone "—" is the previous word's mark.
    assert punctuation_f1(['He said "stop" — then left.'],
                          ["he said stop — then left."]).f1 == 1.0


def test_capitalization_f1_sees_a_lower_cased_proper_noun():
    # capitalised reference words: "And", "Americans" (2); hypothesis: "And" (1); TP 1.
    f1 = capitalization_f1(["And so my fellow Americans ask not."],
                           ["And so my fellow americans ask not."])
    assert (f1.true_positives, f1.reference_count, f1.hypothesis_count) == (1, 2, 1)
    assert f1.f1 == pytest.approx(2 / 3)
    # An inserted capitalised word is a false positive: 2*2 / (2+3).
    assert capitalization_f1(["And so Americans"], ["And so Americans Ask"]).f1 == \
        pytest.approx(4 / 5)


def test_references_without_case_or_punctuation_say_so_instead_of_a_number():
    caps = capitalization_f1(["WE CALL IT BEAR"], ["We call it bear."])
    assert caps.f1 is None and "no case" in caps.note and "upper-case" in caps.note
    lower = capitalization_f1(["we call it bear"], ["We call it bear."])
    assert lower.f1 is None and "no case" in lower.note
    bare = punctuation_f1(["WE CALL IT BEAR"], ["We call it bear."])
    assert bare.f1 is None and "no punctuation" in bare.note


def test_error_breakdown_counts_rates_and_words():
    refs = ["the cat sat on the mat", "a b"]
    hyps = ["the bat sat on mat", "a b c c"]
    errors = error_breakdown(refs, hyps, identity)
    # cat->bat; one "the" deleted; "c" inserted twice; 8 reference words.
    assert (errors.substitutions, errors.deletions, errors.insertions) == (1, 1, 2)
    assert errors.reference_words == 8
    assert (errors.sub_rate, errors.del_rate, errors.ins_rate) == (1 / 8, 1 / 8, 2 / 8)
    assert errors.sub_rate + errors.del_rate + errors.ins_rate == \
        pytest.approx(score(refs, hyps, identity).wer)
    assert errors.table() == [
        {"kind": "substitution", "reference": "cat", "hypothesis": "bat", "count": 1},
        {"kind": "deletion", "reference": "the", "hypothesis": "", "count": 1},
        {"kind": "insertion", "reference": "", "hypothesis": "c", "count": 2},
    ]


def test_insertion_burst_shows_in_insertion_rate_and_repeated_ngrams():
    errors = error_breakdown(["he is a big boy"], ["he is a big boy boy boy boy"], identity)
    assert (errors.insertions, errors.ins_rate) == (3, 3 / 5)
    assert errors.inserted == {"boy": 3}
    # 3-grams: "he is a", "is a big", "a big boy", "big boy boy", "boy boy boy" x2: 6, and
    # only the second "boy boy boy" repeats an earlier one.
    assert repeated_ngram_rate(["he is a big boy boy boy boy"]) == pytest.approx(1 / 6)


def test_loop_is_caught_by_whisper_compression_ratio():
    loop = "jaw, " * 30
    data = loop.encode()
    assert compression_ratio(loop) == len(data) / len(zlib.compress(data))
    assert compression_ratio(loop) > LOOP_COMPRESSION_RATIO
    fine = "I never wanted to be cool."
    assert compression_ratio(fine) < LOOP_COMPRESSION_RATIO
    assert compression_ratio("") == 0.0
    assert loop_share([fine, loop, "", "He is a big boy."]) == 1 / 4
    assert math.isnan(loop_share([]))


def test_repeated_ngram_rate_is_pooled_over_outputs():
    # "a b c a b c": abc, bca, cab, abc (the last repeats); "x y z": one 3-gram -> 1 of 5.
    assert repeated_ngram_rate(["a b c a b c", "x y z"]) == pytest.approx(1 / 5)
    assert repeated_ngram_rate(["A b c a B c"]) == pytest.approx(1 / 4), "case-insensitive"
    assert repeated_ngram_rate(["a b", ""]) == 0.0


def test_empty_share():
    assert empty_share(["", "  ", "a"]) == pytest.approx(2 / 3)


def test_slice_wer_per_group_leaves_out_rows_without_a_value():
    refs = ["a b", "a b c d", "a b c d", "z"]
    hyps = ["a b", "a x c d", "a b c d", "q"]
    rows = slice_wer(refs, hyps, ["f", "m", "m", None], identity)
    # f: 0 errors of 2 words; m: 1 substitution of 8 words; the unlabelled row is left out.
    assert rows == [{"value": "f", "n_utterances": 1, "wer": 0.0},
                    {"value": "m", "n_utterances": 2, "wer": 1 / 8}]


def test_slice_labels_categorical_binned_and_refused():
    labels, how = slice_labels(["f", "m", "f", "", "m", "f"])
    assert labels == ["f", "m", "f", None, "m", "f"] and how.startswith("categorical")
    # 8 numeric values > MAX_NUMERIC_CATEGORIES: 4 quantile bins named by their own values.
    labels, how = slice_labels(["1", "2", "3", "4", "5", "6", "7", "8"])
    assert labels == ["1-2", "1-2", "3-4", "3-4", "5-6", "5-6", "7-8", "7-8"]
    assert how == "numeric: 4 quantile bins"
    labels, how = slice_labels([f"spk{i}" for i in range(60)] * 3, max_values=50)
    assert labels is None and "not sliced: 60 distinct values" in how
    labels, how = slice_labels(["a", "b", "c", "a"])
    assert labels is None and "half the rows" in how


def test_duration_buckets():
    assert [duration_bucket(s) for s in (0.5, 2.0, 7.0, 19.9, 29.0)] == \
        ["<2 s", "2-5 s", "5-10 s", "10-20 s", ">=20 s"]


def test_normalizer_is_named():
    assert normalizer_name(english_normalizer()) == "EnglishTextNormalizer"
    assert normalizer_name(make_normalizer(None, "german")) == "BasicTextNormalizer"
