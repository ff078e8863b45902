"""The registered model's pyfunc: base64 audio in, text (and timed segments) out.

MLflow loads it through models-from-code (``pyfunc_model.py``). Audio is decoded with soundfile +
soxr, so serving needs neither ffmpeg nor torchaudio; with the ctranslate2 backend it needs no
torch either (this module and the faster-whisper path never import it). Every bad request
raises an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which ``mlflow models serve``
answers with HTTP 400 and the message, and keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import re
import threading
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import (
    Array,
    ColSpec,
    DataType,
    Object,
    ParamSchema,
    ParamSpec,
    Property,
    Schema,
)

from whisper_exp.audio import AudioError, load_audio, probe
from whisper_exp.ctranslate2_backend import FasterWhisperTranscriber, is_ctranslate2_model
from whisper_exp.decoding import DecodeOptions, TranscribeError
from whisper_exp.safety import verify_registered_weights

AUDIO_COLUMN = "audio"
MODEL_ARTIFACT = "model"  # context.artifacts key of the model folder (HF or CTranslate2)
BACKENDS = ("transformers", "ctranslate2")
# The ctranslate2 backend runs the precision the export was made with; its CPU threads follow
# OMP_NUM_THREADS (CTranslate2's default is 4). No pyfunc model_config carries them: MLflow would
# log it as params of the training run the model is registered from.
CTRANSLATE2_COMPUTE_TYPE = "default"
MAX_REQUEST_AUDIO_S = 30 * 60
REQUEST_EXAMPLE = '{"dataframe_records": [{"audio": "<base64 of the file bytes>"}]}'

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, AUDIO_COLUMN)]),
    outputs=Schema([
        ColSpec(DataType.string, "text"),
        ColSpec(Array(Object([Property("start", DataType.double),
                              Property("end", DataType.double),
                              Property("text", DataType.string)])),
                "segments", required=False),
        ColSpec(Array(Object([Property("word", DataType.string),
                              Property("start", DataType.double),
                              Property("end", DataType.double)])),
                "words", required=False),
    ]),
    params=ParamSchema([
        ParamSpec("language", DataType.string, None),
        ParamSpec("num_beams", DataType.long, 1),
        ParamSpec("return_timestamps", DataType.boolean, False),
        ParamSpec("max_new_tokens", DataType.long, None),
        ParamSpec("word_timestamps", DataType.boolean, False),
    ]),
)


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass
class RequestParams:
    language: str | None = None
    num_beams: int = 1
    return_timestamps: bool = False
    max_new_tokens: int | None = None
    word_timestamps: bool = False


def _int_param(params: dict[str, Any], name: str, default: int | None) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise bad_request(f"param {name!r} must be an integer, got {value!r}") from None


def parse_params(params: dict[str, Any] | None) -> RequestParams:
    """Request params with MLflow's defaults filled in. The signature checks types over HTTP;
    a direct ``predict`` call is checked here, so a wrong type is a bad request too."""
    params = params or {}
    if not isinstance(params, dict):
        raise bad_request(f"params must be a mapping, got {type(params).__name__}")
    language = params.get("language") or None
    if language is not None and not isinstance(language, str):
        raise bad_request(f"param 'language' must be a string, got {language!r}")
    return RequestParams(
        language=language,
        num_beams=_int_param(params, "num_beams", 1),
        return_timestamps=bool(params.get("return_timestamps") or False),
        max_new_tokens=_int_param(params, "max_new_tokens", None),
        word_timestamps=bool(params.get("word_timestamps") or False),
    )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def decode_base64_audio(value: Any, row: int) -> bytes:
    """One cell of the ``audio`` column -> file bytes (line breaks and a data: prefix allowed)."""
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        raise bad_request(f"row {row}: '{AUDIO_COLUMN}' is empty; send the audio file's bytes "
                          f"base64-encoded, e.g. {REQUEST_EXAMPLE}")
    if not isinstance(value, str):
        raise bad_request(f"row {row}: '{AUDIO_COLUMN}' must be a base64 string, got "
                          f"{type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"row {row}: '{AUDIO_COLUMN}' is not valid base64 ({exc}); encode the "
                          "file's bytes, e.g. `base64 -w0 clip.flac`") from None
    if not data:
        raise bad_request(f"row {row}: '{AUDIO_COLUMN}' decodes to 0 bytes; send a non-empty "
                          "audio file")
    return data


def _without_handle(exc: Exception) -> str:
    """libsndfile names the in-memory buffer (``<_io.BytesIO object at 0x..>``): drop it."""
    return re.sub(r"Error opening <[^>]*>: ", "", str(exc))


def probe_audio(data: bytes, where: str) -> float:
    """Seconds of audio in a file's bytes, from its header; unreadable or empty is a bad
    request (``where`` names the row or form field)."""
    try:
        info = probe(data)
    except AudioError as exc:
        raise bad_request(f"{where}: not a readable audio file ({_without_handle(exc)}); "
                          "send wav, flac, ogg or mp3 bytes") from None
    if info.frames == 0:
        raise bad_request(f"{where}: the audio holds no samples")
    return info.duration_s


def decode_audio(data: bytes, where: str) -> np.ndarray:
    """A file's bytes -> 16 kHz mono float32; a file cut short is a bad request."""
    try:
        return load_audio(data)
    except AudioError as exc:
        raise bad_request(f"{where}: {_without_handle(exc)}; send a complete wav, "
                          "flac, ogg or mp3 file") from None


