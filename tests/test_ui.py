"""The MLflow UI as a user sees it (issue 12): real runs on the tiny random model (a train run,
an evaluate run, a registered version) in a store served by ``mlflow server`` on loopback,
opened in headless Chromium (Debian's ``chromium``, driven by Playwright; nothing downloaded).

MLflow 3.17's UI is a React app: every check waits for text a user reads, not for CSS classes.
Links carry ``workflowType=machine_learning``: the 3.17 UI picks GenAI or model-training views
from that URL parameter (else the browser's last choice, GenAI when new), not from the
experiment's kind tag."""

from __future__ import annotations

import json
import re
import zlib
from base64 import b64decode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from conftest import skip_optional_asset
from mlflow.entities import LoggedModel, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from servers import running

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (CI runs as root), no GPU, and no background traffic: the test machine is offline.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ML_VIEW = "workflowType=machine_learning"
# The 3.17 UI's saved runs-table views: experiment tags holding a JSON envelope whose ``state``
# is JSON, plain or "deflate;<base64 zlib>". The runs table opens one with ?viewStateShareKey=.
SAVED_VIEW_PREFIX = "mlflow.sharedViewState."
WAIT_MS = 90_000  # the first page load compiles the app's chunks on a busy 2-core machine


@dataclass(frozen=True)
class Store:
    url: str
    tracking_uri: str
    experiment_id: str
    train: Run
    evaluate: Run
    version: ModelVersion
    logged_model: LoggedModel | None


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        skip_optional_asset("chromium", f"{CHROMIUM} (Debian package `chromium`; .ci/run "
                                        "installs it)")
    return CHROMIUM


@pytest.fixture(scope="module")
def store(chromium, tiny_english_path, sample_dir, tmp_path_factory) -> Iterator[Store]:
    """Train (full fine-tune, 2 steps: registering it reuses its LoggedModel, no merge), evaluate
it, register it; then serve the store."""
    from whisper_exp.config import load_config
    from whisper_exp.evaluation import run_evaluation
    from whisper_exp.registry import register_run, trained_model
    from whisper_exp.training import train

    root = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # MLflow's default artifact root, ./mlruns, lands here
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        cfg = load_config(None, {
            "model": {"name": str(tiny_english_path)},
            "data": {"train": str(sample_dir), "max_train_samples": 4, "max_eval_samples": 2},
            "finetuning": {"strategy": "full"},
            "training": {"max_steps": 2, "batch_size": 2, "output_dir": str(root / "out")},
            "evaluation": {"batch_size": 2, "max_new_tokens": 4},
            "tracking": {"experiment_name": "ui", "tracking_uri": uri},
        })
        trained = train(cfg)
        run_evaluation(f"runs:/{trained.run_id}", str(sample_dir), cfg)
        version = register_run(trained.run_id, alias="champion")
        client = MlflowClient(uri)
        train_run = client.get_run(trained.run_id)
        evaluate_run = next(r for r in client.search_runs([train_run.info.experiment_id])
                            if r.info.run_id != trained.run_id)
        logged_model = trained_model(trained.run_id)
    with running(["mlflow", "server", "--backend-store-uri", uri, "--workers", "1"],
                 root / "server.log", cwd=root) as (url, _):
        yield Store(url, uri, train_run.info.experiment_id, train_run, evaluate_run, version,
                    logged_model)


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    yield opened
    context.close()


def _open(page, store: Store, route: str, ready_text: str):
    """Open ``#<route>`` and wait until ``ready_text`` shows."""
    separator = "&" if "?" in route else "?"
    page.goto(f"{store.url}/#{route}{separator}{ML_VIEW}")
    page.get_by_text(ready_text, exact=True).first.wait_for()
    return page


def _saved_views(store: Store) -> dict[str, dict]:
    """The experiment's saved runs-table views (MLflow's own storage): share key -> state."""
    views = {}
    experiment = MlflowClient(store.tracking_uri).get_experiment(store.experiment_id)
    for key, value in experiment.tags.items():
        if key.startswith(SAVED_VIEW_PREFIX):
            state = json.loads(value)["state"]
            if state.startswith("deflate;"):
                state = zlib.decompress(b64decode(state.removeprefix("deflate;"))).decode()
            views[key.removeprefix(SAVED_VIEW_PREFIX)] = json.loads(state)
    return views


