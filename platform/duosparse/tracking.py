"""MLflow: where runs are stored and how a training run reports into one.

Embedded default (DESIGN section 6): a SQLite file `./mlruns.db` and artifacts under
`./mlartifacts/`; `MLFLOW_TRACKING_URI` (e.g. an http(s) tracking server) overrides it.
Uses `MlflowClient` with explicit run ids, never MLflow's global "active run", so several
runs can report from one process.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from . import __version__, schema
from .config import RunConfig

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says why and what to do."""


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def is_local_uri(uri: str) -> bool:
    """SQLite or plain files: only reachable from this machine."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_store(uri: str | None = None):
    """An MlflowClient on `uri`, with the store's schema created once, here, by the caller.

    Parallel trials racing to create a fresh SQLite schema fail, so the driver calls this
    before any trial starts. An unreachable server is reported before any work starts.
    """
    uri = uri or default_tracking_uri()
    client = _client(uri)
    try:
        client.search_experiments(max_results=1)  # creates the SQLite schema / checks the server
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "cannot use it"
        raise TrackingError(
            f"The MLflow tracking store '{uri}' cannot be used ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Check that the server is running and reachable, "
            "or unset MLFLOW_TRACKING_URI to use the embedded SQLite store in this folder."
        ) from None
    return client


def ensure_experiment(client: Any, name: str) -> str:
    """The experiment's id, creating it (with local artifacts beside a local store) if new."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    artifact_location = None
    if is_local_uri(client.tracking_uri):
        artifact_location = (Path.cwd() / DEFAULT_ARTIFACTS).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_tags(config: RunConfig, kind: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {
        schema.TAG_RUN_KEY: config.run_key,
        schema.TAG_CODE_VERSION: __version__,
        schema.TAG_KIND: kind,
    }
    sha = git_sha()
    if sha:
        tags[schema.TAG_GIT_SHA] = sha
    tags.update(extra or {})
    return tags


def start_run(
    client: Any, experiment_id: str, config: RunConfig, kind: str = "train",
    run_name: str | None = None, parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a RUNNING run with the flattened config as params; returns its id."""
    from mlflow.entities import Param

    all_tags = run_tags(config, kind, tags)
    if parent_run_id:
        all_tags[schema.TAG_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    params = [Param(k, "null" if v is None else str(v)) for k, v in config.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


def finish_run(client: Any, run_id: str, status: str = "FINISHED", failure: str | None = None) -> None:
    if failure:
        client.set_tag(run_id, schema.TAG_FAILURE, failure[:5000])
    client.set_terminated(run_id, status=status)


class MlflowReporter:
    """The training loop's Reporter, writing into one MLflow run."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))
