"""Shared fixtures: real assets from ../shared (skipped, as a declared optional asset, when
absent), tiny random Whisper models built in-process from the tokenizer files shipped in
tests/assets, and the strict-skip check `.ci/run` relies on."""

from __future__ import annotations

import csv
import gzip
import os
import shutil
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
SHARED = Path(os.environ.get("WHISPER_EXP_SHARED", ROOT.parent / "shared"))
TINY_EN = SHARED / "models" / "whisper-tiny.en"
SPEECHOCEAN = SHARED / "data" / "speechocean762"
SAMPLE_DATA = ROOT / "data" / "sample"

# The only things a test may skip for. Any other skip fails `.ci/run` (WHISPER_EXP_STRICT_SKIPS=1).
OPTIONAL_ASSETS = {
    "shared": "../shared (or $WHISPER_EXP_SHARED): real tiny.en weights and speechocean762",
    "chromium": "a Chromium browser for browser tests",
}
OPTIONAL_ASSET_PREFIX = "optional asset absent: "
STRICT_SKIPS_ENV = "WHISPER_EXP_STRICT_SKIPS"


def skip_optional_asset(asset: str, detail: str) -> NoReturn:
    """Skip because a declared optional asset is missing; the fixed prefix is what the strict
    check accepts, so only the assets in OPTIONAL_ASSETS can make a test skip in CI."""
    if asset not in OPTIONAL_ASSETS:
        raise ValueError(f"{asset!r} is not a declared optional asset: {sorted(OPTIONAL_ASSETS)}")
    pytest.skip(f"{OPTIONAL_ASSET_PREFIX}{asset}: {detail}")


def _require(path: Path) -> Path:
    if not path.exists():
        skip_optional_asset("shared", f"{path} (see ../shared/README.md); real-asset test")
    return path


@pytest.fixture(scope="session")
def tiny_en_path() -> Path:
    return _require(TINY_EN / "model.safetensors").parent


@pytest.fixture(scope="session")
def dev_dir() -> Path:
    return _require(SPEECHOCEAN / "dev" / "metadata.csv").parent


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The sample that ships in the repo: missing, it is a broken checkout, not a skip."""
    assert (SAMPLE_DATA / "metadata.csv").is_file(), f"{SAMPLE_DATA} is part of the repository"
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def whisper_tokenizer_path(tmp_path_factory) -> Path:
    """tests/assets/whisper-tokenizer unpacked (its large JSON files are stored gzipped):
    tiny.en's tokenizer, spelling map, feature extractor and generation config, no weights."""
    source = ASSETS / "whisper-tokenizer"
    out = tmp_path_factory.mktemp("whisper-tokenizer")
    for path in source.iterdir():
        if path.suffix == ".gz":
            (out / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
        elif path.suffix == ".json":
            shutil.copy(path, out / path.name)
    return out


def _unset_mlflow_run_env(patch: pytest.MonkeyPatch) -> None:
    """Unset the run/experiment variables so that undo unsets them again: a plain delenv of an
    absent variable records nothing, and one a test then sets (set_experiment exports
    MLFLOW_EXPERIMENT_ID) would leak into every later test."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        patch.setenv(name, "")
        patch.delenv(name)


@pytest.fixture(autouse=True, scope="module")
def _mlflow_process_state_per_module():
    """MLflow keeps the active experiment in process state and in ``MLFLOW_EXPERIMENT_ID``
    (``set_experiment`` exports it). A module-scoped fixture that trains (it runs before the
    per-test isolation below) must neither inherit an earlier module's experiment nor leave its
    own to later modules."""
    import mlflow.tracking.fluent as fluent

    with pytest.MonkeyPatch.context() as patch:
        _unset_mlflow_run_env(patch)
        patch.setattr(fluent, "_active_experiment_id", None, raising=False)
        yield
        while fluent.active_run():
            fluent.end_run()


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test tracks into its own SQLite file and artifact folder (it runs in its tmp_path,
    where MLflow's default ./mlruns lands), never the developer's mlflow.db or ./mlruns."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _unset_mlflow_run_env(monkeypatch)
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


def _tiny_model_dir(root: Path, tokenizer_dir: Path, multilingual: bool) -> Path:
    """A 2-layer random Whisper with tiny.en's tokenizer/feature extractor (shipped in
    tests/assets, so no ../shared needed), saved as a hub-style folder. The multilingual
    variant has vocab 51865 and a generation config with language and task ids, like
    openai/whisper-tiny."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    processor = WhisperProcessor.from_pretrained(tokenizer_dir)
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
    gen = GenerationConfig.from_pretrained(tokenizer_dir)
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
def tiny_multilingual_path(tmp_path_factory, whisper_tokenizer_path) -> Path:
    return _tiny_model_dir(tmp_path_factory.mktemp("models"), whisper_tokenizer_path,
                           multilingual=True)


