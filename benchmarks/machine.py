"""What the benchmarks share: the machine line every table starts with (benchmarks are only
comparable on one machine) and the training benchmarks' model / data / config arguments."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config --model --train --dev --set --out``, defaulting to the shared tiny.en and
    speechocean762 train/dev and ``experiments/lora.yaml``."""
    parser.add_argument("--config", default=str(ROOT / "experiments/lora.yaml"))
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"))
    parser.add_argument("--train", default=str(SHARED / "data/speechocean762/train"))
    parser.add_argument("--dev", default=str(SHARED / "data/speechocean762/dev"))
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra config overrides for every run, key=value")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")


def describe_machine() -> str:
    """Accelerator (or CPU only), CPU model, cores, RAM and torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total_kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory = f"; {total_kb / 2**20:.0f} GiB RAM"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{device}; {cpu}; {os.cpu_count()} cores{memory}; torch {torch.__version__}"
