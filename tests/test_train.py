"""One training run: learning on real PTB, divergence, repeatability, checkpoints, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from duosparse import data, schema, tracking
from duosparse.config import load_config
from duosparse.train import (
    TrainingDiverged,
    _read_losses,
    evaluate,
    load_checkpoint,
    load_model,
    train,
)

TINY = [
    "data.corpus=synthetic",
    "model.embedding_size=16",
    "model.hidden_size=24",
    "train.batch_size=8",
    "train.eval_batch_size=8",
    "train.max_steps_per_epoch=15",
    "train.max_eval_batches=5",
    "model.threshold=0.05",
]


class Recorder:
    def __init__(self, stop_after_epoch: int | None = None):
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[str] = []
        self.stop_after_epoch = stop_after_epoch

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))
        if self.stop_after_epoch is not None and step == self.stop_after_epoch:
            raise KeyboardInterrupt("simulated kill after the epoch's checkpoint")

    def log_missing(self, metrics, step):
        if all(logged != step for logged, m in self.metrics if m.keys() == metrics.keys()):
            self.log_metrics(metrics, step)

    def log_artifact(self, path):
        self.artifacts.append(path.name)


@pytest.fixture(scope="module")
def ptb_run(tmp_path_factory):
    import os

    if not os.environ.get("DUOSPARSE_DATA_DIR"):
        pytest.fail("DUOSPARSE_DATA_DIR must point at the shared data (make test sets it)")
    cfg = load_config(
        None,
        [
            "data.corpus=ptb",
            "model.arch=egru",
            "model.threshold=0.05",
            "model.num_layers=1",
            "model.embedding_size=200",
            "model.hidden_size=200",
            "train.batch_size=16",
            "train.lr=0.003",
            "train.epochs=1",
            "train.max_steps_per_epoch=300",
            "train.eval_batch_size=20",
            "train.max_eval_batches=40",
        ],
    )
    workdir = tmp_path_factory.mktemp("ptb")
    recorder = Recorder()
    final = train(cfg, recorder, workdir, progress=False)
    return cfg, workdir, recorder, final


@pytest.mark.slow
def test_a_few_hundred_steps_on_ptb_beat_the_unigram_model_by_far(ptb_run):
    cfg, _, _, final = ptb_run
    corpus = data.load_corpus("ptb")
    unigram = data.unigram_perplexity(corpus.train, corpus.valid, corpus.vocab_size)
    assert 600 < unigram < 800  # ~685 on PTB valid
    assert final[schema.VAL_PPL] < 0.6 * unigram
    assert final[schema.TEST_PPL] < 0.6 * unigram
    assert 0.2 < final[schema.SPARSITY_ACTIVITY] < 1.0  # the EGRU is sparse on real text


def test_every_schema_metric_is_reported_each_epoch_and_at_the_end(ptb_run):
    _, _, recorder, final = ptb_run
    epoch_metrics = recorder.metrics[0][1]
    for name in schema.RUN_METRICS:
        if name.startswith("test/"):
            assert name in final
        else:
            assert name in epoch_metrics or name in final, name
    assert schema.layer_activity(0) in epoch_metrics
    assert recorder.artifacts == [
        schema.ARTIFACT_CONFIG,
        schema.ARTIFACT_CHECKPOINT,
        schema.ARTIFACT_ACTIVITY,
    ]


def test_checkpoint_reloads_with_weights_only_and_evaluates_the_same(ptb_run):
    cfg, workdir, _, final = ptb_run
    model, loaded_cfg = load_model(workdir / schema.ARTIFACT_CHECKPOINT)
    assert loaded_cfg == cfg
    corpus = data.load_corpus("ptb")
    test = evaluate(
        model,
        data.batchify(corpus.test, cfg.train.eval_batch_size),
        cfg.train.bptt,
        cfg.train.max_eval_batches,
    )
    assert test.loss == pytest.approx(final[schema.TEST_LOSS], rel=1e-6)
    assert test.accounting[schema.OPS_EFFECTIVE] == pytest.approx(
        final[schema.OPS_EFFECTIVE], rel=1e-6
    )
    activity = json.loads((workdir / schema.ARTIFACT_ACTIVITY).read_text())
    assert len(activity["unit_event_rates"][0]) == 200
    rates = torch.tensor(activity["unit_event_rates"][0])
    assert 1 - float(rates.mean()) == pytest.approx(final[schema.layer_activity(0)], rel=1e-6)
    silent = float((rates == 0).double().mean())
    assert final[schema.layer_silent_units(0)] == pytest.approx(silent)
    assert final[schema.SPARSITY_SILENT_UNITS] == pytest.approx(silent)


def test_a_nan_loss_ends_the_run_with_the_reason(tmp_path):
    cfg = load_config(None, TINY + ["train.optimizer=sgd", "train.lr=1e36", "train.clip=0"])
    with pytest.raises(TrainingDiverged, match=r"train/loss became (nan|inf).*train.lr"):
        train(cfg, None, tmp_path, progress=False)


@pytest.mark.parametrize("arch", ["lstm", "gru", "egru"])
def test_same_seed_same_run_other_seed_other_run(tmp_path, arch):
    cfg = load_config(
        None, TINY + [f"model.arch={arch}", "model.dropout.hidden=0.2", "model.dropout.weight=0.2"]
    )
    a = train(cfg, None, tmp_path / "a", progress=False)
    b = train(cfg, None, tmp_path / "b", progress=False)
    c = train(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})}),
        None,
        tmp_path / "c",
        progress=False,
    )

    def no_timing(m):
        return {k: v for k, v in m.items() if not k.startswith("perf/")}

    assert no_timing(a) == no_timing(b)  # bit for bit
    assert a[schema.TEST_LOSS] != c[schema.TEST_LOSS]


def test_an_interrupted_run_resumes_from_its_last_epoch(tmp_path):
    cfg = load_config(None, TINY + ["train.epochs=3", "model.dropout.hidden=0.2"])
    whole = Recorder()
    expected = train(cfg, whole, tmp_path / "whole", progress=False)
    interrupted = Recorder(stop_after_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, interrupted, tmp_path / "resumed", progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    resumed = Recorder()
    resumed.metrics = list(interrupted.metrics)  # the store it reports to has epochs 1 and 2
    result = train(cfg, resumed, tmp_path / "resumed", progress=False)
    new = resumed.metrics[len(interrupted.metrics) :]
    assert [step for step, _ in new] == [3, 3]  # only epoch 3, then the final figures
    assert result[schema.TEST_LOSS] == pytest.approx(expected[schema.TEST_LOSS], rel=1e-9)
    assert new[0][1][schema.VAL_LOSS] == pytest.approx(
        whole.metrics[2][1][schema.VAL_LOSS], rel=1e-9
    )


class DiesBeforeLogging(tracking.MlflowReporter):
    """A kill that lands after epoch `at`'s checkpoint and before its metrics reach MLflow."""

    def __init__(self, client, run_id, at: int):
        super().__init__(client, run_id)
        self.at = at

    def log_metrics(self, metrics, step):
        if step == self.at:
            raise KeyboardInterrupt("simulated kill between the checkpoint and the log")
        super().log_metrics(metrics, step)


