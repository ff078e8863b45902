"""Inference with a CTranslate2 export through faster-whisper (the ``ctranslate2`` backend).

``whisper_exp.export`` writes the CTranslate2 folder; this module runs it. It imports neither
torch nor transformers' models (only their language table, on a language request), so a model
registered with ``backend="ctranslate2"`` serves from an environment without torch: about
300 MB less resident memory than the transformers backend before any weights are loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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
    check_decode_options,
    default_max_new_tokens,
    language_code,
    window_max_new_tokens,
)

if TYPE_CHECKING:
    from faster_whisper import WhisperModel


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
    return WhisperModel(str(model_dir), device=device, compute_type=compute_type,
                        cpu_threads=cpu_threads, num_workers=num_workers)


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
                               long_form: DecodeOptions | None = None) -> Decoded:
    """One 16 kHz clip or recording, decoded like ``generation.transcribe_arrays``: one pass at
    temperature 0 (no sampling fallback, so deterministic), no VAD, no previous-text prompt and
    no no-speech skipping; ``max_new_tokens`` None caps it as the transformers backend does.
    ``long_form`` (a recording over 30 s, which faster-whisper walks window by window itself)
    applies its previous-text and temperature-fallback choices and window budget instead."""
    settings: dict = {"temperature": 0.0, "condition_on_previous_text": False,
                      "no_speech_threshold": None}
    if long_form is not None:
        max_new_tokens = window_max_new_tokens(long_form, int(model.max_length))
        settings["condition_on_previous_text"] = long_form.condition_on_prev_tokens
        if long_form.temperature_fallback:  # faster-whisper's own thresholds for the fallback
            settings.update(temperature=FALLBACK_TEMPERATURES, no_speech_threshold=0.6)
    elif max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(min(len(audio) / SAMPLE_RATE, SHORT_FORM_MAX_S))
    segments, _ = model.transcribe(
        np.asarray(audio, dtype=np.float32), language=language, beam_size=beam_size,
        without_timestamps=not timestamps, vad_filter=False, max_new_tokens=max_new_tokens,
        **settings)
    segments = list(segments)  # a generator: decoding happens here
    text = "".join(segment.text for segment in segments).strip()
    if not timestamps:
        return Decoded(text)
    duration = len(audio) / SAMPLE_RATE
    return Decoded(text, [
        Segment(round(min(segment.start, duration), 3),
                round(min(max(segment.end, segment.start), duration), 3), segment.text.strip())
        for segment in segments if segment.text.strip()
    ])


def transcribe_with_faster_whisper(
    model_dir: str | Path | WhisperModel,
    audios: Sequence[np.ndarray],
    compute_type: str = "int8",
    beam_size: int = 1,
    language: str | None = None,
) -> list[str]:
    """Transcribe 16 kHz mono float32 clips (up to 30 s) with faster-whisper, without
    timestamps (see ``decode_with_faster_whisper``).

    ``model_dir`` is an exported folder (loaded with ``compute_type``) or, to reuse one across
    calls, a ``WhisperModel`` from ``load_faster_whisper``; ``language`` (name or code) defaults
    to the export's metadata, and multilingual models detect it when neither says.
    """
    if isinstance(model_dir, str | Path):
        model = load_faster_whisper(model_dir, compute_type=compute_type)
    else:
        model, model_dir = model_dir, None
    multilingual = model.model.is_multilingual
    code = language_code(language or export_language(model_dir), multilingual) \
        if multilingual else None
    return [decode_with_faster_whisper(model, audio, language=code, beam_size=beam_size).text
            for audio in audios]


class FasterWhisperTranscriber:
    """A loaded CTranslate2 export with ``transcribe.Transcriber``'s interface
    (``check_options``, ``transcribe_audio``), so the registered pyfunc serves either backend
    with one request path."""

    def __init__(self, model: WhisperModel, default_language: str | None = None,
                 name: str = "") -> None:
        self.model = model
        self.default_language = default_language
        self.name = name

    @classmethod
    def load(cls, model_dir: str | Path, compute_type: str = "default", cpu_threads: int = 0,
             num_workers: int = 1) -> FasterWhisperTranscriber:
        model = load_faster_whisper(model_dir, compute_type=compute_type,
                                    cpu_threads=cpu_threads, num_workers=num_workers)
        return cls(model, export_language(model_dir), str(model_dir))

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    def check_options(self, options: DecodeOptions) -> None:
        """The transformers backend's rules (``decoding.check_decode_options``)."""
        check_decode_options(options, self.multilingual, int(self.model.max_length),
                             set(self.model.supported_languages))

    def transcribe_audio(self, audios: Sequence[np.ndarray], options: DecodeOptions,
                         on_done: Callable[[int], None] | None = None) -> list[Decoded]:
        """16 kHz mono arrays -> text (and segments with ``options.return_timestamps``; always
        for recordings over 30 s, whose decoding follows the timestamps)."""
        self.check_options(options)
        code = None
        if self.multilingual:
            code = language_code(options.language or self.default_language, True,
                                 set(self.model.supported_languages))
        results = []
        for audio in audios:
            # Over one window: timestamps, so faster-whisper moves its window to the last
            # complete segment (as transformers' long-form generation does).
            long_form = len(audio) > SHORT_FORM_MAX_S * SAMPLE_RATE
            decoded = decode_with_faster_whisper(
                self.model, audio, language=code, beam_size=options.num_beams,
                timestamps=options.return_timestamps or long_form,
                max_new_tokens=options.max_new_tokens,
                long_form=options if long_form else None)
            results.append(decoded)
            if on_done is not None:
                on_done(1)
        return results
