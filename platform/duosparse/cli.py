"""The `duosparse` command line (docs/design.md section 7).

Bad input ends with a one-paragraph message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.table import Table

from . import data as data_module
from . import schema, terminal
from .analyze_cli import register as register_analysis
from .config import ConfigError, load_config
from .sensitivity import prune_app
from .simulate import simulate_app

app = typer.Typer(
    help="duosparse: sweeps over activity sparsity (EGRU) x weight sparsity (pruning) "
    "for recurrent language models, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Find, verify and download the corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")
sweep_app = typer.Typer(
    help="Run and inspect sweeps declared in sweeps/*.yaml.", no_args_is_help=True
)
app.add_typer(sweep_app, name="sweep")
app.add_typer(prune_app, name="prune")
app.add_typer(simulate_app, name="simulate")
register_analysis(app)  # `analyze` and `export pareto`

console = terminal.stderr()


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _show_warning(message, category, *args, **kwargs) -> None:
    console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _jsonable(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


# --- train ---------------------------------------------------------------------------------


@app.command()
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
    from . import tracking, warmstart
    from .train import DeviceUnavailable, SilentStart, TrainingDiverged, resolve_device
    from .train import train as run_training

    if not experiment.strip():
        fail(
            "--experiment is empty; give the MLflow experiment a name (the default is 'duosparse')."
        )
    terminal.setup_logging(console, quiet)
    terminal.quiet_libraries()
    overrides = list(set_ or [])
    if data_dir is not None:
        overrides.append(f"data.dir={data_dir}")
    try:
        cfg = load_config(config, overrides)
        resolve_device(cfg.train.device)  # before any run exists: a missing GPU is bad input
        corpus = data_module.load_corpus(cfg.data.corpus, cfg.data.dir, seed=cfg.train.seed)
        client = tracking.open_store(tracking_uri)
        source = warmstart.resolve(client, cfg)  # a warm start is checked before anything starts
        workdir = workdir or Path("runs") / cfg.run_key[:12]
        _check_writable(workdir)
        _hold_workdir(workdir, tracking.process_id())
        init = warmstart.fetch_checkpoint(client, source, workdir / "init") if source else None
    except (
        ConfigError,
        data_module.DataNotFoundError,
        data_module.DataIntegrityError,
        tracking.TrackingError,
        warmstart.WarmStartError,
        DeviceUnavailable,
    ) as e:
        fail(str(e))
    experiment_id = tracking.ensure_experiment(
        client,
        experiment,
        (
            "Runs of `duosparse train`: one run per command, its params the whole config, its metrics per "
            f"epoch and then on the test split. Useful columns: {', '.join(f'`{c}`' for c in schema.UI_COLUMNS)}."
        ),
    )
    checkpoint = workdir / "last.pt"
    killed = (
        tracking.resumable_train_run(client, experiment_id, cfg.run_key)
        if checkpoint.is_file()
        else None
    )
    if killed is not None:  # the same config was interrupted: continue its run, epochs and all
        run_id = killed.info.run_id
        tracking.reopen_run(client, run_id)
        tracking.complete_params(client, killed, cfg)
        console.print(
            f"MLflow run {run_id} in experiment '{experiment}' ({client.tracking_uri}), "
            f"continued from {checkpoint}"
        )
    else:
        run_name = f"{cfg.model.arch}-h{cfg.model.hidden_size}-p{cfg.prune.target_sparsity:g}-t{cfg.model.threshold:g}"
        run_id = tracking.start_run(
            client,
            experiment_id,
            cfg,
            kind="train",
            run_name=run_name,
            tags={schema.TAG_DRIVER: tracking.process_id()},
        )
        console.print(f"MLflow run {run_id} in experiment '{experiment}' ({client.tracking_uri})")
    reporter = tracking.MlflowReporter(client, run_id)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            metrics = run_training(
                cfg,
                reporter,
                workdir,
                corpus=corpus,
                progress=not (json_out or quiet) and sys.stderr.isatty(),
                init_checkpoint=init,
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
        fail(_resume_line(name, checkpoint), code=128 + signal.Signals[name].value)
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
    if json_out:
        print(
            json.dumps(
                {"run_id": run_id, "run_key": cfg.run_key, "metrics": _jsonable(metrics)}, indent=2
            )
        )
        return
    table = Table(title=f"run {run_id}", show_header=False)
    for key in (
        schema.VAL_PPL,
        schema.TEST_PPL,
        schema.SPARSITY_WEIGHT,
        schema.SPARSITY_ACTIVITY,
        schema.OPS_DENSE,
        schema.OPS_EFFECTIVE,
        schema.OPS_COMPUTE_REDUCTION,
        schema.OPS_TOTAL_EFFECTIVE,
    ):
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


# --- data ----------------------------------------------------------------------------------


@data_app.command("check")
def data_check(
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding <corpus>/...")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Report where each corpus is found and whether its files verify (sha256)."""
    report = data_module.data_report(data_dir)
    if json_out:
        print(json.dumps(report, indent=2, default=str))
    else:
        table = Table("corpus", "found in", "file", "bytes", "sha256 ok")
        for entry in report:
            files = entry.get("files") or {}
            if not files:
                table.add_row(entry["corpus"], "[red]not found[/]", "", "", "")
            for split, info in files.items():
                table.add_row(
                    entry["corpus"],
                    str(entry.get("path")),
                    split,
                    str(info.get("bytes")),
                    "yes" if info.get("ok") else "[red]no[/]",
                )
        terminal.stdout().print(table)
    ok = all(
        entry.get("files") and all(f.get("ok") for f in entry["files"].values()) for entry in report
    )
    if not ok:
        fail(
            "some corpora are missing or do not verify; set DUOSPARSE_DATA_DIR (or --data-dir) to a "
            "folder holding <corpus>/{train,valid,test}.txt, or run `duosparse data download <corpus>`.",
            1,
        )


