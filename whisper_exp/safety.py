"""Model files loaded safely: safetensors only (pickle by opt-in), weights checked by sha256.

A pickle file (``pytorch_model.bin``, ``*.pt``) runs code when it is unpickled; even
``torch.load(weights_only=True)`` has had escapes (CVE-2025-32434). So a Hugging Face model or
adapter folder must carry ``*.safetensors`` weights; one that has only pickle weights is refused
unless ``WHISPER_EXP_ALLOW_PICKLE=1`` is set (the one opt-in, for every command and the server).
A CTranslate2 export's ``model.bin`` is CTranslate2's own flat format, not a pickle.

A registered model records the sha256 of each weight file; the server recomputes them at load
and refuses a folder whose weights were swapped or damaged after registration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

ALLOW_PICKLE_ENV = "WHISPER_EXP_ALLOW_PICKLE"
SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
CTRANSLATE2_WEIGHTS = "model.bin"  # CTranslate2's format (no pickle): see ctranslate2_backend
# Where a registered pyfunc's MLmodel metadata keeps the hashes (under the "whisper_exp" key),
# and the version tag with the digest over all of them.
WEIGHT_FILES_KEY = "weight_files_sha256"
WEIGHTS_DIGEST_KEY = "weights_sha256"
_CHUNK = 1 << 20


class UnsafeModelError(OSError):
    """A model folder whose weights would be unpickled, and the user has not opted in."""


class WeightsMismatchError(OSError):
    """A model folder whose weight files differ from the hashes recorded at registration."""


def pickle_allowed() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _is_ctranslate2(folder: Path) -> bool:
    return (folder / CTRANSLATE2_WEIGHTS).is_file()


def pickle_weight_files(folder: Path) -> list[Path]:
    if _is_ctranslate2(folder):
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def has_safetensors(folder: Path) -> bool:
    return any(p.suffix == SAFE_SUFFIX for p in folder.iterdir() if p.is_file())


def check_model_folder(folder: str | Path) -> None:
    """Refuse a local model/adapter/checkpoint folder whose only weights are pickles.

    Hub names and folders without weight files pass (``from_pretrained(use_safetensors=True)``
    refuses a hub repo without safetensors itself)."""
    path = Path(folder).expanduser()
    if not path.is_dir() or has_safetensors(path) or pickle_allowed():
        return
    pickles = pickle_weight_files(path)
    if pickles:
        names = ", ".join(p.name for p in pickles)
        raise UnsafeModelError(
            f"{path} has only pickle weights ({names}), which can run code when loaded; "
            "convert them to safetensors (model.save_pretrained(folder)), or set "
            f"{ALLOW_PICKLE_ENV}=1 if you trust where this folder came from")


def use_safetensors() -> bool | None:
    """``use_safetensors`` for ``from_pretrained``: True (safetensors or an error), or None
    (prefer safetensors, fall back to pickle with ``weights_only=True``) when opted in."""
    return None if pickle_allowed() else True


# --------------------------------------------------------------------------- weight hashes


def weight_files(folder: str | Path) -> list[Path]:
    """Every weight file of a model folder (safetensors, pickle, CTranslate2's model.bin)."""
    root = Path(folder)
    suffixes = (SAFE_SUFFIX, *PICKLE_SUFFIXES)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(folder: str | Path) -> dict[str, str]:
    """Relative path (posix) -> sha256 of each weight file."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in weight_files(root)}


def weights_digest(hashes: Mapping[str, str]) -> str:
    """One sha256 over all files' hashes (names included): the version tag's value."""
    text = json.dumps(dict(sorted(hashes.items())), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def verify_weights(folder: str | Path, expected: Mapping[str, str]) -> None:
    """Raise ``WeightsMismatchError`` naming every file that is missing, extra or changed."""
    actual = weights_sha256(folder)
    problems = [f"{name} missing" for name in sorted(set(expected) - set(actual))]
    problems += [f"{name} not recorded" for name in sorted(set(actual) - set(expected))]
    problems += [f"{name} changed (sha256 {actual[name][:12]}..., recorded "
                 f"{expected[name][:12]}...)"
                 for name in sorted(set(actual) & set(expected)) if actual[name] != expected[name]]
    if problems:
        raise WeightsMismatchError(
            f"refusing to load {folder}: its weights do not match the hashes recorded when the "
            f"model was registered ({'; '.join(problems)}); re-download the version or "
            "register the model again")


def recorded_weight_hashes(artifact_dir: str | Path) -> dict[str, str] | None:
    """The hashes in the MLmodel metadata of the pyfunc that holds ``artifact_dir`` (its
    ``artifacts/model`` folder); None for a model registered before hashes were recorded."""
    from mlflow.models import Model

    for parent in list(Path(artifact_dir).resolve().parents)[:3]:
        if (parent / "MLmodel").is_file():
            metadata = Model.load(str(parent / "MLmodel")).metadata or {}
            return (metadata.get("whisper_exp") or {}).get(WEIGHT_FILES_KEY)
    return None


def verify_registered_weights(artifact_dir: str | Path) -> None:
    """The pyfunc's check at load: recorded hashes must match (a warning when none exist)."""
    expected = recorded_weight_hashes(artifact_dir)
    if expected is None:
        log.warning("%s records no weight hashes (registered before they were recorded): "
                    "loading it unchecked", artifact_dir)
        return
    verify_weights(artifact_dir, expected)
