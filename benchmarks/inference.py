"""Inference speed on the shared dev set: transformers vs faster-whisper vs the served endpoint.

Run (not in CI; about 8 minutes on 2 CPU cores for the 260 dev utterances):
    python benchmarks/inference.py
    python benchmarks/inference.py --limit 8                          # check the script
    python benchmarks/inference.py --model runs:/<run_id> --clients 4

One model (``--model``: hub name, folder, ``runs:/<id>``, ``models:/<name>@<alias>``; adapters
merged into their base, fp32) is scored the same way in every row:
(a) transformers fp32, batched greedy decoding (``whisper_exp.generation.transcribe_arrays``:
    length-sorted batches, SDPA attention);
(b) faster-whisper, direct, on the model exported once to CTranslate2 int8 and float32
    (``whisper_exp.export``), one clip at a time (``transcribe_with_faster_whisper``);
(c) the served endpoint: ``mlflow models serve`` on loopback of the model registered with
    backend transformers and ctranslate2 int8, one request per utterance (its FLAC bytes,
    base64), posted sequentially and from ``--clients`` concurrent clients.
In-process rows run in a fresh subprocess each, with audio decoded before the clock starts, and
report that process's peak RSS (``/proc/self/status`` VmHWM). Served rows time the HTTP round
trips (base64 encoding done beforehand) and report VmHWM summed over the server's process tree
(the ``mlflow models serve`` CLI and its uvicorn worker). Every row transcribes the first
utterance once before timing. All processes get ``OMP_NUM_THREADS=--threads``. WER uses
``whisper_exp.metrics`` (Whisper's English normaliser).
Writes benchmarks/results/inference.{md,csv,png} and logs them to MLflow (experiment
whisper-exp-benchmarks at ``--tracking-uri``); the models registered for serving go to a
scratch tracking store, not yours.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from machine import bar_chart, describe_machine, model_server, save_results

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DIRECT_ROWS = ("transformers", "faster-whisper-int8", "faster-whisper-float32")
SERVED_BACKENDS = {"transformers": {}, "ctranslate2": {"quantization": "int8"}}


@dataclass
class Row:
    name: str
    engine: str
    weights: str
    clients: int | str
    rtfx: float
    wall_s: float
    peak_mb: float
    wer: float


# --------------------------------------------------------------------------- data and memory


def read_utterances(data: Path, limit: int | None) -> list[dict[str, str]]:
    with (data / "metadata.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return rows[:limit] if limit else rows


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak resident memory of one process (Linux ``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from each process's parent id in /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_peaks_mb(root: int) -> dict[str, float]:
    """Peak RSS of each process in the tree, by a short name of its command."""
    peaks = {}
    for pid in process_tree(root):
        with contextlib.suppress(OSError, RuntimeError):  # exited meanwhile
            words = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            name = next((Path(w).name for w in words if w in {"uvicorn", "mlflow"}
                         or w.endswith("/uvicorn")), Path(words[0]).name)
            peaks[f"{name} ({pid})"] = vm_hwm_mb(pid)
    return peaks


# --------------------------------------------------------------------------- in-process rows


def run_direct(name: str, model_dir: Path, data: Path, limit: int | None, batch_size: int
               ) -> dict:
    """One in-process row (run in its own subprocess): texts, wall seconds, peak MiB."""
    from whisper_exp.audio import load_audio

    audios = [load_audio(data / row["file_name"]) for row in read_utterances(data, limit)]
    if name == "transformers":
        import torch

        from whisper_exp.generation import transcribe_arrays
        from whisper_exp.modeling import load_for_inference

        model, processor = load_for_inference(str(model_dir), torch.device("cpu"))
        attention = model.config._attn_implementation

        def transcribe(clips):
            return transcribe_arrays(model, processor, clips, batch_size=batch_size,
                                     progress=False)
    else:
        from whisper_exp.ctranslate2_backend import (
            load_faster_whisper,
            transcribe_with_faster_whisper,
        )

        model = load_faster_whisper(model_dir, compute_type="default")
        attention = ""

        def transcribe(clips):
            return transcribe_with_faster_whisper(model, clips)

    transcribe(audios[:1])  # warm-up, untimed
    start = time.perf_counter()
    texts = transcribe(audios)
    wall = time.perf_counter() - start
    return {"texts": texts, "wall_s": wall, "peak_mb": vm_hwm_mb(), "attention": attention}


def direct_row(name: str, model_dir: Path, args) -> dict:
    command = [sys.executable, __file__, "--one", name, "--model-dir", str(model_dir),
               "--data", str(args.data), "--batch-size", str(args.batch_size)]
    if args.limit:
        command += ["--limit", str(args.limit)]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(args))
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"row {name!r} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_env(args) -> dict[str, str]:
    """Every measured process (children and servers) gets the same thread budget; the served
    models are registered in the scratch store."""
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                MLFLOW_TRACKING_URI=scratch_tracking_uri(args.workdir))


# --------------------------------------------------------------------------- served rows


def served_rows(model_uri: str, payloads: list[dict], workdir: Path, args) -> list[dict]:
    """Sequential then concurrent requests against one server; texts, wall and peak each."""
    import requests

    def post(payload: dict) -> str:
        answer = requests.post(f"{url}/invocations", json=payload, timeout=600)
        if answer.status_code != 200:
            raise SystemExit(f"request failed ({answer.status_code}): {answer.text[:500]}")
        return answer.json()["predictions"][0]["text"]

    log = workdir / f"server-{model_uri.rsplit('@', 1)[-1]}.log"
    with model_server(model_uri, log, child_env(args), cwd=workdir,
                      extra_args=["-t", "600"]) as (url, process):
        post(payloads[0])  # warm-up, untimed
        results = []
        for clients in (1, args.clients):
            start = time.perf_counter()
            if clients == 1:
                texts = [post(payload) for payload in payloads]
            else:
                with ThreadPoolExecutor(max_workers=clients) as pool:
                    texts = list(pool.map(post, payloads))
            wall = time.perf_counter() - start
            peaks = tree_peaks_mb(process.pid)
            results.append({"clients": clients, "texts": texts, "wall_s": wall,
                            "peak_mb": sum(peaks.values()), "processes": peaks})
    return results


def register_for_serving(merged_dir: Path, workdir: Path) -> dict[str, str]:
    """Register the merged model in a scratch tracking store, once per backend."""
    import mlflow

    from whisper_exp.registry import register_run

    mlflow.set_tracking_uri(scratch_tracking_uri(workdir))
    mlflow.set_experiment("inference-benchmark")
    with mlflow.start_run(run_name="benchmark model") as run:
        mlflow.log_artifacts(str(merged_dir), "model")
    uris = {}
    for backend, options in SERVED_BACKENDS.items():
        register_run(run.info.run_id, name="whisper-exp-benchmark", alias=backend,
                     backend=backend, **options)
        uris[backend] = f"models:/whisper-exp-benchmark@{backend}"
    return uris


def scratch_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


# --------------------------------------------------------------------------- report


def machine() -> str:
    import ctranslate2
    import faster_whisper
    import transformers

    return (f"{describe_machine()}, transformers {transformers.__version__}, ctranslate2 "
            f"{ctranslate2.__version__}, faster-whisper {faster_whisper.__version__}")


def write_report(rows: list[Row], header: list[str], out: Path) -> str:
    lines = [*header, "", "| row | engine | weights | clients | RTFx | wall s | peak MB | WER |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.engine} | {r.weights} | {r.clients} | {r.rtfx:.1f} | "
                     f"{r.wall_s:.1f} | {r.peak_mb:.0f} | {100 * r.wer:.2f}% |")
    table = "\n".join(lines)
    save_results(out, "inference", table, [asdict(r) for r in rows])
    labels = [f"{r.name} ({r.clients} client{'s' if r.clients != 1 else ''})"
              if r.name.startswith("served") else r.name for r in rows]
    bar_chart(out / "inference.png", labels, [r.rtfx for r in rows],
              ["#2a7" if "faster-whisper" in r.engine else "#999" for r in rows],
              "RTFx: audio seconds per wall second (higher is better)",
              "Whisper inference on the dev set (same model, greedy)")
    return table


def log_to_mlflow(rows: list[Row], args, ratios: dict[str, float], out: Path,
                  predictions: list[dict]) -> str:
    import mlflow

    from whisper_exp.tracking import log_csv

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("whisper-exp-benchmarks")
    with mlflow.start_run(run_name="inference speed") as run:
        mlflow.log_params({"model": args.model, "data": str(args.data), "limit": args.limit,
                           "n_utterances": len(predictions), "clients": args.clients,
                           "threads": args.threads, "batch_size": args.batch_size,
                           "machine": machine()[:500]})
        for r in rows:
            key = "".join(c if c.isalnum() else "_" for c in f"{r.name}_{r.clients}")
            mlflow.log_metrics({f"rtfx.{key}": r.rtfx, f"wer.{key}": r.wer,
                                f"peak_mb.{key}": r.peak_mb, f"wall_s.{key}": r.wall_s})
        mlflow.log_metrics(ratios)
        for name in ("inference.md", "inference.csv", "inference.png"):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name), "inference")
        log_csv(predictions, "inference/predictions.csv")
        return run.info.run_id


# --------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"),
                        help="Any model reference (adapters are merged into their base).")
    parser.add_argument("--data", type=Path, default=SHARED / "data/speechocean762/dev")
    parser.add_argument("--limit", type=int, default=None, help="First N utterances only.")
    parser.add_argument("--clients", type=int, default=4, help="Concurrent served clients.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP_NUM_THREADS for every process (torch and CTranslate2).")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers batch size.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--tracking-uri", default="", help="Where the summary run is logged "
                        "(default: $MLFLOW_TRACKING_URI, else MLflow's default).")
    parser.add_argument("--one", choices=DIRECT_ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(run_direct(args.one, args.model_dir, args.data, args.limit,
                                    args.batch_size)))
        return
    with tempfile.TemporaryDirectory(prefix="whisper-exp-inference-",
                                     ignore_cleanup_errors=True) as workdir:
        benchmark(args, Path(workdir))


def benchmark(args, workdir: Path) -> None:
    """Export, run every row, write the report and log it (scratch files under workdir)."""
    import mlflow

    from whisper_exp.audio import probe
    from whisper_exp.export import convert_to_ctranslate2, save_merged_hf
    from whisper_exp.metrics import english_normalizer, score

    command = "python benchmarks/inference.py " + shlex.join(sys.argv[1:])
    utterances = read_utterances(args.data, args.limit)
    audio_s = sum(probe(args.data / u["file_name"]).duration_s for u in utterances)
    references = [u["transcription"] for u in utterances]
    payloads = [{"dataframe_records": [{"audio": base64.b64encode(
        (args.data / u["file_name"]).read_bytes()).decode("ascii")}]} for u in utterances]

    # The summary goes to the caller's store; the served models to a scratch one.
    args.tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()
    args.workdir = workdir
    print(f"preparing {args.model} in {workdir} ...", flush=True)
    merged = save_merged_hf(args.model, workdir / "merged", source=args.model)
    exports = {f"faster-whisper-{q}": convert_to_ctranslate2(merged, workdir / f"ct2-{q}", q)
               for q in ("int8", "float32")}
    spelling_file = merged / "normalizer.json"
    normalize = english_normalizer(json.loads(spelling_file.read_text(encoding="utf-8"))
                                   if spelling_file.exists() else None)

    rows: list[Row] = []
    predictions = [{"file": u["file_name"], "reference": u["transcription"]} for u in utterances]

    def add(name: str, engine: str, weights: str, clients: int | str, result: dict) -> None:
        wer = score(references, result["texts"], normalize).wer
        rows.append(Row(name, engine, weights, clients, audio_s / result["wall_s"],
                        result["wall_s"], result["peak_mb"], wer))
        for prediction, text in zip(predictions, result["texts"], strict=True):
            prediction[f"{name} ({clients})"] = text
        print(f"{name} [{clients}]: RTFx {audio_s / result['wall_s']:.1f}, "
              f"WER {100 * wer:.2f}%, peak {result['peak_mb']:.0f} MB", flush=True)

    print("transformers fp32 (batched greedy) ...", flush=True)
    hf = direct_row("transformers", merged, args)
    add("transformers batched greedy", f"transformers ({hf['attention']}, batch "
        f"{args.batch_size})", "fp32", "-", hf)
    for name, directory in exports.items():
        print(f"{name} direct ...", flush=True)
        weights = name.rsplit("-", 1)[1]
        add(f"faster-whisper direct {weights}", "faster-whisper", weights, "-",
            direct_row(name, directory, args))

    uris = register_for_serving(merged, workdir)
    server_processes = []
    for backend, uri in uris.items():
        print(f"served {backend} ...", flush=True)
        weights = SERVED_BACKENDS[backend].get("quantization", "fp32")
        engine = "faster-whisper" if backend == "ctranslate2" else "transformers"
        for result in served_rows(uri, payloads, workdir, args):
            add(f"served {backend}", f"mlflow models serve, {engine}", weights,
                result["clients"], result)
        server_processes.append(f"{backend}: " + " + ".join(
            f"{name.split(' ')[0]} {mb:.0f} MB" for name, mb in result["processes"].items()))

    direct_int8 = next(r for r in rows if r.name == "faster-whisper direct int8").rtfx
    served_ct2 = {r.clients: r.rtfx for r in rows if r.name == "served ctranslate2"}
    ratios = {"served_ct2_over_direct_int8": served_ct2[1] / direct_int8,
              f"served_ct2_{args.clients}_clients_over_direct_int8":
                  served_ct2[args.clients] / direct_int8}
    header = [
        f"Machine: {machine()}; {args.threads} threads (OMP_NUM_THREADS).",
        f"Data: {len(utterances)} utterances of {args.data.name} ({audio_s / 60:.1f} min of "
        f"audio); model {args.model}; greedy decoding, no timestamps.",
        f"Command: `{command}`",
        "",
        "RTFx = audio seconds / wall second. In-process rows: audio decoded beforehand, own "
        "process's peak RSS (VmHWM). Served rows: one HTTP request per utterance (FLAC, "
        "base64), peak RSS summed over the server's processes (after the concurrent run: "
        f"{'; '.join(server_processes)}). WER: Whisper English normaliser.",
        "",
        f"Served ctranslate2 ÷ direct faster-whisper int8 RTFx: "
        f"{ratios['served_ct2_over_direct_int8']:.2f} sequential, "
        f"{served_ct2[args.clients] / direct_int8:.2f} with {args.clients} clients "
        "(target ≥ 0.9).",
    ]
    table = write_report(rows, header, args.out)
    print(table)
    run_id = log_to_mlflow(rows, args, ratios, args.out, predictions)
    print(f"results in {args.out}; MLflow run {run_id} at {args.tracking_uri}")


if __name__ == "__main__":
    main()
