"""Stores, folders and artifacts that cannot be used end with one clear paragraph and a
non-zero exit, never a traceback, and change nothing already stored."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from conftest import require
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
    "train.max_steps_per_epoch=5",
    "--set",
    "train.max_eval_batches=2",
    "--set",
    "train.epochs=1",
    "--set",
    "model.arch=lstm",
]
FAKE_RUN = "0123456789abcdef0123456789abcdef"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(extra)
    return env


def run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DUOSPARSE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(**env),
        stdin=subprocess.DEVNULL,
    )


def message(result: subprocess.CompletedProcess) -> str:
    """stderr as one line (rich wraps long messages)."""
    return " ".join(result.stderr.split())


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str) -> str:
    text = message(result)
    assert result.returncode not in (0, None), text
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert text.count("error:") == 1, text  # one paragraph
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# --- a tracking URI that cannot be written -------------------------------------------------


def test_train_to_a_store_under_a_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker / 'mlruns.db'}"
    result = run("train", *TINY, "--tracking-uri", uri, cwd=tmp_path)
    assert_clean_failure(result, uri, "cannot be created", "writable folder")
    assert result.returncode == 2
    assert not (tmp_path / "runs").exists()  # refused before training


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "tiny", "base": {"data": {"corpus": "synthetic"}}, "grid": {}, "seeds": [0]}
        )
    )
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["train", *TINY],
        ["sweep", "status", "tiny.yaml"],
        ["analyze", "tiny"],
        ["simulate", "spinnaker2", FAKE_RUN],
        ["prune", "sensitivity", FAKE_RUN],
        ["ui", "--port", "1"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_every_command_refuses_an_unwritable_tracking_uri_cleanly(tmp_path, spec, command):
    uri = "sqlite:////proc/duosparse-nowhere/mlruns.db"  # /proc: not writable, even by root
    result = run(*command, cwd=tmp_path, MLFLOW_TRACKING_URI=uri)
    assert_clean_failure(result, uri)
    assert result.returncode == 2


# --- a read-only working directory ---------------------------------------------------------


def _readonly_runner(folder: Path):
    """A function running duosparse with `folder`, read-only, as its working directory: a
    read-only bind mount in a private mount namespace as root (root writes through file
    modes), else the folder's write bits removed."""
    if os.geteuid() != 0:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)

        def run_readonly(*args: str, **env: str) -> subprocess.CompletedProcess:
            return run(*args, cwd=folder, **env)

        return run_readonly
    unshare = shutil.which("unshare")
    script = 'mount --bind -o ro "$0" "$0" && cd "$0" && exec "$@"'
    require(
        unshare is not None
        and subprocess.run(
            [unshare, "-m", "sh", "-c", script, str(folder), "true"], capture_output=True
        ).returncode
        == 0,
        "as root, a read-only folder needs `unshare -m` and mount rights",
    )

    def run_readonly(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [unshare, "-m", "sh", "-c", script, str(folder), DUOSPARSE, *args],
            capture_output=True,
            text=True,
            timeout=600,
            env=_env(**env),
            stdin=subprocess.DEVNULL,
        )

    return run_readonly


@pytest.fixture
def readonly(tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    yield folder, _readonly_runner(folder)
    folder.chmod(stat.S_IRWXU)


def test_train_in_a_readonly_folder_with_the_embedded_store_is_refused(readonly):
    folder, run_readonly = readonly
    result = run_readonly("train", *TINY)
    text = assert_clean_failure(result, "cannot be created", "writable folder")
    assert "mlruns.db" in text
    assert result.returncode == 2
    assert list(folder.iterdir()) == []


def test_train_in_a_readonly_folder_with_a_store_elsewhere_is_refused_before_any_run(
    tmp_path, readonly
):
    folder, run_readonly = readonly
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    result = run_readonly("train", *TINY, "--tracking-uri", uri)
    text = assert_clean_failure(result, "cannot write the run's folder", "runs/", "--workdir")
    assert "Read-only file system" in text or "Permission denied" in text
    assert result.returncode == 2
    client = MlflowClient(uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    # and with --workdir elsewhere the same run trains, its artifacts beside the store
    result = run_readonly(
        "train", *TINY, "--tracking-uri", uri, "--workdir", str(tmp_path / "work")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "store" / "mlartifacts").is_dir()


# --- a corrupted model.pt ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    result = run("train", *TINY, "--json", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads(result.stdout)["run_id"]
    client = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    checkpoint = Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / "model.pt"
    assert checkpoint.is_file()
    return folder, run_id, checkpoint, checkpoint.read_bytes()


@pytest.fixture(params=["truncated", "garbage"])
def corrupted(request, trained):
    folder, run_id, checkpoint, good = trained
    checkpoint.write_bytes(
        good[: len(good) // 2] if request.param == "truncated" else b"not a checkpoint\n"
    )
    client = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    before = client.get_run(run_id)
    yield folder, run_id
    after = client.get_run(run_id)
    assert after.info.status == before.info.status == "FINISHED"
    assert after.data.metrics == before.data.metrics  # nothing logged
    assert after.data.tags == before.data.tags
    checkpoint.write_bytes(good)


def test_simulate_a_run_with_a_corrupted_checkpoint_fails_cleanly(corrupted):
    folder, run_id = corrupted
    result = run("simulate", "spinnaker2", run_id, cwd=folder)
    assert_clean_failure(
        result, f"model.pt artifact of run {run_id}", "cannot be loaded", "Train the run again"
    )
    assert result.returncode == 2


def test_prune_sensitivity_of_a_run_with_a_corrupted_checkpoint_names_the_run_not_a_temp_file(
    corrupted,
):
    folder, run_id = corrupted
    result = run("prune", "sensitivity", run_id, "--levels", "0.5", cwd=folder)
    text = assert_clean_failure(
        result, f"model.pt artifact of MLflow run {run_id}", "cannot be loaded"
    )
    assert result.returncode == 2
    assert "duosparse-sensitivity-" not in text and "/tmp" not in text
    assert text.endswith("or train the run again.")  # the whole message, not cut off
