"""The MLflow UI as users meet it, in a real browser: a finished, analysed smoke sweep behind
`duosparse ui`, opened in the system Chromium through Selenium and Debian's chromedriver
(`make test` installs both; nothing is downloaded).

The pages are saved as screenshots under the test's temporary folder; with
DUOSPARSE_SCREENSHOTS=<folder> they are also copied there (how docs/dashboard/ was made)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from cli_helpers import DUOSPARSE, cli_env, free_port, wait_for_ui
from conftest import require
from duosparse import schema
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.system]

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 120  # a deadline for pages to render on a loaded machine, not a timing


@pytest.fixture(scope="module")
def analysed_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard")
    for args in (
        ["sweep", "run", str(ROOT / "sweeps" / "smoke.yaml")],
        ["analyze", "smoke", "--bootstrap", "50"],
    ):
        done = subprocess.run(
            [DUOSPARSE, *args],
            cwd=folder,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    (launch,) = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep"]
    trials = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "trial"]
    assert len(trials) == 4
    return folder, experiment.experiment_id, launch, trials


@pytest.fixture(scope="module")
def ui(analysed_sweep):
    folder = analysed_sweep[0]
    port = free_port()
    process = subprocess.Popen(
        [DUOSPARSE, "ui", "--port", str(port)],
        cwd=folder,
        env=cli_env(),
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for_ui(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    require(
        bool(chromium and driver),
        "the dashboard test needs Chromium and its driver: run it through "
        "`make test` (.ci/system-packages.sh installs chromium and chromium-driver)",
    )
    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
    ):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def visit(browser, url: str, until_text: str, shots: Path, name: str) -> str:
    """Open `url`, wait until the page shows `until_text`, save a screenshot; the page's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, WAIT_S).until(
        lambda b: until_text in b.find_element(By.TAG_NAME, "body").text
    )
    save(browser, shots, name)
    return browser.find_element(By.TAG_NAME, "body").text


def as_javascript_prints(value: float) -> str:
    """A float as the UI shows it: JavaScript's shortest round trip, like Python's repr, but
    whole numbers without '.0'."""
    return str(int(value)) if value.is_integer() else repr(value)


def save(browser, shots: Path, name: str) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shots / f"{name}.png"))
    extra = os.environ.get("DUOSPARSE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(shots / f"{name}.png", Path(extra) / f"{name}.png")


def test_the_mlflow_ui_shows_the_sweep_its_trials_their_curves_and_the_report(
    analysed_sweep, ui, browser, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, experiment_id, launch, trials = analysed_sweep
    shots = tmp_path / "screenshots"
    view = "workflowType=machine_learning"  # the link `duosparse ui` prints

    # the experiment in the model-training view, described, with its launch run
    page = visit(
        browser, f"{ui}/#/experiments/{experiment_id}/runs?{view}", "smoke launch", shots, "runs"
    )
    assert "Model training" in page and "Judges" not in page and "Prompts" not in page
    assert "duosparse sweep smoke" in page
    # expanding the launch lists every trial
    browser.find_element(
        By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"
    ).click()
    for trial in trials:
        WebDriverWait(browser, WAIT_S).until(
            lambda b, t=trial: b.find_elements(By.CSS_SELECTOR, f"a[href*='{t.info.run_id}']")
        )
    save(browser, shots, "runs")

    # each trial's page: its figures (val/ppl as logged), then its per-epoch charts
    for trial in trials:
        page = visit(
            browser,
            f"{ui}/#/experiments/{experiment_id}/runs/{trial.info.run_id}?{view}",
            schema.TEST_PPL,
            shots,
            "run",
        )
        for name in (
            schema.VAL_PPL,
            schema.TEST_PPL,
            schema.SPARSITY_ACTIVITY,
            schema.OPS_EFFECTIVE,
        ):
            assert f"{name}\n{as_javascript_prints(trial.data.metrics[name])}" in page, name
    visit(
        browser,
        f"{ui}/#/experiments/{experiment_id}/runs/{trial.info.run_id}/model-metrics?{view}",
        "compute_reduction",
        shots,
        "run-charts",
    )
    WebDriverWait(browser, WAIT_S).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "svg.main-svg")) >= 3
    )
    save(browser, shots, "run-charts")

    # the launch run: its description links the report, which renders from its artifacts
    visit(
        browser,
        f"{ui}/#/experiments/{experiment_id}/runs/{launch.info.run_id}?{view}",
        "the report",
        shots,
        "launch",
    )
    link = browser.find_element(
        By.CSS_SELECTOR, "a[href*='artifacts/analysis/report.html']"
    ).get_attribute("href")
    assert link.endswith(
        f"/#/experiments/{experiment_id}/runs/{launch.info.run_id}/artifacts/analysis/report.html"
    )
    visit(browser, f"{link}?{view}", "report.html", shots, "report")
    frame = WebDriverWait(browser, WAIT_S).until(lambda b: b.find_elements(By.TAG_NAME, "iframe"))[
        0
    ]
    browser.switch_to.frame(frame)
    try:
        WebDriverWait(browser, WAIT_S).until(
            lambda b: "Pareto" in b.find_element(By.TAG_NAME, "body").text
        )
        WebDriverWait(browser, WAIT_S).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, "svg.main-svg")
        )
    finally:
        browser.switch_to.default_content()
    save(browser, shots, "report")
    assert {p.name for p in shots.iterdir()} == {
        f"{n}.png" for n in ("runs", "run", "run-charts", "launch", "report")
    }
