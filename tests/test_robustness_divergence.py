"""Divergence that stays finite ends the run FAILED, and `analyze` never counts a FAILED run
or one whose perplexity is at the cap exp(50)."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import TINY
from cli_helpers import run as cli_run
from duosparse import schema, tracking
from duosparse.analysis import runs
from duosparse.config import RunConfig, load_config
from duosparse.train import LOSS_CAP, TrainingDiverged, check_divergence
from mlflow.tracking import MlflowClient


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return cli_run(*args, cwd=cwd, timeout=600)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.lr=100", "train.clip=0"],  # Adam thrown far out: val/loss ~1e3, ppl at the cap
        ["train.optimizer=sgd", "train.lr=1e30"],  # clipped SGD: finite, ~1e28 nats
    ],
    ids=["adam-lr100-noclip", "sgd-lr1e30"],
)
@pytest.mark.slow
def test_finite_divergence_ends_the_run_failed_through_the_cli(tmp_path, overrides):
    args = [a for o in overrides for a in ("--set", o)]
    result = run("train", *TINY, *args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    text = " ".join(result.stderr.split())
    assert "diverged" in text and "marked FAILED" in text and "lower train.lr" in text
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run_,) = client.search_runs([client.get_experiment_by_name("duosparse").experiment_id])
    assert run_.info.status == "FAILED"
    assert "train.lr" in run_.data.tags[schema.TAG_FAILURE]
    assert schema.TEST_PPL not in run_.data.metrics  # no figure of a diverged model is logged


def test_the_rule_is_the_perplexity_cap_or_one_nat_above_a_uniform_guess():
    config = load_config(None, [])
    vocab = 64
    uniform = math.log(vocab)
    check_divergence(config, uniform, vocab, 1)  # knowing nothing is not diverging
    check_divergence(config, uniform + 0.99, vocab, 1)
    with pytest.raises(TrainingDiverged, match=r"nat above a uniform guess.*lower train.lr"):
        check_divergence(config, uniform + 1.01, vocab, 1)
    with pytest.raises(TrainingDiverged, match=r"perplexity cap.*lower train.lr"):
        check_divergence(config, LOSS_CAP, 10**30, 3)


def _finished_run(
    client,
    experiment: str,
    config: RunConfig,
    val_ppl: float,
    test_ppl: float,
    status: str = "FINISHED",
) -> str:
    run_id = tracking.start_run(
        client, experiment, config, kind="trial", tags={schema.TAG_SWEEP: "capped"}
    )
    reporter = tracking.MlflowReporter(client, run_id)
    given = (schema.VAL_PPL, schema.VAL_LOSS, schema.TEST_PPL, schema.TEST_LOSS)
    reporter.log_metrics({name: 1.0 for name in schema.RUN_METRICS if name not in given}, step=1)
    reporter.log_metrics({schema.VAL_PPL: val_ppl, schema.VAL_LOSS: math.log(val_ppl)}, step=1)
    reporter.log_metrics({schema.TEST_PPL: test_ppl, schema.TEST_LOSS: math.log(test_ppl)}, step=1)
    tracking.finish_run(client, run_id, status)
    return run_id


@pytest.mark.slow
def test_analysis_never_counts_a_failed_run_or_a_perplexity_at_the_cap(tmp_path):
    client = tracking.open_store(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.create_experiment("capped", artifact_location=(tmp_path / "art").as_uri())
    cap = math.exp(LOSS_CAP)
    ids = {}
    for i, (name, val, test, status) in enumerate(
        [
            ("good", 80.0, 85.0, "FINISHED"),
            ("capped_test", 90.0, cap, "FINISHED"),  # logged before the divergence rule existed
            ("capped_val", cap, 95.0, "FINISHED"),
            ("failed", 70.0, 75.0, "FAILED"),
        ]
    ):
        config = RunConfig.model_validate({"model": {"hidden_size": 32 + i}})
        ids[name] = _finished_run(client, experiment, config, val, test, status)
        time.sleep(0.01)
    table = runs.runs_table("capped", client=client)
    ok = dict(zip(table[runs.RUN_ID], table[runs.OK]))
    assert ok == {
        ids["good"]: True,
        ids["capped_test"]: False,
        ids["capped_val"]: False,
        ids["failed"]: False,
    }

    # A table exported by an older version, with the capped runs marked ok, is corrected on read.
    old = table.copy()
    old[runs.OK] = True
    path = runs.write_table(old, tmp_path / "runs.csv")
    again = runs.read_table(path)
    assert dict(zip(again[runs.RUN_ID], again[runs.OK])) == {
        ids["good"]: True,
        ids["capped_test"]: False,
        ids["capped_val"]: False,
        ids["failed"]: False,
    }


@pytest.mark.slow
def test_analyze_reports_only_the_usable_run(tmp_path):
    client = tracking.open_store(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.create_experiment("capped", artifact_location=(tmp_path / "art").as_uri())
    cap = math.exp(LOSS_CAP)
    for i, (val, test, status) in enumerate(
        [(80.0, 85.0, "FINISHED"), (90.0, cap, "FINISHED"), (70.0, 75.0, "FAILED")]
    ):
        config = RunConfig.model_validate({"model": {"hidden_size": 32 + i}})
        _finished_run(client, experiment, config, val, test, status)
    result = run("analyze", "capped", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert "analysing 3 runs (1 usable)" in " ".join(result.stderr.split()), result.stderr[-3000:]
