"""OpenAI's audio transcription API: the form it takes and the answers it gives, without the
HTTP server (``openai_server``), so the rules are testable on their own.

The form fields, response formats and the ``timestamp_granularities[]`` rule follow
https://platform.openai.com/docs/api-reference/audio/createTranscription; decoding options are
checked by the backend's own ``check_options`` (``decoding.check_decode_options``), as the
MLflow-served model checks them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from whisper_exp.decoding import Decoded, DecodeOptions, Segment
from whisper_exp.transcript_formats import Transcript, format_srt, format_vtt

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json",
               "text": "text/plain; charset=utf-8", "srt": "application/x-subrip",
               "vtt": "text/vtt; charset=utf-8"}


class APIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad_form(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


@dataclass
class TranscriptionRequest:
    """A parsed ``POST /v1/audio/transcriptions`` form (the file's bytes read separately)."""

    model: str
    response_format: str = "json"
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    granularities: tuple[str, ...] = ("segment",)

    @property
    def words(self) -> bool:
        return "word" in self.granularities

    def decode_options(self, batch_size: int) -> DecodeOptions:
        """Timed segments for srt, vtt and verbose_json; word timings only when asked for."""
        return DecodeOptions(
            batch_size=batch_size, language=self.language, prompt=self.prompt,
            temperature=self.temperature, word_timestamps=self.words,
            return_timestamps=self.response_format in ("srt", "vtt", "verbose_json"))


def _one(form: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = form.get(name) or []
    if len(values) > 1:
        raise bad_form(f"'{name}' was sent {len(values)} times; send it once", name)
    return values[0] if values else None


def parse_form(form: Mapping[str, Sequence[str]]) -> TranscriptionRequest:
    """Text fields of the form (name -> values) -> a request, or a 400 naming the field."""
    model = (_one(form, "model") or "").strip()
    if not model:
        raise bad_form("you must provide a model parameter (any name: this server serves one "
                       "model, see GET /v1/models)", "model")
    response_format = (_one(form, "response_format") or "json").strip()
    if response_format not in RESPONSE_FORMATS:
        raise bad_form(f"response_format {response_format!r} is not supported; use one of "
                       f"{', '.join(RESPONSE_FORMATS)}", "response_format")
    temperature_text = (_one(form, "temperature") or "0").strip()
    try:
        temperature = float(temperature_text)
    except ValueError:
        raise bad_form(f"temperature must be a number between 0 and 1, got "
                       f"{temperature_text!r}", "temperature") from None
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 1.0:
        raise bad_form(f"temperature must be between 0 and 1, got {temperature_text}",
                       "temperature")
    granularities = [*form.get("timestamp_granularities[]", []),
                     *form.get("timestamp_granularities", [])]
    unknown = sorted(set(granularities) - set(GRANULARITIES))
    if unknown:
        raise bad_form(f"timestamp_granularities {unknown} not supported; use segment and/or "
                       "word", "timestamp_granularities")
    if "word" in granularities and response_format != "verbose_json":
        raise bad_form("timestamp_granularities word needs response_format verbose_json",
                       "timestamp_granularities")
    return TranscriptionRequest(
        model=model, response_format=response_format,
        language=(_one(form, "language") or "").strip() or None,
        prompt=_one(form, "prompt") or None, temperature=temperature,
        granularities=tuple(dict.fromkeys(granularities)) or ("segment",))


def _language_name(code: str | None) -> str | None:
    """OpenAI reports languages by name ("english"); Whisper's table maps the codes."""
    if not code:
        return None
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code, code)


def _segment(index: int, segment: Segment) -> dict[str, Any]:
    return {"id": index, **segment.to_dict(details=True)}


def verbose_json(request: TranscriptionRequest, decoded: Decoded,
                 duration: float) -> dict[str, Any]:
    """OpenAI's verbose_json: segments unless only words were asked for, words when asked.
    Segment fields the backend does not report (transformers: avg_logprob, no_speech_prob ...)
    are left out rather than made up."""
    body: dict[str, Any] = {"task": "transcribe"}
    language = _language_name(decoded.language)
    if language:
        body["language"] = language
    body.update(duration=round(duration, 3), text=decoded.text)
    if "segment" in request.granularities:
        body["segments"] = [_segment(i, s) for i, s in enumerate(decoded.segments)]
    if request.words:
        body["words"] = [vars(word) for word in decoded.words]
    body["usage"] = {"type": "duration", "seconds": math.ceil(duration)}
    return body


def response_body(request: TranscriptionRequest, decoded: Decoded,
                  duration: float) -> tuple[str, str]:
    """(body, media type) of the answer in the requested ``response_format``."""
    fmt = request.response_format
    if fmt == "json":
        body = json.dumps({"text": decoded.text}, ensure_ascii=False)
    elif fmt == "verbose_json":
        body = json.dumps(verbose_json(request, decoded, duration), ensure_ascii=False)
    elif fmt == "text":
        body = decoded.text + "\n"
    else:
        transcript = Transcript("", decoded.text, decoded.segments, round(duration, 3))
        body = format_srt(transcript) if fmt == "srt" else format_vtt(transcript)
    return body, MEDIA_TYPES[fmt]
