"""Transcript text case: detect all-caps corpora, sentence-case them, and truecase them from a
base model's own transcript of the same clip.

Pure text functions (no audio, no model): ``data`` applies them while reading a corpus, and the
training layer (``truecasing``) supplies the base transcripts for ``text_case: truecase``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Protocol


class Transcribed(Protocol):
    """What the case functions need of ``data.Example``."""

    text: str
    recase: bool


# Full stops, question and exclamation marks of the scripts Whisper covers (Latin, CJK, Arabic,
# Devanagari/Bengali danda, Armenian, Greek, Ethiopic, Myanmar), optionally followed by closing
# quotes or brackets: a transcript ending in any of them already has its own final punctuation.
_SENTENCE_END = re.compile("[.!?…。？！｡．؟۔।॥։;።။][\"'”’»)\\]」』]*$")
_LONE_I = re.compile(r"\bi\b(?=('(m|ll|ve|d|s))?\b)")
# Languages written in scripts without letter case (Chinese, Japanese, Korean, Thai, Arabic,
# Hebrew, the Indic scripts, ...): upper/lower/sentence case means nothing there, and the Latin
# acronyms they contain ("NBA") are not shouting. Georgian is unicameral in running text.
UNCASED_LANGUAGES = frozenset({
    "zh", "yue", "ja", "ko", "th", "lo", "km", "my", "bo", "ar", "fa", "ur", "ps", "sd", "ug",
    "he", "yi", "hi", "mr", "ne", "sa", "bn", "as", "pa", "gu", "ta", "te", "kn", "ml", "si",
    "am", "ka",
})
# The full stop a cased language appends when a transcript ends without one.
_FULL_STOP = {"hy": "։"}


@functools.lru_cache(maxsize=64)
def language_code(language: str | None) -> str:
    """``"Italian"``/``"it"`` -> ``"it"``; None (an English-only ``.en`` model) -> ``"en"``."""
    if language is None:
        return "en"
    key = language.strip().lower()
    if key in ("en", "english"):
        return "en"
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    if key in LANGUAGES:
        return key
    return TO_LANGUAGE_CODE.get(key, key)


def _cased_letter_share(text: str) -> tuple[int, int]:
    """(letters, letters that have an upper/lower case form)."""
    letters = [c for c in text if c.isalpha()]
    return len(letters), sum(c.isupper() or c.islower() for c in letters)


def _in_cased_script(text: str) -> bool:
    """Most of the letters have case: Latin/Cyrillic/Greek text, not Chinese with an acronym."""
    letters, cased = _cased_letter_share(text)
    return letters > 0 and 2 * cased > letters


def is_all_caps(text: str) -> bool:
    """Has cased letters and every one is upper-case (text without case is never all caps)."""
    cased = [c for c in text if c.isupper() or c.islower()]
    return bool(cased) and all(c.isupper() for c in cased)


def sentence_case(text: str, language: str | None = "english") -> str:
    """``WE CALL IT BEAR`` -> ``We call it bear.``: what Whisper was pre-trained to emit.
    The English "I" rule applies to English only; text in a script without case is returned
    as it is, and no "." is added after the language's own final punctuation (。？！؟।)."""
    code = language_code(language)
    text = text.strip()
    if not text or code in UNCASED_LANGUAGES or not _in_cased_script(text):
        return text
    text = text.lower()
    if code == "en":
        text = _LONE_I.sub("I", text)
    text = text[0].upper() + text[1:]
    if _SENTENCE_END.search(text) or (code == "el" and text.endswith(";")):
        return text
    return text + _FULL_STOP.get(code, ".")


def is_all_lower(text: str) -> bool:
    """Has cased letters and every one is lower-case (an uncased corpus: "we call it bear")."""
    cased = [c for c in text if c.isupper() or c.islower()]
    return bool(cased) and all(c.islower() for c in cased)


def _uniform_case_rows(examples: Sequence[Transcribed], language: str | None,
                       *, lower_too: bool) -> list[Transcribed]:
    """The rows to re-case when the corpus is all upper-case (or, with ``lower_too``, all
    lower-case); none when its language or script has no case or the corpus is mixed-case."""
    with_letters = sum(any(c.isalpha() for c in e.text) for e in examples)
    cased = [e for e in examples if _in_cased_script(e.text)]
    if language_code(language) in UNCASED_LANGUAGES or 2 * len(cased) < with_letters:
        return []
    for test in (is_all_caps, is_all_lower) if lower_too else (is_all_caps,):
        rows = [e for e in cased if test(e.text)]
        if rows and len(rows) >= 0.9 * len(cased):
            return rows
    return []


