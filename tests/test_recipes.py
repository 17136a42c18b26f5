"""EvNN-recipe features: Beta thresholds, initialisations, activity regulariser, per-layer
clipping, lr schedules, capped-epoch budgets, test batch size, silent starts, validation,
sweep recipes and the CLI's silent-start guard."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from duosparse import data, schema
from duosparse.config import ConfigError, ModelConfig, build_config, load_config
from duosparse.model import GATES, LanguageModel, RecurrentLayer, initial_thresholds
from duosparse.sweep import SpecError, expand, load_spec
from duosparse.train import (
    LrState,
    SilentStart,
    SilentStartWarning,
    _activity_penalty,
    build_model,
    clip_gradients,
    evaluate,
    load_checkpoint,
    load_model,
    lr_at,
    make_optimizer,
    probe_silent_start,
    seed_everything,
    train,
)
from test_train import Recorder  # the reporter that records, and can simulate a kill

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "data.corpus=synthetic",
    "model.embedding_size=16",
    "model.hidden_size=24",
    "train.batch_size=8",
    "train.eval_batch_size=8",
    "train.max_steps_per_epoch=15",
    "train.max_eval_batches=5",
    "model.threshold=0.05",
    "train.epochs=1",
    "train.device=cpu",
]
SILENT = TINY + ["model.threshold=5.0", "train.max_steps_per_epoch=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: on a loaded machine, intra-op threads spin far longer than they
    # compute (a 2-epoch toy run takes ~13 s with 2 threads, ~0.2 s with 1).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def no_timing(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def thresholds(model):
    return [layer.threshold.detach().clone() for layer in model.layers]


# --- 1. EGRU thresholds -------------------------------------------------------------------


def test_beta_thresholds_have_the_configured_mean_and_differ_per_unit():
    torch.manual_seed(0)
    draws = initial_thresholds(ModelConfig(threshold=0.01, threshold_init="beta"), 20000)
    assert draws.shape == (20000,)
    assert draws.mean().item() == pytest.approx(0.01, rel=0.12)  # sd of the mean: 3.5%
    # many draws of Beta(0.03, 3) underflow to the smallest float32: ties, so not > 19000
    assert draws.unique().numel() > 10000 and draws.std().item() > 0.01
    assert (draws >= 0).all() and (draws <= 1).all()
    # a = beta * m / (1 - m) fixes the mean AND the spread: var = m (1 - m) / (beta / (1 - m) + 1).
    # At m = 0.5 a wrong alpha shows (a = beta * m would give mean 1/3).
    for beta in (3.0, 30.0):
        torch.manual_seed(1)
        draws = initial_thresholds(
            ModelConfig(threshold=0.5, threshold_init="beta", threshold_beta=beta), 20000
        )
        assert draws.mean().item() == pytest.approx(0.5, abs=0.01)
        assert draws.var().item() == pytest.approx(0.25 / (beta / 0.5 + 1), rel=0.05)
    constant = initial_thresholds(ModelConfig(threshold=0.07), 500)
    assert torch.equal(constant, torch.full((500,), 0.07))


def test_threshold_max_clamps_thresholds():
    cfg = load_config(
        None,
        [
            "model.threshold=0.3",
            "model.threshold_max=0.5",
            "model.num_layers=2",
            "model.hidden_size=3",
            "model.embedding_size=3",
        ],
    ).model
    model = LanguageModel(cfg, 10)
    for layer in model.layers:
        layer.threshold.data = torch.tensor([-1.0, 0.2, 0.9])
    model.clamp_thresholds()
    for layer in model.layers:
        assert torch.equal(layer.threshold.data, torch.tensor([0.0, 0.2, 0.5]))
    unbounded = LanguageModel(cfg.model_copy(update={"threshold_max": None}), 10)
    unbounded.layers[0].threshold.data = torch.tensor([-1.0, 0.2, 0.9])
    unbounded.clamp_thresholds()
    assert torch.equal(unbounded.layers[0].threshold.data, torch.tensor([0.0, 0.2, 0.9]))


def test_thresholds_have_their_own_undecayed_optimizer_group():
    cfg = load_config(
        None, ["train.weight_decay=0.1", "train.optimizer=adamw", "train.threshold_lr_factor=0.5"]
    )
    model = build_model(cfg, 20)
    weights, thetas = make_optimizer(cfg, model).param_groups
    theta_ids = {id(layer.threshold) for layer in model.layers}
    assert {id(p) for p in thetas["params"]} == theta_ids
    assert thetas["weight_decay"] == 0.0 and thetas["lr_factor"] == 0.5
    assert weights["weight_decay"] == 0.1 and weights["lr_factor"] == 1.0
    assert not theta_ids & {id(p) for p in weights["params"]}
    assert len(weights["params"]) + len(thetas["params"]) == len(list(model.parameters()))
    lstm = load_config(None, ["model.arch=lstm", "train.weight_decay=0.1"])
    assert len(make_optimizer(lstm, build_model(lstm, 20)).param_groups) == 1


@pytest.mark.parametrize("factor", [0.0, 1.0])
def test_threshold_lr_factor_zero_freezes_thresholds_and_one_trains_them(tmp_path, factor):
    cfg = load_config(
        None,
        TINY
        + [
            "model.threshold_init=beta",
            "train.optimizer=adamw",
            "train.weight_decay=0.1",
            "train.max_steps_per_epoch=5",
            f"train.threshold_lr_factor={factor}",
        ],
    )
    train(cfg, None, tmp_path, progress=False)
    seed_everything(cfg.train.seed)  # as train(): seed, (synthetic corpus: own RNG), build
    initial = build_model(cfg, data.load_corpus("synthetic", seed=cfg.train.seed).vocab_size)
    assert initial.layers[0].threshold.unique().numel() > 1  # the Beta draw, not a constant
    trained, _ = load_model(tmp_path / schema.ARTIFACT_CHECKPOINT)
    assert not torch.equal(trained.layers[0].weight_ih, initial.layers[0].weight_ih)  # it trained
    same = [torch.equal(a, b) for a, b in zip(thresholds(trained), thresholds(initial))]
    if factor == 0:
        assert all(same)
    else:
        assert not any(same)


# --- 2. initialisation ---------------------------------------------------------------------


def test_xavier_normal_std_is_over_the_stacked_gates():
    torch.manual_seed(0)
    cfg = ModelConfig(weight_init="xavier_normal", bias_init="zeros")
    layer = RecurrentLayer("egru", 256, 512, cfg)
    for weight, fan_in in ((layer.weight_ih, 256), (layer.weight_hh, 512)):
        expected = math.sqrt(2.0 / (fan_in + 3 * 512))  # fan_out = G * H, not H
        assert weight.std().item() == pytest.approx(expected, rel=0.05)
        assert abs(weight.mean().item()) < 0.05 * expected
    assert not layer.bias_ih.any() and not layer.bias_hh.any()


@pytest.mark.parametrize("arch", ["gru", "egru", "lstm"])
def test_orthogonal_gives_an_orthogonal_block_per_gate(arch):
    torch.manual_seed(0)
    layer = RecurrentLayer(arch, 48, 64, ModelConfig(arch=arch, weight_init="orthogonal"))
    blocks = layer.weight_hh.detach().chunk(GATES[arch])
    assert len(blocks) == GATES[arch]
    for block in blocks:
        assert block.shape == (64, 64)
        torch.testing.assert_close(block @ block.T, torch.eye(64), atol=1e-5, rtol=0)
    assert not torch.equal(blocks[0], blocks[1])
    expected = math.sqrt(2.0 / (48 + GATES[arch] * 64))  # input weights stay xavier_normal
    assert layer.weight_ih.std().item() == pytest.approx(expected, rel=0.1)


def test_bias_zeros_and_uniform_default():
    torch.manual_seed(0)
    zeros = load_config(None, ["model.bias_init=zeros", "model.tie_weights=false"]).model
    model = LanguageModel(zeros, 50)
    for layer in model.layers:
        assert not layer.bias_ih.any() and not layer.bias_hh.any()
        assert layer.weight_ih.any()
    assert not model.decoder.bias.any()
    default = LanguageModel(load_config(None, ["model.tie_weights=false"]).model, 50)
    assert default.decoder.bias.abs().min() > 0
    for layer in default.layers:
        bound = 1 / math.sqrt(layer.hidden_size)
        for p in (layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh):
            assert p.abs().max().item() <= bound
        assert layer.weight_hh.abs().max().item() > 0.95 * bound  # uniform over the whole range


def _hand_transcribed_default_init(arch, vocab, emb, hidden, num_layers):
    """What the model drew before weight_init/bias_init existed: nn.Embedding (normal), then each
    layer uniform(+-1/sqrt(H)) for weight_ih, weight_hh, bias_ih, bias_hh (EGRU thresholds are
    constants: no draw), then nn.Linear (kaiming uniform weight, uniform bias), then the
    embedding re-drawn uniform(+-0.1). Tied: the last layer is emb wide."""
    torch.manual_seed(0)
    torch.empty(vocab, emb).normal_()
    sizes = [hidden] * (num_layers - 1) + [emb]
    inputs = [emb] + sizes[:-1]
    layers = []
    for i, h in zip(inputs, sizes):
        g, bound = GATES[arch], 1 / math.sqrt(h)
        layers.append(
            [
                torch.empty(*shape).uniform_(-bound, bound)
                for shape in ((g * h, i), (g * h, h), (g * h,), (g * h,))
            ]
        )
    decoder_weight = torch.empty(vocab, sizes[-1])
    torch.nn.init.kaiming_uniform_(decoder_weight, a=math.sqrt(5))
    decoder_bias = torch.empty(vocab).uniform_(-1 / math.sqrt(sizes[-1]), 1 / math.sqrt(sizes[-1]))
    encoder = torch.empty(vocab, emb).uniform_(-0.1, 0.1)
    return layers, decoder_bias, encoder


@pytest.mark.parametrize("arch", ["egru", "lstm"])
def test_default_init_is_bit_identical_to_before(arch):
    cfg = load_config(
        None,
        [
            f"model.arch={arch}",
            "model.embedding_size=12",
            "model.hidden_size=20",
            "model.num_layers=3",
            "model.threshold=0.05",
        ],
    ).model
    torch.manual_seed(0)
    model = LanguageModel(cfg, 30)
    layers, decoder_bias, encoder = _hand_transcribed_default_init(arch, 30, 12, 20, 3)
    for layer, expected in zip(model.layers, layers):
        for p, e in zip((layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh), expected):
            assert torch.equal(p.detach(), e)
    assert torch.equal(model.decoder.bias.detach(), decoder_bias)
    assert torch.equal(model.encoder.weight.detach(), encoder)


# --- 3. activity regulariser ---------------------------------------------------------------


def test_activity_penalty_linear_and_squared():
    events = [torch.tensor([[1.0, 0.0, 0.0, 1.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])]
    rate = 5 / 8  # unit-weighted: all 8 event slots together
    linear = load_config(
        None, ["model.activity_regularizer.kind=linear", "model.activity_regularizer.weight=2.0"]
    )
    assert _activity_penalty(linear, events).item() == pytest.approx(2.0 * rate)
    squared = load_config(
        None, ["model.activity_regularizer.weight=3.0", "model.activity_regularizer.target=0.1"]
    )
    assert _activity_penalty(squared, events).item() == pytest.approx(3.0 * (rate - 0.1) ** 2)
    assert _activity_penalty(load_config(None, []), events) is None  # weight 0: off


# --- 4. per-layer clipping -----------------------------------------------------------------


def _grads(model, layer0_scale):
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        scale = (
            layer0_scale
            if name.startswith("layers.0.")
            else (1e-5 if name.startswith("layers.") else 1.0)
        )
        p.grad = torch.randn(p.shape, generator=g) * scale
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _norm(grads):
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()


def test_layer_clip_bounds_each_egru_layer_then_the_global_clip_applies():
    common = ["model.embedding_size=8", "model.hidden_size=12", "model.tie_weights=false"]
    model = build_model(load_config(None, common), 40)
    before = _grads(model, 1.0)
    clip_gradients(load_config(None, common + ["train.layer_clip=0.1", "train.clip=0"]), model)
    after = {n: p.grad for n, p in model.named_parameters()}
    assert _norm(before[n] for n in before if n.startswith("layers.0.")) > 1  # was above the clip
    assert _norm(after[n] for n in after if n.startswith("layers.0.")) == pytest.approx(
        0.1, rel=1e-4
    )
    for name in before:
        if not name.startswith("layers.0."):  # layer 1 (below the clip), embedding, decoder
            assert torch.equal(after[name], before[name]), name

    before = _grads(model, 1.0)
    clip_gradients(load_config(None, common + ["train.layer_clip=0.1", "train.clip=0.05"]), model)
    layer0 = _norm(before[n] for n in before if n.startswith("layers.0."))
    expected = {
        n: g * (0.1 / layer0 if n.startswith("layers.0.") else 1.0) for n, g in before.items()
    }
    total = _norm(expected.values())
    assert total > 0.05
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name] * (0.05 / total), rtol=1e-4, atol=1e-9)
    assert _norm(p.grad for p in model.parameters()) == pytest.approx(0.05, rel=1e-4)


def test_layer_clip_leaves_lstm_layers_alone():
    cfg = load_config(
        None,
        [
            "model.arch=lstm",
            "model.embedding_size=8",
            "model.hidden_size=12",
            "model.tie_weights=false",
            "train.layer_clip=0.1",
            "train.clip=0",
        ],
    )
    model = build_model(cfg, 40)
    before = _grads(model, 1.0)
    clip_gradients(cfg, model)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name]), name


# --- 5. schedules --------------------------------------------------------------------------


def test_linear_warmup():
    cfg = load_config(None, ["train.epochs=3", "train.warmup_epochs=0.5", "train.lr=0.01"])
    lrs = [lr_at(cfg, s, 10, LrState()) for s in range(12)]
    assert lrs[:5] == pytest.approx([0.01 * (s + 1) / 5 for s in range(5)])
    assert lrs[5:] == pytest.approx([0.01] * 7)


def test_fractional_warmup_never_exceeds_the_base_lr():
    cfg = load_config(None, ["train.epochs=3", "train.warmup_epochs=0.25", "train.lr=1.0"])
    lrs = [lr_at(cfg, s, 10, LrState()) for s in range(6)]  # warmup of 2.5 steps
    assert lrs[:2] == pytest.approx([1 / 2.5, 2 / 2.5])
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[2:] == pytest.approx([1.0] * 4)


def test_cosine_is_held_then_half_a_cosine_to_zero():
    cfg = load_config(
        None,
        ["train.epochs=4", "train.lr_schedule=cosine", "train.decay_start_epoch=3", "train.lr=0.5"],
    )
    per_epoch, start, total = 10, 20, 40

    def expected(step):
        if step < start:
            return 0.5
        return 0.5 * 0.5 * (1 + math.cos(math.pi * (step - start) / (total - start)))

    for step in (0, 10, 19, 20, 21, 25, 30, 35, 39):
        assert lr_at(cfg, step, per_epoch, LrState()) == pytest.approx(expected(step), rel=1e-12), (
            step
        )
    assert lr_at(cfg, 19, per_epoch, LrState()) == 0.5
    assert lr_at(cfg, 30, per_epoch, LrState()) == pytest.approx(0.25)
    assert lr_at(cfg, 39, per_epoch, LrState()) < 0.01 * 0.5
    lrs = [lr_at(cfg, s, per_epoch, LrState()) for s in range(40)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_step_schedule_decays_after_each_listed_epoch():
    cfg = load_config(
        None,
        [
            "train.epochs=5",
            "train.lr_schedule=step",
            "train.step_epochs=[2, 4]",
            "train.lr_decay_factor=0.5",
            "train.lr=0.8",
        ],
    )
    state, lrs = LrState(), []
    for epoch in range(1, 5):
        state.end_of_epoch(cfg, epoch, val_loss=10.0 - epoch)
        lrs.append(lr_at(cfg, epoch * 10, 10, state))
    assert lrs == pytest.approx([0.8, 0.4, 0.4, 0.2])


def test_plateau_divides_after_patience_plus_one_bad_epochs_only():
    cfg = load_config(
        None,
        [
            "train.epochs=10",
            "train.lr_schedule=plateau",
            "train.plateau_patience=1",
            "train.lr_decay_factor=0.25",
            "train.lr=1.0",
        ],
    )
    state, scales = LrState(), []
    for epoch, val in enumerate([3.0, 2.0, 2.5, 2.4, 1.0, 1.5, 1.0], start=1):
        state.end_of_epoch(cfg, epoch, val)
        scales.append(lr_at(cfg, 0, 10, state))
    assert scales == pytest.approx(
        [1, 1, 1, 0.25, 0.25, 0.25, 0.0625]
    )  # an equal loss is no new best
    eager = load_config(
        None, ["train.epochs=10", "train.lr_schedule=plateau", "train.lr_decay_factor=0.5"]
    )
    state = LrState()
    for epoch, val in enumerate([3.0, 3.5, 2.0, 2.0], start=1):
        state.end_of_epoch(eager, epoch, val)
    assert state.scale == 0.25


def test_a_plateau_run_resumed_after_a_kill_ends_exactly_as_an_uninterrupted_one(tmp_path):
    # SGD at lr 50 makes epoch 2 worse (val 4.09 -> 4.13; at lr 100 the divergence rule would
    # end the run), so the plateau has divided the lr when the run is killed: the resumed run
    # needs lr_state, the data position and the rng.
    cfg = load_config(
        None,
        TINY
        + [
            "train.epochs=3",
            "train.optimizer=sgd",
            "train.lr=50",
            "train.max_steps_per_epoch=4",
            "train.max_eval_batches=3",
            "train.lr_schedule=plateau",
            "train.variable_bptt=true",
            "model.dropout.hidden=0.2",
        ],
    )
    whole = Recorder()
    expected = train(cfg, whole, tmp_path / "whole", progress=False)
    interrupted = Recorder(stop_after_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, interrupted, tmp_path / "resumed", progress=False)
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert ckpt["epoch"] == 2
    assert ckpt["lr_state"]["scale"] == 0.25
    assert ckpt["position"] > 4 * 5  # mid-stream: epoch 3 must not start at row 0
    resumed = Recorder()
    resumed.metrics = list(interrupted.metrics)  # the store it reports to has epochs 1 and 2
    result = train(cfg, resumed, tmp_path / "resumed", progress=False)
    new = resumed.metrics[len(interrupted.metrics) :]
    assert [step for step, _ in new] == [3, 3]
    assert no_timing(result) == no_timing(expected)
    assert no_timing(new[0][1]) == no_timing(whole.metrics[2][1])


# --- 6. budgets: capped epochs continue where the last stopped ------------------------------


@pytest.mark.parametrize("variable", [False, True])
def test_capped_epochs_walk_the_whole_stream_before_repeating(variable):
    rows, cols = 101, 3
    source = data.batchify(torch.arange(rows * cols), cols)  # column 0 holds row numbers
    generator = torch.Generator().manual_seed(0)
    position, seen, wraps = 0, [], []
    for _ in range(8):  # 8 capped epochs of 3 chunks: more than one pass
        for inputs, targets, next_position in data.epoch_batches(
            source, 7, 3, position, variable, generator
        ):
            assert torch.equal(
                targets, source[inputs[0, 0] + 1 : inputs[0, 0] + 1 + inputs.size(0)]
            )
            seen += inputs[:, 0].tolist()
            wraps.append(next_position == 0)
        position = next_position  # the next capped epoch starts where this one stopped
    assert len(seen) > rows - 1 and wraps.count(True) >= 1  # more than one pass was walked
    # rows 0..99 in order (the last row is only ever a target), then from row 0 again
    assert seen == [i % (rows - 1) for i in range(len(seen))]


def test_fixed_bptt_capped_epochs_hand_over_their_position():
    source = data.batchify(torch.arange(101 * 2), 2)
    got = [
        [(x[0, 0].item(), len(x), nxt) for x, _, nxt in data.epoch_batches(source, 7, 4, start)]
        for start in (0, 28, 56, 84)
    ]
    assert got[0] == [(0, 7, 7), (7, 7, 14), (14, 7, 21), (21, 7, 28)]
    assert got[3] == [(84, 7, 91), (91, 7, 98), (98, 2, 0), (0, 7, 7)]  # short last chunk, wrap


def test_train_checkpoints_the_capped_epoch_position(tmp_path):
    # batch 200: 200 rows, 5 full chunks of 35 per pass (and a short one); capped at 4.
    cfg = load_config(
        None,
        TINY
        + [
            "train.batch_size=200",
            "train.bptt=35",
            "train.max_steps_per_epoch=4",
            "train.epochs=2",
            "model.embedding_size=8",
            "model.hidden_size=8",
        ],
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, Recorder(stop_after_epoch=1), tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "last.pt")["position"] == (4 * 35) % 199
    train(cfg, None, tmp_path, progress=False)
    # epoch 2: 140 -> 175 -> 199 (a 24-row chunk, the stream's end: back to 0) -> 35 -> 70
    assert load_checkpoint(tmp_path / "last.pt")["position"] == 70


def test_uncapped_epochs_start_at_row_zero(tmp_path, monkeypatch):
    starts, original = [], data.bptt_batches

    def recording(source, bptt, variable=False, generator=None, max_batches=None, start=0):
        if source.size(1) == 2000:  # the training stream (evaluation runs at batch 8)
            starts.append(start)
            first = next(iter(original(source, bptt, variable, generator, max_batches, start)))[0]
            starts.append(
                first[0, 0].item() == source[0, 0].item()
                and torch.equal(first, source[: len(first)])
            )
        return original(source, bptt, variable, generator, max_batches, start)

    monkeypatch.setattr(data, "bptt_batches", recording)
    cfg = load_config(
        None,
        TINY
        + [
            "train.batch_size=2000",
            "train.bptt=5",
            "train.max_steps_per_epoch=null",
            "train.epochs=2",
            "model.embedding_size=8",
            "model.hidden_size=8",
        ],
    )
    train(cfg, None, tmp_path, progress=False)
    assert starts == [0, True, 0, True]  # one pass per epoch, each from the first row
    assert load_checkpoint(tmp_path / "last.pt")["position"] == 0


# --- 7. test batch size ---------------------------------------------------------------------


def test_test_batch_size_one_evaluates_the_best_model_at_batch_one(tmp_path):
    cfg = load_config(
        None,
        TINY
        + [
            "train.test_batch_size=1",
            "train.eval_batch_size=10",
            "train.max_eval_batches=20",
            "train.max_steps_per_epoch=10",
        ],
    )
    final = train(cfg, None, tmp_path, progress=False)
    model, loaded = load_model(tmp_path / schema.ARTIFACT_CHECKPOINT)
    corpus = data.load_corpus("synthetic", seed=cfg.train.seed)
    at_one = evaluate(
        model, data.batchify(corpus.test, 1), cfg.train.bptt, cfg.train.max_eval_batches
    )
    at_ten = evaluate(
        model, data.batchify(corpus.test, 10), cfg.train.bptt, cfg.train.max_eval_batches
    )
    assert final[schema.TEST_LOSS] == pytest.approx(at_one.loss, rel=1e-9)
    assert final[schema.TEST_PPL] == pytest.approx(at_one.ppl, rel=1e-9)
    assert at_ten.ppl != pytest.approx(at_one.ppl, rel=1e-4)


# --- 8. silent start -------------------------------------------------------------------------


@pytest.mark.slow
def test_evnn_recipe_is_alive_on_ptb_and_the_old_configuration_is_not(data_dir):
    corpus = data.load_corpus("ptb", data_dir)
    cfg = load_config(ROOT / "configs/recipes/evnn_ptb.yaml")
    assert probe_silent_start(cfg, corpus) is None

    seed_everything(cfg.train.seed)  # the model train(cfg) would build
    model = build_model(cfg, corpus.vocab_size).eval()
    # A few columns of the first chunk: events there are events in the chunk (columns are
    # independent in eval mode), at a fraction of the cost.
    tokens = data.batchify(corpus.train, cfg.train.batch_size)[: cfg.train.bptt, :4]
    with torch.no_grad():
        logits, _, trace = model(tokens, model.initial_state(4))
        assert len(trace.events) == 3 and all(events.any() for events in trace.events)
        changed = tokens.clone()
        changed[:-1] = (changed[:-1] + 1) % corpus.vocab_size  # all but the last input token
        other, _, _ = model(changed, model.initial_state(4))
    assert not torch.allclose(logits[-1], other[-1])  # the history reaches the output

    old = load_config(
        None,
        [
            "data.corpus=ptb",
            "model.arch=egru",
            "model.embedding_size=750",
            "model.hidden_size=1350",
            "model.num_layers=3",
            "model.tie_weights=true",
            "model.weight_init=uniform",
            "model.threshold_init=constant",
            "model.threshold=0.05",
            "train.batch_size=64",
            "train.bptt=70",
        ],
    )
    message = probe_silent_start(old, corpus)
    assert message is not None and "layer 2 is silent" in message and "layer 1 " not in message
    assert "model.threshold" in message


def test_probe_on_tiny_models():
    corpus = data.load_corpus("synthetic", seed=0)
    assert probe_silent_start(load_config(None, TINY), corpus) is None
    assert "layer 1 is silent" in probe_silent_start(load_config(None, SILENT), corpus)
    assert probe_silent_start(load_config(None, SILENT + ["model.arch=lstm"]), corpus) is None


def test_a_silent_start_warns_or_refuses_before_any_step(tmp_path):
    with pytest.warns(SilentStartWarning, match="layer 1 is silent"):
        train(load_config(None, SILENT), None, tmp_path / "warn", progress=False)
    assert (tmp_path / "warn" / "last.pt").exists()
    cfg = load_config(None, SILENT + ["train.on_silent_start=error"])
    with pytest.raises(SilentStart, match="on_silent_start"):
        train(cfg, None, tmp_path / "error", progress=False)
    assert not (tmp_path / "error" / "last.pt").exists()
    assert not (tmp_path / "error" / schema.ARTIFACT_CHECKPOINT).exists()


# --- 9. validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tree, field",
    [
        ({"model": {"threshold_init": "beta", "threshold": 0.0}}, "model.threshold"),
        ({"model": {"threshold_init": "beta", "threshold": 1.0}}, "model.threshold"),
        ({"model": {"threshold_init": "beta", "threshold": 1.5}}, "model.threshold"),
        ({"model": {"threshold": 0.5, "threshold_max": 0.4}}, "model.threshold_max"),
        ({"model": {"hidden_size": True}}, "model.hidden_size"),
        ({"train": {"epochs": 3, "warmup_epochs": 3}}, "train.warmup_epochs"),
        ({"train": {"epochs": 3, "warmup_epochs": 4.5}}, "train.warmup_epochs"),
        ({"train": {"lr_decay_factor": 0}}, "train.lr_decay_factor"),
        ({"train": {"lr_decay_factor": 1.5}}, "train.lr_decay_factor"),
        ({"train": {"lr_schedule": "step", "step_epochs": []}}, "train.step_epochs"),
        (
            {"train": {"lr_schedule": "step", "epochs": 4, "step_epochs": [2, 4]}},
            "train.step_epochs",
        ),
        ({"train": {"betas": [1.0, 0.999]}}, "train.betas"),
        ({"train": {"betas": [0.9, -0.1]}}, "train.betas"),
        ({"train": {"lr": yaml.safe_load(".inf")}}, "train.lr"),
    ],
)
def test_invalid_recipe_values_are_refused_naming_the_field(tree, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        build_config(tree)


def test_valid_edge_values_are_accepted():
    assert build_config({"train": {"betas": [0.0, 0.999]}}).train.betas == (0.0, 0.999)
    assert build_config({"train": {"epochs": 3, "warmup_epochs": 2.5}}).train.warmup_epochs == 2.5
    assert (
        build_config({"model": {"threshold_init": "beta", "threshold": 0.01}}).model.threshold
        == 0.01
    )
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=.inf"])


# --- 10. sweep specs with a recipe -------------------------------------------------------------


def test_a_recipe_is_merged_under_base_relative_to_the_spec(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "specs").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"corpus": "synthetic"},
                "model": {
                    "arch": "egru",
                    "hidden_size": 64,
                    "threshold": 0.2,
                    "weight_init": "xavier_normal",
                },
                "train": {"lr": 0.0012, "epochs": 5},
            }
        )
    )
    spec_path = tmp_path / "specs" / "s.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "recipe": "../recipes/r.yaml",
                "base": {"model": {"hidden_size": 32}, "train": {"epochs": 2}},
                "grid": {"prune.target_sparsity": [0.0]},
            }
        )
    )
    elsewhere = tmp_path / "a" / "b"  # ../recipes/r.yaml does not exist from here
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    (trial,) = expand(load_spec(spec_path))
    assert trial.model.hidden_size == 32 and trial.train.epochs == 2  # base wins
    assert trial.model.threshold == 0.2 and trial.model.weight_init == "xavier_normal"  # deep merge
    assert trial.train.lr == 0.0012 and trial.data.corpus == "synthetic"


def test_a_missing_or_invalid_recipe_is_refused_naming_it(tmp_path):
    spec = {"name": "r", "grid": {"prune.target_sparsity": [0.0]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**spec, "recipe": "nowhere.yaml"}))
    with pytest.raises(SpecError, match="nowhere.yaml"):
        load_spec(path)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": {"hiden_size": 3}}))
    path.write_text(yaml.safe_dump({**spec, "recipe": "bad.yaml"}))
    with pytest.raises(SpecError, match=r"bad\.yaml.*model\.hiden_size"):
        load_spec(path)


def test_ptb_paper_sweep_carries_the_evnn_recipe():
    trials = expand(load_spec(ROOT / "sweeps" / "ptb_paper.yaml"))
    assert len(trials) == 90
    by_arch = {
        arch: [t for t in trials if t.model.arch == arch] for arch in ("lstm", "gru", "egru")
    }
    assert [len(v) for v in by_arch.values()] == [18, 18, 54]
    for t in by_arch["egru"]:
        assert t.model.threshold_init == "beta" and t.model.weight_init == "xavier_normal"
        assert t.train.lr == 0.0012 and t.train.betas == (0.0, 0.999)
        assert t.train.layer_clip == 0.1 and t.train.test_batch_size == 1
        assert t.prune.schedule == "gradual"
    assert {t.model.threshold for t in by_arch["egru"]} == {0.01, 0.05, 0.1}
    for t in by_arch["lstm"] + by_arch["gru"]:
        assert t.model.weight_init == "uniform" and t.model.bias_init == "uniform"
        assert t.train.lr == 0.0012


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "recipes").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_recipe_loads_and_documents_its_source(path):
    load_config(path)
    comments = "\n".join(
        line for line in path.read_text().splitlines() if line.lstrip().startswith("#")
    )
    assert re.search(r"python \S+\.py --", comments), "names no published command"
    claim = re.search(r"(Published|Should reach)[^\n]*", comments)
    assert claim, "says neither what was published nor what it should reach"
    stated = re.search(
        r"(Published|Should reach)[^\n]*?(\d+(\.\d+)?|unknown|not reproducible)",
        comments,
        re.IGNORECASE,
    )
    assert stated and (
        stated.group(2)[0].isdigit() or stated.group(2).lower() in ("unknown", "not reproducible")
    )


def test_recipe_directory_is_not_empty():
    assert len(list((ROOT / "configs" / "recipes").glob("*.yaml"))) >= 3


# --- 11. the CLI refuses silent sweeps before Ray --------------------------------------------


def test_sweep_run_warns_of_silent_trials_and_refuses_them_before_ray(tmp_path, monkeypatch):
    from duosparse import sweep_runner
    from duosparse.cli import app
    from typer.testing import CliRunner

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(sweep_runner, "run_sweep", no_ray)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "silent",
                "base": {
                    "data": {"corpus": "synthetic"},
                    "model": {
                        "embedding_size": 8,
                        "hidden_size": 8,
                        "num_layers": 1,
                        "threshold": 5.0,
                    },
                    "train": {"epochs": 1, "max_steps_per_epoch": 2},
                },
                "grid": {"model.arch": ["gru", "egru"]},
            }
        )
    )
    runner = CliRunner()
    dry = runner.invoke(app, ["sweep", "run", "s.yaml", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "silent" in dry.stderr and "1 EGRU trial" in dry.stderr
    real = runner.invoke(app, ["sweep", "run", "s.yaml"])
    assert real.exit_code != 0
    assert "allow-silent-start" in real.stderr and "Traceback" not in real.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("arch", ["lstm", "gru", "egru"])
def test_carry_gate_bias_shifts_only_the_gate_that_keeps_the_state(arch):
    def layer(bias: float) -> RecurrentLayer:
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, hidden_size=8, embedding_size=8, carry_gate_bias=bias)
        return RecurrentLayer(arch, 8, 8, cfg)

    plain, shifted = layer(0.0), layer(1.0)
    delta = (shifted.bias_ih - plain.bias_ih).detach().view(GATES[arch], 8)
    expected = torch.zeros_like(delta)
    expected[1] = 1.0  # LSTM forget gate, GRU z, EGRU u: the second block in each layout
    assert torch.allclose(delta, expected, atol=1e-6)
    assert torch.equal(shifted.bias_hh, plain.bias_hh) and torch.equal(
        shifted.weight_hh, plain.weight_hh
    )
    if arch == "lstm":
        return  # torch.lstm's gate order is (i, f, g, o); c = f c + i g moves even when f = 1
    # and it is the carry gate: with a large bias the state barely moves in one step
    x, state = torch.randn(1, 2, 8), plain.initial_state(2)
    state = tuple(torch.full_like(t, 0.5) for t in state)
    far = layer(20.0)
    _, (h, *rest), _ = far(x, state)
    kept = h
    if arch == "egru":  # c' = c - o * theta, and c ~ c_prev when u ~ 1
        kept = rest[0] + (h != 0) * far.threshold
    assert torch.allclose(kept, torch.full_like(kept, 0.5), atol=1e-3)


def test_unigram_decoder_bias_starts_the_model_at_the_unigram_models_perplexity():
    corpus = data.load_corpus("synthetic", seed=0)
    cfg = load_config(None, TINY + ["model.unigram_decoder_bias=true"]).model
    model = LanguageModel(cfg, corpus.vocab_size)
    model.start_at_unigram(data.unigram_log_probs(corpus.train, corpus.vocab_size))
    with torch.no_grad():
        model.decoder.weight.zero_()  # the logits are then the bias alone
    stream = data.batchify(corpus.valid, 4)
    logits, _, _ = model(stream[:-1], model.initial_state(4))
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, corpus.vocab_size).double(), stream[1:].reshape(-1)
    )
    # brute force: the add-one smoothed counts of the training split, over the same tokens
    counts = torch.ones(corpus.vocab_size, dtype=torch.float64)
    for token in corpus.train.tolist():
        counts[token] += 1
    expected = -(counts / counts.sum()).log()[stream[1:].reshape(-1)].mean()
    assert math.isclose(nll.item(), expected.item(), rel_tol=1e-6)


def test_train_starts_the_decoder_bias_at_the_unigram_only_when_asked(tmp_path):
    corpus = data.load_corpus("synthetic", seed=0)
    unigram = data.unigram_log_probs(corpus.train, corpus.vocab_size).float()
    for asked in (True, False):
        cfg = load_config(
            None,
            TINY
            + [
                f"model.unigram_decoder_bias={str(asked).lower()}",
                "train.max_steps_per_epoch=1",
                "train.lr=1e-9",  # one step that cannot move the bias visibly
            ],
        )
        train(cfg, None, tmp_path / str(asked), progress=False)
        model, _ = load_model(tmp_path / str(asked) / schema.ARTIFACT_CHECKPOINT)
        at_unigram = torch.allclose(model.decoder.bias, unigram, atol=1e-6)
        assert at_unigram == asked


@pytest.mark.parametrize(
    "key, default, value",
    [("unigram_decoder_bias", "false", "true"), ("readout", "events", "state")],
)
def test_a_key_added_later_stays_out_of_the_run_key_at_its_default(key, default, value):
    plain = load_config(None, TINY)
    at_default = load_config(None, TINY + [f"model.{key}={default}"])
    asked = load_config(None, TINY + [f"model.{key}={value}"])
    assert plain.run_key == at_default.run_key != asked.run_key
    assert f'"{key}"' not in plain.canonical_json()
    shown = "true" if value == "true" else f'"{value}"'
    assert f'"{key}":{shown}' in asked.canonical_json()
