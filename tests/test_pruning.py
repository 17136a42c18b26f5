"""Weight pruning that composes with activity sparsity: scopes, schedules, optimiser steps,
checkpoints and resume, MAC counts against brute force, the tied embedding, config checks,
the sensitivity analysis and one end-to-end `duosparse train`.

Everything runs on the synthetic corpus with tiny models, one torch thread each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from duosparse import data, schema
from duosparse.accounting import Accountant, weight_sparsity
from duosparse.analysis.sensitivity import magnitude_mask, sensitivity_table
from duosparse.cli import app as duosparse_app
from duosparse.config import ConfigError, PruneConfig, load_config
from duosparse.model import LanguageModel, current_weight, detach_state
from duosparse.pruning import Pruner, masks, prune_to, restore_masks, tensor_name
from duosparse.train import evaluate, load_checkpoint, load_model, train
from typer.testing import CliRunner

BASE = [
    "data.corpus=synthetic",
    "model.embedding_size=8",
    "model.hidden_size=12",
    "model.num_layers=2",
    "model.threshold=0.05",
    "train.bptt=8",
    "train.batch_size=4",
    "train.eval_batch_size=4",
    "train.max_steps_per_epoch=8",
    "train.max_eval_batches=3",
]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: thread hand-offs cost more than they bring.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return data.synthetic_corpus(0)


def tiny(*overrides: str):
    return load_config(None, BASE + list(overrides))


def tiny_model(*overrides: str, vocab: int = 64, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(tiny(*overrides).model, vocab)


def zeros(module, name) -> int:
    return int((current_weight(module, name) == 0).sum())


def snapshot(tensors) -> dict[tuple, torch.Tensor]:
    return {(m, n): current_weight(m, n).detach().clone() for m, n in tensors}


# --- scopes ---------------------------------------------------------------------------------


def test_layer_scope_prunes_every_tensor_to_the_target_by_magnitude():
    model = tiny_model()
    tensors = model.prunable(include_embedding=True)
    for level in (0.7, 0.85):  # the second call prunes further, on top of the first masks
        before = snapshot(tensors)
        prune_to(tensors, level, "layer")
        for module, name in tensors:
            w, old = current_weight(module, name), before[(module, name)]
            pruned = w == 0
            assert abs(int(pruned.sum()) - level * w.numel()) <= 1  # within one weight
            assert torch.equal(w[~pruned], old[~pruned])  # kept weights untouched
            assert bool((old == 0)[~pruned].sum() == 0)  # earlier zeros stay zeros
            newly = pruned & (old != 0)
            # brute force: the new zeros are the smallest magnitudes among the weights left
            assert old[newly].abs().max() <= old[~pruned].abs().min()


def test_global_scope_hits_the_target_overall_and_reads_current_magnitudes():
    model = tiny_model()
    tensors = model.prunable(include_embedding=True)  # the embedding starts smaller (+-0.1)
    orig = torch.cat([current_weight(m, n).detach().abs().flatten() for m, n in tensors])
    prune_to(tensors, 0.3, "global")
    total = orig.numel()
    assert sum(zeros(m, n) for m, n in tensors) == round(0.3 * total)
    kept = torch.cat([(current_weight(m, n) != 0).flatten() for m, n in tensors])
    assert orig[~kept].max() <= orig[kept].min()  # one threshold over all tensors
    per_tensor = [zeros(m, n) / current_weight(m, n).numel() for m, n in tensors]
    assert max(per_tensor) - min(per_tensor) > 0.2  # tensors differ individually
    assert 0.3 < per_tensor[-1] < 0.9  # the embedding: the most pruned, but not all of it

    # Magnitudes change in training; the next update must use orig * mask as it is now, not
    # a copy left on the module by the pruning hook (never refreshed for the embedding).
    with torch.no_grad():
        model.encoder.weight_orig.mul_(100.0)
    embedding_zeros = zeros(model.encoder, "weight")
    now = torch.cat([current_weight(m, n).detach().abs().flatten() for m, n in tensors])
    prune_to(tensors, 0.5, "global")
    assert sum(zeros(m, n) for m, n in tensors) == round(0.5 * total)
    assert zeros(model.encoder, "weight") == embedding_zeros  # its weights are the largest now
    kept2 = torch.cat([(current_weight(m, n) != 0).flatten() for m, n in tensors])
    assert now[kept & ~kept2].max() <= now[kept2].min()


# --- schedules -------------------------------------------------------------------------------


def test_gradual_schedule_follows_the_cubic_formula_at_every_update():
    cfg = PruneConfig(
        target_sparsity=0.8, schedule="gradual", start_epoch=2, end_epoch=3, update_every=3
    )
    model = tiny_model("model.arch=gru")
    pruner = Pruner(cfg, model, steps_per_epoch=10)
    t0, t1 = 10, 30  # start of epoch 2, end of epoch 3, in global steps
    changed = []
    for step in range(36):
        if step < t0:
            expected = 0.0
        elif step >= t1:
            expected = 0.8
        else:  # Zhu & Gupta 2017, held between updates every 3 steps from t0
            t = t0 + (step - t0) // 3 * 3
            expected = 0.8 * (1 - (1 - (t - t0) / (t1 - t0)) ** 3)
        assert pruner.sparsity_at(step) == pytest.approx(expected, abs=1e-12)
        if pruner.step(step):
            changed.append(step)
        for module, name in pruner.tensors:
            assert zeros(module, name) == round(expected * current_weight(module, name).numel())
    assert set(changed) <= {s for s in range(t0, t1, 3)} | {t1}
    assert len(changed) >= 5


@pytest.mark.parametrize("schedule", ["oneshot", "iterative"])
def test_oneshot_and_iterative_schedules(schedule):
    cfg = PruneConfig(
        target_sparsity=0.75, schedule=schedule, start_epoch=2, end_epoch=3, iterative_steps=4
    )
    pruner = Pruner(cfg, tiny_model(), steps_per_epoch=10)
    got = [pruner.sparsity_at(s) for s in range(40)]
    if schedule == "oneshot":  # all at the first step of start_epoch, then fine-tuning
        assert got == [0.0] * 10 + [0.75] * 30
        assert pruner.final_epoch == 2
    else:  # 4 equal steps at 10, 15, 20, 25, each removing the same share of what is left
        levels = [1 - 0.25 ** (i / 4) for i in range(1, 5)]
        expected = [0.0] * 10 + [x for x in levels for _ in range(5)] + [0.75] * 10
        assert got == pytest.approx(expected, abs=1e-12)
        assert pruner.final_epoch == 3


# --- training: optimiser, DropConnect, fused kernels ------------------------------------------------


@pytest.mark.parametrize("arch, optimizer", [("lstm", "adam"), ("gru", "adamw"), ("egru", "adamw")])
def test_pruned_weights_stay_exactly_zero_through_100_optimiser_steps(corpus, arch, optimizer):
    model = tiny_model(f"model.arch={arch}", "model.dropout.weight=0.3", vocab=corpus.vocab_size)
    tensors = model.prunable(include_embedding=True)  # tied embedding/decoder included
    prune_to(tensors, 0.75, "layer")
    saved_masks = {k: v.clone() for k, v in masks(model).items()}
    orig_before = {
        k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("_orig")
    }
    opt_class = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = opt_class(model.parameters(), lr=1e-2, weight_decay=0.1)
    stream = data.batchify(corpus.train, 4)
    state = model.initial_state(4)
    model.train()
    for inputs, targets in data.bptt_batches(stream, 5, max_batches=100):
        logits, state, _ = model(inputs, detach_state(state))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
    for module, name in tensors:
        key = tensor_name(model, module, name)
        mask = getattr(module, name + "_mask")
        assert torch.equal(mask, saved_masks[key + "_mask"])
        assert bool((current_weight(module, name)[mask == 0] == 0).all())
        # not vacuous: the optimiser did move weight_orig under the pruned entries
        orig = getattr(module, name + "_orig").detach()
        assert not torch.equal(orig[mask == 0], orig_before[key + "_orig"][mask == 0])
    # what the recurrent kernels read (set by the pruning hook at each forward) is masked too
    for layer in model.layers:
        assert bool((layer.weight_ih[layer.weight_ih_mask == 0] == 0).all())
        assert bool((layer.weight_hh[layer.weight_hh_mask == 0] == 0).all())
    assert bool((model.decoder_weight()[model.encoder.weight_mask == 0] == 0).all())


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_pruned_fused_layers_equal_torch_modules_with_the_masked_weights(arch):
    model = tiny_model(f"model.arch={arch}", "model.num_layers=1", "model.tie_weights=false")
    prune_to(model.prunable(), 0.6, "global")
    layer = model.layers[0].eval()
    reference = (torch.nn.LSTM if arch == "lstm" else torch.nn.GRU)(8, 12)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, name + "_l0").copy_(current_weight(layer, name))
    x = torch.randn(6, 3, 8)
    with torch.no_grad():
        out, _, _ = layer(x, layer.initial_state(3))
        expected, _ = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# --- checkpoints and resume ----------------------------------------------------------------------


class Killer:
    """A reporter that dies at epoch `at`, like a killed worker."""

    def __init__(self, at: int):
        self.at = at

    def log_metrics(self, metrics, step):
        if step == self.at:
            raise KeyboardInterrupt("simulated kill")

    def log_missing(self, metrics, step):
        pass

    def log_artifact(self, path):
        pass


def test_masks_survive_save_load_and_resume_bit_for_bit(tmp_path, corpus):
    cfg = tiny(
        "model.arch=lstm",
        "model.dropout.weight=0.2",
        "train.epochs=3",
        "train.optimizer=adamw",
        "train.weight_decay=0.05",
        "prune.schedule=gradual",
        "prune.target_sparsity=0.8",
        "prune.start_epoch=1",
        "prune.end_epoch=3",
        "prune.update_every=2",
        "prune.include_embedding=true",
    )
    whole = train(cfg, None, tmp_path / "whole", corpus=corpus, progress=False)
    saved = load_checkpoint(tmp_path / "whole" / schema.ARTIFACT_CHECKPOINT)["model"]
    expected = {k: v for k, v in saved.items() if k.endswith("_mask")}
    assert set(expected) == {"encoder.weight_mask"} | {
        f"layers.{i}.{w}_mask" for i in range(2) for w in ("weight_ih", "weight_hh")
    }

    # load: the masks come back, and the model evaluates as it did at the end of training
    model, _ = load_model(tmp_path / "whole" / schema.ARTIFACT_CHECKPOINT)
    assert masks(model).keys() == expected.keys()
    assert all(torch.equal(masks(model)[k], v) for k, v in expected.items())
    assert model.decoder.weight is model.encoder.weight_orig  # still tied after loading
    for module, name in model.prunable(include_embedding=True):
        assert zeros(module, name) == round(0.8 * current_weight(module, name).numel())
    test = evaluate(model, data.batchify(corpus.test, 4), 8, 3, include_embedding=True)
    assert test.loss == pytest.approx(whole[schema.TEST_LOSS], rel=1e-9)
    assert test.accounting[schema.SPARSITY_WEIGHT] == whole[schema.SPARSITY_WEIGHT]

    # resume: killed while reporting epoch 2 (epoch 1's checkpoint at least is on disk)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, Killer(at=2), tmp_path / "resumed", corpus=corpus, progress=False)
    last = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert last["epoch"] in (1, 2)
    partial = [
        float((v == 0).double().mean()) for k, v in last["model"].items() if k.endswith("_mask")
    ]
    assert all(0.0 < s < 0.79 for s in partial)  # mid-schedule masks
    resumed = train(cfg, None, tmp_path / "resumed", corpus=corpus, progress=False)
    final = load_checkpoint(tmp_path / "resumed" / schema.ARTIFACT_CHECKPOINT)["model"]
    assert all(torch.equal(final[k], v) for k, v in expected.items())
    assert resumed[schema.TEST_LOSS] == pytest.approx(whole[schema.TEST_LOSS], rel=1e-9)


# --- operation counts -------------------------------------------------------------------------------


def test_dense_activity_lstm_effective_macs_equal_weight_sparse_macs(corpus):
    model = tiny_model("model.arch=lstm", vocab=corpus.vocab_size)
    prune_to(model.prunable(), 0.6, "layer")
    nnz_w = [int((current_weight(layer, "weight_ih") != 0).sum()) for layer in model.layers]
    nnz_r = [int((current_weight(layer, "weight_hh") != 0).sum()) for layer in model.layers]
    batch, bptt, chunks = 4, 8, 5
    ev = evaluate(model, data.batchify(corpus.valid, batch), bptt, chunks)
    tokens = batch * bptt * chunks
    assert ev.accounting[schema.SPARSITY_ACTIVITY] == 0.0  # LSTM outputs o * tanh(c) are never 0
    assert ev.accounting[schema.OPS_WEIGHT_SPARSE] == sum(nnz_w) + sum(nnz_r)
    # Every input column (embedding rows, then dense LSTM outputs) and every previous-output
    # column is active on every token, except y_{-1}: evaluate starts from the zero state, so
    # on the first token of each of the `batch` sequences no R column is used. Exactly:
    expected = sum(w + r * (tokens - batch) / tokens for w, r in zip(nnz_w, nnz_r, strict=True))
    assert ev.accounting[schema.OPS_EFFECTIVE] == pytest.approx(expected, rel=1e-12)
    # From a non-zero state the effective count equals the weight-sparse count exactly.
    state = [
        (torch.rand(batch, layer.hidden_size) + 0.1, torch.rand(batch, layer.hidden_size))
        for layer in model.layers
    ]
    inputs, _ = next(data.bptt_batches(data.batchify(corpus.valid, batch), bptt))
    with torch.no_grad():
        _, _, trace = model.eval()(inputs, state)
    accountant = Accountant(model)
    accountant.update(trace)
    got = accountant.metrics()
    assert got[schema.OPS_EFFECTIVE] == pytest.approx(got[schema.OPS_WEIGHT_SPARSE], rel=1e-12)
    assert got[schema.OPS_MULTIPLICATIVE] == pytest.approx(got[schema.OPS_WEIGHT_SPARSE], rel=1e-12)


def test_egru_effective_macs_match_brute_force_and_never_exceed_weight_sparse(corpus):
    model = tiny_model("model.arch=egru", "model.threshold=0.1", vocab=corpus.vocab_size).eval()
    prune_to(model.prunable(), 0.7, "global")
    batch, bptt, chunks = 4, 8, 4
    stream = data.batchify(corpus.valid, batch)
    ev = evaluate(model, stream, bptt, chunks)
    w = [current_weight(layer, "weight_ih") for layer in model.layers]
    r = [current_weight(layer, "weight_hh") for layer in model.layers]
    dec = model.decoder_weight()
    count, decoder_count, tokens = 0, 0, 0
    state = model.initial_state(batch)
    with torch.no_grad():
        for inputs, _ in data.bptt_batches(stream, bptt, max_batches=chunks):
            _, new_state, trace = model(inputs, state)
            for layer in range(len(model.layers)):
                previous = state[layer][0]  # y_{t-1}: the carried output first
                for t in range(inputs.size(0)):
                    x_t, y_t = trace.inputs[layer][t], trace.outputs[layer][t]
                    for b in range(batch):
                        count += int((w[layer][:, x_t[b] != 0] != 0).sum())
                        count += int((r[layer][:, previous[b] != 0] != 0).sum())
                        if layer == len(model.layers) - 1:
                            decoder_count += int((dec[:, y_t[b] != 0] != 0).sum())
                    previous = y_t
            state, tokens = new_state, tokens + inputs.numel()
    acc = ev.accounting
    assert 0.2 < acc[schema.SPARSITY_ACTIVITY] < 0.95  # both sparsities are at work
    assert acc[schema.OPS_EFFECTIVE] == pytest.approx(count / tokens, rel=1e-12)
    assert acc[schema.OPS_DECODER_EFFECTIVE] == pytest.approx(decoder_count / tokens, rel=1e-12)
    assert acc[schema.OPS_EFFECTIVE] < acc[schema.OPS_WEIGHT_SPARSE]
    assert acc[schema.OPS_WEIGHT_SPARSE] == sum(int((m != 0).sum()) for m in w + r)
    assert acc[schema.SPARSITY_WEIGHT] == pytest.approx(0.7, abs=1 / sum(m.numel() for m in w + r))


# --- the tied embedding, biases, thresholds -------------------------------------------------------


def test_tied_embedding_is_one_pruned_tensor_and_the_decoder_reads_its_mask():
    model = tiny_model("model.arch=gru").eval()
    tensors = model.prunable(include_embedding=True)
    assert [tensor_name(model, m, n) for m, n in tensors][-1] == "encoder.weight"
    assert len(tensors) == 2 * len(model.layers) + 1  # tied: the decoder is not a second tensor
    prune_to(tensors, 0.5, "layer")
    assert model.decoder.weight is model.encoder.weight_orig
    assert not hasattr(model.decoder, "weight_mask")
    mask = model.encoder.weight_mask
    tokens = torch.arange(64).view(8, 8)  # every word is looked up
    state = model.initial_state(8)
    with torch.no_grad():
        before = model(tokens, state)[0]
        model.encoder.weight_orig[mask == 0] += 3.0  # pruned entries: no effect anywhere
        assert torch.equal(model(tokens, state)[0], before)
        assert bool((model.decoder_weight()[mask == 0] == 0).all())
        model.encoder.weight_orig[mask == 1] += 0.01  # kept entries: embedding and decoder
        after = model(tokens, state)[0]
    assert not torch.equal(after, before)
    fresh = tiny_model("model.arch=gru", seed=1).eval()
    restore_masks(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert fresh.decoder.weight is fresh.encoder.weight_orig
    with torch.no_grad():
        assert torch.equal(fresh(tokens, state)[0], after)
    untied = tiny_model("model.tie_weights=false")
    names = [tensor_name(untied, m, n) for m, n in untied.prunable(include_embedding=True)]
    assert names[-2:] == ["encoder.weight", "decoder.weight"]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_biases_and_thresholds_are_never_pruned(scope):
    cfg = PruneConfig(target_sparsity=0.9, schedule="oneshot", scope=scope, include_embedding=True)
    model = tiny_model("model.arch=egru", "model.threshold=0.3")
    Pruner(cfg, model, steps_per_epoch=5).step(0)
    assert set(masks(model)) == {"encoder.weight_mask"} | {
        f"layers.{i}.{w}_mask" for i in range(2) for w in ("weight_ih", "weight_hh")
    }
    assert weight_sparsity(model, include_embedding=True) == pytest.approx(0.9, abs=1e-3)
    for layer in model.layers:
        for name in ("bias_ih", "bias_hh", "threshold"):
            assert isinstance(getattr(layer, name), torch.nn.Parameter)
            assert not hasattr(layer, name + "_mask")
        assert bool((layer.threshold == 0.3).all())
        assert int((layer.bias_ih == 0).sum()) == int((layer.bias_hh == 0).sum()) == 0
    assert not hasattr(model.decoder, "bias_mask")


# --- config validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["prune.schedule=oneshot", "prune.target_sparsity=1.0"], "prune.target_sparsity"),
        (["prune.schedule=oneshot", "prune.target_sparsity=-0.1"], "prune.target_sparsity"),
        (
            [
                "prune.schedule=gradual",
                "prune.target_sparsity=0.5",
                "prune.start_epoch=2",
                "prune.end_epoch=1",
                "train.epochs=3",
            ],
            "prune.end_epoch",
        ),
        (
            [
                "prune.schedule=gradual",
                "prune.target_sparsity=0.5",
                "prune.end_epoch=3",
                "train.epochs=2",
            ],
            "prune.end_epoch",
        ),
        (
            [
                "prune.schedule=iterative",
                "prune.target_sparsity=0.5",
                "prune.end_epoch=5",
                "train.epochs=4",
            ],
            "prune.end_epoch",
        ),
        (
            [
                "prune.schedule=oneshot",
                "prune.target_sparsity=0.5",
                "prune.start_epoch=3",
                "train.epochs=2",
            ],
            "prune.start_epoch",
        ),
        (["prune.target_sparsity=0.5"], "prune.schedule"),
    ],
)
def test_config_refuses_unreachable_or_invalid_pruning(overrides, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(None, overrides)


def test_config_accepts_schedules_that_end_with_training():
    cfg = load_config(
        None,
        [
            "prune.schedule=gradual",
            "prune.target_sparsity=0.95",
            "prune.start_epoch=2",
            "prune.end_epoch=2",
            "train.epochs=2",
        ],
    )
    assert cfg.prune.end_epoch == cfg.train.epochs


# --- sensitivity --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory, corpus) -> Path:
    cfg = tiny(
        "model.arch=lstm",
        "train.epochs=2",
        "train.lr=0.01",
        "train.max_steps_per_epoch=30",
        "train.max_eval_batches=4",
    )
    workdir = tmp_path_factory.mktemp("dense")
    train(cfg, None, workdir, corpus=corpus, progress=False)
    return workdir / schema.ARTIFACT_CHECKPOINT


def cli(args: list[str]):
    return CliRunner().invoke(duosparse_app, ["prune", "sensitivity", *args])


def test_magnitude_mask_prunes_smallest_on_top_of_existing_mask():
    weight = torch.tensor([[0.5, -0.1, 0.3], [-0.7, 0.2, 0.05]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert magnitude_mask(weight, mask, 0.5).tolist() == [[1, 0, 1], [1, 0, 0]]
    assert torch.equal(magnitude_mask(weight, mask, 0.1), mask)  # never lowers sparsity


def test_sensitivity_table_against_brute_force(dense_checkpoint, corpus):
    model, cfg = load_model(dense_checkpoint)
    stream = data.batchify(corpus.valid, cfg.train.eval_batch_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    levels = [0.5, 0.95]
    table = sensitivity_table(model, stream, cfg.train.bptt, levels, max_batches=4)
    tensors = [tensor_name(model, m, n) for m, n in model.prunable()]
    assert [(row["tensor"], row["level"]) for row in table["rows"]] == [
        (t, level) for t in tensors for level in levels
    ]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored
    assert table["baseline"]["ppl"] == evaluate(model, stream, cfg.train.bptt, 4).ppl
    by = {(row["tensor"], row["level"]): row for row in table["rows"]}
    worse = sum(by[(t, 0.95)]["ppl"] >= by[(t, 0.5)]["ppl"] for t in tensors)
    assert worse > len(tensors) / 2
    # one row by hand: zero the 95% smallest weights of layers.1.weight_hh, evaluate
    weight = model.layers[1].weight_hh
    k = round(0.95 * weight.numel())
    threshold = weight.detach().abs().flatten().kthvalue(k).values
    with torch.no_grad():
        weight[weight.abs() <= threshold] = 0.0
    row = by[("layers.1.weight_hh", 0.95)]
    assert row["sparsity"] == pytest.approx(k / weight.numel())
    assert row["ppl"] == pytest.approx(evaluate(model, stream, cfg.train.bptt, 4).ppl, rel=1e-9)


def test_sensitivity_command_on_a_checkpoint(dense_checkpoint, tmp_path):
    out = tmp_path / "s.json"
    result = cli(
        [
            str(dense_checkpoint),
            "--levels",
            "0.5,0.95",
            "--max-batches",
            "2",
            "--json",
            "--out",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    assert json.loads(out.read_text()) == table
    assert len(table["rows"]) == 4 * 2 and table["run_id"] is None
    shown = cli([str(dense_checkpoint.parent), "--levels", "0.9", "--max-batches", "1"])
    assert shown.exit_code == 0, shown.output
    assert "layers.0.weight_ih" in shown.stdout and "val ppl" in shown.stdout
    bad = cli([str(dense_checkpoint), "--levels", "0.5,1.5"])
    assert bad.exit_code != 0
    assert "--levels" in bad.output and "Traceback" not in bad.output
    missing = cli([str(tmp_path / "nothing.pt")])
    assert missing.exit_code != 0 and "CHECKPOINT_OR_RUN" in missing.output


# --- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def egru_run(tmp_path_factory) -> tuple[Path, dict]:
    cwd = tmp_path_factory.mktemp("e2e")
    overrides = [
        "data.corpus=synthetic",
        "model.arch=egru",
        "model.embedding_size=16",
        "model.hidden_size=24",
        "model.num_layers=2",
        "model.threshold=0.05",
        "prune.schedule=gradual",
        "prune.target_sparsity=0.9",
        "prune.start_epoch=1",
        "prune.end_epoch=2",
        "prune.update_every=4",
        "train.epochs=2",
        "train.bptt=10",
        "train.max_steps_per_epoch=16",
        "train.batch_size=8",
        "train.eval_batch_size=8",
        "train.max_eval_batches=4",
        "train.lr=0.005",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    args = [str(VENV_BIN / "duosparse"), "train", "--json"]
    for item in overrides:
        args += ["--set", item]
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, json.loads(done.stdout)


@pytest.mark.slow
def test_duosparse_train_egru_gradual_to_90_percent(egru_run):
    cwd, out = egru_run
    metrics = out["metrics"]
    model, cfg = load_model(cwd / "runs" / out["run_key"][:12] / schema.ARTIFACT_CHECKPOINT)
    tensors = model.prunable()
    total = sum(current_weight(m, n).numel() for m, n in tensors)
    for module, name in tensors:
        assert abs(zeros(module, name) - 0.9 * current_weight(module, name).numel()) <= 1
    assert abs(metrics[schema.SPARSITY_WEIGHT] - 0.9) <= len(tensors) / total
    assert metrics[schema.SPARSITY_WEIGHT] == weight_sparsity(model)
    # both sparsities compose: fewer MACs than weight pruning alone would leave
    assert metrics[schema.OPS_WEIGHT_SPARSE] == pytest.approx(
        0.1 * metrics[schema.OPS_DENSE], abs=len(tensors)
    )
    assert metrics[schema.OPS_EFFECTIVE] < metrics[schema.OPS_WEIGHT_SPARSE]
    assert metrics[schema.OPS_COMPUTE_REDUCTION] > 1 / (1 - 0.9)


def test_sensitivity_command_logs_into_the_mlflow_run(egru_run, monkeypatch):
    cwd, out = egru_run
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{cwd / 'mlruns.db'}"
    result = cli(
        [out["run_id"], "--tracking-uri", uri, "--levels", "0.5,0.95", "--max-batches", "2"]
    )
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(out["run_id"])
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith(schema.SENSITIVITY_PREFIX)}
    names = [f"layers.{i}.{w}" for i in range(2) for w in ("weight_ih", "weight_hh")]
    assert set(logged) == {schema.SENSITIVITY_BASELINE} | {
        schema.sensitivity_metric(t, level) for t in names for level in (0.5, 0.95)
    }
    # 0.5 is below the run's 0.9: nothing changes, the perplexity is the baseline's
    assert logged[schema.sensitivity_metric(names[0], 0.5)] == logged[schema.SENSITIVITY_BASELINE]
    artifacts = [a.path for a in client.list_artifacts(out["run_id"])]
    assert schema.ARTIFACT_SENSITIVITY in artifacts
    # sparsity/weight is logged every epoch and follows the gradual schedule
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(out["run_id"], schema.SPARSITY_WEIGHT)
    )
    assert history[0][0] == 1 and 0.3 < history[0][1] < 0.89
    assert history[-1] == (2, pytest.approx(0.9, abs=0.01))