def test_run_page_lists_datasets_logged_model_and_description(store, page):
    datasets = {i.dataset.name: {t.key: t.value for t in i.tags}.get("mlflow.data.context")
                for i in store.train.inputs.dataset_inputs}
    assert "training" in datasets.values() and len(datasets) >= 2, (
        f"the train run logs its train and eval sets as MLflow datasets, got {datasets}")
    assert store.logged_model is not None, "the train run logs its model as a LoggedModel"
    description = store.train.data.tags.get("mlflow.note.content", "")
    assert "WER" in description, "the train run has a markdown description with its WER"

    run_page = _open(page, store, f"/experiments/{store.experiment_id}/runs/"
                                  f"{store.train.info.run_id}", store.train.info.run_name)
    train_set = next(name for name, context in datasets.items() if context == "training")
    page.get_by_text(train_set).first.wait_for()
    page.get_by_text("Logged models (").wait_for()
    logged = run_page.get_by_role("row").filter(has_text=store.logged_model.name)
    assert logged.count() >= 1, "the Logged models table lists the run's model"
    for name in datasets:  # the eval set shows beside the model it scored (metrics' dataset)
        run_page.get_by_text(name).first.wait_for()
    wer_line = next(line for line in description.splitlines() if "WER" in line)
    run_page.get_by_text(re.sub(r"[*_`#]", "", wer_line).strip(" -")).first.wait_for()


def test_logged_model_page_shows_its_metrics_on_the_eval_set(store, page):
    assert store.logged_model is not None, "the train run logs its model as a LoggedModel"
    model = store.logged_model
    metrics = {m.key: m for m in model.metrics or []}
    assert "wer" in metrics and metrics["wer"].dataset_name, (
        f"the logged model carries its WER, linked to the eval dataset: {model.metrics}")
    _open(page, store, f"/experiments/{store.experiment_id}/models/{model.model_id}",
          model.name)
    page.get_by_text("Metrics (").first.wait_for()
    row = page.get_by_role("row").filter(has=page.get_by_text("wer", exact=True))
    row.first.wait_for()
    text = row.first.inner_text()
    assert metrics["wer"].dataset_name in text, f"wer row names its dataset: {text!r}"
    assert store.train.info.run_name in text, f"wer row names its source run: {text!r}"


def test_registered_version_links_to_its_run_and_model(store, page):
    version = store.version
    _open(page, store, f"/models/{version.name}/versions/{version.version}",
          f"Version {version.version}")
    run_link = page.get_by_role("link", name=store.train.info.run_name)
    assert store.train.info.run_id in (run_link.get_attribute("href") or "")
    assert store.logged_model is not None, "the train run logs its model as a LoggedModel"
    assert version.source == store.logged_model.model_uri, "register reuses the run's model"
    model_id = store.logged_model.model_id
    page.locator(f"a[href*='{model_id}']").first.wait_for()  # "Source Model" links to it
    run_link.click()
    page.get_by_text(store.train.info.run_id).first.wait_for()


def test_experiment_runs_view_shows_wer_columns(store, page):
    views = {key: state for key, state in _saved_views(store).items()
             if "metrics.`wer`" in state.get("selectedColumns", [])}
    assert views, ("the experiment has a saved runs view with a WER column (the 3.17 runs "
                   "table shows no metric column by default)")
    share_key = next(iter(views))
    _open(page, store, f"/experiments/{store.experiment_id}/runs?viewStateShareKey={share_key}",
          store.train.info.run_name)
    page.get_by_role("columnheader", name="wer", exact=True).first.wait_for()
    for run in (store.train, store.evaluate):
        assert page.get_by_role("row").filter(has_text=run.info.run_name).count() >= 1
    # The train run's WER is in the wer column of its row (the grid draws a row's pinned name
    # and its metric cells as separate row elements sharing aria-rowindex).
    column = page.get_by_role("columnheader", name="wer", exact=True).first
    named = page.get_by_role("row").filter(has_text=store.train.info.run_name).first
    cell = page.locator(f"[role=row][aria-rowindex='{named.get_attribute('aria-rowindex')}'] "
                        f"[role=gridcell][aria-colindex='{column.get_attribute('aria-colindex')}']")
    shown = cell.first.inner_text().strip()
    assert float(shown) == pytest.approx(store.train.data.metrics["wer"], abs=1e-3), shown
