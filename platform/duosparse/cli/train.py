"""`duosparse train CONFIG`: one model, one MLflow run (docs/design.md section 7).

SIGTERM and Ctrl-C end the run KILLED with its last checkpoint kept: the same command then
continues it, epochs and all.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from duosparse import schema, terminal

from .common import console, fail, jsonable, show_warning

RESULT_KEYS = (
    schema.VAL_PPL,
    schema.TEST_PPL,
    schema.SPARSITY_WEIGHT,
    schema.SPARSITY_ACTIVITY,
    schema.SPARSITY_SILENT_UNITS,
    schema.OPS_DENSE,
    schema.OPS_EFFECTIVE,
    schema.OPS_COMPUTE_REDUCTION,
    schema.OPS_TOTAL_EFFECTIVE,
)


def train(
    config: Annotated[
        Path | None, typer.Argument(help="RunConfig YAML (defaults if omitted)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override: key=value, e.g. model.arch=gru")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder holding <corpus>/{train,valid,test}.txt")
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "duosparse",
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns.db)"),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Checkpoints and artifacts (default: runs/<run_key[:12]>)")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the final metrics as JSON on stdout")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", help="No per-epoch lines or progress bar (errors and warnings only)"
        ),
    ] = False,
) -> None:
    """Train one model from CONFIG, logged as one MLflow run."""
    if not experiment.strip():
        fail(
            "--experiment is empty; give the MLflow experiment a name (the default is 'duosparse')."
        )
    terminal.setup_logging(console, quiet)
    terminal.quiet_libraries()
    overrides = [*(set_ or []), *([f"data.dir={data_dir}"] if data_dir is not None else [])]
    job = _prepare(config, overrides, tracking_uri, workdir)
    run_id = _open_run(job, experiment)
    metrics = _train(job, run_id, progress=not (json_out or quiet) and sys.stderr.isatty())
    _print_result(job, run_id, metrics, json_out)


@dataclass
class _Job:
    """What a training needs once its input is checked: config, corpus, store, folder."""

    cfg: Any
    corpus: Any
    client: Any
    workdir: Path
    init: Path | None  # the warm start's checkpoint, if any

    @property
    def checkpoint(self) -> Path:
        return self.workdir / "last.pt"


def _prepare(
    config: Path | None, overrides: list[str], tracking_uri: str | None, workdir: Path | None
) -> _Job:
    """Check everything that can be bad input before any run exists in the store."""
    from duosparse import data, tracking, warmstart
    from duosparse.config import ConfigError, load_config
    from duosparse.train import DeviceUnavailable, resolve_device

    try:
        cfg = load_config(config, overrides)
        resolve_device(cfg.train.device)  # a missing GPU is bad input
        corpus = data.load_corpus(cfg.data.corpus, cfg.data.dir, seed=cfg.train.seed)
        client = tracking.open_store(tracking_uri, reconcile=True)  # dead train runs: KILLED
        source = warmstart.resolve(client, cfg)
        workdir = workdir or Path("runs") / cfg.run_key[:12]
        _check_writable(workdir)
        _hold_workdir(workdir, tracking.process_id())
        init = warmstart.fetch_checkpoint(client, source, workdir / "init") if source else None
    except (
        ConfigError,
        data.DataNotFoundError,
        data.DataIntegrityError,
        tracking.TrackingError,
        warmstart.WarmStartError,
        DeviceUnavailable,
    ) as e:
        fail(str(e))
    return _Job(cfg, corpus, client, workdir, init)


def _open_run(job: _Job, experiment: str) -> str:
    """The run to log to: the same config's KILLED run when its checkpoint is here (it is
    continued), else a new one."""
    from duosparse import tracking

    client, cfg = job.client, job.cfg
    experiment_id = tracking.ensure_experiment(
        client,
        experiment,
        (
            "Runs of `duosparse train`: one run per command, its params the whole config, its metrics per "
            f"epoch and then on the test split. Useful columns: {', '.join(f'`{c}`' for c in schema.UI_COLUMNS)}."
        ),
    )
    killed = (
        tracking.resumable_train_run(client, experiment_id, cfg.run_key)
        if job.checkpoint.is_file()
        else None
    )
    where = f"MLflow run {{}} in experiment '{experiment}' ({client.tracking_uri})"
    if killed is not None:
        run_id = killed.info.run_id
        tracking.reopen_run(client, run_id)
        tracking.complete_params(client, killed, cfg)
        console.print(where.format(run_id) + f", continued from {job.checkpoint}")
        return run_id
    run_id = tracking.start_run(
        client,
        experiment_id,
        cfg,
        kind="train",
        run_name=f"{cfg.model.arch}-h{cfg.model.hidden_size}-p{cfg.prune.target_sparsity:g}-t{cfg.model.threshold:g}",
        tags={schema.TAG_DRIVER: tracking.process_id()},
    )
    console.print(where.format(run_id))
    return run_id


def _train(job: _Job, run_id: str, progress: bool) -> dict[str, float]:
    """Train, and end the run FINISHED, FAILED (with the reason) or KILLED (resumable)."""
    from duosparse import tracking
    from duosparse.train import SilentStart, TrainingDiverged
    from duosparse.train import train as run_training

    client = job.client
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            metrics = run_training(
                job.cfg,
                tracking.MlflowReporter(client, run_id),
                job.workdir,
                corpus=job.corpus,
                progress=progress,
                init_checkpoint=job.init,
            )
    except SilentStart as e:
        tracking.finish_run(client, run_id, "FAILED", str(e))
        fail(str(e), code=1)
    except TrainingDiverged as e:
        tracking.finish_run(client, run_id, "FAILED", str(e))
        fail(f"the run diverged and is marked FAILED in MLflow: {e}", code=1)
    except KeyboardInterrupt as e:
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        tracking.finish_run(client, run_id, "KILLED", f"interrupted by {name}")
        fail(_resume_line(name, job.checkpoint), code=128 + signal.Signals[name].value)
    except OSError as e:
        tracking.finish_run(client, run_id, "FAILED", f"{type(e).__name__}: {e}")
        if e.filename is None:  # not a file: a network or system error, shown as it is
            raise
        fail(
            f"could not write '{e.filename}' ({e.strerror}); the run is marked FAILED in MLflow. "
            "Free some space or pass --workdir a writable folder.",
            code=1,
        )
    except Exception as e:
        tracking.finish_run(client, run_id, "FAILED", f"{type(e).__name__}: {e}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    tracking.finish_run(client, run_id, "FINISHED")
    return metrics


def _print_result(job: _Job, run_id: str, metrics: dict[str, float], json_out: bool) -> None:
    if json_out:
        result = {"run_id": run_id, "run_key": job.cfg.run_key, "metrics": jsonable(metrics)}
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"run {run_id}", show_header=False)
    for key in RESULT_KEYS:
        table.add_row(key, f"{metrics[key]:,.4g}")
    terminal.stdout().print(table)
    console.print("Browse it with: make ui  (or: duosparse ui)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a batch scheduler), raised where the process is, so `train`
    closes its run KILLED and keeps its checkpoint exactly as for Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _resume_line(signal_name: str, checkpoint: Path) -> str:
    command = shlex.join(["duosparse", *sys.argv[1:]])
    if checkpoint.is_file():
        return (
            f"interrupted by {signal_name}; the run is marked KILLED in MLflow and its last "
            f"checkpoint is kept in {checkpoint}. Resume it with the same command: {command}"
        )
    return (
        f"interrupted by {signal_name} before its first epoch ended; the run is marked KILLED in "
        f"MLflow. Start it again with: {command}"
    )


def _check_writable(folder: Path) -> None:
    """Refuse before any run is created when the run's folder cannot be written."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        fail(
            f"cannot write the run's folder '{folder}' ({e.strerror or e}: '{e.filename}'); run "
            "from a writable folder or pass --workdir DIR."
        )


def _hold_workdir(folder: Path, owner: str) -> None:
    """Hold the run's folder for this process's lifetime (the lock goes with the process):
    two trainings of one config in one folder would overwrite each other's checkpoints."""
    path = folder / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text().strip() or "another process"
        fail(
            f"'{folder}' is in use by {holder}, which is training the same config; wait for it to "
            "end (running this command again then continues or repeats it), or pass --workdir DIR "
            "to train a separate copy as its own MLflow run."
        )
    os.ftruncate(fd, 0)
    os.write(fd, owner.encode())
    _HELD.append(fd)


_HELD: list[int] = []  # open for as long as the process lives
