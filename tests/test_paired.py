"""The paired pruning-cost test: re-evaluation reproduces the logged test perplexity, and the
block bootstrap behaves as a paired interval should."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from duosparse import schema
from duosparse.analysis import paired, runs
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
    "train.max_steps_per_epoch=10",
    "--set",
    "train.epochs=2",
    "--set",
    "model.threshold=0.05",
    "--set",
    "prune.schedule=oneshot",
    "--set",
    "prune.start_epoch=1",
]


def train(folder: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [DUOSPARSE, "train", *TINY, *extra, "--experiment", "pc", "--json"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_pruning_cost_reevaluates_the_logged_test_figures_and_brackets_the_rise(tmp_path):
    dense = train(tmp_path, "--set", "prune.target_sparsity=0.0")
    pruned = train(tmp_path, "--set", "prune.target_sparsity=0.9")
    half = train(tmp_path, "--set", "prune.target_sparsity=0.5")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    table = runs.runs_table("pc", client=client)
    (entry,) = paired.pruning_cost(table, client, n_boot=500)
    assert "skipped" not in entry, entry
    assert entry["dense_run_id"] == dense["run_id"] and entry["pruned_run_id"] == pruned["run_id"]
    assert entry["target_sparsity"] == 0.9  # the highest level, not 0.5
    # the chunk-by-chunk re-evaluation is the training loop's test pass, to rounding
    assert entry["ppl_dense"] == pytest.approx(dense["metrics"][schema.TEST_PPL], rel=1e-6)
    assert entry["ppl_pruned"] == pytest.approx(pruned["metrics"][schema.TEST_PPL], rel=1e-6)
    assert entry["ci_low"] <= entry["difference"] <= entry["ci_high"]
    assert half["run_id"] not in (entry["dense_run_id"], entry["pruned_run_id"])


def test_paired_difference_of_equal_models_is_exactly_zero_and_a_shift_is_detected():
    rng = np.random.default_rng(1)
    tokens = np.full(100, 350.0)
    loss = rng.normal(5.0, 0.3, 100) * tokens
    same = paired.paired_difference(loss, loss.copy(), tokens, n_boot=300)
    assert same["difference"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    # every chunk 0.1 nats worse: ppl rises by about exp(5)(e^0.1 - 1), and the interval is
    # narrow because the pairing removes the chunks' own variation
    worse = paired.paired_difference(loss, loss + 0.1 * tokens, tokens, n_boot=300)
    expected = np.exp(loss.sum() / tokens.sum()) * (np.exp(0.1) - 1)
    assert worse["difference"] == pytest.approx(expected, rel=1e-9)
    assert 0 < worse["ci_low"] <= worse["difference"] <= worse["ci_high"] < 1.2 * expected
    assert worse["block_chunks"] == 10
