"""Sweeps on real Ray Tune with the real embedded MLflow store (SQLite), driven as a user
drives them: `duosparse sweep run` in a fresh folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from duosparse import schema, tracking
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DUOSPARSE = str(Path(sys.executable).with_name("duosparse"))
SMOKE = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())


def sweep(*args: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run(
        [DUOSPARSE, "sweep", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def write_spec(folder: Path, name: str, **changes) -> Path:
    tree = json.loads(json.dumps(SMOKE))
    for key, value in changes.items():
        tree[key] = value
    tree["name"] = name
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def store(folder: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")


def trial_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "trial"], [
        r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep"
    ]


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smoke")
    spec = write_spec(folder, "smoke")
    result = sweep("run", str(spec), "--json", cwd=folder)
    return folder, spec, result


def test_smoke_sweep_finishes_every_trial_under_one_parent(smoke_folder):
    folder, _, result = smoke_folder
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is locked" not in result.stderr and "Traceback" not in result.stderr
    out = json.loads(result.stdout)
    assert out["counts"] == {"FINISHED": 4}
    trials, parents = trial_runs(store(folder), "smoke")
    assert len(parents) == 1 and len(trials) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[schema.TAG_SWEEP] == "smoke" and parent.data.tags[schema.TAG_SPEC_HASH]
    # what the MLflow UI shows: the model-training view, the sweep described, the launch's
    # note naming the columns to pick and where the report goes, the commit on every run
    experiment = store(folder).get_experiment_by_name("smoke")
    assert experiment.tags[schema.TAG_EXPERIMENT_KIND] == "custom_model_development"
    assert "**smoke**" in experiment.tags[schema.TAG_NOTE]
    note = parent.data.tags[schema.TAG_NOTE]
    assert all(f"`{c}`" in note for c in schema.UI_COLUMNS)
    assert (
        f"(#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts/analysis/report.html)"
        in note
    )
    logged = yaml.safe_load(
        Path(store(folder).download_artifacts(parent.info.run_id, schema.ARTIFACT_SPEC)).read_text()
    )
    assert logged["name"] == "smoke" and logged["grid"] == SMOKE["grid"]
    sha = tracking.git_sha()
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags[schema.TAG_PARENT_RUN_ID] == parent.info.run_id
        assert run.data.tags[schema.TAG_SWEEP] == "smoke"
        assert run.data.tags[schema.TAG_SPEC_HASH] == parent.data.tags[schema.TAG_SPEC_HASH]
        assert sha is None or run.data.tags[schema.TAG_GIT_COMMIT] == sha
        assert run.data.params["model.arch"] in ("lstm", "egru")
        for name in schema.RUN_METRICS:
            assert name in run.data.metrics, name
        steps = [m.step for m in store(folder).get_metric_history(run.info.run_id, schema.VAL_LOSS)]
        assert sorted(steps) == [1, 2]
    pruned = [r for r in trials if r.data.params["prune.target_sparsity"] == "0.5"]
    assert all(
        r.data.metrics[schema.SPARSITY_WEIGHT] == pytest.approx(0.5, abs=1e-3) for r in pruned
    )
    assert len({r.data.tags[schema.TAG_RUN_KEY] for r in trials}) == 4
    # never more than max_concurrent (2) trials at once
    events = sorted(
        [(r.info.start_time, 1) for r in trials] + [(r.info.end_time, -1) for r in trials]
    )
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2


def test_same_spec_again_runs_nothing_and_a_new_value_runs_only_its_trials(smoke_folder):
    folder, spec, first = smoke_folder
    assert first.returncode == 0
    again = sweep("run", str(spec), "--json", cwd=folder)
    assert again.returncode == 0, again.stderr[-2000:]
    trials, parents = trial_runs(store(folder), "smoke")
    assert len(trials) == 4 and len(parents) == 1  # no new run, not even a parent
    dry = sweep("run", str(spec), "--dry-run", "--json", cwd=folder)
    assert {t["status"] for t in json.loads(dry.stdout)["trials"]} == {"FINISHED"}
    grown = write_spec(
        folder,
        "smoke",
        grid={"model.arch": ["lstm", "egru"], "prune.target_sparsity": [0.0, 0.5, 0.8]},
    )
    result = sweep("run", str(grown), "--json", cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    trials, parents = trial_runs(store(folder), "smoke")
    assert len(trials) == 6 and len(parents) == 2
    first = min(parents, key=lambda r: r.info.start_time).info.run_id
    by_launch = Counter(
        (r.data.tags[schema.TAG_PARENT_RUN_ID] == first, r.data.params["prune.target_sparsity"])
        for r in trials
    )
    # the first launch keeps its four; the second ran only the two new 0.8 trials
    assert by_launch == {(True, "0.0"): 2, (True, "0.5"): 2, (False, "0.8"): 2}
    status = sweep("status", str(grown), "--json", cwd=folder)
    assert json.loads(status.stdout)["counts"] == {"FINISHED": 6}


def test_specs_sharing_an_experiment_share_finished_trials_and_other_experiments_do_not(
    smoke_folder,
):
    # what the README says the run_key deduplicates, and what it does not
    folder, _, first = smoke_folder
    assert first.returncode == 0
    shared = write_spec(folder, "same-experiment", tracking={"experiment": "smoke"})
    own = write_spec(folder, "own-experiment")
    for spec, expected in ((shared, {"FINISHED"}), (own, {"PENDING"})):
        dry = sweep("run", str(spec), "--dry-run", "--json", cwd=folder)
        assert dry.returncode == 0, dry.stderr[-2000:]
        trials = json.loads(dry.stdout)["trials"]
        assert len(trials) == 4 and {t["status"] for t in trials} == expected, (spec.name, trials)


def test_raising_and_diverging_trials_fail_with_reasons_while_others_finish(tmp_path):
    if torch.cuda.is_available():
        pytest.fail("this test makes a trial raise by asking for CUDA on a CPU-only machine")
    spec = write_spec(
        tmp_path,
        "failing",
        grid={"model.arch": ["lstm", "gru", "egru"]},
        conditional=[
            {"when": {"model.arch": "lstm"}, "grid": {"train.device": ["cuda"]}},
            {
                "when": {"model.arch": "egru"},
                "grid": {"train.optimizer": ["sgd"], "train.lr": [1e36], "train.clip": [0.0]},
            },
        ],
        retries=1,
    )
    result = sweep("run", str(spec), "--json", cwd=tmp_path)
    assert result.returncode == 1  # not everything finished
    trials, _ = trial_runs(store(tmp_path), "failing")
    by_arch = {r.data.params["model.arch"]: r for r in trials}
    assert len(trials) == 3  # the retried trial continued its run: no duplicate
    assert by_arch["gru"].info.status == "FINISHED"
    assert by_arch["lstm"].info.status == "FAILED"
    assert "cuda" in by_arch["lstm"].data.tags[schema.TAG_FAILURE].lower()
    assert by_arch["egru"].info.status == "FAILED"
    assert "train/loss became nan" in by_arch["egru"].data.tags[schema.TAG_FAILURE]
    status = json.loads(sweep("status", str(spec), "--json", cwd=tmp_path).stdout)
    assert status["counts"] == {"FINISHED": 1, "FAILED": 2}
    reasons = {t["model.arch"]: t["reason"] for t in status["trials"]}
    assert "train/loss became nan" in reasons["egru"]


LONG_EPOCHS = 40


def long_spec(folder: Path, name: str) -> Path:
    # Long enough trials that a signal lands mid-trial even on a loaded machine: with 3 epochs
    # the second trial could finish between the poll that saw its first epoch and the signal;
    # with 12, a quiet machine once ran its last 10 epochs (0.1-0.3 s each) between SIGINT
    # and Tune's graceful stop.
    return write_spec(
        folder,
        name,
        max_concurrent=1,
        base={
            **SMOKE["base"],
            "train": {**SMOKE["base"]["train"], "epochs": LONG_EPOCHS, "max_steps_per_epoch": 25},
        },
    )


def wait_for_second_trial_midway(client: MlflowClient, name: str, driver: subprocess.Popen):
    """(finished, started) once one trial has FINISHED and the next has logged two epochs:
    a resume that restarted it from scratch would then log 12 + 2 epochs."""
    deadline = time.monotonic() + 300  # a generous deadline, not a timing
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep ended before its second trial was midway"
        try:
            trials, _ = trial_runs(client, name)
        except Exception:  # the store or experiment is not there yet
            trials = []
        finished = [r for r in trials if r.info.status == "FINISHED"]
        started = [
            r for r in trials if r.info.status == "RUNNING" and schema.VAL_LOSS in r.data.metrics
        ]
        if (
            finished
            and started
            and len(client.get_metric_history(started[0].info.run_id, schema.VAL_LOSS)) >= 2
        ):
            return finished[0], started[0]
        time.sleep(0.5)
    driver.kill()
    pytest.fail("the sweep never reached the middle of its second trial")


def assert_resumed_once(client: MlflowClient, folder: Path, name: str, finished, started) -> None:
    """Every trial FINISHED exactly once, under the launch that finished them; the one that was
    interrupted continued from its resume file; the one finished before was not touched."""
    trials, parents = trial_runs(client, name)
    keys = [r.data.tags[schema.TAG_RUN_KEY] for r in trials]
    assert len(keys) == 4 and len(set(keys)) == 4
    assert all(r.info.status == "FINISHED" for r in trials)
    assert all(r.info.status != "RUNNING" for r in parents)
    last = max(parents, key=lambda r: r.info.start_time)
    assert last.info.status == "FINISHED"
    # each run hangs under the launch that finished it: the interrupted one's children moved
    parent_of = {r.info.run_id: r.data.tags[schema.TAG_PARENT_RUN_ID] for r in trials}
    assert (
        parent_of.pop(finished.info.run_id)
        == finished.data.tags[schema.TAG_PARENT_RUN_ID]
        != last.info.run_id
    )
    assert set(parent_of.values()) == {last.info.run_id}
    before = [m.step for m in client.get_metric_history(finished.info.run_id, schema.VAL_LOSS)]
    assert before == list(range(1, LONG_EPOCHS + 1))  # not re-run
    assert client.get_run(finished.info.run_id).info.end_time == finished.info.end_time
    history = client.get_metric_history(started.info.run_id, schema.VAL_LOSS)
    assert {m.step for m in history} == set(range(1, LONG_EPOCHS + 1))
    # it continued from its resume file: at most the epoch in flight at the stop is repeated
    assert len(history) <= LONG_EPOCHS + 1, sorted(m.step for m in history)
    resume_files = folder / "runs" / "tune" / f"{name}.resume"
    assert resume_files.is_dir() and not list(
        resume_files.glob("*.pt")
    )  # each dropped when its trial ended


def test_killed_driver_resumes_without_duplicates(tmp_path):
    spec = long_spec(tmp_path, "killed")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    driver = subprocess.Popen(
        [DUOSPARSE, "sweep", "run", str(spec)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = store(tmp_path)
    finished, started = wait_for_second_trial_midway(client, "killed", driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)
    status = json.loads(sweep("status", str(spec), "--json", cwd=tmp_path).stdout)
    # status only reads: the orphan is shown RUNNING, with why and what will end it
    orphans = [t for t in status["trials"] if t["status"] == "RUNNING"]
    assert started.info.run_id in [t["run_id"] for t in orphans], status
    assert all("driver is gone" in t["reason"] and "reconcile" in t["reason"] for t in orphans)
    assert client.get_run(started.info.run_id).info.status == "RUNNING"
    reconciled = subprocess.run(
        [DUOSPARSE, "reconcile"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert reconciled.returncode == 0, reconciled.stderr[-3000:]
    assert client.get_run(started.info.run_id).info.status == "KILLED"
    status = json.loads(sweep("status", str(spec), "--json", cwd=tmp_path).stdout)
    assert "RUNNING" not in status["counts"] and status["counts"].get("KILLED", 0) >= 1
    result = sweep("run", str(spec), "--resume", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_once(client, tmp_path, "killed", finished, started)


def test_sigint_ends_the_launch_killed_and_its_resume_line_finishes_every_trial_once(tmp_path):
    spec = long_spec(tmp_path, "stopped")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    driver = subprocess.Popen(
        [DUOSPARSE, "sweep", "run", str(spec)],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    client = store(tmp_path)
    finished, started = wait_for_second_trial_midway(client, "stopped", driver)
    driver.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = driver.communicate(timeout=300)

    text = " ".join(err.split())
    assert driver.returncode == 128 + signal.SIGINT, text[-3000:]
    assert "Traceback" not in err and "Tuner.restore" not in err, err[-3000:]
    assert "interrupted by SIGINT" in text
    line = f"Resume it with: duosparse sweep run {spec} --resume"
    assert line in text
    trials, parents = trial_runs(client, "stopped")
    (launch,) = parents
    assert launch.info.status == "KILLED" and "SIGINT" in launch.data.tags[schema.TAG_FAILURE]
    status = {r.info.run_id: r.info.status for r in trials}
    assert status[finished.info.run_id] == "FINISHED" and status[started.info.run_id] == "KILLED"
    assert "RUNNING" not in status.values()

    words = line.split(": ", 1)[1].split()  # the printed line, run as printed
    result = subprocess.run(
        [DUOSPARSE, *words[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_once(client, tmp_path, "stopped", finished, started)


def test_stages_warm_start_skip_orphans_and_rerun_nothing_finished(tmp_path):
    base = {
        **SMOKE["base"],
        "prune": {"schedule": "gradual", "start_epoch": 1, "end_epoch": 1, "update_every": 2},
    }
    spec = write_spec(
        tmp_path,
        "staged",
        grid={},
        conditional=[],
        max_concurrent=2,
        retries=0,
        base={k: v for k, v in base.items() if k != "prune"},
        stages=[
            {
                "name": "dense",
                "grid": {"model.arch": ["lstm", "egru"]},
                # the EGRU diverges, so its prune-stage trials must be skipped, not run cold
                "conditional": [
                    {
                        "when": {"model.arch": "egru"},
                        "grid": {
                            "train.optimizer": ["sgd"],
                            "train.lr": [1e36],
                            "train.clip": [0.0],
                        },
                    }
                ],
            },
            {
                "name": "prune",
                "from": "dense",
                "base": {"prune": base["prune"], "train": {"epochs": 1}},
                "grid": {"prune.target_sparsity": [0.0, 0.5]},
            },
        ],
    )
    result = sweep("run", str(spec), cwd=tmp_path)
    assert result.returncode == 1  # not everything finished
    assert "Traceback" not in result.stderr
    # without a terminal: one line per ended trial with the overall ETA and the counts, no
    # banner of Ray's or MLflow's, and the final table at full width (not cut to 80 columns)
    assert "left" in result.stderr and "running," in result.stderr and "1 failed)" in result.stderr
    for banner in (
        "Configuration for experiment",
        "TensorBoard",
        "Token authentication",
        "View detailed results",
        "Creating initial MLflow database",
    ):
        assert banner not in result.stderr, banner
    assert "…" not in result.stdout and result.stdout.count("FINISHED") == 3
    client = store(tmp_path)
    trials, parents = trial_runs(client, "staged")
    assert len(parents) == 1 and len(trials) == 4  # two dense, two pruned; skipped ones never start
    assert {r.data.tags[schema.TAG_PARENT_RUN_ID] for r in trials} == {parents[0].info.run_id}
    stage = {r.data.tags[schema.TAG_RUN_KEY]: r.data.tags.get(schema.TAG_STAGE) for r in trials}
    dense = {
        r.data.params["model.arch"]: r for r in trials if r.data.tags[schema.TAG_STAGE] == "dense"
    }
    pruned = [r for r in trials if r.data.tags[schema.TAG_STAGE] == "prune"]
    assert sorted(stage.values()) == ["dense", "dense", "prune", "prune"]
    assert dense["egru"].info.status == "FAILED" and dense["lstm"].info.status == "FINISHED"
    lstm_key = dense["lstm"].data.tags[schema.TAG_RUN_KEY]
    assert all(
        r.data.params["init.from_run_key"] == lstm_key and r.info.status == "FINISHED"
        for r in pruned
    )
    assert {r.data.params["prune.target_sparsity"] for r in pruned} == {"0.0", "0.5"}
    status = json.loads(sweep("status", str(spec), "--json", cwd=tmp_path).stdout)
    assert status["counts"] == {"FINISHED": 3, "FAILED": 1, "SKIPPED": 2}
    skipped = [t for t in status["trials"] if t["status"] == "SKIPPED"]
    egru_key = dense["egru"].data.tags[schema.TAG_RUN_KEY]
    assert all(
        t["stage"] == "prune"
        and egru_key[:12] in t["reason"]
        and "FAILED" in t["reason"]
        and "stage 'dense'" in t["reason"]
        for t in skipped
    )
    # the run table knows each run's stage, and pairs each pruned run with its dense parent
    from duosparse.analysis import paired, runs

    table = runs.runs_table("staged", client=client)
    assert set(table[runs.STAGE]) == {"dense", "prune"}
    ((base, top),) = paired.lineages(table)
    assert base[runs.RUN_KEY] == lstm_key and top["prune.target_sparsity"] == 0.5
    # a plain re-run starts nothing that FINISHED (the failed dense EGRU is tried again)
    finished = {r.info.run_id for r in trials if r.info.status == "FINISHED"}
    again = sweep("run", str(spec), "--json", cwd=tmp_path)
    assert again.returncode == 1
    after, _ = trial_runs(client, "staged")
    assert {r.info.run_id for r in after if r.info.status == "FINISHED"} == finished
    assert len(after) == 4


def test_a_warm_start_from_outside_the_spec_is_checked_before_anything_starts(tmp_path):
    base = {**SMOKE["base"], "init": {"from_run_key": "e" * 64}}
    spec = write_spec(tmp_path, "outside", base=base)
    result = sweep("run", str(spec), cwd=tmp_path)
    text = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in text
    assert (
        "the spec's base" in text
        and "init.from_run_key eeeeeeeeeeee" in text
        and "no FINISHED run" in text
    )
    exp = store(tmp_path).get_experiment_by_name("outside")
    assert exp is None or not store(tmp_path).search_runs([exp.experiment_id])
