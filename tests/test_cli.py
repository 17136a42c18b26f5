"""The command line as a user runs it: real processes, the embedded MLflow store."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from cli_helpers import DUOSPARSE, TINY, cli_env, free_port, run, wait_for_ui
from duosparse import schema

pytestmark = pytest.mark.slow


def test_bad_config_key_exits_nonzero_naming_the_key_without_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  arch: egru\n  hiden_size: 128\n")
    result = run("train", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "model.hiden_size" in result.stderr
    assert "hidden_size" in result.stderr  # the valid keys are listed
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "mlruns.db").exists()  # refused before any work started


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "model.arch=transformer"], "model.arch"),
        (["--set", "train.lr=-1"], "train.lr"),
        (["--set", "prune.target_sparsity=1.0"], "prune.target_sparsity"),
        (["--set", "nonsense"], "key=value"),
        (["--set", "model.num_layers=1"], "model.hidden_size"),  # tied 1-layer: hidden_size unused
    ],
)
def test_bad_values_are_refused_with_the_field_named(tmp_path, args, needle):
    result = run("train", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_missing_data_says_how_to_provide_it(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DUOSPARSE_DATA_DIR", "MLFLOW_TRACKING_URI")
    }
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    result = subprocess.run(
        [DUOSPARSE, "train", "--set", "data.corpus=ptb"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "DUOSPARSE_DATA_DIR" in result.stderr and "Traceback" not in result.stderr


def test_train_logs_one_mlflow_run_with_the_schema(tmp_path):
    result = run("train", *TINY, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run_ = client.get_run(out["run_id"])
    assert run_.info.status == "FINISHED"
    assert run_.data.params["model.arch"] == "egru"
    assert run_.data.params["prune.target_sparsity"] == "0.0"
    assert run_.data.tags[schema.TAG_RUN_KEY] == out["run_key"]
    assert run_.data.tags[schema.TAG_CODE_VERSION]
    for name in schema.RUN_METRICS:
        assert name in run_.data.metrics, name
        if not name.startswith("val/"):  # --json gives the best epoch's val, MLflow the last's
            assert out["metrics"][name] == pytest.approx(run_.data.metrics[name]), name
    history = client.get_metric_history(out["run_id"], schema.VAL_PPL)
    assert sorted(m.step for m in history) == [1, 2]
    effective = client.get_metric_history(out["run_id"], schema.OPS_EFFECTIVE)
    assert sorted(m.step for m in effective) == [1, 2, 2]  # each epoch, then the final test figure
    artifacts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {
        schema.ARTIFACT_CONFIG,
        schema.ARTIFACT_CHECKPOINT,
        schema.ARTIFACT_ACTIVITY,
    } <= artifacts
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the embedded store


def test_a_diverging_run_is_failed_with_its_reason(tmp_path):
    result = run(
        "train",
        *TINY,
        "--set",
        "train.optimizer=sgd",
        "--set",
        "train.lr=1e36",
        "--set",
        "train.clip=0",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run_,) = client.search_runs(client.get_experiment_by_name("duosparse").experiment_id)
    assert run_.info.status == "FAILED"
    assert "train/loss became" in run_.data.tags[schema.TAG_FAILURE]


def test_data_check_reports_the_shared_corpora(tmp_path, data_dir):
    result = run("data", "check", "--data-dir", str(data_dir), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = {entry["corpus"]: entry for entry in json.loads(result.stdout)}
    assert report["ptb"]["ok"] and report["wikitext-2"]["ok"]


def test_help_for_every_command(tmp_path):
    """Every command and group of the app, found by walking it (so a new one is covered),
    answers --help; the real process for the top level, in-process for the rest."""
    import typer
    from duosparse.cli import app
    from typer.testing import CliRunner

    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0 and "Usage" in result.stdout

    def walk(command, path: tuple[str, ...]):
        yield path
        if hasattr(command, "commands"):  # a group (typer's own click-compatible class)
            for name, sub in command.commands.items():
                yield from walk(sub, (*path, name))

    paths = [p for p in walk(typer.main.get_command(app), ()) if p]
    names = {" ".join(p) for p in paths}
    assert {
        "train",
        "ui",
        "analyze",
        "sweep run",
        "sweep status",
        "reconcile",
        "data check",
        "data download",
        "prune sensitivity",
        "simulate spinnaker2",
        "export pareto",
    } <= names, names
    for path in paths:
        shown = CliRunner().invoke(app, [*path, "--help"])
        assert shown.exit_code == 0 and "Usage" in shown.output, (path, shown.output[-2000:])


def test_ui_serves_the_embedded_store_on_loopback_only(tmp_path):
    import urllib.request

    import psutil

    assert run("train", *TINY, "--json", cwd=tmp_path).returncode == 0
    port = free_port()
    ui = subprocess.Popen(
        [DUOSPARSE, "ui", "--port", str(port)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_ui(port, ui)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=duosparse"
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["experiment"]["name"] == "duosparse"  # the same store `train` wrote
        procs = [psutil.Process(ui.pid), *psutil.Process(ui.pid).children(recursive=True)]
        addresses = set()
        for proc in procs:
            try:
                connections = proc.net_connections("inet")
            except psutil.NoSuchProcess:  # a short-lived helper of the server's that ended
                continue
            addresses |= {c.laddr.ip for c in connections if c.status == "LISTEN"}
        assert addresses and addresses <= {"127.0.0.1"}
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)


def test_train_without_a_terminal_logs_one_line_per_epoch_and_quiet_logs_none(tmp_path):
    result = run("train", *TINY, cwd=tmp_path)  # stderr is a pipe here, as in a log file or CI
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if " epoch " in line]
    assert [line.split(" epoch ")[1].split()[0] for line in lines] == ["1/2", "2/2"]
    for line in lines:
        for figure in (
            "train loss ",
            "val ppl ",
            "activity sparsity ",
            "effective MACs/token ",
            " tok/s",
            "elapsed ",
            "ETA ",
        ):
            assert figure in line, (figure, line)
        assert line[:4].isdigit()  # a timestamp first: plain lines, not a transient bar
    assert "test ppl " in result.stderr and "Creating initial MLflow database" not in result.stderr
    client_metrics = json.loads(
        run("train", *TINY, "--json", "--quiet", "--experiment", "q", cwd=tmp_path).stdout
    )
    assert client_metrics["metrics"][schema.TEST_PPL] > 0
    quiet = run("train", *TINY, "--quiet", "--experiment", "q2", cwd=tmp_path)
    assert (
        quiet.returncode == 0 and " epoch " not in quiet.stderr and "test ppl " not in quiet.stderr
    )
