"""Disk full while writing a cache entry, an export or a checkpoint; damaged checkpoints.

ENOSPC is simulated by making the write raise ``OSError(errno.ENOSPC)`` after writing part of
its bytes (no real full disk needed).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from whisper_exp import storage
from whisper_exp.cache import ArrayCache
from whisper_exp.storage import (
    DiskFullError,
    checkpoint_space_callback,
    last_good_checkpoint,
)


def _enospc(*args, **kwargs):
    handle = next((a for a in args if hasattr(a, "write")), None)
    if handle is not None:
        handle.write(b"\x93NUMPY partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_cache_entry_on_a_full_disk_is_a_clear_error_and_old_entries_stay(tmp_path,
                                                                           monkeypatch):
    cache = ArrayCache(tmp_path / "cache", memory_budget_mb=0)
    kept = np.arange(12, dtype=np.float16).reshape(3, 4)
    cache.put("kept", kept)
    monkeypatch.setattr(np, "save", _enospc)
    with pytest.raises(DiskFullError) as caught:
        cache.put("new", np.ones((256, 256), dtype=np.float16))
    message = str(caught.value)
    assert str(tmp_path / "cache" / "new.float16.npy") in message
    assert "0.1 MB" in message and "free" in message
    assert not list((tmp_path / "cache").glob("*.tmp")), "the partial write is removed"
    monkeypatch.undo()
    assert np.array_equal(cache.get("kept"), kept)
    assert cache.get("new") is None


def test_export_on_a_full_disk_names_the_folder_and_leaves_nothing(tiny_english_path, tmp_path,
                                                                   monkeypatch):
    from transformers import WhisperForConditionalGeneration

    from whisper_exp.export import ExportError, export_model

    def partial_save(self, folder, *args, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(WhisperForConditionalGeneration, "save_pretrained", partial_save)
    output = tmp_path / "export"
    with pytest.raises(ExportError, match=f"no space left on the device writing {output}: it "
                                          r"needs about [0-9.]+ MB"):
        export_model(str(tiny_english_path), output, log_to_run=False)
    assert not output.exists()


def test_export_that_cannot_fit_is_refused_before_writing(tiny_english_path, tmp_path,
                                                          monkeypatch):
    from whisper_exp.export import ExportError, export_model

    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    output = tmp_path / "export"
    with pytest.raises(ExportError, match="0.0 MB free"):
        export_model(str(tiny_english_path), output, log_to_run=False)
    assert not output.exists()


def _checkpoint(trainer_dir: Path, step: int) -> Path:
    """What Trainer writes for a LoRA run: adapter weights, optimizer, RNG state, state."""
    folder = trainer_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"lora_A": torch.randn(64, 4), "lora_B": torch.randn(4, 64)},
              str(folder / "adapter_model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.randn(64, 4)}}}, folder / "optimizer.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "trainer_state.json",
                                     "optimizer.pt", "rng_state.pth"])
def test_a_truncated_last_checkpoint_falls_back_to_the_one_before(tmp_path, damaged):
    trainer_dir = tmp_path / "trainer"
    before = _checkpoint(trainer_dir, 2)
    last = _checkpoint(trainer_dir, 10)
    assert last_good_checkpoint(trainer_dir) == last
    _truncate(last / damaged)
    assert last_good_checkpoint(trainer_dir) == before
    _truncate(before / "adapter_model.safetensors")
    assert last_good_checkpoint(trainer_dir) is None


def test_a_checkpoint_save_that_cannot_fit_stops_before_writing(tmp_path, monkeypatch):
    trainer_dir = tmp_path / "trainer"
    _checkpoint(trainer_dir, 2)
    callback = checkpoint_space_callback(trainer_dir)
    args = SimpleNamespace(output_dir=str(trainer_dir))
    state = SimpleNamespace(global_step=4)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 10)
    callback.on_step_end(args, state, SimpleNamespace(should_save=False))  # no save: no check
    with pytest.raises(DiskFullError, match=f"writing {trainer_dir}: .*checkpoint-4; earlier "
                                            "checkpoints are intact"):
        callback.on_step_end(args, state, SimpleNamespace(should_save=True))
