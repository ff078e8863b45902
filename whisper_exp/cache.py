"""Caches for what does not change during training: log-mel features and frozen-encoder outputs.

Whisper pads every clip to 30 s, so the encoder dominates each step. With the encoder (or its
bottom k layers) frozen, that part's output is a pure function of the audio: compute it once per
utterance and reuse it in every later epoch and every Optuna trial on the same base model.

Keys are content hashes: the frozen weights (and k), the audio bytes and the feature-extractor
settings, so changing any of them misses the cache instead of returning stale arrays. Arrays live
in memory up to a budget, then as ``.npy`` files on disk, memory-mapped on read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from whisper_exp.audio import AudioRef
from whisper_exp.storage import removed_on_disk_full

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- fingerprints


def audio_fingerprint(audio: str | os.PathLike | bytes | AudioRef) -> str:
    """Hash of the encoded audio file: a path, its bytes, or an ``AudioRef`` to a dataset row
    holding them all give the same key (a reference is read only now, one clip at a time)."""

    digest = hashlib.sha256()
    if isinstance(audio, (bytes, bytearray, memoryview)):
        digest.update(audio)
    elif isinstance(audio, AudioRef) and not isinstance(audio, (str, os.PathLike)):
        digest.update(audio.read_bytes())
    else:
        with open(audio, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def modules_fingerprint(modules: Iterable[torch.nn.Module], extra: str = "") -> str:
    """Hash of every tensor (name, dtype, shape, bytes) in the given modules."""
    digest = hashlib.sha256(extra.encode())
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            if not isinstance(tensor, torch.Tensor):
                continue
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{index}.{name}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:32]


def feature_settings_fingerprint(feature_extractor) -> str:
    settings = json.loads(feature_extractor.to_json_string())
    settings.pop("processor_class", None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- storage


class MemoryPool:
    """Bytes the caches sharing it hold in memory, against one budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0

    def reserve(self, nbytes: int) -> bool:
        if self.used + nbytes > self.budget:
            return False
        self.used += nbytes
        return True