@pytest.fixture(scope="session")
def tiny_english_path(tmp_path_factory, whisper_tokenizer_path) -> Path:
    return _tiny_model_dir(tmp_path_factory.mktemp("models"), whisper_tokenizer_path,
                           multilingual=False)



def teach_to_say_the(model, processor) -> None:
    """Perturb ``model`` in place so it says " the" at every step: the decoder's last layer
    norm outputs a constant aligned with a long " the" embedding."""
    import torch

    the = processor.tokenizer.convert_tokens_to_ids("\u0120the")
    with torch.no_grad():
        embed = model.get_output_embeddings().weight
        embed[the] = 100 * embed[the] / embed[the].norm()
        model.model.decoder.layer_norm.weight.zero_()
        model.model.decoder.layer_norm.bias.copy_(embed[the])


@pytest.fixture(scope="session")
def says_the_path(tiny_english_path, tmp_path_factory) -> Path:
    """tiny_english_path with perturbed weights that make it say " the" at every step (the
    decoder's last layer norm outputs a constant aligned with a long " the" embedding): a model
    whose transcript of anything is known, to tell two models apart and see text flow through
    evaluation, registry and serving without real weights."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_english_path)
    processor = WhisperProcessor.from_pretrained(tiny_english_path)
    teach_to_say_the(model, processor)
    out = tmp_path_factory.mktemp("models") / "says-the"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out

POSTGRES_ADMIN = os.environ.get("WHISPER_EXP_TEST_POSTGRES",
                                "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for one test (created and dropped here); skipped when no
    server answers at $WHISPER_EXP_TEST_POSTGRES (default: local trust-auth PostgreSQL)."""
    import uuid

    import psycopg  # a dependency (SQLAlchemy's PostgreSQL driver): never a reason to skip
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


class StrictSkips:
    """With $WHISPER_EXP_STRICT_SKIPS=1 (set by .ci/run), a skip for anything but a declared
    optional asset, or a session where no test passed (pytest's exit code 5 included), fails the
    run: a silently skipped layer would otherwise look like a green CI."""

    def __init__(self) -> None:
        self.undeclared: list[tuple[str, str]] = []
        self.passed = 0
        self.problem = ""

    @staticmethod
    def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        return reason.removeprefix("Skipped: ")

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = self._reason(report)
            if not reason.startswith(OPTIONAL_ASSET_PREFIX):
                self.undeclared.append((report.nodeid, reason))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)
        if report.when == "call" and report.passed:
            self.passed += 1

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            return
        if self.undeclared:
            lines = [f"  {nodeid}: {reason}" for nodeid, reason in self.undeclared]
            self.problem = (f"{len(self.undeclared)} test(s) skipped for a reason that is not a "
                            f"declared optional asset ({', '.join(OPTIONAL_ASSETS)}):\n"
                            + "\n".join(lines))
        elif self.passed == 0:
            self.problem = (f"no test passed (pytest exit status {int(exitstatus)}): nothing was "
                            "tested")
        if self.problem and session.exitstatus in (pytest.ExitCode.OK,
                                                   pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.problem:
            terminalreporter.section(f"{STRICT_SKIPS_ENV}=1", sep="=", red=True, bold=True)
            terminalreporter.line(self.problem, red=True)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(STRICT_SKIPS_ENV) == "1":
        config.pluginmanager.register(StrictSkips(), "whisper-exp-strict-skips")
