"""``data.text_case: truecase`` at training time: transcribe the marked clips with the base
model (cached on disk by model and audio content) and give each word of their transcripts the
case the base model wrote where the words agree (``text_case.truecase``).

Why: sentence-casing an all-caps corpus also lower-cases every proper noun in the targets
("americans"), and the fine-tuned model learns it; the base model already writes "Americans".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from whisper_exp.cache import audio_fingerprint
from whisper_exp.config import ExperimentConfig
from whisper_exp.data import DatasetSplit, Example
from whisper_exp.evaluation import evaluate_examples
from whisper_exp.modeling import load_for_inference
from whisper_exp.text_case import truecase

log = logging.getLogger(__name__)


def _model_key(cfg: ExperimentConfig, language: str | None) -> str:
    """Which base model decoded: its name (a local folder by its absolute path) and prompt."""
    name = cfg.model.name
    if Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())
    text = json.dumps([name, language, cfg.model.task, cfg.evaluation.num_beams])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class TranscriptCache:
    """Base-model transcripts by audio fingerprint, one JSON file per base model under
    ``<training.cache_dir>/base-transcripts/`` (none when cache_dir is empty)."""

    def __init__(self, directory: str | None, model_key: str):
        self.path = (Path(directory).expanduser() / "base-transcripts" / f"{model_key}.json"
                     if directory else None)
        self.texts: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.texts = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # a damaged cache is recomputed, not fatal
                log.warning("ignoring unreadable transcript cache %s (%s)", self.path, exc)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(self.texts, out, ensure_ascii=False)
        os.replace(tmp, self.path)  # atomic: a concurrent reader never sees half a file


def base_transcripts(cfg: ExperimentConfig, examples: Sequence[Example], device: torch.device,
                     language: str | None) -> tuple[list[str], int]:
    """The base model's transcript of each example; returns (texts, how many were decoded now
    rather than read from the cache)."""
    cache = TranscriptCache(cfg.training.cache_dir, _model_key(cfg, language))
    keys = [audio_fingerprint(e.audio) for e in examples]
    todo = [i for i, key in enumerate(keys) if key not in cache.texts]
    if todo:
        model, processor = load_for_inference(cfg.model.name, device, language=language,
                                              task=cfg.model.task)
        result = evaluate_examples(model, processor, [examples[i] for i in todo],
                                   cfg.evaluation, language=language)
        for i, row in zip(todo, result.rows, strict=True):
            cache.texts[keys[i]] = row["hypothesis"]
        cache.save()
        del model
    return [cache.texts[key] for key in keys], len(todo)


def recase_split(cfg: ExperimentConfig, split: DatasetSplit, device: torch.device,
                 base_language: str | None, language: str | None) -> dict[str, float]:
    """Truecase the rows ``text_case=truecase`` marked (train and eval) in place; adds a notice
    to the split and returns the counts to log. ``base_language`` is the base model's prompt
    language (None for ``.en``), ``language`` the text's (for the sentence-case rules)."""
    if cfg.data.text_case != "truecase":
        return {}
    rows = [e for e in (*split.train, *split.eval) if e.recase]
    if not rows:
        return {}
    texts, decoded = base_transcripts(cfg, rows, device, base_language)
    words = from_base = changed = 0
    for example, base in zip(rows, texts, strict=True):
        recased = truecase(example.text, base, language)
        example.text = recased.text
        example.recase = False
        words, from_base = words + recased.words, from_base + recased.from_base
        changed += recased.changed
    split.notices.append(
        f"text_case=truecase: {from_base} of {words} words in {len(rows)} transcript(s) took "
        f"the base model's case ({changed} differ from sentence case, e.g. proper nouns); "
        f"{decoded} clip(s) transcribed by {cfg.model.name}, {len(rows) - decoded} from the "
        "cache")
    return {"data.truecase_rows": len(rows), "data.truecase_words": words,
            "data.truecase_words_from_base": from_base,
            "data.truecase_words_changed": changed, "data.truecase_decoded": decoded}