@data_app.command("download")
def data_download(
    corpus: Annotated[str, typer.Argument(help="ptb or wikitext-2")],
    data_dir: Annotated[
        Path | None, typer.Option(help="Where to put it (default: the user cache)")
    ] = None,
) -> None:
    """Download a corpus from its canonical source and verify it by sha256."""
    if corpus not in data_module.CORPORA:
        fail(f"unknown corpus '{corpus}'; choose one of {', '.join(data_module.CORPORA)}.")
    dest = data_dir or data_module.user_cache_dir() / "data"
    try:
        path = data_module.download_corpus(corpus, Path(dest))
    except (data_module.DataNotFoundError, data_module.DataIntegrityError) as e:
        fail(str(e))
    console.print(f"{corpus} downloaded and verified in {path}")


# --- sweeps ------------------------------------------------------------------------------


def _load_plan(spec_path: Path, tracking_uri: str | None):
    from . import tracking, tuning
    from .sweep import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
        uri = tuning.tracking_uri_for(spec, tracking_uri)
        return spec, uri, tuning.plan(spec, uri)
    except (SpecError, tracking.TrackingError) as e:
        fail(str(e))


def _plan_table(plan, title: str) -> Table:
    rows = plan.rows()
    table = Table(*(rows[0].keys() if rows else ["run_key"]), title=title)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


