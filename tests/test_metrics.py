import math

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


def test_tokenizer_spelling_map_is_used(tiny_en_path):
    from transformers import WhisperTokenizer

    normalize = make_normalizer(WhisperTokenizer.from_pretrained(tiny_en_path), "english")
    assert normalize("Mr. Smith's colour") == normalize("mister smith's color")


def test_basic_normaliser_for_other_languages():
    normalize = make_normalizer(None, "german")
    assert normalize("Grüße, Welt!").split() == ["grüße", "welt"]


def test_empty_references_are_not_scored():
    scores = score(["", "hello"], ["noise", "hello"], identity)
    assert (scores.wer, scores.n_scored, scores.n_empty_references) == (0.0, 1, 1)
    assert math.isnan(utterance_wer("", "x", identity))
    assert utterance_wer("a b", "a c", identity) == 0.5
