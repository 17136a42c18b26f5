"""A multi-node Ray cluster on this machine and an MLflow server over PostgreSQL: the smoke
sweep goes in through `ray job submit`, as on a real cluster. `make test` / `.ci/run` start
PostgreSQL and set DUOSPARSE_TEST_POSTGRES_URI."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest
from conftest import postgres_uri
from duosparse import schema
from mlflow.tracking import MlflowClient
from ray_processes import stop_cluster

pytestmark = [pytest.mark.slow, pytest.mark.system]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def postgres_db():
    uri = postgres_uri()
    import psycopg

    name = f"duosparse_test_{secrets.token_hex(4)}"
    admin = psycopg.connect(uri, autocommit=True)
    admin.execute(f"CREATE DATABASE {name}")
    parts = urlparse(uri)
    yield urlunparse(parts._replace(path=f"/{name}"))
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture(scope="module")
def mlflow_server(postgres_db, tmp_path_factory):
    port = free_port()
    artifacts = tmp_path_factory.mktemp("artifacts")
    log = open(tmp_path_factory.mktemp("logs") / "mlflow.log", "w")
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            postgres_db,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=120)
        yield url, artifacts
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# Ray's token authentication: every process of the cluster and every client shares one token.
RAY_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
    # as docker/services/ray-node-start.sh: trials at full priority (Ray's default niceness
    # 15 starves them on a machine whose cores are busy, and the round then times out)
    "RAY_worker_niceness": "0",
}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    gcs, dashboard = free_port(), free_port()
    env = RAY_ENV
    ray = str(BIN / "ray")
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--num-cpus",
            "1",
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
            # Ray's fixed default (52365) is taken by any other Ray on this machine (another
            # node of this cluster, a sweep's local Ray): the head's agent then cannot
            # serve, and every job is refused with "No available agent to submit job"
            "--dashboard-agent-listen-port",
            str(free_port()),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    try:
        subprocess.run(
            [
                ray,
                "start",
                "--address",
                f"127.0.0.1:{gcs}",
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                "1",
                "--disable-usage-stats",
                "--dashboard-agent-listen-port",
                str(free_port()),
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=180,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # up, and refusing requests without the token
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
                pytest.fail("the Ray dashboard answered a request without the auth token")
            except urllib.error.HTTPError as e:
                assert e.code in (401, 403)
                break
            except OSError:
                time.sleep(0.5)
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    finally:
        stop_cluster(gcs)  # this cluster only; `ray stop` would end every Ray here


def submit_sweep(dashboard: str, spec: str, tracking_uri: str) -> subprocess.CompletedProcess:
    """`ray job submit` of `duosparse sweep run SPEC`, as a cluster user runs it."""
    deadline = time.monotonic() + 180
    while True:
        submit = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                dashboard,
                "--working-dir",
                str(ROOT),
                "--",
                sys.executable,
                "-m",
                "duosparse.cli",
                "sweep",
                "run",
                spec,
                "--tracking-uri",
                tracking_uri,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=RAY_ENV,
        )
        # The head's job agent registers some time after the dashboard answers (later still on
        # a loaded machine); Ray refuses a job before then and says to try again.
        if "No available agent to submit job" not in submit.stderr or time.monotonic() > deadline:
            return submit
        time.sleep(2)


def test_smoke_sweep_through_ray_job_submit_lands_in_postgres(ray_cluster, mlflow_server):
    gcs, dashboard = ray_cluster
    tracking_uri, artifacts = mlflow_server
    nodes = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import ray; ray.init(address='{gcs}', log_to_driver=False); "
            "print(len([n for n in ray.nodes() if n['Alive']]))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=RAY_ENV,
    )
    assert nodes.stdout.strip().splitlines()[-1] == "2"  # a head and a second node
    submit = submit_sweep(dashboard, "sweeps/smoke.yaml", tracking_uri)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "trial"]
    assert len(trials) == 4
    assert all(r.info.status == "FINISHED" for r in trials)
    assert all(schema.TEST_PPL in r.data.metrics for r in trials)
    # artifacts went through the server into its artifact store
    names = {a.path for a in client.list_artifacts(trials[0].info.run_id)}
    assert schema.ARTIFACT_CHECKPOINT in names
    assert any(artifacts.rglob(schema.ARTIFACT_CHECKPOINT))


def test_staged_sweep_warm_starts_through_the_tracking_servers_artifacts(
    ray_cluster, mlflow_server
):
    gcs, dashboard = ray_cluster
    tracking_uri, _ = mlflow_server
    submit = submit_sweep(dashboard, "sweeps/smoke_staged.yaml", tracking_uri)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("smoke_staged")
    trials = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get(schema.TAG_KIND) == "trial"
    ]
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    dense = {
        r.data.tags[schema.TAG_RUN_KEY] for r in trials if r.data.tags[schema.TAG_STAGE] == "dense"
    }
    pruned = [r for r in trials if r.data.tags[schema.TAG_STAGE] == "prune"]
    assert len(dense) == 2 and {r.data.params["init.from_run_key"] for r in pruned} == dense
    assert all(r.data.metrics[schema.SPARSITY_WEIGHT] > 0.4 for r in pruned)


def test_remote_cluster_with_a_sqlite_store_is_refused(ray_cluster, tmp_path):
    gcs, _ = ray_cluster
    result = subprocess.run(
        [
            str(BIN / "duosparse"),
            "sweep",
            "run",
            str(ROOT / "sweeps" / "smoke.yaml"),
            "--address",
            gcs,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=RAY_ENV,
    )
    assert result.returncode == 2
    assert "SQLite" in result.stderr and "MLFLOW_TRACKING_URI" in result.stderr
    assert "Traceback" not in result.stderr