def apply_text_case(examples: Sequence[Transcribed], mode: str,
                    language: str | None = "english") -> tuple[int, str | None]:
    """Rewrite transcripts in place; returns (rows changed, notice for the log). ``auto`` acts
    only on a corpus in a cased language, mostly in a cased script, whose cased rows are nearly
    all upper-case; rows in other scripts are left as they are. ``truecase`` sentence-cases an
    all-caps or all-lower-case corpus the same way and marks those rows ``recase``: training
    then takes each word's case from the base model's transcript (:func:`truecase`)."""
    if mode == "keep":
        return 0, None
    if mode == "lower":
        changed = sum(e.text != e.text.lower() for e in examples)
        for e in examples:
            e.text = e.text.lower()
        return changed, f"text_case=lower: {changed} transcript(s) lower-cased"
    if mode == "sentence":
        targets = list(examples)
    else:
        targets = _uniform_case_rows(examples, language, lower_too=mode == "truecase")
        if not targets:
            return 0, None
    changed = 0
    for e in targets:
        new = sentence_case(e.text, language)
        changed += new != e.text
        e.text = new
        if mode == "truecase":
            e.recase = True
    if mode == "truecase":
        return changed, (f"text_case=truecase: {len(targets)} transcript(s) have no case of "
                         f"their own; {changed} sentence-cased now, their words re-cased from "
                         "the base model's transcripts when training")
    reason = "transcripts are all upper-case, " if mode == "auto" else ""
    return changed, (f"text_case={mode}: {reason}{changed} transcript(s) sentence-cased "
                     "(e.g. 'WE CALL IT BEAR' -> 'We call it bear.')")


# --------------------------------------------------------------------------- truecasing

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})
_EDGES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


def _split_word(token: str) -> tuple[str, str, str]:
    """``'"Americans,'`` -> ``('"', 'Americans', ',')``: punctuation around a word's core."""
    lead, core, trail = _EDGES.match(token).groups()
    return lead, core, trail


def word_key(token: str) -> str:
    """A word as the alignment compares it: case, edge punctuation and apostrophe style gone."""
    return _split_word(token)[1].translate(_APOSTROPHES).lower()


@dataclass
class Recased:
    text: str
    words: int  # words in the reference
    from_base: int  # words whose case was taken from the base transcript
    changed: int  # of those, words whose case differs from plain sentence case


def _copy_case(core: str, model: str) -> str:
    """``core`` with the letter case of ``model``, an equal word (same letters, any case)."""
    if len(core) != len(model):
        return core
    return "".join(c.upper() if m.isupper() else c.lower() for c, m in zip(core, model,
                                                                          strict=True))


def _capitalise_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def truecase(reference: str, base: str, language: str | None = "english") -> Recased:
    """Each reference word takes its case from the base model's transcript of the same clip
    where the two agree (normalised words aligned with ``difflib.SequenceMatcher``); every
    other word is sentence-cased. The reference keeps its own words and punctuation:
    ``"AND SO MY FELLOW AMERICANS"`` + ``"And so my fellow Americans, ask"`` ->
    ``"And so my fellow Americans"``. Text without case is returned as it is."""
    tokens = reference.split()
    if (not tokens or language_code(language) in UNCASED_LANGUAGES
            or not _in_cased_script(reference)):
        return Recased(reference, len(tokens), 0, 0)
    english = language_code(language) == "en"

    def plain(token: str) -> str:
        lowered = token.lower()
        return _LONE_I.sub("I", lowered) if english else lowered

    out = [plain(t) for t in tokens]
    sentence = list(out)
    if out:
        out[0] = sentence[0] = _capitalise_first(out[0])
    base_tokens = base.split()
    ref_keys = [word_key(t) for t in tokens]
    # Punctuation-only tokens get keys that never match, so they cannot anchor the alignment.
    ref_keys = [k or f"\0ref{i}" for i, k in enumerate(ref_keys)]
    base_keys = [word_key(t) or f"\0base{i}" for i, t in enumerate(base_tokens)]
    matcher = SequenceMatcher(None, ref_keys, base_keys, autojunk=False)
    from_base = 0
    for i, j, size in matcher.get_matching_blocks():
        for offset in range(size):
            lead, core, trail = _split_word(out[i + offset])
            model = _split_word(base_tokens[j + offset])[1]
            out[i + offset] = lead + _copy_case(core, model) + trail
            from_base += 1
    if out:
        out[0] = _capitalise_first(out[0])  # a sentence starts upper-case whatever the base says
    changed = sum(a != b for a, b in zip(out, sentence, strict=True))
    return Recased(" ".join(out), len(tokens), from_base, changed)