def _counts(plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in plan.rows():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


@sweep_app.command("run")
def sweep_run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="sweeps/<study>.yaml")],
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted launch (Tuner.restore)")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the trial table and stop")
    ] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default: spec, $MLFLOW_TRACKING_URI, ./mlruns.db)"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    allow_silent_start: Annotated[
        bool,
        typer.Option(
            "--allow-silent-start", help="Run EGRU trials even where a layer emits no event at init"
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", help="No progress or ETA lines (errors, warnings and the final table only)"
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Keep Ray's and MLflow's own banners and hints")
    ] = False,
) -> None:
    """Run every trial of SPEC that has not FINISHED yet, on Ray Tune, logged to MLflow."""
    from . import tuning

    terminal.setup_logging(console, quiet)
    if not verbose:
        terminal.quiet_libraries()

    spec, uri, plan = _load_plan(spec_path, tracking_uri)
    silent = tuning.silent_starts(plan.todo)
    if silent:
        first = next(iter(silent.values()))
        console.print(
            f"[bold yellow]warning:[/] {len(silent)} EGRU trial(s) would start silent, for "
            f"example: {first}",
            highlight=False,
            soft_wrap=True,
        )
        if not dry_run and not allow_silent_start:
            fail(
                f"refusing to start sweep {spec.name}: {len(silent)} trial(s) have an EGRU layer "
                "without events at initialisation (above). Fix the thresholds or the initialisation "
                "in the spec, or pass --allow-silent-start to run them anyway."
            )
    if dry_run:
        if json_out:
            print(json.dumps({"sweep": spec.name, "trials": plan.rows()}, indent=2))
        else:
            terminal.stdout().print(
                _plan_table(
                    plan, f"sweep {spec.name}: {len(plan.trials)} trials, {len(plan.todo)} to run"
                )
            )
        return
    console.print(
        f"sweep {spec.name}: {len(plan.trials)} trials, {len(plan.todo)} to run; MLflow {uri}, experiment '{spec.experiment}'"
    )
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Ray Tune's own prints; stdout is ours
            final = tuning.run_sweep(
                spec,
                address=address,
                resume=resume,
                tracking_uri=tracking_uri,
                show_progress=not (json_out or quiet),
            )
    except tuning.SweepError as e:
        fail(str(e))
    except tuning.SweepInterrupted as e:
        words = ["duosparse", "sweep", "run", str(spec_path), "--resume"]
        words += [
            *(["--address", address] if address else []),
            *(["--tracking-uri", tracking_uri] if tracking_uri else []),
            *(["--allow-silent-start"] if allow_silent_start else []),
        ]
        command = shlex.join(words)
        fail(
            f"sweep {spec.name} was interrupted by {e.signal_name}: the launch and its {e.killed} trial(s) in "
            "progress are marked KILLED in MLflow, finished trials are kept, and each unfinished trial "
            f"continues from its last epoch. Resume it with: {command}",
            code=128 + signal.Signals[e.signal_name].value,
        )
    counts = _counts(final)
    if json_out:
        print(json.dumps({"sweep": spec.name, "counts": counts, "trials": final.rows()}, indent=2))
    else:
        terminal.stdout().print(_plan_table(final, f"sweep {spec.name}"))
        console.print(f"{counts}. Browse with: make ui")
    if counts.get("FINISHED", 0) < len(final.trials):
        raise typer.Exit(1)


@sweep_app.command("status")
def sweep_status(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Finished / running / failed / pending trials of SPEC, with failure reasons."""
    spec, _, plan = _load_plan(spec_path, tracking_uri)
    if json_out:
        print(
            json.dumps(
                {"sweep": spec.name, "counts": _counts(plan), "trials": plan.rows()}, indent=2
            )
        )
    else:
        terminal.stdout().print(_plan_table(plan, f"sweep {spec.name}"))
        console.print(str(_counts(plan)))


# --- ui ------------------------------------------------------------------------------------


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1", min=1, max=65535)] = 5000,
    host: Annotated[
        str, typer.Option(help="Interface to bind (keep 127.0.0.1 unless you mean it)")
    ] = "127.0.0.1",
    tracking_uri: Annotated[
        str | None, typer.Option(help="Store to browse (default: as `train`)")
    ] = None,
) -> None:
    """Open the MLflow UI over the same store that runs are logged to."""
    from . import tracking

    uri = tracking_uri or tracking.default_tracking_uri()
    if not tracking.is_local_uri(uri):
        fail(f"the tracking store is a server ({uri}); open it in a browser directly.")
    try:
        tracking.open_store(uri)
    except tracking.TrackingError as e:
        fail(str(e))
    artifacts = tracking.artifacts_root(uri)
    # MLflow 3 opens in its GenAI view unless told otherwise; this link selects model training
    # (the browser then keeps that choice)
    console.print(
        f"MLflow UI over {uri} (Ctrl-C to stop): http://{host}:{port}/#/experiments?workflowType=machine_learning",
        highlight=False,
        soft_wrap=True,
    )
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        artifacts.as_uri(),
        "--host",
        host,
        "--port",
        str(port),
    ]
    # The server and its workers get a process group of their own, stopped as one whatever
    # ends this process (Ctrl-C, SIGTERM, SIGHUP, an error): nothing is left on the port.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_terminated_ui)
    server: subprocess.Popen | None = None
    try:
        server = subprocess.Popen(
            cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, start_new_session=True
        )
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        if server is not None:
            _stop_process_tree(server)
    raise typer.Exit(code)


def _raise_terminated_ui(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a requested stop, like Ctrl-C


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux; elsewhere only the group is stopped)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_process_tree(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the group `process` leads and to each of its descendants (some, such as
    MLflow's job runners, start sessions of their own), then SIGKILL to what outlives
    `grace_s`."""
    from . import tracking

    members = [process.pid, *_descendants(process.pid)]
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signum)
        for pid in members:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace_s
        while any(tracking.pid_alive(pid) for pid in members) and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.2)
        if not any(tracking.pid_alive(pid) for pid in members):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)  # reap the leader


def main() -> None:
    app()


if __name__ == "__main__":
    main()
