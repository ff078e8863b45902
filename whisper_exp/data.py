"""Speech datasets: read, validate, normalise text case and split into train / eval.

Three sources are accepted: a folder with ``metadata.csv`` (``file_name,transcription`` plus any
columns), a folder of audio with same-stem ``.txt`` transcripts, or a Hugging Face dataset (hub
name, ``load_from_disk`` folder or ``load_dataset`` path). Every problem is collected with its
file and row before any training starts, so one run reports all bad rows at once.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whisper_exp.audio import AUDIO_EXTENSIONS, AudioError, AudioRef, find_audio_files, probe
from whisper_exp.config import DataConfig

# Text case lives in text_case; language_code stays importable from here for older callers.
from whisper_exp.text_case import apply_text_case, language_code  # noqa: F401

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.csv"
REQUIRED_COLUMNS = ("file_name", "transcription")


# Why an eval row with no transcript is left out of scoring (its skipped_rows.csv message).
NO_REFERENCE = "no reference transcript: not scored"


class DataError(ValueError):
    """The dataset cannot be used; the message lists every problem with its file and row."""


@dataclass
class Example:
    """One utterance. ``audio`` is a file path, raw file bytes, or an ``AudioRef`` (a row of a
    memory-mapped Hugging Face dataset, read when decoded)."""

    audio: str | bytes | AudioRef
    text: str
    name: str
    speaker: str | None = None
    where: str = ""  # "metadata.csv line 7": where a user finds this row
    # Every other column of the row (metadata.csv or scalar dataset columns) as text, e.g.
    # speaker, age, gender: the report slices WER by them.
    metadata: dict[str, str] = field(default_factory=dict)
    # text_case=truecase: sentence-cased on reading; training re-cases it from the base model's
    # transcript of this clip (whisper_exp.truecasing).
    recase: bool = False

    def as_row(self) -> dict[str, Any]:
        return {"file": self.name, "speaker": self.speaker or "", "transcription": self.text}


@dataclass
class Problem:
    where: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.file}: {self.message}"


@dataclass
class LoadedData:
    examples: list[Example]
    problems: list[Problem] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


@dataclass
class DatasetSplit:
    train: list[Example]
    eval: list[Example]
    skipped: list[Problem]
    notices: list[str]
    split_method: str

    def split_rows(self) -> list[dict[str, Any]]:
        return [dict(e.as_row(), split=name) for name, rows in
                (("train", self.train), ("eval", self.eval)) for e in rows]


# --------------------------------------------------------------------------- reading sources


_OUTSIDE_HINT = ("data must stay inside its folder {folder}: copy or move the audio in and "
                 "name it relative to the folder, or set data.allow_outside_paths=true")


def _outside_folder(folder: Path, name: str) -> str | None:
    """Why ``name`` leads outside ``folder`` (absolute, ``..``, a symlink), or None."""
    if Path(name).is_absolute():
        reason = "is an absolute path"
    elif not Path(os.path.abspath(folder / name)).is_relative_to(os.path.abspath(folder)):
        reason = "climbs out of the data folder with '..'"
    else:
        target = (folder / name).resolve()
        if target.is_relative_to(folder.resolve()):
            return None
        reason = f"is a symlink leading outside the data folder (to {target})"
    return f"file_name {reason}; " + _OUTSIDE_HINT.format(folder=folder)


def _csv_error(path: Path, reader: csv.DictReader, exc: csv.Error) -> str:
    return (f"{path} line {reader.line_num}: not a readable CSV row ({exc}); check quoting and "
            "that the file is plain UTF-8 text (no NUL bytes, no field over "
            f"{csv.field_size_limit()} characters)")


def _read_metadata_csv(folder: Path, allow_outside: bool = False) -> LoadedData:
    path = folder / METADATA_FILE
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: not valid UTF-8 (byte offset {exc.start}). Re-save the file as "
            "UTF-8, e.g. `iconv -f latin1 -t utf-8 metadata.csv > fixed.csv`."
        ) from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise DataError(_csv_error(path, reader, exc)) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found {columns}. The header must contain "
            "file_name,transcription (speaker and other columns are optional)."
        )
    reader.fieldnames = columns
    examples: list[Example] = []
    problems: list[Problem] = []
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:  # a field over csv.field_size_limit, a stray NUL ...
            raise DataError(_csv_error(path, reader, exc)) from None
        where = f"{path} line {reader.line_num}"
        name = (row.get("file_name") or "").strip()
        if not name:
            problems.append(Problem(where, "<empty>", "file_name is empty"))
            continue
        if "\x00" in name:
            problems.append(Problem(where, repr(name), "file_name contains a NUL byte; "
                                    "fix the row (the file may be corrupt)"))
            continue
        outside = None if allow_outside else _outside_folder(folder, name)
        if outside:
            problems.append(Problem(where, name, outside))
            continue
        examples.append(Example(
            audio=str(folder / name),
            text=(row.get("transcription") or "").strip(),
            name=name,
            speaker=(row.get("speaker") or "").strip() or None,
            where=where,
            metadata={key: (value or "").strip() for key, value in row.items()
                      if key and key not in REQUIRED_COLUMNS},
        ))
    return LoadedData(examples, problems)


def write_metadata_from_txt(folder: str | Path) -> Path:
    """Build ``metadata.csv`` from ``clip.wav`` + ``clip.txt`` pairs. Never overwrites."""
    folder = Path(folder)
    target = folder / METADATA_FILE
    if target.exists():
        raise DataError(f"{target} already exists; it is never overwritten. Edit or move it.")
    rows, orphans = [], []
    for audio in find_audio_files(folder, recursive=True):
        transcript = audio.with_suffix(".txt")
        if not transcript.exists():
            orphans.append(audio.relative_to(folder).as_posix())
            continue
        text = " ".join(transcript.read_text(encoding="utf-8").split())
        rows.append((audio.relative_to(folder).as_posix(), text))
    if not rows:
        raise DataError(
            f"{folder}: no audio ({', '.join(AUDIO_EXTENSIONS)}) with a same-stem .txt "
            f"transcript found, and no {METADATA_FILE}."
        )
    tmp = target.with_suffix(".csv.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(REQUIRED_COLUMNS)
        writer.writerows(rows)
    tmp.replace(target)  # atomic: a crash never leaves a half-written metadata.csv
    if orphans:
        log.warning("%d audio file(s) without a .txt transcript left out of %s: %s",
                    len(orphans), target, ", ".join(orphans[:5]))
    return target


def _read_folder(folder: Path, allow_outside: bool = False) -> LoadedData:
    notices = []
    if not (folder / METADATA_FILE).exists():
        if not any(folder.rglob("*.txt")):
            raise DataError(
                f"{folder}: no {METADATA_FILE} and no .txt transcripts. Provide a metadata.csv "
                "with columns file_name,transcription or one .txt per audio file."
            )
        try:
            written = write_metadata_from_txt(folder)
            notices.append(f"generated {written} from .txt transcripts")
        except OSError:  # read-only folder: read the pairs in memory instead
            return _read_txt_pairs(folder)
    loaded = _read_metadata_csv(folder, allow_outside)
    loaded.notices.extend(notices)
    return loaded


def _read_txt_pairs(folder: Path) -> LoadedData:
    examples = []
    for audio in find_audio_files(folder, recursive=True):
        transcript = audio.with_suffix(".txt")
        if transcript.exists():
            name = audio.relative_to(folder).as_posix()
            examples.append(Example(str(audio), transcript.read_text("utf-8").strip(), name,
                                    where=str(transcript)))
    return LoadedData(examples, notices=[f"read .txt transcripts in {folder} (read-only)"])


@dataclass(frozen=True, eq=False)
class DatasetAudioRef:
    """One row's audio in a (memory-mapped) Hugging Face dataset: holds the dataset and the row
    index, not the bytes, which are read when the clip is hashed, probed or decoded."""

    dataset: Any  # datasets.Dataset of the audio column only, in "arrow" format
    index: int
    column: str
    name: str

    def read_bytes(self) -> bytes:
        value = self.dataset[self.index].column(self.column)[0]
        data = value["bytes"] if value.type.num_fields else value
        return data.as_py() or b""

    def __repr__(self) -> str:
        return f"DatasetAudioRef({self.name})"


_HF_BATCH_ROWS = 1_000


def _audio_locations(column) -> tuple[list[str | None], list[bool]]:
    """Per row: the stored path, and whether the row holds audio bytes. Reads only the Arrow
    offsets/validity and the path strings: the audio bytes stay on disk."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = len(column)
    kind = column.type
    names = {kind.field(i).name for i in range(kind.num_fields)} if pa.types.is_struct(kind) \
        else set()
    paths: list[str | None] = [None] * rows
    data = None
    if names:
        paths = pc.struct_field(column, "path").to_pylist() if "path" in names else paths
        data = pc.struct_field(column, "bytes") if "bytes" in names else None
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        paths = column.to_pylist()
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        data = column
    if data is None:
        return paths, [False] * rows
    sizes = pc.binary_length(data).to_pylist()
    return paths, [bool(size) for size in sizes]


