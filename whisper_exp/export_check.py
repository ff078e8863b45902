"""Every export proves itself: right after it is written, an export (hf, ctranslate2, ggml) is
decoded on a few clips in its own engine and scored beside the source model in transformers on
the same clips, so a conversion that breaks the model is refused before anyone deploys it.

The clips are the source run's own eval rows (``eval/predictions.csv``: file and reference,
the audio found in the run's ``data.eval`` or ``data.train`` folder), else a ``--check-data``
folder, else the check is skipped with a note. The source run gets ``export_wer/<format>-
<precision>`` beside ``export_wer/source`` (the source model on the same clips) and its ``wer``.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CHECK_CLIPS = 8
# Absolute WER (0.05 = 5 points) an export may lose against its source on the same clips.
DEFAULT_MAX_WER_INCREASE = 0.05
EVAL_PREDICTIONS = "eval/predictions.csv"
EXPORT_WER_METRIC = "export_wer"


@dataclass
class CheckClips:
    """Clips with their references, and where they came from (for messages and notes)."""

    audios: list[np.ndarray]
    references: list[str]
    source: str


@dataclass
class ExportCheck:
    """The export's and its source model's WER on the same clips."""

    key: str  # "<format>-<precision>", as in exports/<key>/
    export_wer: float
    source_wer: float
    n_clips: int
    clips_source: str

    @property
    def increase(self) -> float:
        return self.export_wer - self.source_wer

    def metrics(self) -> dict[str, float]:
        return {f"{EXPORT_WER_METRIC}/{self.key}": self.export_wer,
                f"{EXPORT_WER_METRIC}/source": self.source_wer}

    def summary(self) -> str:
        return (f"export WER {self.export_wer:.4f} vs source model {self.source_wer:.4f} on "
                f"{self.n_clips} clip(s) from {self.clips_source}")


def _load(paths: Sequence[Path]) -> list[np.ndarray]:
    from whisper_exp.audio import load_audio

    return [load_audio(str(path)) for path in paths]


def run_eval_clips(run_id: str, limit: int = DEFAULT_CHECK_CLIPS) -> CheckClips | None:
    """The first ``limit`` rows of a run's ``eval/predictions.csv`` whose audio is on this
    machine (looked up under the run's ``data.eval``, then ``data.train`` folder)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        params = client.get_run(run_id).data.params
        with tempfile.TemporaryDirectory(prefix="whisper-exp-check-") as tmp:
            local = client.download_artifacts(run_id, EVAL_PREDICTIONS, tmp)
            with open(local, encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle))
    except (MlflowException, OSError):
        return None
    folders = [Path(params[key]).expanduser() for key in ("data.eval", "data.train")
               if params.get(key) not in (None, "", "None")]
    paths, references = [], []
    for row in rows:
        name, reference = row.get("file") or "", row.get("reference") or ""
        found = next((folder / name for folder in folders if (folder / name).is_file()),
                     Path(name) if Path(name).is_absolute() and Path(name).is_file() else None)
        if found is not None and reference.strip():
            paths.append(found)
            references.append(reference)
        if len(paths) == limit:
            break
    if not paths:
        return None
    return CheckClips(_load(paths), references, f"runs:/{run_id}/{EVAL_PREDICTIONS}")


def folder_clips(data: str | Path, limit: int = DEFAULT_CHECK_CLIPS) -> CheckClips:
    """The first ``limit`` usable rows of a data folder or dataset (any source ``train``
    reads)."""
    from whisper_exp.audio import load_audio
    from whisper_exp.config import DataConfig
    from whisper_exp.data import DataError, read_source

    examples = [e for e in read_source(str(data), DataConfig()).examples if e.text.strip()]
    if not examples:
        raise DataError(f"--check-data {data} has no usable utterances")
    examples = examples[:limit]
    return CheckClips([load_audio(e.audio) for e in examples], [e.text for e in examples],
                      str(data))


def transformers_transcripts(model_dir: str | Path, audios: Sequence[np.ndarray]
                             ) -> tuple[list[str], object]:
    """Greedy transcripts of a (merged or adapter) model in transformers, and its tokenizer."""
    import torch

    from whisper_exp.generation import transcribe_arrays
    from whisper_exp.modeling import load_for_inference

    model, processor = load_for_inference(str(model_dir), torch.device("cpu"))
    return transcribe_arrays(model, processor, audios, progress=False), processor.tokenizer


def export_transcripts(fmt: str, output: Path, audios: Sequence[np.ndarray]) -> list[str]:
    """Greedy transcripts of a written export in the engine it is made for."""
    if fmt == "hf":
        return transformers_transcripts(output, audios)[0]
    if fmt == "ctranslate2":
        from whisper_exp.ctranslate2_backend import transcribe_with_faster_whisper

        return transcribe_with_faster_whisper(output, audios, compute_type="default")
    from whisper_exp.ggml_export import transcribe_with_whisper_cpp

    meta = json.loads((output / "whisper_exp.json").read_text(encoding="utf-8"))
    return transcribe_with_whisper_cpp(output / meta["model_file"], audios,
                                       language=meta.get("language") or "en")


def check_export(fmt: str, precision: str, output: Path, source_model: str | Path,
                 clips: CheckClips) -> ExportCheck:
    """Score the export and its source model on the same clips (same normaliser)."""
    from whisper_exp.metrics import make_normalizer, score

    source, tokenizer = transformers_transcripts(source_model, clips.audios)
    exported = export_transcripts(fmt, output, clips.audios)
    normalize = make_normalizer(tokenizer)
    check = ExportCheck(key=f"{fmt}-{precision}",
                        export_wer=score(clips.references, exported, normalize).wer,
                        source_wer=score(clips.references, source, normalize).wer,
                        n_clips=len(clips.audios), clips_source=clips.source)
    log.info("%s: %s", check.key, check.summary())
    return check
