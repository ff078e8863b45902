"""Text case: sentence case, the all-caps detection of ``auto`` and word-level truecasing."""

import pytest

from whisper_exp.data import Example
from whisper_exp.text_case import (
    apply_text_case,
    is_all_caps,
    is_all_lower,
    sentence_case,
    truecase,
    word_key,
)


@pytest.mark.parametrize("text, expected", [
    ("WE CALL IT BEAR", "We call it bear."),
    ("I THINK I'M READY", "I think I'm ready."),
    ("IS IT OK?", "Is it ok?"),
    # any final punctuation of its own is kept, not followed by a period
    ("HELLO 世界。", "Hello 世界。"),
    ("WHAT？", "What？"),
    ("HE SAID \"GO.\"", "He said \"go.\""),
])
def test_sentence_case(text, expected):
    assert sentence_case(text) == expected


def _examples(*texts):
    return [Example(audio=f"{i}.wav", text=t, name=f"{i}.wav") for i, t in enumerate(texts)]


@pytest.mark.parametrize("language, texts", [
    ("chinese", ["我们叫它熊", "今天天气很好", "你好吗？"]),
    ("japanese", ["これはペンです", "おはようございます", "元気ですか？"]),
    ("arabic", ["نسميه دب", "الطقس جميل اليوم", "كيف حالك؟"]),
    ("hindi", ["हम इसे भालू कहते हैं", "आज मौसम अच्छा है", "आप कैसे हैं।"]),
    ("zh", ["我喜欢 NBA", "我们用 GPS", "他在 IBM 工作"]),  # caps are acronyms, not shouting
])
def test_auto_leaves_languages_without_case_alone(language, texts):
    examples = _examples(*texts)
    assert apply_text_case(examples, "auto", language=language) == (0, None)
    assert [e.text for e in examples] == texts


def test_scripts_without_case_are_not_all_caps():
    assert not is_all_caps("我们叫它熊")
    assert not is_all_caps("123 !?")
    assert is_all_caps("WE CALL IT 熊")


@pytest.mark.parametrize("language, text, expected", [
    ("italian", "I CANI E I GATTI", "I cani e i gatti."),
    ("it", "SONO I MIEI", "Sono i miei."),
    ("english", "I THINK I'M READY", "I think I'm ready."),
    (None, "SO I SAID", "So I said."),  # an English-only .en model
    ("en", "SO I SAID", "So I said."),
])
def test_lone_i_rule_is_english_only(language, text, expected):
    assert sentence_case(text, language=language) == expected


@pytest.mark.parametrize("language, text", [
    ("chinese", "我们叫它熊"),
    ("chinese", "你好吗？"),
    ("japanese", "元気です。"),
    ("arabic", "كيف حالك؟"),
    ("hindi", "आप कैसे हैं।"),
    ("english", "你好吗？"),  # a row in an uncased script is never changed
])
def test_sentence_case_leaves_uncased_scripts_alone(language, text):
    assert sentence_case(text, language=language) == text


def test_auto_on_mixed_script_corpus_only_touches_cased_rows():
    texts = ["WE CALL IT BEAR", "SO I SAID NO", "GOOD MORNING", "你好", "こんにちは"]
    examples = _examples(*texts)
    changed, notice = apply_text_case(examples, "auto", language="english")
    assert changed == 3 and "sentence-cased" in notice
    assert [e.text for e in examples] == ["We call it bear.", "So I said no.", "Good morning.",
                                          "你好", "こんにちは"]


def test_auto_still_sentence_cases_all_caps_italian():
    examples = _examples("I CANI E I GATTI", "BUONGIORNO A TUTTI")
    changed, _ = apply_text_case(examples, "auto", language="italian")
    assert changed == 2
    assert [e.text for e in examples] == ["I cani e i gatti.", "Buongiorno a tutti."]


@pytest.mark.parametrize("reference, base, expected", [
    # the case: the proper noun comes back, the base's extra word and comma do not
    ("AND SO MY FELLOW AMERICANS", "And so my fellow Americans, ask", "And so my fellow Americans"),
    # sentence-cased by the data layer first: the reference keeps its own full stop
    ("We met john in paris.", "We met John in Paris!", "We met John in Paris."),
    # a substituted word is sentence-cased, the matches around it take the base's case
    ("I SAW NASA AND THE BBC", "I saw Nassau and the BBC.", "I saw nasa and the BBC"),
    # no base words agree: plain sentence case with the English "I" rule
    ("SO I SAID I'M OUT", "", "So I said I'm out"),
    # the base starts lower-case: a transcript still starts upper-case
    ("THE END", "the end", "The end"),
    # curly apostrophes and quotes around words still align
    ("DON'T ASK \"JOHN\"", "Don’t ask John.", "Don't ask \"John\""),
])
def test_truecase_takes_the_base_models_case_where_words_agree(reference, base, expected):
    assert truecase(reference, base).text == expected


def test_truecase_counts_the_words_taken_from_the_base():
    recased = truecase("AND SO MY FELLOW AMERICANS ASK", "And so my fellow Americans.")
    assert (recased.words, recased.from_base, recased.changed) == (6, 5, 1)


def test_truecase_leaves_text_without_case_alone():
    assert truecase("我们叫它熊", "我们叫它熊", language="chinese").text == "我们叫它熊"


def test_word_key_ignores_case_punctuation_and_apostrophe_style():
    assert word_key("\"Don’t,") == word_key("DON'T") == "don't"


def test_truecase_mode_marks_all_caps_and_all_lower_corpora_for_recasing():
    for texts in (["WE CALL IT BEAR", "GOOD MORNING"], ["we call it bear", "good morning"]):
        examples = _examples(*texts)
        changed, notice = apply_text_case(examples, "truecase")
        assert changed == 2 and "truecase" in notice
        assert [e.text for e in examples] == ["We call it bear.", "Good morning."]
        assert all(e.recase for e in examples)
    assert is_all_lower("we call it bear") and not is_all_lower("We call it")


def test_truecase_mode_leaves_cased_corpora_alone():
    examples = _examples("We met John.", "Paris is nice.", "GO AWAY")
    assert apply_text_case(examples, "truecase") == (0, None)
    assert not any(e.recase for e in examples)
    # auto does not touch an all-lower-case corpus: only truecase has a source of case for it
    assert apply_text_case(_examples("we call it bear", "good morning"), "auto") == (0, None)