def _read_hf_dataset(source: str, split: str, cfg: DataConfig) -> LoadedData:
    """Hub name, ``save_to_disk`` folder, or script/data path. Audio is decoded by us, not by
    ``datasets.Audio`` (which needs torchcodec), so the column is cast to ``decode=False``.
    Audio bytes are never loaded here: each row becomes a ``DatasetAudioRef`` into the
    memory-mapped Arrow data (or the stored path), so a corpus larger than RAM still trains."""
    import datasets

    try:
        if Path(source, "dataset_info.json").exists() or Path(source, "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source)
    except Exception as exc:
        raise DataError(f"cannot load Hugging Face dataset {source!r}: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"dataset {source!r} has no split {split!r}; it has {list(loaded)}")
        loaded = loaded[split]
    for column in (cfg.audio_column, cfg.text_column):
        if column not in loaded.column_names:
            raise DataError(
                f"dataset {source!r} has no column {column!r} (columns: {loaded.column_names}); "
                "set data.audio_column / data.text_column in the config."
            )
    if isinstance(loaded.features[cfg.audio_column], datasets.Audio):
        loaded = loaded.cast_column(cfg.audio_column, datasets.Audio(decode=False))
    has_speaker = cfg.speaker_column in loaded.column_names
    audio_rows = loaded.select_columns([cfg.audio_column]).with_format("arrow")
    scalar_columns = [name for name, feature in loaded.features.items()
                      if isinstance(feature, (datasets.Value, datasets.ClassLabel))
                      and name not in (cfg.audio_column, cfg.text_column)]
    text_rows = loaded.select_columns(
        [cfg.text_column] + ([cfg.speaker_column] if has_speaker else [])
        + [c for c in scalar_columns if c != cfg.speaker_column]).with_format(None)
    examples, problems = [], []
    for first in range(0, len(loaded), _HF_BATCH_ROWS):
        rows = range(first, min(first + _HF_BATCH_ROWS, len(loaded)))
        paths, has_bytes = _audio_locations(audio_rows[first:rows.stop].column(cfg.audio_column))
        columns = text_rows[first:rows.stop]
        for offset, index in enumerate(rows):
            where = f"{source}[{split}] row {index}"
            audio: str | DatasetAudioRef
            if has_bytes[offset]:
                name = f"{split}-{index:06d}"
                audio = DatasetAudioRef(audio_rows, index, cfg.audio_column, where)
            elif paths[offset]:
                audio = paths[offset]
                name = Path(audio).name
            else:
                problems.append(Problem(where, "<audio>", "audio column holds no path or bytes"))
                continue
            speaker = str(columns[cfg.speaker_column][offset]) if has_speaker else None
            metadata = {c: _metadata_text(loaded.features[c], columns[c][offset])
                        for c in scalar_columns}
            examples.append(Example(audio, str(columns[cfg.text_column][offset] or "").strip(),
                                    name, speaker, where, metadata))
    return LoadedData(examples, problems)


def _metadata_text(feature, value) -> str:
    """A dataset cell as metadata.csv would hold it: a class label by its name."""
    import datasets

    if value is None:
        return ""
    if isinstance(feature, datasets.ClassLabel):
        return feature.int2str(value)
    return str(value)


def read_source(source: str | Path, cfg: DataConfig, hf_split: str | None = None) -> LoadedData:
    path = Path(source)
    if path.is_dir() and not (path / "dataset_info.json").exists() \
            and not (path / "dataset_dict.json").exists():
        return _read_folder(path, cfg.allow_outside_paths)
    if path.is_file() and path.name == METADATA_FILE:
        return _read_folder(path.parent, cfg.allow_outside_paths)
    return _read_hf_dataset(str(source), hf_split or cfg.train_split_name, cfg)


# --------------------------------------------------------------------------- validation


def validate(
    examples: Sequence[Example],
    *,
    max_duration_s: float,
    count_label_tokens: Callable[[str], int] | None = None,
    max_label_tokens: int | None = None,
) -> tuple[list[Example], list[Problem]]:
    """Check every row; returns (good rows, problems). Reads only audio headers."""
    good, problems = [], []
    for e in examples:
        issues = []
        if isinstance(e.audio, str) and not Path(e.audio).exists():
            issues.append(f"audio file not found at {e.audio}")
        else:
            try:
                info = probe(e.audio)
                if info.frames == 0:
                    issues.append("audio is empty (0 samples)")
                elif info.duration_s > max_duration_s:
                    issues.append(
                        f"audio is {info.duration_s:.1f} s, over the {max_duration_s:.0f} s "
                        "Whisper window; split it into shorter clips"
                    )
            except AudioError as exc:
                issues.append(f"unreadable audio ({exc})")
        if not e.text.strip():
            issues.append("transcript is empty")
        elif count_label_tokens and max_label_tokens:
            length = count_label_tokens(e.text)
            if length > max_label_tokens:
                issues.append(f"transcript is {length} tokens, over the decoder's "
                              f"{max_label_tokens}-token limit")
        if issues:
            problems.extend(Problem(e.where, e.name, msg) for msg in issues)
        else:
            good.append(e)
    return good, problems


# --------------------------------------------------------------------------- splitting


def split_examples(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example], str]:
    """Hold out ``fraction`` of utterances; whole speakers at a time when speakers are known."""
    if not 0 < fraction < 1:
        raise DataError(f"data.eval_split must be between 0 and 1 (got {fraction}) "
                        "when no separate data.eval is given")
    rng = random.Random(seed)
    speakers = sorted({e.speaker for e in examples if e.speaker})
    if len(speakers) >= 2 and all(e.speaker for e in examples):
        rng.shuffle(speakers)
        target = max(1, round(fraction * len(examples)))
        held: set[str] = set()
        count = 0
        for speaker in speakers[:-1]:  # always leave at least one speaker for training
            if count >= target:
                break
            held.add(speaker)
            count += sum(e.speaker == speaker for e in examples)
        train = [e for e in examples if e.speaker not in held]
        evals = [e for e in examples if e.speaker in held]
        return train, evals, f"speaker-disjoint ({len(held)} of {len(speakers)} speakers held out)"
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_eval = max(1, round(fraction * len(examples)))
    if n_eval >= len(examples):
        raise DataError(f"only {len(examples)} usable utterance(s): too few to split")
    held_idx = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held_idx]
    evals = [e for i, e in enumerate(examples) if i in held_idx]
    return train, evals, "random utterances"


