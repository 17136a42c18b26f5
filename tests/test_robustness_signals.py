"""Signals end runs honestly: SIGTERM to `duosparse train` closes its run KILLED and keeps
the checkpoint the same command resumes from; a second `train` of the same config while the
first runs is refused (they would share a checkpoint folder); a train killed outright (SIGKILL) is marked
KILLED by `duosparse reconcile` or the next `train` (commands that only read leave it); SIGTERM to `duosparse ui` stops the whole
MLflow server it started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from cli_helpers import wait_for_ui
from duosparse import schema, tracking

pytestmark = pytest.mark.slow

DUOSPARSE = str(Path(sys.executable).with_name("duosparse"))
EPOCHS = 6
# ~20 s or more here: long enough that a signal lands after the first epoch, before the last
SLOW = [
    "--set",
    "data.corpus=synthetic",
    "--set",
    "model.embedding_size=16",
    "--set",
    "model.hidden_size=24",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.eval_batch_size=8",
    "--set",
    "train.max_steps_per_epoch=30",
    "--set",
    "train.max_eval_batches=4",
    "--set",
    f"train.epochs={EPOCHS}",
    "--set",
    "model.arch=lstm",
]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DUOSPARSE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def start_train(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [DUOSPARSE, "train", *SLOW, "--json"],
        cwd=cwd,
        env=_env(),
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def store(folder: Path):
    # through the schema lock: the train being watched may be creating the schema right now
    return tracking.open_store(f"sqlite:///{folder / 'mlruns.db'}", reconcile=False)


def the_train_run(folder: Path):
    client = store(folder)
    experiment = client.get_experiment_by_name("duosparse")
    (run_,) = client.search_runs([experiment.experiment_id])
    return run_


def wait_for_first_epoch(folder: Path, proc: subprocess.Popen, timeout_s: float = 300) -> str:
    """The run id, once the run has logged epoch 1 (a generous deadline, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (
            f"train ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}"
        )
        if (folder / "mlruns.db").exists():
            client = store(folder)
            experiment = client.get_experiment_by_name("duosparse")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and client.get_metric_history(runs[0].info.run_id, schema.VAL_LOSS):
                return runs[0].info.run_id
        time.sleep(0.1)
    raise AssertionError("the first epoch was never logged")


def epochs_logged(folder: Path, run_id: str) -> list[int]:
    return sorted(m.step for m in store(folder).get_metric_history(run_id, schema.VAL_LOSS))


def test_sigterm_ends_train_killed_and_the_same_command_resumes_the_run(tmp_path):
    proc = start_train(tmp_path)
    run_id = wait_for_first_epoch(tmp_path, proc)
    # a live run is left alone by the reconciliation any command does when it opens the store
    assert tracking.mark_dead_train_runs_killed(store(tmp_path)) == 0
    assert the_train_run(tmp_path).info.status == "RUNNING"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)

    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    text = " ".join(err.split())
    assert "interrupted by SIGTERM" in text and "KILLED" in text
    assert f"Resume it with the same command: duosparse train {' '.join(SLOW)} --json" in text
    run_ = the_train_run(tmp_path)
    assert run_.info.run_id == run_id and run_.info.status == "KILLED"
    assert "SIGTERM" in run_.data.tags[schema.TAG_FAILURE]
    key = run_.data.tags[schema.TAG_RUN_KEY]
    assert (tmp_path / "runs" / key[:12] / "last.pt").is_file()
    done = epochs_logged(tmp_path, run_id)
    assert done and done == list(range(1, len(done) + 1)) and len(done) < EPOCHS

    resumed = run("train", *SLOW, "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["run_id"] == run_id  # the same run, continued
    assert "continued from" in " ".join(resumed.stderr.split())
    run_ = the_train_run(tmp_path)
    assert run_.info.status == "FINISHED" and not run_.data.tags.get(schema.TAG_FAILURE)
    assert epochs_logged(tmp_path, run_id) == list(range(1, EPOCHS + 1))  # each epoch once


def test_the_same_config_twice_at_once_is_refused_and_the_first_run_is_untouched(tmp_path):
    proc = start_train(tmp_path)
    run_id = wait_for_first_epoch(tmp_path, proc)
    # Paused, so that it is still training whatever the machine's speed (on a quiet one the
    # rest of its epochs take less time than a second process takes to start).
    proc.send_signal(signal.SIGSTOP)
    try:
        assert proc.poll() is None, "the first train ended before it could be paused"
        second = run("train", *SLOW, "--json", cwd=tmp_path)
    finally:
        proc.send_signal(signal.SIGCONT)
    text = " ".join(second.stderr.split())
    assert second.returncode == 2 and "Traceback" not in second.stderr, text[-3000:]
    assert f"is in use by {socket.gethostname()}:{proc.pid}" in text and "--workdir" in text
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out)["run_id"] == run_id
    run_ = the_train_run(tmp_path)  # the only run: the refused one created none
    assert run_.info.status == "FINISHED"
    assert epochs_logged(tmp_path, run_id) == list(range(1, EPOCHS + 1))
    # once the first has ended, the folder is free again
    third = run("train", *SLOW, "--json", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]


