"""Bad input, case by case: every command given a bad config, spec, option value or file ends
with a non-zero exit, no traceback and one message that names what to fix, and leaves what
the store already holds exactly as it was (run ids, statuses, tags, params, metrics, and the
checksum of every artifact and checkpoint file).

All cases run against one folder holding one finished run, each as a user runs it: the
`duosparse` command in a subprocess, without a terminal."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

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
SYNTHETIC = ["--set", "data.corpus=synthetic", "--set", "train.epochs=1"]
RUN = "{run}"  # stands for the stored run's id in a case's arguments


@dataclass
class Case:
    id: str
    args: list[str]
    needles: list[str]  # each must appear in the message: the thing to fix, named
    files: dict[str, str | bytes] = field(default_factory=dict)  # written before the command runs
    usage: bool = False  # refused by the command line parser (typer), not by duosparse


def spec(text: str) -> dict[str, str]:
    return {"spec.yaml": "name: bad\n" + text}


def dry(text: str, *needles: str, id: str) -> Case:
    return Case(id, ["sweep", "run", "spec.yaml", "--dry-run"], list(needles), spec(text))


CASES = [
    # --- a run's config through --set --------------------------------------------------------
    Case(
        "bool-for-int",
        [*SYNTHETIC, "--set", "model.hidden_size=true"],
        ["'model.hidden_size'", "integer"],
    ),
    Case("lr-infinite", [*SYNTHETIC, "--set", "train.lr=.inf"], ["'train.lr'", "finite"]),
    Case("lr-nan", [*SYNTHETIC, "--set", "train.lr=nan"], ["'train.lr'", "finite"]),
    Case("lr-not-a-number", [*SYNTHETIC, "--set", "train.lr=abc"], ["'train.lr'", "'abc'"]),
    Case(
        "unknown-arch", [*SYNTHETIC, "--set", "model.arch=transformer"], ["'model.arch'", "'egru'"]
    ),
    Case(
        "misspelt-key",
        [*SYNTHETIC, "--set", "model.hiden_size=3"],
        ["'model.hiden_size'", "hidden_size"],
    ),
    Case(
        "unknown-section",
        [*SYNTHETIC, "--set", "optim.lr=3"],
        ["'optim'", "data, model, prune, train"],
    ),
    Case(
        "hidden-size-zero",
        [*SYNTHETIC, "--set", "model.hidden_size=0"],
        ["'model.hidden_size'", "greater than"],
    ),
    Case(
        "hidden-size-negative",
        [*SYNTHETIC, "--set", "model.hidden_size=-5"],
        ["'model.hidden_size'", "-5"],
    ),
    Case("no-layers", [*SYNTHETIC, "--set", "model.num_layers=0"], ["'model.num_layers'"]),
    Case(
        "sparsity-one",
        [*SYNTHETIC, "--set", "prune.target_sparsity=1.0"],
        ["'prune.target_sparsity'", "less than 1"],
    ),
    Case(
        "sparsity-negative",
        [*SYNTHETIC, "--set", "prune.target_sparsity=-0.1"],
        ["'prune.target_sparsity'"],
    ),
    Case(
        "sparsity-without-schedule",
        [*SYNTHETIC, "--set", "prune.target_sparsity=0.5"],
        ["prune.schedule", "oneshot, gradual or iterative"],
    ),
    Case(
        "unknown-schedule",
        [*SYNTHETIC, "--set", "prune.schedule=magic"],
        ["'prune.schedule'", "'gradual'"],
    ),
    Case(
        "gradual-starts-after-it-ends",
        [
            *SYNTHETIC,
            "--set",
            "prune.schedule=gradual",
            "--set",
            "prune.target_sparsity=0.5",
            "--set",
            "prune.start_epoch=5",
        ],
        ["prune.end_epoch", "prune.start_epoch"],
    ),
    Case("batch-zero", [*SYNTHETIC, "--set", "train.batch_size=0"], ["'train.batch_size'"]),
    Case("epochs-negative", [*SYNTHETIC, "--set", "train.epochs=-1"], ["'train.epochs'"]),
    Case(
        "epochs-float-text",
        [*SYNTHETIC, "--set", "train.epochs=1e3"],
        ["'train.epochs'", "integer"],
    ),
    Case(
        "seed-fractional", [*SYNTHETIC, "--set", "train.seed=1.5"], ["'train.seed'", "fractional"]
    ),
    Case("bptt-zero", [*SYNTHETIC, "--set", "train.bptt=0"], ["'train.bptt'"]),
    Case("clip-negative", [*SYNTHETIC, "--set", "train.clip=-1"], ["'train.clip'"]),
    Case(
        "weight-decay-negative",
        [*SYNTHETIC, "--set", "train.weight_decay=-0.1"],
        ["'train.weight_decay'"],
    ),
    Case(
        "unknown-optimizer",
        [*SYNTHETIC, "--set", "train.optimizer=lion"],
        ["'train.optimizer'", "'adamw'"],
    ),
    Case("threshold-negative", [*SYNTHETIC, "--set", "model.threshold=-1"], ["'model.threshold'"]),
    Case(
        "unknown-corpus",
        [*SYNTHETIC, "--set", "data.corpus=imagenet"],
        ["'data.corpus'", "'wikitext-2'"],
    ),
    Case(
        "value-for-a-section",
        [*SYNTHETIC, "--set", "model.dropout=1.5"],
        ["'model.dropout' is a section", "output"],
    ),
    Case("set-without-equals", [*SYNTHETIC, "--set", "noequals"], ["'noequals'", "key=value"]),
    Case("set-without-key", [*SYNTHETIC, "--set", "=3"], ["is not a config key"]),
    Case(
        "short-warm-start-key",
        [*SYNTHETIC, "--set", "init.from_run_key=deadbeef"],
        ["init.from_run_key", "64 hex digits"],
    ),
    Case(
        "warm-start-from-nothing",
        [*SYNTHETIC, "--set", "init.from_run_key=" + "ab" * 32],
        ["init.from_run_key", "ab" * 6, "names no FINISHED run"],
    ),
    Case("empty-experiment", [*SYNTHETIC, "--experiment", ""], ["--experiment"]),
    # --- config files --------------------------------------------------------------------------
    Case("config-missing", ["train", "nothere.yaml"], ["'nothere.yaml' does not exist"]),
    Case(
        "config-broken-yaml",
        ["train", "c.yaml"],
        ["'c.yaml' is not valid YAML"],
        {"c.yaml": "model: [1, 2\n"},
    ),
    Case(
        "config-a-list",
        ["train", "c.yaml"],
        ["'c.yaml' must hold a mapping"],
        {"c.yaml": "- a\n- b\n"},
    ),
    Case(
        "config-key-twice",
        ["train", "c.yaml"],
        ["'model' appears twice"],
        {"c.yaml": "model: {arch: lstm}\nmodel: {arch: gru}\n"},
    ),
    Case(
        "config-not-text",
        ["train", "c.yaml"],
        ["'c.yaml' is not a text file"],
        {"c.yaml": b"\xff\xfe\x00\x01"},
    ),
    Case(
        "config-unknown-section",
        ["train", "c.yaml"],
        ["'optim' is not a config key"],
        {"c.yaml": "model: {arch: lstm}\noptim: {lr: 1}\n"},
    ),
    Case(
        "config-corrupted-corpus",
        ["train", "--data-dir", "corpora", "--set", "data.corpus=ptb"],
        ["sha256", "duosparse data download ptb"],
        {f"corpora/ptb/{split}.txt": "not the corpus\n" for split in ("train", "valid", "test")},
    ),
    # --- stores and folders ----------------------------------------------------------------------
    Case(
        "store-under-a-file",
        [*SYNTHETIC, "--tracking-uri", "sqlite:///afile/mlruns.db"],
        ["cannot be created", "writable folder"],
        {"afile": "a file, not a folder"},
    ),
    Case(
        "store-driver-missing",
        [*SYNTHETIC, "--tracking-uri", "mysql://nobody@127.0.0.1:1/x"],
        ["cannot be used", "MLFLOW_TRACKING_URI"],
    ),
    Case(
        "workdir-not-writable",
        [*SYNTHETIC, "--workdir", "/proc/duosparse"],
        ["'/proc/duosparse'", "--workdir"],
    ),
    # --- sweep specs -----------------------------------------------------------------------------
    Case("spec-missing", ["sweep", "run", "nothere.yaml"], ["'nothere.yaml' does not exist"]),
    Case(
        "spec-status-missing",
        ["sweep", "status", "nothere.yaml"],
        ["'nothere.yaml' does not exist"],
    ),
    Case("spec-analyze-missing", ["analyze", "nothere.yaml"], ["'nothere.yaml' does not exist"]),
    dry("grid: {}\nbogus: 1\n", "'bogus' is not a spec field", id="spec-unknown-field"),
    dry("grid: {model.archh: [lstm]}\n", "model.archh", id="spec-unknown-axis"),
    dry("grid: {model.arch: lstm}\n", "'grid.model.arch'", "list", id="spec-axis-not-a-list"),
    dry("grid: {model.arch: []}\n", "'model.arch' has no values", id="spec-axis-empty"),
    dry(
        "grid: {train.seed: [0, 1]}\nseeds: [0]\n",
        "'train.seed'",
        "seeds: [0, 1]",
        id="spec-seed-axis",
    ),
    dry(
        "grid: {model.hidden_size: [true]}\n",
        "'model.hidden_size'",
        "integer",
        id="spec-bool-axis-value",
    ),
    dry(
        "grid: {prune.target_sparsity: [0.5]}\n",
        "prune.schedule",
        "Fix the axis values or the base",
        id="spec-value-invalid-with-base",
    ),
    dry(
        "base: {train: {lr: .inf}}\ngrid: {}\n",
        "base",
        "'train.lr'",
        "finite",
        id="spec-base-infinite",
    ),
    dry("grid: {}\nmax_concurrent: 0\n", "'max_concurrent'", id="spec-no-concurrency"),
    dry("grid: {}\nresources: {cpu: -1}\n", "'resources.cpu'", id="spec-negative-cpu"),
    dry("grid: {}\nseeds: []\n", "'seeds'", id="spec-no-seeds"),
    dry("grid: {}\nretries: -2\n", "'retries'", id="spec-negative-retries"),
    dry(
        "grid: {}\nconditional: [{when: {model.arch: gru}, grid: {model.threshold: [0.1]}}]\n",
        "conditional[0].when",
        "matches no trial",
        id="spec-condition-matches-nothing",
    ),
    dry(
        "grid: {}\nearly_stopping: {grace_period: 0}\n",
        "'early_stopping.grace_period'",
        id="spec-grace-zero",
    ),
    dry(
        "grid: {}\nstages: [{name: a, grid: {}}, {name: b, from: zzz, grid: {}}]\n",
        "'from: zzz'",
        "names no earlier stage",
        id="spec-stage-from-nowhere",
    ),
    dry(
        "recipe: nothere.yaml\ngrid: {}\n",
        "recipe 'nothere.yaml' does not exist",
        id="spec-recipe-missing",
    ),
    dry("grid: {}\ngrid: {}\n", "'grid' appears twice", id="spec-key-twice"),
    Case(
        "spec-bad-name",
        ["sweep", "run", "spec.yaml", "--dry-run"],
        ["'name'"],
        {"spec.yaml": "name: bad/name\ngrid: {}\n"},
    ),
    Case(
        "spec-no-name",
        ["sweep", "run", "spec.yaml", "--dry-run"],
        ["'name'", "Field required"],
        {"spec.yaml": "grid: {}\n"},
    ),
    # --- simulate, prune, data, ui ------------------------------------------------------------
    Case(
        "simulate-unknown-run",
        ["simulate", "spinnaker2", "0123456789abcdef0123456789abcdef"],
        ["no run '0123456789abcdef0123456789abcdef'"],
    ),
    Case("simulate-nothing-named", ["simulate", "spinnaker2"], ["exactly one of RUN_ID, --sweep"]),
    Case("simulate-unknown-sweep", ["simulate", "spinnaker2", "--sweep", "nosuch"], ["'nosuch'"]),
    Case(
        "simulate-decoder",
        ["simulate", "spinnaker2", RUN, "--decoder", "moon"],
        ["--decoder", "chip, host"],
    ),
    Case(
        "simulate-precision",
        ["simulate", "spinnaker2", RUN, "--precision", "fp8"],
        ["--precision", "fp32"],
    ),
    Case("simulate-pes", ["simulate", "spinnaker2", RUN, "--pes", "wide"], ["--pes", "compact"]),
    Case(
        "simulate-level", ["simulate", "spinnaker2", RUN, "--level", "9"], ["--level", "high, low"]
    ),
    Case(
        "simulate-unknown-constant",
        ["simulate", "spinnaker2", RUN, "--set", "nosuch=1"],
        ["'nosuch'"],
    ),
    Case(
        "simulate-event-rate-for-a-run",
        ["simulate", "spinnaker2", RUN, "--event-rate", "0.2"],
        ["--event-rate", "--config only"],
    ),
    Case(
        "simulate-profile-missing",
        ["simulate", "spinnaker2", RUN, "--profile", "nothere.yaml"],
        ["'nothere.yaml' does not exist"],
    ),
    Case(
        "simulate-profile-broken",
        ["simulate", "spinnaker2", RUN, "--profile", "p.yaml"],
        ["'p.yaml' is not valid YAML"],
        {"p.yaml": "constants: {a: [1\n"},
    ),
    Case(
        "simulate-config-missing",
        ["simulate", "spinnaker2", "--config", "nothere.yaml"],
        ["'nothere.yaml' does not exist"],
    ),
    Case(
        "simulate-no-chips",
        ["simulate", "spinnaker2", RUN, "--chips", "0"],
        ["'--chips'"],
        usage=True,
    ),
    Case(
        "prune-nothing-there",
        ["prune", "sensitivity", "nothere/model.pt"],
        ["'nothere/model.pt'", "run id"],
    ),
    Case(
        "prune-level-not-a-number",
        ["prune", "sensitivity", RUN, "--levels", "0.5,abc"],
        ["--levels", "'abc'"],
    ),
    Case(
        "prune-level-out-of-range",
        ["prune", "sensitivity", RUN, "--levels", "1.5"],
        ["--levels", "[0, 1)"],
    ),
    Case("prune-device", ["prune", "sensitivity", RUN, "--device", "tpu"], ["--device", "'tpu'"]),
    Case(
        "prune-not-a-checkpoint",
        ["prune", "sensitivity", "notes.pt"],
        ["'notes.pt'", "model.pt"],
        {"notes.pt": "some notes"},
    ),
    Case(
        "prune-no-batches",
        ["prune", "sensitivity", RUN, "--max-batches", "0"],
        ["'--max-batches'"],
        usage=True,
    ),
    Case("data-unknown-corpus", ["data", "download", "nosuch"], ["'nosuch'", "ptb, wikitext-2"]),
    Case("ui-port-out-of-range", ["ui", "--port", "99999"], ["'--port'"], usage=True),
    Case(
        "ui-on-a-server-store",
        ["ui", "--tracking-uri", "http://127.0.0.1:1"],
        ["is a server", "browser"],
    ),
]
if not torch.cuda.is_available():
    CASES.append(
        Case(
            "cuda-without-gpu",
            [*SYNTHETIC, "--set", "train.device=cuda"],
            ["train.device", "'cpu'"],
        )
    )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def duosparse(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DUOSPARSE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def snapshot(folder: Path) -> dict:
    """Everything a failed command must leave as it was."""
    client = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    runs = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            runs[run.info.run_id] = (
                run.info.status,
                run.info.end_time,
                run.data.tags,
                run.data.params,
                run.data.metrics,
            )
    files = {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for top in ("mlartifacts", "runs")
        for p in sorted((folder / top).rglob("*"))
        if p.is_file()
    }
    return {"runs": runs, "files": files}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stored")
    trained = duosparse("train", *TINY, "--json", cwd=folder)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_id,) = snapshot(folder)["runs"]
    return folder, run_id


def test_there_are_at_least_fifty_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 50


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly_and_changes_nothing(store, case: Case):
    folder, run_id = store
    before = snapshot(folder)
    written = []
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        written.append(path)
    try:
        args = [run_id if a == RUN else a for a in case.args]
        if args[0] == "--set":  # a bare override list: the train command
            args = ["train", *args]
        result = duosparse(*args, cwd=folder)
    finally:
        for path in written:
            path.unlink()
    text = " ".join(result.stderr.split())
    assert result.returncode == 2, (result.returncode, text[-3000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    if case.usage:
        assert "Usage:" in text, text
    else:
        assert text.count("error:") == 1, text  # one paragraph
    for needle in case.needles:
        assert needle in text, (needle, text)
    assert snapshot(folder) == before
