"""The embedded store under concurrency: many processes starting at once on a fresh folder
all create (or find) the SQLite schema, and every run they start ends FINISHED."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from duosparse import schema
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

DUOSPARSE = str(Path(sys.executable).with_name("duosparse"))
TINY = [
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
    "train.max_steps_per_epoch=4",
    "--set",
    "train.max_eval_batches=2",
    "--set",
    "train.epochs=1",
    "--set",
    "model.arch=lstm",
]

# Each process waits for the gate file, so all of them reach the store in the same instant.
OPEN_AT_THE_GATE = """
import os, sys, time
from pathlib import Path
import mlflow.tracking  # the slow imports before the gate, not after
from duosparse import tracking

uri, gate = sys.argv[1:3]
Path(f"{gate}.ready.{os.getpid()}").touch()
while not Path(gate).exists():
    time.sleep(0.005)
client = tracking.open_store(uri)
tracking.ensure_experiment(client, "race")
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process; a generous deadline, then anything left is killed."""
    deadline = time.monotonic() + timeout_s
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        results.append((proc.returncode, err))
    return results


def test_eight_processes_opening_a_fresh_store_in_the_same_instant_all_succeed(tmp_path):
    """Without the schema lock, MLflow's schema creation loses all but one of these
    (`duplicate column name`, `table ... already exists`)."""
    uri, gate = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}", tmp_path / "gate"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_THE_GATE, uri, str(gate)],
            cwd=tmp_path,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    deadline = time.monotonic() + 300  # until every interpreter has imported MLflow
    while len(list(tmp_path.glob("gate.ready.*"))) < len(procs) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before the gate opened"
        time.sleep(0.2)
    gate.touch()
    for code, err in _wait_all(procs, 300):
        assert code == 0 and "Traceback" not in err, err[-3000:]
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("race") is not None


def _one_trial_spec(folder: Path, name: str) -> Path:
    spec = {
        "name": name,
        "base": {
            "data": {"corpus": "synthetic"},
            "model": {"arch": "lstm", "embedding_size": 16, "hidden_size": 24},
            "train": {
                "epochs": 1,
                "batch_size": 8,
                "eval_batch_size": 8,
                "max_steps_per_epoch": 4,
                "max_eval_batches": 2,
            },
        },
        "grid": {},
        "seeds": [0],
        "resources": {"cpu": 1},
        "max_concurrent": 1,
        "retries": 0,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_six_trains_and_two_sweeps_started_at_once_on_a_fresh_folder_all_finish(tmp_path):
    specs = [_one_trial_spec(tmp_path, name) for name in ("race_a", "race_b")]
    commands = [
        [DUOSPARSE, "train", *TINY, "--set", f"train.seed={seed}", "--json"] for seed in range(6)
    ]
    commands += [[DUOSPARSE, "sweep", "run", str(spec), "--json"] for spec in specs]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in commands
    ]
    results = _wait_all(procs, 900)
    for cmd, (code, err) in zip(commands, results):
        assert code == 0, f"{' '.join(cmd[1:3])} exited {code}:\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        assert "database is locked" not in err, err[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    kinds = [r.data.tags.get(schema.TAG_KIND) for r in runs]
    assert kinds.count("train") == 6 and kinds.count("trial") == 2 and kinds.count("sweep") == 2
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert (
        len(
            {
                r.data.tags[schema.TAG_RUN_KEY]
                for r in runs
                if r.data.tags.get(schema.TAG_KIND) == "train"
            }
        )
        == 6
    )


def test_a_run_continued_after_its_params_were_lost_gets_them_all(tmp_path):
    """A trial whose server refused the params after the run was created (seen under load:
    the retry continued the run without them, and the run table had no config for it)."""
    from duosparse import sweep_runner, tracking
    from duosparse.config import RunConfig
    from mlflow.entities import Param

    client = tracking.open_store(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment_id = tracking.ensure_experiment(client, "lost")
    config = RunConfig.model_validate({"data": {"corpus": "synthetic"}, "model": {"arch": "gru"}})
    run = client.create_run(experiment_id, tags=tracking.run_tags(config, "trial"))
    client.log_batch(
        run.info.run_id, params=[Param("model.arch", "gru")]
    )  # one batch of several got through
    client.set_terminated(run.info.run_id, "FAILED")
    continued = sweep_runner._trial_run(client, {}, config, client.get_run(run.info.run_id))
    assert continued == run.info.run_id
    expected = {k: "null" if v is None else str(v) for k, v in config.flat().items()}
    assert client.get_run(run.info.run_id).data.params == expected