def test_a_train_killed_outright_is_left_by_readers_closed_by_reconcile_and_resumed(tmp_path):
    spec = tmp_path / "other.yaml"  # any spec: `sweep status` opens the same store
    spec.write_text(
        yaml.safe_dump(
            {"name": "other", "base": {"data": {"corpus": "synthetic"}}, "grid": {}, "seeds": [0]}
        )
    )
    proc = start_train(tmp_path)
    run_id = wait_for_first_epoch(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)  # reaped: its pid is gone
    run_ = the_train_run(tmp_path)
    assert run_.info.status == "RUNNING"  # nothing could close it
    owner = run_.data.tags[schema.TAG_DRIVER]
    assert owner.endswith(f":{proc.pid}")

    # a command that reads (here `sweep status`) leaves the store as it is
    status = run("sweep", "status", str(spec), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr[-3000:]
    assert the_train_run(tmp_path).info.status == "RUNNING"
    reconciled = run("reconcile", cwd=tmp_path)
    assert reconciled.returncode == 0, reconciled.stderr[-3000:]
    assert "1 train run(s)" in reconciled.stderr
    run_ = the_train_run(tmp_path)
    assert run_.info.status == "KILLED"
    assert owner in run_.data.tags[schema.TAG_FAILURE]

    resumed = run("train", *SLOW, "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["run_id"] == run_id
    assert the_train_run(tmp_path).info.status == "FINISHED"
    assert epochs_logged(tmp_path, run_id) == list(range(1, EPOCHS + 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    living = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                living.append(proc)
        except psutil.NoSuchProcess:
            pass
    return living


def test_sigterm_to_ui_stops_the_whole_server_tree(tmp_path):
    port = _free_port()
    ui = subprocess.Popen(
        [DUOSPARSE, "ui", "--port", str(port)],
        cwd=tmp_path,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    tree: list[psutil.Process] = []
    try:
        wait_for_ui(port, ui)
        tree = psutil.Process(ui.pid).children(recursive=True)
        assert tree  # the server and its workers
        ui.send_signal(signal.SIGTERM)  # to `duosparse ui` alone, as `kill PID` does
        _, err = ui.communicate(timeout=120)
        assert "Traceback" not in err
        gone_by = time.monotonic() + 60
        while (_alive(tree) or _port_open(port)) and time.monotonic() < gone_by:
            time.sleep(0.5)
        assert not _alive(tree), [p.cmdline() for p in _alive(tree)]
        assert not _port_open(port)
    finally:
        with contextlib.suppress(OSError):  # whatever a failed test left behind
            os.killpg(ui.pid, signal.SIGKILL)
        for proc in _alive(tree):
            proc.kill()
