"""Sweep stages, warm starts and the sweep ETA, without Ray: spec validation and expansion,
`duosparse train` warm-started from a stored run, and the ETA's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import TINY, run
from duosparse import schema
from duosparse.config import WARM_START_KEYS, ConfigError, build_config
from duosparse.eta import TRIAL_OVERHEAD, SweepEta, epoch_work
from duosparse.sweep import SpecError, describe, expand, expand_stages, parse_spec
from mlflow.tracking import MlflowClient

BASE = {
    "data": {"corpus": "synthetic"},
    "model": {"embedding_size": 16, "hidden_size": 24},
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 8,
        "max_steps_per_epoch": 10,
        "max_eval_batches": 4,
    },
}
DENSE = {
    "name": "dense",
    "grid": {"model.arch": ["lstm", "egru"]},
    "conditional": [{"when": {"model.arch": "egru"}, "grid": {"model.threshold": [0.01, 0.1]}}],
}
PRUNE = {
    "name": "prune",
    "from": "dense",
    "base": {
        "prune": {"schedule": "gradual", "start_epoch": 1, "end_epoch": 1},
        "train": {"epochs": 1, "lr": 1e-3},
    },
    "grid": {"prune.target_sparsity": [0.0, 0.5, 0.9]},
}


def staged(**changes):
    tree = {"name": "s", "base": BASE, "stages": [DENSE, PRUNE], "seeds": [0, 1]}
    tree.update(changes)
    return parse_spec(json.loads(json.dumps(tree)))


# --- expansion -----------------------------------------------------------------------------


def test_each_later_trial_continues_one_earlier_run_of_the_same_model_and_seed():
    (dense_name, dense), (prune_name, prune) = expand_stages(staged())
    assert (dense_name, prune_name) == ("dense", "prune")
    assert len(dense) == 3 * 2  # lstm + egru x 2 thresholds, x 2 seeds
    assert len(prune) == len(dense) * 3  # x 3 prune levels
    by_key = {c.run_key: c for c in dense}
    for trial in prune:
        parent = by_key[trial.init.from_run_key]
        for key in (*WARM_START_KEYS, "model.threshold", "train.seed"):
            assert trial.flat()[key] == parent.flat()[key], key
        assert trial.train.epochs == 1 and trial.train.lr == 1e-3  # the stage's base on top
        assert parent.train.epochs == 2 and parent.init.from_run_key is None
    assert {(t.init.from_run_key, t.prune.target_sparsity) for t in prune} == {
        (p.run_key, s) for p in dense for s in (0.0, 0.5, 0.9)
    }
    assert len(expand(staged())) == len(dense) + len(prune)  # all distinct run_keys
    assert "prune.target_sparsity" in describe(prune[0], staged())


def test_when_selects_which_runs_a_stage_continues():
    prune = {**PRUNE, "when": {"model.arch": "egru"}}
    (_, dense), (_, pruned) = expand_stages(staged(stages=[DENSE, prune]))
    assert {t.model.arch for t in pruned} == {"egru"} and len(pruned) == 4 * 3


def test_a_spec_without_stages_is_one_unnamed_stage_with_the_same_trials():
    tree = {"name": "flat", "base": BASE, "grid": {"model.arch": ["lstm", "gru"]}, "seeds": [0]}
    ((name, trials),) = expand_stages(parse_spec(tree))
    assert name is None and [t.run_key for t in trials] == [
        t.run_key for t in expand(parse_spec(tree))
    ]


@pytest.mark.parametrize(
    "stages, needles",
    [
        (
            [DENSE, {**PRUNE, "from": "dense2"}],
            ["stages[1] ('prune')", "'from: dense2'", "earlier stages: dense"],
        ),
        ([{**PRUNE, "name": "prune"}, DENSE], ["stages[0] ('prune')", "first stage"]),
        (
            [DENSE, {**PRUNE, "grid": {"model.hidden_size": [32]}}],
            ["('prune')", "model.hidden_size", "first stage"],
        ),
        ([DENSE, {**PRUNE, "base": {"model": {"arch": "gru"}}}], ["('prune')", "model.arch"]),
        ([DENSE, {**PRUNE, "base": {"data": {"corpus": "ptb"}}}], ["('prune')", "data.corpus"]),
        ([DENSE, {**PRUNE, "grid": {"train.seed": [3]}}], ["('prune')", "train.seed"]),
        ([DENSE, {**PRUNE, "name": "dense"}], ["('dense')", "own name"]),
        ([{**DENSE, "when": {"model.arch": "lstm"}}, PRUNE], ["stages[0]", "'when'", "'from'"]),
        (
            [DENSE, {**PRUNE, "grid": {"prune.target_sparsty": [0.5]}}],
            ["stages[1] ('prune').grid", "prune.target_sparsty"],
        ),
        ([DENSE, {**PRUNE, "frm": "dense"}], ["frm"]),
    ],
)
def test_bad_stages_are_refused_naming_the_stage_and_key(stages, needles):
    with pytest.raises(SpecError) as e:
        staged(stages=stages)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_top_level_axes_beside_stages_are_refused():
    with pytest.raises(SpecError, match="move the top-level 'grid'"):
        staged(grid={"model.arch": ["gru"]})


def test_a_when_that_matches_no_earlier_run_is_refused():
    with pytest.raises(SpecError, match="stage 'prune'.*matches no run of stage 'dense'"):
        expand_stages(staged(stages=[DENSE, {**PRUNE, "when": {"model.arch": "gru"}}]))


# --- warm starts through `duosparse train` -------------------------------------------------


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("warm")
    result = run("train", *TINY, "--json", cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder, json.loads(result.stdout)


@pytest.mark.slow
def test_a_warm_start_begins_from_the_source_runs_final_weights(source_run):
    folder, source = source_run
    # a learning rate too small to move the weights: the first validation is the source's
    result = run(
        "train",
        *TINY,
        "--set",
        f"init.from_run_key={source['run_key']}",
        "--set",
        "train.epochs=1",
        "--set",
        "train.lr=1e-12",
        "--json",
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    warm = json.loads(result.stdout)
    assert warm["run_key"] != source["run_key"]
    assert warm["metrics"][schema.VAL_LOSS] == pytest.approx(
        source["metrics"][schema.VAL_LOSS], abs=1e-5
    )
    assert warm["metrics"][schema.TEST_LOSS] == pytest.approx(
        source["metrics"][schema.TEST_LOSS], abs=1e-5
    )
    # and a cold start of the same config does not
    cold = run(
        "train", *TINY, "--set", "train.epochs=1", "--set", "train.lr=1e-12", "--json", cwd=folder
    )
    cold_loss = json.loads(cold.stdout)["metrics"][schema.VAL_LOSS]
    assert abs(cold_loss - source["metrics"][schema.VAL_LOSS]) > 0.01  # 1000x the tolerance above
    client = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    assert client.get_run(warm["run_id"]).data.params["init.from_run_key"] == source["run_key"]


@pytest.mark.parametrize(
    "changes, needles",
    [
        (["--set", "model.arch=gru"], ["init.from_run_key", "model.arch egru there, gru here"]),
        (
            ["--set", "model.hidden_size=32"],
            ["init.from_run_key", "model.hidden_size 24 there, 32 here"],
        ),
    ],
)
@pytest.mark.slow
def test_a_warm_start_from_a_different_model_is_refused_before_anything_starts(
    source_run, changes, needles
):
    folder, source = source_run
    client = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    result = run(
        "train", *TINY, *changes, "--set", f"init.from_run_key={source['run_key']}", cwd=folder
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in " ".join(result.stderr.split()), result.stderr
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before


@pytest.mark.slow
def test_a_warm_start_from_an_unknown_or_unfinished_run_is_refused(source_run):
    folder, source = source_run
    result = run("train", *TINY, "--set", f"init.from_run_key={'f' * 64}", cwd=folder)
    assert result.returncode == 2 and "no FINISHED run" in " ".join(result.stderr.split())
    client = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    run_id = source["run_id"]
    client.update_run(run_id, status="KILLED")
    try:
        result = run("train", *TINY, "--set", f"init.from_run_key={source['run_key']}", cwd=folder)
    finally:
        client.update_run(run_id, status="FINISHED")
    text = " ".join(result.stderr.split())
    assert result.returncode == 2 and "KILLED" in text and "init.from_run_key" in text


def test_from_run_key_must_be_a_whole_key():
    with pytest.raises(ConfigError, match="init.from_run_key must be a whole run_key"):
        build_config({"init": {"from_run_key": "abc123"}})


def test_warm_start_in_train_checks_vocabulary(tmp_path, source_run):
    from duosparse.train import build_model, warm_start

    folder, source = source_run
    checkpoint = folder / "runs" / source["run_key"][:12] / "model.pt"
    payload = torch.load(checkpoint, weights_only=True)
    config = build_config({**BASE, "init": {"from_run_key": source["run_key"]}})
    with pytest.raises(ValueError, match="vocabulary"):
        warm_start(
            build_model(config, payload["vocab_size"] + 1),
            config,
            checkpoint,
            payload["vocab_size"] + 1,
        )


# --- ETA -----------------------------------------------------------------------------------


def test_epoch_work_counts_training_three_times_and_each_evaluation_once():
    config = build_config(
        {
            **BASE,
            "train": {
                **BASE["train"],
                "max_steps_per_epoch": None,
                "max_eval_batches": None,
                "bptt": 10,
                "batch_size": 4,
                "eval_batch_size": 2,
            },
        }
    )
    # train 401 tokens -> 100 per column, 99 targets each: 4 x 99 = 396; valid 101 -> 50 per
    # column: 2 x 49; test 61 -> 2 x 29
    work = epoch_work(config, (401, 101, 61))
    assert work == [3 * 396 + 98, 3 * 396 + 98 + 58]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_extrapolates_the_rate_of_work_done():
    configs = [build_config({**BASE, "train": {**BASE["train"], "seed": s}}) for s in range(4)]
    clock = FakeClock()
    eta = SweepEta(configs, lambda c: None, clock)
    assert eta.remaining() is None
    a, b, c, d = (x.run_key for x in configs)
    epoch, trial = eta.work[a][0], eta.work[a][0] * 2 + TRIAL_OVERHEAD
    assert eta.total == pytest.approx(4 * trial)
    clock.now = 10.0
    eta.epoch(a, 1)
    eta.epoch(a, 2)
    eta.trial_ended(a)  # one of four equal trials in 10 s: 30 s to go
    assert eta.remaining() == pytest.approx(30.0)
    eta.trial_ended(a)  # reported twice (an error after completion): counted once
    assert eta.done == pytest.approx(trial) and eta.trials_done == 1
    eta.epoch(b, 2)  # resumed at its last epoch: its first epoch is not this launch's work
    clock.now = 15.0
    assert eta.remaining() == pytest.approx((eta.total - eta.done) / (eta.done / 15.0))
    assert eta.total == pytest.approx(4 * trial - epoch)
    eta.trial_ended(c)  # failed before any epoch: only its start-up was work
    assert eta.total == pytest.approx(3 * trial - epoch + TRIAL_OVERHEAD)
    eta.trial_ended(d, started=False)  # skipped: nothing of it was work
    assert eta.total == pytest.approx(2 * trial - epoch + TRIAL_OVERHEAD)
    assert "3/4 trials done" in eta.summary() and "left" in eta.summary()