@pytest.mark.parametrize("killed", ["before the log", "after the log"])
def test_a_resumed_run_has_every_epoch_in_mlflow_exactly_once(tmp_path, killed):
    cfg = load_config(None, TINY + ["train.epochs=3"])
    client = tracking.open_store(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = tracking.ensure_experiment(client, "resume")
    run_id = client.create_run(experiment).info.run_id
    dying = (
        DiesBeforeLogging(client, run_id, at=2)
        if killed == "before the log"
        else DiesAfterLogging(client, run_id, at=2)
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, dying, tmp_path / "work", progress=False)
    assert load_checkpoint(tmp_path / "work" / "last.pt")["epoch"] == 2
    train(cfg, tracking.MlflowReporter(client, run_id), tmp_path / "work", progress=False)
    steps = [m.step for m in client.get_metric_history(run_id, schema.VAL_LOSS)]
    assert sorted(steps) == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, schema.TEST_PPL)] == [3]


class DiesAfterLogging(tracking.MlflowReporter):
    def __init__(self, client, run_id, at: int):
        super().__init__(client, run_id)
        self.at = at

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        if step == self.at:
            raise KeyboardInterrupt("simulated kill after the log")


def test_variable_bptt_and_cosine_schedule_train(tmp_path):
    cfg = load_config(
        None,
        TINY
        + [
            "train.variable_bptt=true",
            "train.lr_schedule=cosine",
            "train.optimizer=adamw",
            "train.weight_decay=0.01",
            "train.epochs=2",
        ],
    )
    result = train(cfg, None, tmp_path, progress=False)
    assert math.isfinite(result[schema.TEST_LOSS])


