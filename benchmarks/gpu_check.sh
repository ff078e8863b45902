#!/usr/bin/env bash
# The GPU check (under 10 minutes on one CUDA machine): the CUDA test subset, VRAM and step time
# for full / lora / qlora / freeze_encoder with and without gradient checkpointing in bf16 and
# fp32 (one table, benchmarks/gpu_check.py), and a 2-GPU torchrun smoke run when two GPUs exist.
#
#   benchmarks/gpu_check.sh [--model DIR] [--size tiny|small] [--batch N] [--steps N]
#   benchmarks/gpu_check.sh --dry-run    # CPU: 1 step per row on a tiny random model
#
# Nothing is downloaded: the model is random weights of a real Whisper size unless --model names
# a local checkpoint. PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [[ " $* " == *" --dry-run "* ]]; then
  exec timeout 300 "$PY" benchmarks/gpu_check.py "$@"
fi

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ "$gpus" -eq 0 ]]; then
  echo "gpu_check: no CUDA device visible (torch.cuda.is_available() is False, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset});" \
       "run this on a GPU machine, or pass --dry-run to check the script on the CPU" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
echo "== CUDA test subset (tests marked cuda; exit 5 = none collected)"
set +e
timeout 180 "$PY" -m pytest -q -m cuda tests
rc=$?
set -e
if [[ $rc -ne 0 && $rc -ne 5 ]]; then status=1; fi

echo "== VRAM and step time"
timeout 360 "$PY" benchmarks/gpu_check.py "$@" || status=1

if [[ "$gpus" -ge 2 ]]; then
  echo "== 2-GPU torchrun smoke run"
  timeout 120 "$PY" -m torch.distributed.run --nproc_per_node 2 benchmarks/gpu_check.py \
    --ddp-smoke --size tiny || status=1
else
  echo "== 2-GPU torchrun smoke run: skipped ($gpus GPU visible)"
fi
exit $status
