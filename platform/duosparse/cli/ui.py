"""`duosparse ui`: the MLflow UI over the store that runs are logged to."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .common import console, fail


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
    from duosparse import tracking

    uri = tracking_uri or tracking.default_tracking_uri()
    if not tracking.is_local_uri(uri):
        fail(f"the tracking store is a server ({uri}); open it in a browser directly.")
    try:
        tracking.open_store(uri)
    except tracking.TrackingError as e:
        fail(str(e))
    # MLflow 3 opens in its GenAI view unless told otherwise; this link selects model training
    # (the browser then keeps that choice)
    console.print(
        f"MLflow UI over {uri} (Ctrl-C to stop): http://{host}:{port}/#/experiments?workflowType=machine_learning",
        highlight=False,
        soft_wrap=True,
    )
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--default-artifact-root", tracking.artifacts_root(uri).as_uri()]
    cmd += ["--host", host, "--port", str(port)]
    raise typer.Exit(_serve(cmd, {**os.environ, "MLFLOW_TRACKING_URI": uri}))


def _serve(cmd: list[str], env: dict[str, str]) -> int:
    """Run the server until it ends or this process is asked to stop. The server and its
    workers get a process group of their own, stopped as one whatever ends this process
    (Ctrl-C, SIGTERM, SIGHUP, an error): nothing is left on the port."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    server: subprocess.Popen | None = None
    try:
        server = subprocess.Popen(cmd, env=env, start_new_session=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None:
            stop_process_tree(server)


def _raise_interrupt(signum: int, frame: object) -> None:
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


def stop_process_tree(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the group `process` leads and to each of its descendants (some, such as
    MLflow's job runners, start sessions of their own), then SIGKILL to what outlives
    `grace_s`."""
    from duosparse import tracking

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
