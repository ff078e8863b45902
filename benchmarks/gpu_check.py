"""GPU check driver (run by benchmarks/gpu_check.sh): VRAM and step time per strategy.

Every row trains a few optimizer steps of the same Whisper (random weights of a real size, or a
local checkpoint with --model; nothing is downloaded) through ``modeling.apply_strategy``:
full / lora / qlora / freeze_encoder (LoRA, encoder frozen), each with and without gradient
checkpointing, in bf16 autocast and fp32. Prints one table. ``--dry-run`` does 1 step per row
on a tiny random model on the CPU (qlora rows need CUDA and are listed as skipped there): the
check that this script works.
``--ddp-smoke`` (under torchrun) runs 2 LoRA steps in DistributedDataParallel on every rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from whisper_exp.config import FinetuningConfig  # noqa: E402
from whisper_exp.modeling import apply_strategy, quantized_device_map  # noqa: E402

SIZES = {  # WhisperConfig of the real checkpoints (vocab of the .en models)
    "dry": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128),
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                 decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536),
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
}
STRATEGIES = (("full", False), ("lora", False), ("qlora", False), ("freeze_encoder", True))


@dataclass
class Row:
    strategy: str
    checkpointing: bool
    precision: str
    trainable_m: float = 0.0
    peak_vram_mb: float = 0.0
    step_ms: float = 0.0
    note: str = ""


def random_model_dir(size: str, out: Path) -> Path:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=51864, num_mel_bins=80, decoder_start_token_id=50257,
                           eos_token_id=50256, pad_token_id=50256, bos_token_id=50256,
                           **SIZES[size])
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(out)
    return out


def build(model_dir: Path, strategy: str, checkpointing: bool, device: torch.device):
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

    kwargs: dict = {"dtype": torch.float32, "use_safetensors": True}
    if strategy == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["proj_out"])
        kwargs["device_map"] = quantized_device_map(device)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, **kwargs)
    if strategy != "qlora":
        model.to(device)
    cfg = FinetuningConfig(strategy="lora" if strategy == "freeze_encoder" else strategy,
                           freeze_encoder=strategy == "freeze_encoder",
                           gradient_checkpointing=checkpointing)
    model = apply_strategy(model, cfg)
    model.train()
    return model


def measure(model_dir: Path, row: Row, device: torch.device, batch: int, steps: int,
            warmup: int) -> Row:
    model = build(model_dir, row.strategy, row.checkpointing, device)
    params = [p for p in model.parameters() if p.requires_grad]
    row.trainable_m = sum(p.numel() for p in params) / 1e6
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    n_mels = model.config.num_mel_bins
    features = torch.randn(batch, n_mels, 3000, device=device)
    labels = torch.randint(0, 50000, (batch, 64), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=row.precision == "bf16")
    cuda = device.type == "cuda"
    times = []
    for step in range(warmup + steps):
        if cuda and step == warmup:
            torch.cuda.reset_peak_memory_stats(device)
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with autocast:
            loss = model(input_features=features, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    row.step_ms = 1000 * sum(times) / len(times)
    if cuda:
        row.peak_vram_mb = torch.cuda.max_memory_allocated(device) / 2**20
    if not torch.isfinite(loss):
        row.note = "loss not finite"
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return row


def table(rows: list[Row], title: str) -> str:
    lines = [title, f"{'strategy':<15}{'grad ckpt':<11}{'precision':<11}{'trainable M':>12}"
                    f"{'peak VRAM MB':>14}{'step ms':>10}  note"]
    for r in rows:
        lines.append(f"{r.strategy:<15}{'on' if r.checkpointing else 'off':<11}{r.precision:<11}"
                     f"{r.trainable_m:>12.2f}{r.peak_vram_mb:>14.0f}{r.step_ms:>10.1f}  {r.note}")
    return "\n".join(lines)


def ddp_smoke(model_dir: Path) -> None:
    """Two LoRA steps under DistributedDataParallel (launched by torchrun, one GPU per rank)."""
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    model = build(model_dir, "lora", False, device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-4)
    features = torch.randn(4, model.config.num_mel_bins, 3000, device=device)
    labels = torch.randint(0, 50000, (4, 32), device=device)
    for _ in range(2):
        loss = ddp(input_features=features, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dist.all_reduce(loss.detach())
    if dist.get_rank() == 0:
        print(f"ddp smoke: {dist.get_world_size()} ranks, 2 LoRA steps, loss {loss.item():.3f}")
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="1 step per row, tiny random "
                        "model, CPU allowed.")
    parser.add_argument("--model", default="", help="Local Whisper folder (default: random "
                        "weights of --size).")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ddp-smoke", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device visible; use --dry-run for the CPU smoke run",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        size = "dry" if args.dry_run else args.size
        model_dir = Path(args.model) if args.model else random_model_dir(size, Path(tmp) / "m")
        if args.ddp_smoke:
            ddp_smoke(model_dir)
            return 0
        device = torch.device("cuda" if cuda else "cpu")
        batch, steps, warmup = (1, 1, 0) if args.dry_run else (args.batch, args.steps, 2)
        rows, failed = [], 0
        for strategy, _ in STRATEGIES:
            for checkpointing in (False, True):
                for precision in ("bf16", "fp32"):
                    row = Row(strategy, checkpointing, precision)
                    if strategy == "qlora" and not cuda:
                        row.note = "skipped: 4-bit needs CUDA"
                    elif precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
                        row.note = "skipped: no bf16 on this GPU"
                    else:
                        try:
                            measure(model_dir, row, device, batch, steps, warmup)
                        except Exception as exc:  # noqa: BLE001 - one row's failure is a row
                            row.note = f"FAILED: {type(exc).__name__}: {str(exc)[:80]}"
                            failed += 1
                    rows.append(row)
                    print(table([row], "").splitlines()[-1], flush=True)
        name = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
        print()
        print(table(rows, f"Whisper {args.model or size} on {name}, batch {batch}, "
                          f"{steps} timed step(s):"))
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
