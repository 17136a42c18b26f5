"""MLflow: where runs are stored and how a training run reports into one.

Embedded default (DESIGN section 6): a SQLite file `./mlruns.db` and artifacts under
`./mlartifacts/`; `MLFLOW_TRACKING_URI` (e.g. an http(s) tracking server) overrides it.
Uses `MlflowClient` with explicit run ids, never MLflow's global "active run", so several
runs can report from one process.

Every command opens the store through `open_store`: it creates a fresh SQLite schema under an
inter-process file lock (MLflow's own creation races), and closes the plain `train` runs that
a dead process left RUNNING.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import warnings
from collections.abc import Iterator
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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifacts_root(uri: str) -> Path:
    """Local artifacts live beside the SQLite file (./mlartifacts for the embedded store)."""
    db = sqlite_path(uri)
    return (db.parent if db is not None else Path.cwd()).resolve() / DEFAULT_ARTIFACTS


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """An exclusive flock on `<db>.lock` beside a SQLite store, held while MLflow creates or
    upgrades the schema: two processes creating it at once lose one of them (`table ...
    already exists`, alembic's `expected to match one row`). A no-op for servers."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    lock = db.with_name(db.name + ".lock")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if db.is_file():  # an existing store in a read-only place can still be read
            yield
            return
        raise TrackingError(
            f"The MLflow store '{uri}' cannot be created: {e.strerror or e} ('{e.filename}'). "
            "Point --tracking-uri (or MLFLOW_TRACKING_URI) at a file in a writable folder, or run "
            "from a writable folder (the default store is ./mlruns.db)."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when closed, or when the process dies
        yield
    finally:
        os.close(fd)


def open_store(uri: str | None = None, reconcile: bool = False):
    """An MlflowClient on `uri`, with the store's schema created once, here, by the caller.

    Every command opens the store through this (trial workers excepted: their driver has
    opened it first). The schema is created under `_schema_lock`, so any number of processes
    may start at once on a fresh folder. An unreachable server or unusable file is reported
    before any work starts. With `reconcile` (`train`, a sweep launch, `duosparse reconcile`;
    commands that only read leave the store as it is), plain `train` runs whose process has
    died are marked KILLED (`mark_dead_train_runs_killed`).
    """
    uri = uri or default_tracking_uri()
    try:
        with _schema_lock(uri):
            client = mlflow_client(uri)  # a SQLite store creates or upgrades its schema here
            client.search_experiments(max_results=1)  # checks a server
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "cannot use it"
        first = str(e).splitlines()[0] if str(e) else ""
        if len(first) > 300:  # a server may answer with a whole page: say where it was shortened
            first = first[:300].rsplit(" ", 1)[0] + " [...]"
        if is_local_uri(uri):
            fix = (
                "Check that its folder exists and is writable (or point --tracking-uri / "
                "MLFLOW_TRACKING_URI at one), and that the file is an MLflow store."
            )
        else:
            fix = (
                "Check that the server is running and reachable, or unset MLFLOW_TRACKING_URI "
                "to use the embedded SQLite store in this folder."
            )
        raise TrackingError(
            f"The MLflow tracking store '{uri}' cannot be used ({type(e).__name__}: {first}). {fix}"
        ) from None
    if reconcile:
        try:
            mark_dead_train_runs_killed(client)
        except Exception as e:  # noqa: BLE001 - a store that can only be read is still useful
            warnings.warn(
                f"could not mark the train runs of dead processes KILLED in {uri} "
                f"({type(e).__name__}: {e})",
                stacklevel=2,
            )
    return client


# --- who runs a run, and runs whose process died ----------------------------------------


def process_id() -> str:
    """host:pid of this process, recorded on the runs it drives (schema.TAG_DRIVER)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this host still runs (a zombie, exited but not yet reaped by
    its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def process_alive(owner: str | None) -> bool | None:
    """Whether the process `owner` (host:pid) still runs; None when it cannot be told from
    here (another host, or no owner recorded)."""
    if not owner or ":" not in owner:
        return None
    host, pid = owner.rsplit(":", 1)
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return pid_alive(int(pid))


def mark_dead_train_runs_killed(client: Any) -> int:
    """Plain `train` runs left RUNNING by a process that is gone become KILLED; how many.

    Sweeps reconcile their own trials (sweep_runner.mark_orphans_killed). Runs without a recorded
    process, or from another host, are left alone: nothing here can tell they are dead.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return 0
    running = client.search_runs(
        experiments,
        f"attributes.status = 'RUNNING' and tags.`{schema.TAG_KIND}` = 'train'",
        max_results=50_000,
    )
    count = 0
    for run in running:
        owner = run.data.tags.get(schema.TAG_DRIVER)
        # This process opens the store before it starts its own run, so a run recorded under
        # its host:pid is a dead one's whose pid came round again (a restarted container).
        if owner == process_id() or process_alive(owner) is False:
            finish_run(
                client,
                run.info.run_id,
                "KILLED",
                f"the process that ran it ({owner}) ended without closing the run",
            )
            count += 1
    return count


def resumable_train_run(client: Any, experiment_id: str, run_key: str) -> Any | None:
    """The newest KILLED plain `train` run of `run_key`: re-running its config continues it
    (from its workdir's last.pt) instead of opening a second run with half the epochs."""
    found = client.search_runs(
        [experiment_id],
        f"tags.`{schema.TAG_RUN_KEY}` = '{run_key}' and tags.`{schema.TAG_KIND}` = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found and found[0].info.status == "KILLED" else None


def reopen_run(client: Any, run_id: str) -> None:
    """Mark a KILLED run RUNNING again, driven by this process, its old failure cleared."""
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, schema.TAG_DRIVER, process_id())
    client.set_tag(run_id, schema.TAG_FAILURE, "")


def ensure_experiment(client: Any, name: str, description: str | None = None) -> str:
    """The experiment's id, creating it (with local artifacts beside a local store) if new;
    tagged for MLflow's model-training view, with `description` shown on its page."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        _label_experiment(client, existing, description)
        return existing.experiment_id
    artifact_location = None
    if is_local_uri(client.tracking_uri):
        artifact_location = artifacts_root(client.tracking_uri).as_uri()
    tags = {schema.TAG_EXPERIMENT_KIND: schema.EXPERIMENT_KIND_TRAINING}
    if description:
        tags[schema.TAG_NOTE] = description
    try:
        return client.create_experiment(name, artifact_location=artifact_location, tags=tags)
    except Exception:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _label_experiment(client: Any, experiment: Any, description: str | None) -> None:
    """Tag an experiment made before these tags existed (or by hand); a description a user
    wrote in the UI is kept."""
    if experiment.tags.get(schema.TAG_EXPERIMENT_KIND) is None:
        client.set_experiment_tag(
            experiment.experiment_id, schema.TAG_EXPERIMENT_KIND, schema.EXPERIMENT_KIND_TRAINING
        )
    if description and not experiment.tags.get(schema.TAG_NOTE):
        client.set_experiment_tag(experiment.experiment_id, schema.TAG_NOTE, description)


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def code_tags() -> dict[str, str]:
    """Which code made a run: the package version and, in a git checkout, the commit (under
    duosparse's name and MLflow's, which the UI shows)."""
    tags = {schema.TAG_CODE_VERSION: __version__}
    sha = git_sha()
    if sha:
        tags[schema.TAG_GIT_SHA] = tags[schema.TAG_GIT_COMMIT] = sha
    return tags


def run_tags(config: RunConfig, kind: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        schema.TAG_RUN_KEY: config.run_key,
        schema.TAG_KIND: kind,
        **code_tags(),
        **(extra or {}),
    }


def start_run(
    client: Any,
    experiment_id: str,
    config: RunConfig,
    kind: str = "train",
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a RUNNING run with the flattened config as params; returns its id."""
    all_tags = run_tags(config, kind, tags)
    if parent_run_id:
        all_tags[schema.TAG_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    _log_params(client, run.info.run_id, config, {})
    return run.info.run_id


def complete_params(client: Any, run: Any, config: RunConfig) -> None:
    """Log the params a continued run lacks: a run whose first process died (or whose
    server refused a request) between creating it and logging its config has none or some."""
    _log_params(client, run.info.run_id, config, run.data.params)


def _log_params(client: Any, run_id: str, config: RunConfig, present: dict[str, str]) -> None:
    from mlflow.entities import Param

    params = [
        Param(k, "null" if v is None else str(v))
        for k, v in config.flat().items()
        if k not in present
    ]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def finish_run(
    client: Any, run_id: str, status: str = "FINISHED", failure: str | None = None
) -> None:
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

    def log_missing(self, metrics: dict[str, float], step: int) -> None:
        """`log_metrics` unless the run already has this step (an epoch re-logged on resume)."""
        probe = next(iter(metrics))  # one log_batch wrote them all, or none
        if all(m.step != step for m in self.client.get_metric_history(self.run_id, probe)):
            self.log_metrics(metrics, step)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))
