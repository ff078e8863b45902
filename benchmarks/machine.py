"""The machine line every benchmark table starts with (benchmarks are only comparable on one)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


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
