"""Shared fixtures: real assets from ../shared (skipped with a reason when absent) and tiny
random Whisper models built in-process for speed."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("WHISPER_EXP_SHARED", ROOT.parent / "shared"))
TINY_EN = SHARED / "models" / "whisper-tiny.en"
SPEECHOCEAN = SHARED / "data" / "speechocean762"
SAMPLE_DATA = ROOT / "data" / "sample"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (see ../shared/README.md); real-asset test skipped")
    return path


@pytest.fixture(scope="session")
def tiny_en_path() -> Path:
    return _require(TINY_EN / "model.safetensors").parent


@pytest.fixture(scope="session")
def dev_dir() -> Path:
    return _require(SPEECHOCEAN / "dev" / "metadata.csv").parent


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return _require(SAMPLE_DATA / "metadata.csv").parent


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test tracks into its own SQLite file and artifact folder (it runs in its tmp_path,
    where MLflow's default ./mlruns lands), never the developer's mlflow.db or ./mlruns."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    import mlflow
    import mlflow.tracking.fluent as fluent

    # The active experiment id is process state: a previous test's set_experiment would point
    # this test's fresh database at an experiment it does not have.
    monkeypatch.setattr(fluent, "_active_experiment_id", None, raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    while mlflow.active_run():
        mlflow.end_run()
    yield
    while mlflow.active_run():
        mlflow.end_run()


def write_tone(path: Path, seconds: float = 1.0, rate: int = 16_000, channels: int = 1,
               fmt: str | None = None, subtype: str | None = None) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    sf.write(str(path), data, rate, format=fmt, subtype=subtype)
    return path


def write_metadata(folder: Path, rows: list[tuple], header=("file_name", "transcription"),
                   encoding: str = "utf-8") -> Path:
    path = folder / "metadata.csv"
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def copy_sample(dest: Path, n: int | None = None) -> Path:
    """A writable copy of the shipped sample (first n rows)."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader((SAMPLE_DATA / "metadata.csv").open(encoding="utf-8")))[:n]
    for row in rows:
        shutil.copy(SAMPLE_DATA / row["file_name"], dest / row["file_name"])
    with (dest / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dest


def _tiny_model_dir(root: Path, multilingual: bool) -> Path:
    """A 2-layer random Whisper with tiny.en's tokenizer/feature extractor, saved as a hub-style
    folder. The multilingual variant has vocab 51865 and a generation config with language and
    task ids, like openai/whisper-tiny."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    processor = WhisperProcessor.from_pretrained(_require(TINY_EN / "tokenizer_config.json").parent)
    tok = processor.tokenizer
    config = WhisperConfig(
        vocab_size=51865 if multilingual else 51864, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        decoder_start_token_id=tok.convert_tokens_to_ids("<|startoftranscript|>"),
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    gen = GenerationConfig.from_pretrained(TINY_EN)
    gen.is_multilingual = multilingual
    if multilingual:
        gen.lang_to_id = {code: tok.convert_tokens_to_ids(code) for code in ("<|en|>", "<|de|>")}
        gen.task_to_id = {task: tok.convert_tokens_to_ids(f"<|{task}|>")
                          for task in ("transcribe", "translate")}
    gen.alignment_heads = None
    model.generation_config = gen
    out = root / ("tiny-random-multilingual" if multilingual else "tiny-random-en")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_multilingual_path(tmp_path_factory) -> Path:
    return _tiny_model_dir(tmp_path_factory.mktemp("models"), multilingual=True)


@pytest.fixture(scope="session")
def tiny_english_path(tmp_path_factory) -> Path:
    return _tiny_model_dir(tmp_path_factory.mktemp("models"), multilingual=False)


POSTGRES_ADMIN = os.environ.get("WHISPER_EXP_TEST_POSTGRES",
                                "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for one test (created and dropped here); skipped when no
    server answers at $WHISPER_EXP_TEST_POSTGRES (default: local trust-auth PostgreSQL)."""
    import uuid

    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN}: {exc}")
    name = f"whisper_exp_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
