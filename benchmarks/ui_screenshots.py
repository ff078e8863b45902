"""Screenshots of the MLflow UI for the README's "Tracking" section: a run page and runs compared.

Run (not in CI; about 13 min on the shared 2-core machine; needs Debian's ``chromium`` and
``../shared``):
    python benchmarks/ui_screenshots.py
    python benchmarks/ui_screenshots.py --model openai/whisper-tiny --max-steps 20

Builds a scratch tracking store as a user would with the library: two training runs on the
shipped sample (LoRA and full fine-tune of ``--model``), an evaluate run of the LoRA model
against its base, the LoRA run registered as ``whisper-exp@champion``. Then serves that store with
``mlflow server`` on loopback, opens it in headless Chromium (Playwright driving
``/usr/bin/chromium``; no browser download) and saves ``run_page.png`` (the LoRA run's overview:
description, datasets, logged model, registered version, metrics) and ``runs_compared.png``
(the experiment's runs table in the saved view with the WER columns, ``run_page.wer_view_url``)
under ``--out`` (default docs/img).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from machine import free_port, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (root in CI/containers), no GPU, no background traffic (machines here are offline).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# The 3.17 UI picks GenAI or model-training views from this URL parameter (else the browser's
# last choice, GenAI when new), not from the experiment's kind tag.
ML_VIEW = "workflowType=machine_learning"
VIEWPORT = {"width": 1440, "height": 960}


def build_store(model: str, data: Path, max_steps: int, workdir: Path) -> dict[str, str]:
    """The runs the screenshots show; returns their ids and the experiment id."""
    from whisper_exp.config import load_config
    from whisper_exp.evaluation import run_evaluation
    from whisper_exp.registry import register_run
    from whisper_exp.training import train

    def config(strategy: str, run_name: str | None):
        # The shipped recipe of each strategy (full: lr 1e-5), as `train --config <strategy>`.
        return load_config(strategy, {
            "model": {"name": model},
            "data": {"train": str(data)},
            "training": {"max_steps": max_steps, "batch_size": 4, "warmup_steps": 0,
                         "output_dir": str(workdir / "out")},
            "tracking": {"experiment_name": "whisper-exp", "run_name": run_name},
        })

    lora = train(config("lora", "lora-sample"))
    full = train(config("full", "full-sample"))
    evaluation = run_evaluation(f"runs:/{lora.run_id}", str(data), config("lora", None),
                                compare_with=model)
    register_run(lora.run_id, alias="champion")
    import mlflow

    return {"lora": lora.run_id, "full": full.run_id, "evaluate": evaluation.run_id,
            "experiment": mlflow.get_run(lora.run_id).info.experiment_id}


@contextlib.contextmanager
def mlflow_server(tracking_uri: str, log: Path, cwd: Path,
                  timeout_s: float = 300) -> Iterator[str]:
    """``mlflow server`` on a free loopback port until /health answers; the whole process group
    is stopped on exit."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--workers", "1", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(process)


def screenshot(page, url: str, ready_text: str, path: Path, column: str | None = None) -> None:
    """Open ``url``, wait for ``ready_text`` (and the table ``column``) and for charts to draw,
    close the assistant panel (it covers a third of the page), save a PNG of the viewport."""
    page.goto(url)
    page.get_by_text(ready_text, exact=True).first.wait_for()
    if column:
        page.get_by_role("columnheader", name=column, exact=True).first.wait_for()
    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():
        close.first.click()
    page.wait_for_timeout(3000)
    page.screenshot(path=str(path))
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared/models/whisper-tiny.en"))
    parser.add_argument("--data", type=Path, default=ROOT / "data/sample")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/img")
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        raise SystemExit(f"{CHROMIUM} not found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)

    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    from whisper_exp.run_page import wer_view_url

    with tempfile.TemporaryDirectory(prefix="ui-screenshots-") as scratch:
        workdir = Path(scratch)
        tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        os.chdir(workdir)  # MLflow's default artifact root, ./mlruns, lands in the scratch dir
        ids = build_store(args.model, args.data.resolve(), args.max_steps, workdir)
        names = {key: MlflowClient().get_run(run_id).info.run_name
                 for key, run_id in ids.items() if key != "experiment"}
        with mlflow_server(tracking_uri, workdir / "server.log", workdir) as url, \
                sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                 args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(120_000)
            experiment = ids["experiment"]
            screenshot(page, f"{url}/#/experiments/{experiment}/runs/{ids['lora']}?{ML_VIEW}",
                       names["lora"], args.out / "run_page.png")
            screenshot(page, url + wer_view_url(experiment), names["full"],
                       args.out / "runs_compared.png", column="wer")
            browser.close()


if __name__ == "__main__":
    main()
