"""``whisper-exp serve``: an OpenAI-compatible transcription server (FastAPI + uvicorn).

Serves one model reference with the backend it carries (a CTranslate2 export runs in
faster-whisper, anything else in transformers) through the same ``transcribe_audio`` the
registered MLflow pyfunc uses. Requests that arrive together are decoded together: one worker
thread owns the model and takes every clip queued within a short wait (``max_wait_ms``) into
one batch, up to ``max_batch_size``, so throughput grows with concurrent clients instead of
queueing on a lock. Every response says how large its batch was (``X-Batch-Size``) and
``GET /health`` counts batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from mlflow.exceptions import MlflowException
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from whisper_exp.audio import SAMPLE_RATE
from whisper_exp.decoding import Decoded, DecodeOptions, TranscribeError
from whisper_exp.openai_api import APIError, bad_form, parse_form, response_body

log = logging.getLogger(__name__)

SETTINGS_ENV = "WHISPER_EXP_SERVE_SETTINGS"  # hands the settings to uvicorn's worker processes
TRANSCRIPTIONS = "/v1/audio/transcriptions"


class Backend(Protocol):
    """``transcribe.Transcriber`` or ``ctranslate2_backend.FasterWhisperTranscriber``."""

    def check_options(self, options: DecodeOptions) -> None: ...

    def transcribe_audio(self, audios: list[np.ndarray], options: DecodeOptions
                         ) -> list[Decoded]: ...


@dataclass
class ServeSettings:
    model: str
    served_name: str = ""  # the id GET /v1/models lists (default: the model reference)
    api_key: str | None = None
    max_upload_mb: float = 25.0  # OpenAI's own limit
    max_batch_size: int = 16
    max_wait_ms: float = 15.0
    compute_type: str = "default"  # ctranslate2 backend: the precision it was exported with
    max_audio_s: float = 30 * 60

    @property
    def model_id(self) -> str:
        return self.served_name or self.model


def load_backend(reference: str, compute_type: str = "default") -> tuple[Backend, str]:
    """Any model reference -> (transcriber, backend name). MLflow references are downloaded
    once; a CTranslate2 folder runs in faster-whisper, the rest in transformers."""
    from whisper_exp.ctranslate2_backend import FasterWhisperTranscriber, is_ctranslate2_model
    from whisper_exp.model_reference import resolve_model_reference

    local = resolve_model_reference(reference)
    if is_ctranslate2_model(local):
        return FasterWhisperTranscriber.load(local, compute_type=compute_type), "ctranslate2"
    from whisper_exp.transcribe import Transcriber

    return Transcriber.load(local), "transformers"


# --------------------------------------------------------------------------- batching


@dataclass
class _Job:
    audio: np.ndarray
    options: DecodeOptions
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class MicroBatcher:
    """One thread owns the model. It waits for a clip, then up to ``max_wait_s`` for more
    (never past ``max_batch_size``), and decodes clips with the same options in one
    ``transcribe_audio`` call (which batches clips up to 30 s)."""

    def __init__(self, backend: Backend, max_batch_size: int = 16,
                 max_wait_s: float = 0.015) -> None:
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batch_sizes: Counter[int] = Counter()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="whisper-exp-batcher",
                                        daemon=True)
        self._thread.start()

    def submit(self, audio: np.ndarray, options: DecodeOptions
               ) -> concurrent.futures.Future[tuple[Decoded, int]]:
        """(decoded clip, size of the batch it went in) once decoded."""
        job = _Job(audio, options)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def stats(self) -> dict[str, Any]:
        return {"requests": sum(size * n for size, n in self.batch_sizes.items()),
                "batches": sum(self.batch_sizes.values()),
                "max_batch_size_seen": max(self.batch_sizes, default=0),
                "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())},
                "queued": self._queue.qsize()}

    def _collect(self, first: _Job) -> list[_Job]:
        jobs, deadline = [first], time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if job is None:  # closing: finish what came before it
                self._queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            groups: dict[tuple, list[_Job]] = {}
            for job in self._collect(first):
                groups.setdefault(dataclasses.astuple(job.options), []).append(job)
            for jobs in groups.values():
                self._decode(jobs)

    def _decode(self, jobs: list[_Job]) -> None:
        try:
            results = self.backend.transcribe_audio([job.audio for job in jobs], jobs[0].options)
        except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
            log.exception("decoding a batch of %d failed", len(jobs))
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.batch_sizes[len(jobs)] += 1
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result((result, len(jobs)))


# --------------------------------------------------------------------------- the app


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _read_upload(request: Request, max_bytes: int) -> tuple[dict[str, list[str]], bytes]:
    """The form's text fields and the ``file`` part's bytes (refused over ``max_bytes``)."""
    async with request.form() as form:
        fields: dict[str, list[str]] = {}
        upload = None
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == "file":
                    upload = value
            else:
                fields.setdefault(name, []).append(value)
        if upload is None:
            raise bad_form("the form has no 'file' part; send the audio file as multipart "
                           "form field 'file'", "file")
        data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise APIError(413, f"the file is over the server's {max_bytes / 2**20:g} MB limit "
                       "(--max-upload-mb)", "file", "file_too_large")
    if not data:
        raise bad_form("the uploaded file is empty", "file")
    return fields, data


def _decode_audio(data: bytes, max_audio_s: float) -> np.ndarray:
    """Validated with the MLflow-served model's own checks (``serving``)."""
    from whisper_exp.serving import decode_audio, probe_audio

    try:
        seconds = probe_audio(data, "file")
        if seconds > max_audio_s:
            raise bad_form(f"the file holds {seconds / 60:.1f} minutes of audio, over the "
                           f"server's {max_audio_s / 60:g}; split it", "file")
        return decode_audio(data, "file")
    except MlflowException as exc:
        raise bad_form(exc.message, "file") from None