def disk_usage(directory: str | Path) -> tuple[int, int]:
    """Bytes and number of cached arrays (``.npy`` files) under ``directory``."""
    total = entries = 0
    for path in Path(directory).expanduser().rglob("*.npy"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        entries += 1
    return total, entries


class DiskCap:
    """Keeps the arrays under ``root`` within ``max_bytes`` (None: unlimited) by deleting the
    least recently used ones; a read touches its file's mtime, so mtime is the last use.

    Evicts down to ``LOW_WATER`` of the cap, so a full cache rescans the directory once per
    tenth of the cap written rather than on every put. An evicted array just misses and is
    recomputed. The running total is this process's estimate; other processes writing to the
    same root are caught by the rescan that each eviction does."""

    LOW_WATER = 0.9
    STALE_TMP_S = 3600  # a .tmp this old is a write killed mid-way, not one in progress

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = root
        self.max_bytes = max_bytes
        self._used: int | None = None

    def added(self, nbytes: int) -> None:
        if not self.max_bytes:
            return
        self._used = disk_usage(self.root)[0] if self._used is None else self._used + nbytes
        if self._used > self.max_bytes:
            self._used = self.evict(int(self.max_bytes * self.LOW_WATER))

    def evict(self, target_bytes: int) -> int:
        """Delete least recently used arrays until at most ``target_bytes`` remain."""
        entries = []
        now = time.time()
        for path in self.root.rglob("*"):
            try:
                stat = path.stat()
                if path.suffix == ".tmp" and now - stat.st_mtime > self.STALE_TMP_S:
                    path.unlink()
                elif path.suffix == ".npy":
                    entries.append((stat.st_mtime, stat.st_size, path))
            except FileNotFoundError:
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= target_bytes:
                break
            path.unlink(missing_ok=True)  # a process that has it memory-mapped keeps its copy
            total -= size
        return total


class ArrayCache:
    """Arrays by key: in memory until ``memory_budget_mb`` (or the shared ``pool``'s budget) is
    used up, then on disk (memory-mapped), within ``disk_cap`` if given."""

    def __init__(self, directory: str | Path | None, memory_budget_mb: float,
                 dtype: str = "float16", pool: MemoryPool | None = None,
                 disk_cap: DiskCap | None = None):
        self.directory = Path(directory).expanduser() if directory else None
        self.pool = pool or MemoryPool(int(memory_budget_mb * 2**20))
        self.disk_cap = disk_cap
        self.dtype = np.dtype(dtype)
        self.memory: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path | None:
        """``<key>.<dtype>.npy``: runs with another ``cache_dtype`` on the same directory keep
        their own arrays instead of reading each other's."""
        return self.directory / f"{key}.{self.dtype.name}.npy" if self.directory else None

    def get(self, key: str) -> np.ndarray | None:
        array = self.memory.get(key)
        if array is None:
            path = self._path(key)
            if path is not None and path.exists():
                try:
                    array = np.load(path, mmap_mode="r")
                    os.utime(path)  # the last use, for least-recently-used eviction
                except (OSError, ValueError):  # torn write from a killed run: recompute
                    array = None
        if array is None:
            self.misses += 1
        else:
            self.hits += 1
        return array

    def put(self, key: str, array: np.ndarray, persist: bool = False) -> None:
        """Store in memory if the budget allows, else on disk; ``persist`` writes to disk
        either way (other processes read it from there)."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if self.pool.reserve(array.nbytes):
            self.memory[key] = array
            if not persist:
                return
        path = self._path(key)
        if path is None:
            return  # over budget and no disk: simply not cached
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash never leaves a half-written array under the real name.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        # A full disk: the partial tmp goes, entries already here stay, the error names both.
        with removed_on_disk_full(tmp, array.nbytes, "a cache entry; the entries already "
                                  "cached are intact", shown=path):
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, array)
            os.replace(tmp, path)
        if self.disk_cap is not None:
            self.disk_cap.added(path.stat().st_size)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def reset_counters(self) -> None:
        self.hits = self.misses = 0


_CACHES: dict[tuple[str, str, str], ArrayCache] = {}
_POOL = MemoryPool(0)
_DISK_CAPS: dict[Path, DiskCap] = {}


def shared_cache(namespace: str, directory: str | Path | None, memory_budget_mb: float,
                 dtype: str, max_disk_gb: float | None = None) -> ArrayCache:
    """One cache per namespace and process, so later Optuna trials reuse the in-memory part.

    All of them share one in-memory budget (the latest run's ``memory_budget_mb``): a search
    over ``freeze_encoder_layers`` makes one encoder cache per k, and separate budgets would let
    the process hold several budgets' worth of arrays. Likewise all namespaces under one
    ``directory`` share its disk cap (the latest run's ``max_disk_gb``; 0 or None: unlimited)."""
    _POOL.budget = int(memory_budget_mb * 2**20)
    cap = None
    if directory:
        top = Path(directory).expanduser()
        cap = _DISK_CAPS.setdefault(top, DiskCap(top))
        cap.max_bytes = int(max_disk_gb * 2**30) if max_disk_gb else None
    root = Path(directory).expanduser() / namespace if directory else None
    key = (namespace, dtype, str(root))
    if key not in _CACHES:
        _CACHES[key] = ArrayCache(root, memory_budget_mb, dtype, pool=_POOL, disk_cap=cap)
    return _CACHES[key]


# --------------------------------------------------------------------------- frozen encoder


@dataclass
class EncoderSplit:
    """Whisper's encoder cut after layer ``k``: a frozen prefix and a (possibly trainable) top.

    ``prefix`` = conv stem + positions + layers[:k]; ``top`` = layers[k:] + final layer norm.
    Together they compute exactly ``encoder.forward`` (no dropout/LayerDrop: both are 0 in every
    released Whisper checkpoint, and a cache is refused otherwise).
    """

    encoder: torch.nn.Module
    k: int

    @torch.no_grad()
    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """Conv stem, positions and the bottom k layers, written out rather than taken from
        ``encoder(..., output_hidden_states=True).hidden_states[k]``: that runs every layer (on
        tiny.en, k=2 of 4, batch of 8 on CPU: 9.5 s against 4.6 s, median of 3), and its last
        entry has the final layer norm applied, so k = n_layers would need a special case. The
        outputs are bitwise equal for k < n_layers."""
        enc = self.encoder
        hidden = torch.nn.functional.gelu(enc.conv1(features))
        hidden = torch.nn.functional.gelu(enc.conv2(hidden)).permute(0, 2, 1)
        positions = torch.arange(enc.embed_positions.num_embeddings, device=hidden.device)
        hidden = hidden + enc.embed_positions(positions)
        for layer in enc.layers[:self.k]:
            hidden = layer(hidden, None)
        return hidden

    def top(self, hidden: torch.Tensor) -> BaseModelOutput:
        for layer in self.encoder.layers[self.k:]:
            hidden = layer(hidden, None)
        return BaseModelOutput(last_hidden_state=self.encoder.layer_norm(hidden))

    def fingerprint(self) -> str:
        enc = self.encoder
        parts = [enc.conv1, enc.conv2, enc.embed_positions, *enc.layers[:self.k]]
        return modules_fingerprint(parts, extra=f"k={self.k}")

    def compute_dtype(self) -> torch.dtype:
        """The dtype the prefix runs in: the encoder's (float32 for quantized weights)."""
        dtype = self.encoder.layer_norm.weight.dtype
        return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def cache_refusal(encoder: torch.nn.Module, k: int, enabled: bool) -> str | None:
    """Why the encoder cache cannot be used, or None when it can."""
    if not enabled:
        return "training.cache_encoder is false"
    if k == 0:
        return "no encoder layer is frozen (set freeze_encoder or freeze_encoder_layers)"
    if any(p.requires_grad for layer in encoder.layers[:k] for p in layer.parameters()):
        return f"the bottom {k} encoder layers are not frozen"
    if getattr(encoder, "dropout", 0.0) or getattr(encoder, "layerdrop", 0.0):
        return "encoder dropout/LayerDrop is on, so its output is not a pure function of audio"
    config = getattr(encoder, "config", None)
    if getattr(config, "apply_spec_augment", False) and (
            getattr(config, "mask_time_prob", 0.0) or getattr(config, "mask_feature_prob", 0.0)):
        return ("SpecAugment is on (config.apply_spec_augment with mask_time_prob/"
                "mask_feature_prob > 0): it masks the features before the encoder in training, "
                "so the frozen prefix's output is not a pure function of audio")
    for index, layer in enumerate(encoder.layers[:k]):
        rates = {"dropout": getattr(layer, "dropout", 0.0),
                 "activation_dropout": getattr(layer, "activation_dropout", 0.0),
                 "attention_dropout": getattr(getattr(layer, "self_attn", None), "dropout", 0.0)}
        active = [f"{name}={rate}" for name, rate in rates.items() if rate]
        if active:
            return (f"frozen encoder layer {index} has {', '.join(active)}: dropout still fires "
                    "in training, so the frozen prefix's output is not a pure function of audio")
    return None


@torch.no_grad()
def fill_encoder_cache(
    split: EncoderSplit,
    cache: ArrayCache,
    keys: Sequence[str],
    features_for: callable,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    persist: bool = False,
) -> int:
    """Compute the frozen prefix for every key not cached yet; returns how many were computed.

    ``persist`` writes every array to disk, for the other processes of a multi-process run."""
    from tqdm.auto import tqdm

    todo = [i for i, key in enumerate(keys) if cache.get(key) is None]
    was_training = split.encoder.training
    split.encoder.eval()
    try:
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        for batch in tqdm(batches, desc="encoding (cache cold)", unit="batch",
                          disable=not progress or not batches):
            features = torch.stack([torch.as_tensor(np.asarray(features_for(i)))
                                    for i in batch]).to(device, dtype)
            hidden = split.prefix(features).float().cpu().numpy()
            for i, array in zip(batch, hidden, strict=True):
                cache.put(keys[i], array, persist=persist)
    finally:
        split.encoder.train(was_training)
    return len(todo)