def _subset(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or limit >= len(examples):
        return examples
    return random.Random(seed).sample(examples, limit)


def _prepare(
    loaded: LoadedData, cfg: DataConfig, count_label_tokens, max_label_tokens,
    language: str | None,
) -> tuple[list[Example], list[Problem], list[str]]:
    notices = list(loaded.notices)
    _, notice = apply_text_case(loaded.examples, cfg.text_case, language)
    if notice:
        notices.append(notice)
    good, problems = validate(loaded.examples, max_duration_s=cfg.max_duration_s,
                              count_label_tokens=count_label_tokens,
                              max_label_tokens=max_label_tokens)
    return good, loaded.problems + problems, notices


def load_eval_only(
    source: str | Path, cfg: DataConfig, *, count_label_tokens=None, max_label_tokens=None,
    seed: int = 42, language: str | None = "english",
) -> DatasetSplit:
    """A whole dataset for evaluation (no held-out split). ``language`` is the model's
    (``cfg.model.language``; None for an English-only model): it decides text case. Rows with
    no reference transcript are not scored: left out (in ``skipped``) with a notice, whatever
    ``data.on_invalid`` says, so a partly transcribed set is scored on the rest."""
    loaded = read_source(source, cfg, cfg.eval_split_name or cfg.train_split_name)
    unscored = [Problem(e.where, e.name, NO_REFERENCE) for e in loaded.examples
                if not e.text.strip()]
    if unscored:
        total = len(loaded.examples)
        if len(unscored) == total:
            raise DataError(f"{source}: none of its {total} rows has a reference transcript "
                            "(the transcription column is empty); nothing to score")
        loaded.examples = [e for e in loaded.examples if e.text.strip()]
        loaded.notices.append(f"{len(unscored)} of {total} rows have no reference transcript: "
                              f"not scored (listed in skipped_rows.csv); scored on the other "
                              f"{total - len(unscored)}")
    good, problems, notices = _prepare(loaded, cfg, count_label_tokens, max_label_tokens,
                                       language)
    _raise_or_skip(problems, cfg.on_invalid)
    _require(good, source)
    return DatasetSplit([], _subset(good, cfg.max_eval_samples, seed), unscored + problems,
                        notices, "evaluation only")


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_eval_set(
    name: str, source: str, cfg: DataConfig, *, split: str | None = None, **options: Any,
) -> DatasetSplit:
    """A named eval set of ``data.eval_sets``: :func:`load_eval_only` with the set's own split,
    every error naming the set. A local path that does not exist fails at once (no hub lookup)."""
    where = f"eval set {name!r} ({source})"
    path = Path(source).expanduser()
    # "data/general" with a ./data folder here is a missing folder, not a hub dataset.
    local = not _HUB_NAME.match(source) or Path(path.parts[0]).is_dir()
    if not source.strip() or (not path.exists() and local):
        raise DataError(f"{where}: no such folder or dataset; fix data.eval_sets.{name}.source "
                        "or remove the set")
    if split:
        cfg = dataclasses.replace(cfg, eval_split_name=split)
    try:
        return load_eval_only(str(path) if path.exists() else source, cfg, **options)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def load_splits(
    cfg: DataConfig, *, seed: int, count_label_tokens=None, max_label_tokens=None,
    language: str | None = "english",
) -> DatasetSplit:
    """Read, case-normalise, validate and split; raises DataError listing every bad row.
    ``language`` is the model's (``cfg.model.language``; None for an English-only model)."""
    train, problems, notices = _prepare(read_source(cfg.train, cfg), cfg, count_label_tokens,
                                        max_label_tokens, language)
    if cfg.eval:
        eval_split = cfg.eval_split_name or (cfg.train_split_name if cfg.eval != cfg.train
                                             else "test")
        evals, eval_problems, eval_notices = _prepare(
            read_source(cfg.eval, cfg, eval_split), cfg, count_label_tokens, max_label_tokens,
            language)
        problems += eval_problems
        notices += eval_notices
        method = f"separate eval source {cfg.eval}"
    else:
        evals, method = [], ""
    _raise_or_skip(problems, cfg.on_invalid)
    _require(train, cfg.train)
    if not cfg.eval:
        train, evals, method = split_examples(train, cfg.eval_split, seed)
    _require(evals, cfg.eval or cfg.train)
    return DatasetSplit(
        _subset(train, cfg.max_train_samples, seed),
        _subset(evals, cfg.max_eval_samples, seed),
        problems, notices, method,
    )


def _raise_or_skip(problems: list[Problem], on_invalid: str) -> None:
    if problems and on_invalid == "error":
        listing = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(
            f"{len(problems)} problem(s) in the data; nothing was trained:\n{listing}{more}\n"
            "Fix these rows, or set data.on_invalid=skip to leave them out (they are then "
            "listed in the run's skipped_rows.csv artifact)."
        )
    for p in problems:
        log.warning("skipping %s", p)


def _require(examples: list[Example], source: str | Path) -> None:
    if not examples:
        raise DataError(f"{source}: no usable utterances left after validation")


def prepare_folder(folder: str | Path, model: str | None = None,
                   max_duration_s: float = 30.0) -> LoadedData:
    """``prepare-data``: make sure ``metadata.csv`` exists, then validate every row."""
    count_tokens = max_tokens = None
    if model:
        from transformers import WhisperConfig, WhisperTokenizer

        tokenizer = WhisperTokenizer.from_pretrained(model)
        count_tokens = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
        max_tokens = WhisperConfig.from_pretrained(model).max_target_positions
    loaded = _read_folder(Path(folder))
    good, problems = validate(loaded.examples, max_duration_s=max_duration_s,
                              count_label_tokens=count_tokens, max_label_tokens=max_tokens)
    return LoadedData(good, loaded.problems + problems, loaded.notices)