def decode_request(model_input: Any, max_audio_s: float = MAX_REQUEST_AUDIO_S
                   ) -> list[np.ndarray]:
    """Validate a request and decode every row to 16 kHz mono float32.

    All headers are read before any audio is decoded, so an over-long request is refused cheaply.
    """
    if isinstance(model_input, dict):
        try:
            model_input = pd.DataFrame(model_input)
        except (ValueError, TypeError) as exc:  # scalars without an index, ragged columns
            raise bad_request(f"the request is not a table of rows ({exc}); send "
                              f"{REQUEST_EXAMPLE}") from None
    if not isinstance(model_input, pd.DataFrame) or AUDIO_COLUMN not in model_input.columns:
        found = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else \
            type(model_input).__name__
        raise bad_request(f"the request has no '{AUDIO_COLUMN}' column (found {found}); send "
                          f"{REQUEST_EXAMPLE}")
    if len(model_input) == 0:
        raise bad_request(f"the request holds no rows; send {REQUEST_EXAMPLE}")
    files = [decode_base64_audio(value, row)
             for row, value in enumerate(model_input[AUDIO_COLUMN].tolist())]
    total = 0.0
    for row, data in enumerate(files):
        total += probe_audio(data, f"row {row}")
        if total > max_audio_s:
            raise bad_request(
                f"the request holds over {max_audio_s / 60:g} minutes of audio (row {row} brings "
                f"it to {total / 60:.1f} min); split the recording into shorter requests or "
                "transcribe it offline with `whisper-exp transcribe`")
    return [decode_audio(data, f"row {row}") for row, data in enumerate(files)]


class WhisperPyfunc(mlflow.pyfunc.PythonModel):
    """Transcribes base64-encoded audio files; over 30 s they use long-form decoding.

    The model folder picks the engine: a CTranslate2 export (``model.bin``, registered with
    ``backend="ctranslate2"``) runs in faster-whisper, a Hugging Face folder in transformers.
    Requests are validated and answered alike.
    """

    def load_context(self, context) -> None:
        model_dir = context.artifacts[MODEL_ARTIFACT]
        # Weights swapped or damaged since registration: refuse before loading (or unpickling).
        verify_registered_weights(model_dir)
        if is_ctranslate2_model(model_dir):
            self.transcriber = FasterWhisperTranscriber.load(
                model_dir, compute_type=CTRANSLATE2_COMPUTE_TYPE)
            # CTranslate2 queues concurrent calls on its own workers, so request threads only
            # overlap their audio decoding and feature extraction.
            self._lock: contextlib.AbstractContextManager = contextlib.nullcontext()
        else:
            from whisper_exp.transcribe import Transcriber  # imports torch: only here

            self.transcriber = Transcriber.load(model_dir)
            # The scoring server runs requests in threads; one model, one decode at a time.
            self._lock = threading.Lock()

    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """DataFrame with an ``audio`` column -> DataFrame with ``text`` (+ ``segments``,
        + ``words`` with the ``word_timestamps`` param)."""
        request = parse_params(params)
        options = DecodeOptions(num_beams=request.num_beams,
                                max_new_tokens=request.max_new_tokens,
                                return_timestamps=request.return_timestamps,
                                language=request.language,
                                word_timestamps=request.word_timestamps)
        try:
            self.transcriber.check_options(options)
        except TranscribeError as exc:
            raise bad_request(str(exc)) from None
        audios = decode_request(model_input)
        with self._lock:
            results = self.transcriber.transcribe_audio(audios, options)
        output = pd.DataFrame({"text": [r.text for r in results]})
        if request.return_timestamps:
            output["segments"] = [[s.to_dict() for s in r.segments] for r in results]
        if request.word_timestamps:
            output["words"] = [[vars(w) for w in r.words] for r in results]
        return output
