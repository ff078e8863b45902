"""Disk full and damaged files: clear errors, intact old files, resume from the last good one.

Writes that can run out of space (cache entries, exports, Trainer checkpoints) raise
``DiskFullError`` naming the path, the space it needed and what was free, after removing their
partial output; earlier cache entries and checkpoints are never touched. ``last_good_checkpoint``
picks the newest Trainer checkpoint whose files are complete (a disk-full or killed save leaves
a truncated one), so ``--resume`` continues from the one before it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

from whisper_exp.safety import check_model_folder

log = logging.getLogger(__name__)

_MB = 2**20
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"


class DiskFullError(OSError):
    """No space left while writing ``path``; the message says how much was needed."""

    def __init__(self, path: str | Path, needed_bytes: int | None, detail: str = ""):
        free = free_bytes(path)
        needed = f"about {needed_bytes / _MB:,.1f} MB" if needed_bytes else "more space"
        message = (f"no space left on the device writing {path}: it needs {needed}, "
                   f"{free / _MB:,.1f} MB free there; free some space or write to another disk"
                   + (f" ({detail})" if detail else ""))
        super().__init__(errno.ENOSPC, message)
        self.path = Path(path)
        self.needed_bytes = needed_bytes

    def __str__(self) -> str:
        return self.strerror


def free_bytes(path: str | Path) -> int:
    """Free space on the file system of ``path`` (its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_free_space(path: str | Path, needed_bytes: int, detail: str = "") -> None:
    """Refuse before writing when ``needed_bytes`` clearly do not fit."""
    if needed_bytes > free_bytes(path):
        raise DiskFullError(path, needed_bytes, detail)


@contextlib.contextmanager
def removed_on_disk_full(partial: str | Path, needed_bytes: int | None = None,
                         detail: str = "", shown: str | Path | None = None) -> Iterator[Path]:
    """Around a write of ``partial`` (a new file or folder: a tmp file, an export folder): on
    ENOSPC remove it and raise ``DiskFullError`` naming ``shown`` (default ``partial``)."""
    target = Path(partial)
    try:
        yield target
    except OSError as exc:
        if not is_disk_full(exc) or isinstance(exc, DiskFullError):
            raise
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        raise DiskFullError(shown or target, needed_bytes, detail) from exc


# --------------------------------------------------------------------------- checkpoints


def _safetensors_complete(path: Path) -> bool:
    """The header parses and the file holds every byte its tensors claim."""
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > path.stat().st_size:
                return False
            header = json.loads(handle.read(header_len))
        ends = [entry["data_offsets"][1] for name, entry in header.items()
                if name != "__metadata__"]
        return path.stat().st_size >= 8 + header_len + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def _zip_complete(path: Path) -> bool:
    """``torch.save`` files are zip archives: every member's CRC must check."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a Trainer checkpoint folder is unusable (None: complete)."""
    state = checkpoint / TRAINER_STATE
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is missing or truncated"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights and not any(checkpoint.glob("*.bin")):
        return "it holds no model or adapter weights"
    for path in weights:
        if not _safetensors_complete(path):
            return f"{path.name} is truncated or damaged"
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth"),
                        *checkpoint.glob("*.bin")]):
        if not _zip_complete(path):
            return f"{path.name} is truncated or damaged"
    return None


def _step(path: Path) -> int:
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if suffix.isdigit() else -1


def last_good_checkpoint(trainer_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-<step>`` whose files are complete; damaged newer ones (a save
    cut short by a full disk or a kill) are skipped with a warning."""
    folder = Path(trainer_dir)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.iterdir()
                         if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and _step(p) >= 0),
                        key=_step, reverse=True)
    for checkpoint in candidates:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            check_model_folder(checkpoint)  # pickle-only weights: refused unless opted in
            return checkpoint
        log.warning("skipping %s: %s; resuming from an earlier checkpoint", checkpoint, problem)
    return None


def checkpoint_space_callback(output_dir: str | Path):
    """A ``TrainerCallback`` that, before each checkpoint save, refuses (``DiskFullError``)
    when the free space is less than the last checkpoint's size (or the trainable state's
    estimate for the first), so a save never starts that cannot finish."""
    from transformers import TrainerCallback

    class CheckpointSpace(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if not control.should_save:
                return
            folder = Path(args.output_dir or output_dir)
            existing = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"), key=_step)
            if existing:
                needed = folder_bytes(existing[-1])
            else:  # weights + Adam's two moments for the trainable part
                params = list(model.parameters()) if model is not None else []
                needed = sum(p.numel() * p.element_size() for p in params) + sum(
                    2 * p.numel() * 4 for p in params if p.requires_grad)
            check_free_space(folder, int(needed * 1.1),
                             f"checkpoint {CHECKPOINT_PREFIX}{state.global_step}; earlier "
                             "checkpoints are intact and --resume continues from the last one")

    return CheckpointSpace()
