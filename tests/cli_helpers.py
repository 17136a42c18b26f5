"""What the CLI tests share: the installed `duosparse`, a tiny synthetic run, and the
MLflow UI's readiness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DUOSPARSE = str(Path(sys.executable).with_name("duosparse"))
# A two-epoch EGRU of a few seconds on the synthetic corpus.
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
    "train.max_steps_per_epoch=10",
    "--set",
    "train.max_eval_batches=4",
    "--set",
    "train.epochs=2",
    "--set",
    "model.threshold=0.05",
]


def cli_env() -> dict[str, str]:
    """This environment without a tracking URI: each test's store is ./mlruns.db in its folder."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def run(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DUOSPARSE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_ui(port: int, process: subprocess.Popen, timeout_s: float = 180) -> None:
    """Until the MLflow UI on `port` answers; fails if `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            assert process.poll() is None, "the UI process exited before serving"
            assert time.monotonic() < deadline, "the MLflow UI did not come up"
            time.sleep(0.5)