def _ntasgd(*extra: str):
    # lr high enough that validation stalls within a few epochs, so the trigger fires
    return load_config(
        None,
        TINY
        + [
            "model.arch=lstm",
            "train.optimizer=ntasgd",
            "train.nonmono=1",
            "train.lr=20",
            "train.epochs=6",
            *extra,
        ],
    )


def test_ntasgd_switches_to_averaging_when_validation_stalls_and_validates_the_average(tmp_path):
    cfg = _ntasgd()
    recorder = Recorder()
    train(cfg, recorder, tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    losses = ckpt["lr_state"]["val_losses"]
    # AWD-LSTM's trigger, written out: the first epoch whose loss is worse than the best
    # of all epochs before it but the last `nonmono` (1) switches to ASGD
    switch = next((i for i in range(2, len(losses)) if losses[i] > min(losses[: i - 1])), None)
    assert switch is not None, f"validation never stalled: {losses}"
    assert ckpt["averaging"] is True
    assert "ax" in next(iter(ckpt["optimizer"]["state"].values()))
    # what was validated after the switch is the running average, not the iterate
    model, _ = load_model(tmp_path / "model.pt")
    iterate = ckpt["model"]
    averaged = [s["ax"] for s in ckpt["optimizer"]["state"].values()]
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            averaged, [v for k, v in iterate.items() if k in dict(model.named_parameters())]
        )
    )


def test_ntasgd_resumes_exactly_across_the_switch(tmp_path):
    cfg = _ntasgd()
    expected = train(cfg, None, tmp_path / "whole", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, Recorder(stop_after_epoch=5), tmp_path / "resumed", progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["averaging"] is True
    result = train(cfg, None, tmp_path / "resumed", progress=False)
    assert result[schema.TEST_LOSS] == pytest.approx(expected[schema.TEST_LOSS], rel=1e-9)


def test_awd_activation_regularisers_are_the_published_formulas():
    from duosparse.model import Trace
    from duosparse.train import _activation_penalty

    torch.manual_seed(0)
    raw = torch.randn(7, 3, 5)
    dropped = raw * (torch.rand(1, 3, 5) > 0.3) / 0.7
    trace = Trace(outputs=[torch.randn(7, 3, 5), raw], decoder_input=dropped)
    cfg = load_config(
        None, ["model.activation_regularizer.ar=2", "model.activation_regularizer.tar=1"]
    )
    ar = sum(float(v) ** 2 for v in dropped.flatten()) / dropped.numel()
    tar = sum(float(v) ** 2 for v in (raw[1:] - raw[:-1]).flatten()) / (6 * 3 * 5)
    assert _activation_penalty(cfg, trace).item() == pytest.approx(2 * ar + tar, rel=1e-5)
    assert _activation_penalty(load_config(None, []), trace) is None


def test_the_loss_is_read_once_per_window_and_names_the_first_step_that_was_not_finite():
    cfg = load_config(None, [])
    window = [torch.tensor(4.0), torch.tensor(3.5)]
    assert _read_losses(window, cfg, epoch=1, step=1) == 3.5  # the window's last loss
    # steps 8, 9 and 10 (1-based) end at step index 9: the nan is step 9's
    window = [torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(float("inf"))]
    with pytest.raises(
        TrainingDiverged, match=r"train/loss became nan at epoch 2, step 9; lower train.lr"
    ):
        _read_losses(window, cfg, epoch=2, step=9)
