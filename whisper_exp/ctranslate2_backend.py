"""Inference with a CTranslate2 export through faster-whisper (the ``ctranslate2`` backend).

``whisper_exp.export`` writes the CTranslate2 folder; this module runs it. It imports neither
torch nor transformers' models (only their language table, on a language request), so a model
registered with ``backend="ctranslate2"`` serves from an environment without torch: about
300 MB less resident memory than the transformers backend before any weights are loaded.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from whisper_exp.audio import SAMPLE_RATE
from whisper_exp.decoding import (
    FALLBACK_TEMPERATURES,
    METADATA_FILE,
    SHORT_FORM_MAX_S,
    Decoded,
    DecodeOptions,
    Segment,
    TranscribeError,
    Word,
    check_decode_options,
    default_max_new_tokens,
    language_code,
    window_max_new_tokens,
)

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

# Whisper's mel frames: 10 ms hops at 16 kHz. faster-whisper names a batched chunk by its offset
# in these frames (``Segment.seek``), and decodes nothing from a clip shorter than one hop.
HOP_SAMPLES = 160
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_SAMPLES
WINDOW_SAMPLES = int(SHORT_FORM_MAX_S * SAMPLE_RATE)


# Mel frames of the clip being decoded when it was padded to a window (per thread/task).
_CLIP_FRAMES: contextvars.ContextVar[int | None] = contextvars.ContextVar("clip_frames",
                                                                         default=None)


class _FullTokenBudget:
    """A ``ctranslate2.models.Whisper`` whose ``generate`` decodes the new tokens faster-whisper
    asks for. faster-whisper passes ``max_length = len(prompt) + max_new_tokens``, but
    CTranslate2's Whisper decodes at most ``min(max_length // 2, max_length - start_step)``
    tokens (``src/models/whisper.cc``; ``start_step`` = the prompt fed before the last prompt
    token), so a request got about half the budget the transformers backend gives (a 40-token
    budget decoded 21). ``max_length`` is raised so that minimum is the budget itself; the
    positions used (prompt + budget) stay those faster-whisper already checked against 448."""

    def __init__(self, whisper: Any) -> None:
        self._whisper = whisper

    def __getattr__(self, name: str) -> Any:
        return getattr(self._whisper, name)

    def align(self, features: Any, start_sequence: Any, text_tokens: Any, num_frames: Any,
              *args: Any, **kwargs: Any) -> Any:
        """Word alignment within the clip: on a clip padded to 30 s faster-whisper offers the
        whole window, where words of a model that keeps talking drift into the silence."""
        limit = _CLIP_FRAMES.get()
        if limit is not None and isinstance(num_frames, int):
            num_frames = min(num_frames, limit)
        return self._whisper.align(features, start_sequence, text_tokens, num_frames, *args,
                                   **kwargs)

    def generate(self, features: Any, prompts: Sequence[Sequence], *args: Any,
                 max_length: int | None = None, **kwargs: Any) -> Any:
        if max_length is not None and prompts:
            prompt = max(len(p) for p in prompts)
            new_tokens, start_step = max_length - prompt, max(prompt - 1, 0)
            if new_tokens > 0:
                max_length = max(2 * new_tokens, new_tokens + start_step)
            kwargs["max_length"] = max_length
        return self._whisper.generate(features, prompts, *args, **kwargs)


def full_token_budget(model: WhisperModel) -> WhisperModel:
    """``model`` with its CTranslate2 Whisper wrapped in ``_FullTokenBudget`` (once; other
    objects, e.g. test doubles, are left alone)."""
    import ctranslate2

    if isinstance(model.model, ctranslate2.models.Whisper):
        model.model = _FullTokenBudget(model.model)
    return model


def pad_to_window(audio: np.ndarray) -> np.ndarray:
    """A clip up to 30 s padded with silence to one whole window, as transformers'
    ``WhisperFeatureExtractor`` pads it before the log-mel (what models are fine-tuned on).
    faster-whisper instead pads the clip's log-mel with zeros, which the model never saw in
    training; on padded audio it computes the same features (``test_ctranslate2_backend``)."""
    audio = np.asarray(audio, dtype=np.float32)
    if len(audio) >= WINDOW_SAMPLES:
        return audio
    return np.concatenate([audio, np.zeros(WINDOW_SAMPLES - len(audio), dtype=np.float32)])


def is_ctranslate2_model(path: str | Path) -> bool:
    """A CTranslate2 folder (``model.bin``) rather than a Hugging Face one (both have a
    ``config.json``): lets callers pick the faster-whisper backend."""
    return (Path(path) / "model.bin").is_file()


def load_faster_whisper(model_dir: str | Path, compute_type: str = "int8", device: str = "cpu",
                        cpu_threads: int = 0, num_workers: int = 1) -> WhisperModel:
    """Load an exported CTranslate2 folder (``cpu_threads=0``: CTranslate2's default;
    ``compute_type="default"`` keeps the precision it was exported with)."""
    from faster_whisper import WhisperModel

    if not is_ctranslate2_model(model_dir):
        raise TranscribeError(f"{model_dir} is not a CTranslate2 model (no model.bin); export "
                              "it with --format ctranslate2 first")
    return full_token_budget(WhisperModel(str(model_dir), device=device,
                                          compute_type=compute_type, cpu_threads=cpu_threads,
                                          num_workers=num_workers))


def export_language(model_dir: str | Path | None) -> str | None:
    """The language a multilingual export was trained for (its ``whisper_exp.json``)."""
    if model_dir is None:
        return None
    meta_file = Path(model_dir) / METADATA_FILE
    if not meta_file.exists():
        return None
    return json.loads(meta_file.read_text(encoding="utf-8")).get("language")


def decode_with_faster_whisper(model: WhisperModel, audio: np.ndarray, *,
                               language: str | None = None, beam_size: int = 1,
                               timestamps: bool = False, max_new_tokens: int | None = None,
                               long_form: DecodeOptions | None = None,
                               word_timestamps: bool = False, prompt: str | None = None,
                               temperature: float = 0.0, pad: bool = True) -> Decoded:
    """One 16 kHz clip or recording, decoded like ``generation.transcribe_arrays``: one pass at
    temperature 0 (no sampling fallback, so deterministic), no VAD, no previous-text prompt and
    no no-speech skipping; ``max_new_tokens`` None caps it as the transformers backend does.
    ``long_form`` (a recording over 30 s, which faster-whisper walks window by window itself)
    applies its previous-text and temperature-fallback choices and window budget instead.
    ``word_timestamps``: faster-whisper's cross-attention word timings (implies timestamps);
    ``prompt``: its ``initial_prompt``; ``temperature`` above 0 samples. ``pad``: a clip up to
    30 s is decoded from the features of the clip padded with silence to 30 s, as transformers
    computes them (``pad_to_window``); False keeps faster-whisper's zero-padded log-mel.
    Durations and timings stay those of the clip itself."""
    model = full_token_budget(model)
    settings: dict = {"temperature": temperature, "condition_on_previous_text": False,
                      "no_speech_threshold": None}
    if long_form is not None:
        max_new_tokens = window_max_new_tokens(long_form, int(model.max_length))
        settings["condition_on_previous_text"] = long_form.condition_on_prev_tokens
        if long_form.temperature_fallback:  # faster-whisper's own thresholds for the fallback
            settings.update(temperature=tuple(t for t in FALLBACK_TEMPERATURES
                                              if t >= temperature) or (temperature,),
                            no_speech_threshold=0.6)
    elif max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(min(len(audio) / SAMPLE_RATE, SHORT_FORM_MAX_S))
    timestamps = timestamps or word_timestamps
    audio = np.asarray(audio, dtype=np.float32)
    duration = len(audio) / SAMPLE_RATE
    padded = pad and long_form is None and len(audio) <= WINDOW_SAMPLES
    segments, info = model.transcribe(
        pad_to_window(audio) if padded else audio, language=language, beam_size=beam_size,
        without_timestamps=not timestamps, vad_filter=False, max_new_tokens=max_new_tokens,
        word_timestamps=word_timestamps, initial_prompt=prompt or None, **settings)
    # A generator: decoding happens here, words aligned within the clip's own frames. A padded
    # clip is one window, decoded once as transformers does: faster-whisper would go on from
    # the last timestamp or word into the silence (``seek`` > 0), so reading stops there (the
    # generator has decoded that one extra window by then: only when the clip's output does
    # not end on a timestamp, e.g. cut off by the token budget).
    frames = _CLIP_FRAMES.set(max(math.ceil(len(audio) / HOP_SAMPLES), 1) if padded else None)
    try:
        if padded:
            segments = list(itertools.takewhile(lambda segment: segment.seek == 0, segments))
        segments = [segment for segment in segments if segment.start < max(duration, 0.01)]
    finally:
        _CLIP_FRAMES.reset(frames)
    text = "".join(segment.text for segment in segments).strip()
    if not timestamps:
        return Decoded(text, language=info.language)
    words: list[Word] = []
    for word in (w for segment in segments for w in segment.words or []):
        start = round(min(max(word.start, words[-1].start if words else 0.0), duration), 3)
        if word.word.strip():
            words.append(Word(word.word.strip(), start,
                              round(min(max(word.end, start), duration), 3)))
    return Decoded(text, [
        Segment(round(min(segment.start, duration), 3),
                round(min(max(segment.end, segment.start), duration), 3), segment.text.strip(),
                tokens=list(segment.tokens), temperature=segment.temperature,
                avg_logprob=segment.avg_logprob, compression_ratio=segment.compression_ratio,
                no_speech_prob=segment.no_speech_prob)
        for segment in segments if segment.text.strip()
    ], words, info.language)


def decode_clips_batched(model: WhisperModel, audios: Sequence[np.ndarray], *,
                         language: str | None = None, beam_size: int = 1,
                         max_new_tokens: int | None = None, batch_size: int = 16,
                         on_batch: Callable[[int], None] | None = None,
                         prompt: str | None = None, temperature: float = 0.0,
                         pad: bool = True) -> list[str]:
    """Clips up to 30 s -> text, ``batch_size`` clips per encoder and decoder pass, with the
    same transcripts as ``decode_with_faster_whisper`` clip by clip (greedy at temperature 0, no
    VAD, no previous text, no timestamps; identical on the dev clips with fp32 and int8 exports).

    faster-whisper's ``BatchedInferencePipeline`` batches the chunks of one recording, which it
    takes from ``clip_timestamps``: the clips of a batch are laid end to end, each from a whole
    second so that its chunk's ``seek`` names it, and marked half a sample inside their bounds so
    the pipeline's ``int(seconds * rate)`` lands on their exact first and last samples. With
    ``pad`` (as ``decode_with_faster_whisper``) each chunk is the clip and its silence up to
    30 s, so the pipeline computes transformers' features for it. Batches
    are length-sorted and, without ``max_new_tokens``, capped for their longest clip (as
    ``generation.generate_batches`` does). ``language`` None on a multilingual model: detected
    per clip. Timestamps and long-form stay on ``decode_with_faster_whisper``: the pipeline drops
    a segment cut off by the window or token cap instead of decoding it again from its last
    timestamp, and has no temperature fallback or previous-text prompt.
    """
    from faster_whisper import BatchedInferencePipeline

    pipeline = BatchedInferencePipeline(full_token_budget(model))
    # Unpadded, clips under one hop decode to nothing (as clip by clip); padded, every clip is
    # a whole window, as in transformers.
    texts = [""] * len(audios)
    order = sorted((i for i, audio in enumerate(audios) if pad or len(audio) >= HOP_SAMPLES),
                   key=lambda i: len(audios[i]))
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        pieces, clips, chunk_of = [], [], {}
        offset = 0
        for index in batch:
            audio = np.asarray(audios[index], dtype=np.float32)
            room = WINDOW_SAMPLES if pad else -(-len(audio) // SAMPLE_RATE) * SAMPLE_RATE
            pieces += [audio, np.zeros(room - len(audio), dtype=np.float32)]
            clips.append({"start": (offset + 0.5) / SAMPLE_RATE,
                          "end": (offset + (room if pad else len(audio)) + 0.5) / SAMPLE_RATE})
            chunk_of[int(offset / SAMPLE_RATE * FRAMES_PER_SECOND)] = index
            offset += room
        longest_s = len(audios[batch[-1]]) / SAMPLE_RATE
        segments, _ = pipeline.transcribe(
            np.concatenate(pieces), clip_timestamps=clips, language=language,
            multilingual=language is None and bool(model.model.is_multilingual),
            beam_size=beam_size, temperature=temperature, initial_prompt=prompt or None,
            without_timestamps=True, vad_filter=False,
            max_new_tokens=max_new_tokens or default_max_new_tokens(longest_s),
            batch_size=len(batch))
        parts: dict[int, list[str]] = {}
        for segment in segments:  # a generator: decoding happens here
            parts.setdefault(chunk_of[segment.seek], []).append(segment.text)
        for index, text in parts.items():
            texts[index] = "".join(text).strip()
        if on_batch is not None:
            on_batch(len(batch))
    return texts


def transcribe_with_faster_whisper(
    model_dir: str | Path | WhisperModel,
    audios: Sequence[np.ndarray],
    compute_type: str = "int8",
    beam_size: int = 1,
    language: str | None = None,
    pad: bool = True,
) -> list[str]:
    """Transcribe 16 kHz mono float32 clips with faster-whisper, without timestamps: up to
    30 s in batches (``decode_clips_batched``), longer ones in fixed 30 s windows.

    ``model_dir`` is an exported folder (loaded with ``compute_type``) or, to reuse one across
    calls, a ``WhisperModel`` from ``load_faster_whisper``; ``language`` (name or code) defaults
    to the export's metadata, and multilingual models detect it when neither says. ``pad``:
    transformers' features for clips up to 30 s (``decode_with_faster_whisper``).
    """
    if isinstance(model_dir, str | Path):
        model = load_faster_whisper(model_dir, compute_type=compute_type)
    else:
        model, model_dir = model_dir, None
    multilingual = model.model.is_multilingual
    code = language_code(language or export_language(model_dir), multilingual) \
        if multilingual else None
    limit = SHORT_FORM_MAX_S * SAMPLE_RATE
    short = [i for i, audio in enumerate(audios) if len(audio) <= limit]
    texts = dict(zip(short, decode_clips_batched(model, [audios[i] for i in short],
                                                 language=code, beam_size=beam_size, pad=pad),
                     strict=True))
    return [texts[i] if i in texts else
            decode_with_faster_whisper(model, audio, language=code, beam_size=beam_size).text
            for i, audio in enumerate(audios)]


class FasterWhisperTranscriber:
    """A loaded CTranslate2 export with ``transcribe.Transcriber``'s interface
    (``check_options``, ``transcribe_audio``), so the registered pyfunc serves either backend
    with one request path. ``pad`` False decodes clips from faster-whisper's own zero-padded
    log-mel instead of transformers' features (kept to measure the difference:
    benchmarks/ct2_parity.py)."""

    def __init__(self, model: WhisperModel, default_language: str | None = None,
                 name: str = "", pad: bool = True) -> None:
        self.model = full_token_budget(model)
        self.default_language = default_language
        self.name = name
        self.pad = pad

    @classmethod
    def load(cls, model_dir: str | Path, compute_type: str = "default", cpu_threads: int = 0,
             num_workers: int = 1, pad: bool = True) -> FasterWhisperTranscriber:
        model = load_faster_whisper(model_dir, compute_type=compute_type,
                                    cpu_threads=cpu_threads, num_workers=num_workers)
        return cls(model, export_language(model_dir), str(model_dir), pad=pad)

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    @property
    def _language(self) -> str | None:
        """English for an English-only model; None: detected per clip (not reported batched)."""
        return None if self.multilingual else "en"

    def check_options(self, options: DecodeOptions) -> None:
        """The transformers backend's rules (``decoding.check_decode_options``)."""
        check_decode_options(options, self.multilingual, int(self.model.max_length),
                             set(self.model.supported_languages))

    def transcribe_audio(self, audios: Sequence[np.ndarray], options: DecodeOptions,
                         on_done: Callable[[int], None] | None = None) -> list[Decoded]:
        """16 kHz mono arrays -> text (and segments with ``options.return_timestamps``; always
        for recordings over 30 s, whose decoding follows the timestamps; words with
        ``options.word_timestamps``). Clips up to 30 s
        without timestamps are decoded ``options.batch_size`` at a time; the rest one by one."""
        self.check_options(options)
        code = None
        if self.multilingual:
            code = language_code(options.language or self.default_language, True,
                                 set(self.model.supported_languages))
        limit = SHORT_FORM_MAX_S * SAMPLE_RATE
        batched = [] if options.timestamps else \
            [i for i, audio in enumerate(audios) if len(audio) <= limit]
        results: list[Decoded | None] = [None] * len(audios)
        if batched:
            texts = decode_clips_batched(
                self.model, [audios[i] for i in batched], language=code,
                beam_size=options.num_beams, max_new_tokens=options.max_new_tokens,
                batch_size=options.batch_size, on_batch=on_done, prompt=options.prompt,
                temperature=options.temperature, pad=self.pad)
            for index, text in zip(batched, texts, strict=True):
                results[index] = Decoded(text, language=code or self._language)
        for index, audio in enumerate(audios):
            if results[index] is not None:
                continue
            # Over one window: timestamps, so faster-whisper moves its window to the last
            # complete segment (as transformers' long-form generation does).
            long_form = len(audio) > limit
            results[index] = decode_with_faster_whisper(
                self.model, audio, language=code, beam_size=options.num_beams,
                timestamps=options.timestamps or long_form,
                max_new_tokens=options.max_new_tokens,
                long_form=options if long_form else None,
                word_timestamps=options.word_timestamps, prompt=options.prompt,
                temperature=options.temperature, pad=self.pad)
            if on_done is not None:
                on_done(1)
        return [r if r is not None else Decoded("") for r in results]