def create_app(settings: ServeSettings, backend: Backend | None = None,
               backend_name: str = "") -> FastAPI:
    """The ASGI app; loads the model unless a backend is given (tests, embedding)."""
    if backend is None:
        backend, backend_name = load_backend(settings.model, settings.compute_type)
    batcher = MicroBatcher(backend, settings.max_batch_size, settings.max_wait_ms / 1000)
    max_bytes = int(settings.max_upload_mb * 2**20)
    created = int(time.time())

    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="whisper-exp", lifespan=lifespan)
    app.state.batcher = batcher

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Key and size are checked before the body is read."""
        if request.url.path.startswith("/v1/") and settings.api_key:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                    token.strip().encode(), settings.api_key.encode()):
                return _error_response(APIError(
                    401, "incorrect or missing API key: send 'Authorization: Bearer <key>' "
                    "with the server's --api-key", None, "invalid_api_key"))
        length = request.headers.get("content-length", "")
        # The form's own fields and boundaries add a little to the file: allow 64 KiB.
        if length.isdigit() and int(length) > max_bytes + 65536:
            return _error_response(APIError(
                413, f"the request ({int(length) / 2**20:.1f} MB) is over the server's "
                f"{settings.max_upload_mb:g} MB limit (--max-upload-mb)", "file",
                "file_too_large"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), kind=kind))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                        kind="server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_id, "backend": backend_name,
                **batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model",
                                            "created": created, "owned_by": "whisper-exp"}]}

    @app.post(TRANSCRIPTIONS)
    async def transcriptions(request: Request) -> Response:
        fields, data = await _read_upload(request, max_bytes)
        parsed = parse_form(fields)
        options = parsed.decode_options(settings.max_batch_size)
        try:
            backend.check_options(options)
        except TranscribeError as exc:
            param = "language" if parsed.language and "language" in str(exc) else None
            raise bad_form(str(exc), param) from None
        audio = await run_in_threadpool(_decode_audio, data, settings.max_audio_s)
        decoded, batch_size = await asyncio.wrap_future(batcher.submit(audio, options))
        body, media_type = response_body(parsed, decoded, len(audio) / SAMPLE_RATE)
        return Response(body, media_type=media_type,
                        headers={"X-Batch-Size": str(batch_size)})

    return app


def app_from_environment() -> FastAPI:
    """uvicorn's factory in each worker process: settings from ``$WHISPER_EXP_SERVE_SETTINGS``."""
    return create_app(ServeSettings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          workers: int = 1, log_level: str = "info") -> None:
    """Run uvicorn; each of ``workers`` processes loads its own copy of the model."""
    import uvicorn

    if workers == 1:  # loaded here, so a bad model reference fails before the port opens
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
        return
    os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
    uvicorn.run("whisper_exp.openai_server:app_from_environment", factory=True, host=host,
                port=port, workers=workers, log_level=log_level)
