"""Event-driven batch-1 inference (duosparse.inference) against the dense model: the same
outputs and logits, the MACs it performs equal to the Accountant's effective MACs, state
carried like LanguageModel.forward, and clear refusals of what it does not support."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from duosparse import schema
from duosparse.accounting import Accountant
from duosparse.config import load_config
from duosparse.inference import (
    CompressedColumns,
    DenseColumns,
    EventDrivenEGRU,
    EventDrivenError,
    column_traversal,
)
from duosparse.model import LanguageModel
from duosparse.pruning import prune_to

VOCAB = 37
BACKENDS = ["scipy", "torch"]


def _model(
    sparsity: float,
    threshold: float,
    *,
    tie: bool = False,
    layers: int = 2,
    include_embedding: bool = False,
    dtype=torch.float64,
    seed: int = 0,
) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = load_config(
        None,
        [
            "model.arch=egru",
            "model.embedding_size=10",
            "model.hidden_size=16",
            f"model.num_layers={layers}",
            f"model.tie_weights={str(tie).lower()}",
            f"model.threshold={threshold}",
        ],
    ).model
    model = LanguageModel(cfg, VOCAB).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init: livelier dynamics
        for layer in model.layers:
            layer.weight_ih.mul_(3.0)
            layer.weight_hh.mul_(3.0)
            layer.threshold.add_(torch.rand_like(layer.threshold) * threshold)  # per-unit
        model.encoder.weight.mul_(5.0)
    if sparsity > 0:
        prune_to(model.prunable(include_embedding), sparsity, "layer")
    return model


def _reference(model: LanguageModel, tokens: torch.Tensor, state=None):
    with torch.no_grad():
        return model(tokens[:, None], state or model.initial_state(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity,threshold", [(0.0, 0.0), (0.5, 0.05), (0.8, 0.1), (0.95, 0.2)])
def test_event_driven_equals_the_dense_model_in_double_precision(backend, sparsity, threshold):
    model = _model(sparsity, threshold)
    tokens = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(1))
    logits, state, trace = _reference(model, tokens)
    engine = EventDrivenEGRU.from_model(model, backend=backend)
    for dense in (False, True):
        out = engine.run(tokens, dense=dense)
        for l, y in enumerate(trace.outputs):
            torch.testing.assert_close(out.outputs[l], y[:, 0], rtol=0, atol=1e-10)
        torch.testing.assert_close(out.logits, logits[:, 0], rtol=0, atol=1e-10)
        for (y, c), y_out, c_out in zip(state, out.state.y, out.state.c):
            np.testing.assert_allclose(y_out, y[0].numpy(), rtol=0, atol=1e-10)
            np.testing.assert_allclose(c_out, c[0].numpy(), rtol=0, atol=1e-10)
    # the operating point is a real one: some units silent, some firing
    activity = torch.cat([y.flatten() for y in trace.outputs])
    assert 0.0 < float((activity == 0).double().mean()) < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_model_with_pruned_embedding_and_decoder(backend):
    """Tied: the last layer has embedding_size units; a pruned decoder is traversed in CSC."""
    model = _model(0.7, 0.05, tie=True, layers=3, include_embedding=True)
    tokens = torch.randint(0, VOCAB, (25,), generator=torch.Generator().manual_seed(2))
    logits, _, trace = _reference(model, tokens)
    engine = EventDrivenEGRU.from_model(model, backend=backend)
    assert isinstance(engine.decoder, CompressedColumns)
    out = engine.run(tokens)
    assert [o.shape[1] for o in out.outputs] == [16, 16, 10]
    for l, y in enumerate(trace.outputs):
        torch.testing.assert_close(out.outputs[l], y[:, 0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out.logits, logits[:, 0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_precision_is_close_to_the_model(backend):
    model = _model(0.9, 0.05, dtype=torch.float32, seed=3)
    tokens = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3))
    logits, _, trace = _reference(model, tokens)
    out = EventDrivenEGRU.from_model(model, backend=backend).run(tokens)
    assert out.outputs[0].dtype == torch.float32
    for l, y in enumerate(trace.outputs):
        torch.testing.assert_close(out.outputs[l], y[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits, logits[:, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "sparsity,threshold,include_embedding",
    [(0.0, 0.0, False), (0.6, 0.1, False), (0.9, 0.05, True)],
)
def test_macs_performed_equal_the_accountants_effective_macs(
    backend, sparsity, threshold, include_embedding
):
    model = _model(sparsity, threshold, include_embedding=include_embedding, seed=4)
    engine = EventDrivenEGRU.from_model(model, backend=backend)
    gen = torch.Generator().manual_seed(5)
    accountant = Accountant(model, include_embedding)
    state, model_state = engine.initial_state(), model.initial_state(1)
    macs, decoder_macs, tokens = 0, 0, 0
    for _ in range(3):  # chunks with the state carried, as train.evaluate does
        chunk = torch.randint(0, VOCAB, (12,), generator=gen)
        _, model_state, trace = _reference(model, chunk, model_state)
        accountant.update(trace)
        out = engine.run(chunk, state)
        state = out.state
        macs += sum(out.macs)
        decoder_macs += out.decoder_macs
        tokens += out.tokens
    m = accountant.metrics()
    assert macs / tokens == pytest.approx(m[schema.OPS_EFFECTIVE], rel=1e-12)
    assert decoder_macs / tokens == pytest.approx(m[schema.OPS_DECODER_EFFECTIVE], rel=1e-12)
    dense = engine.run(chunk, dense=True)
    assert dense.macs_per_token == m[schema.OPS_DENSE]
    assert dense.decoder_macs / dense.tokens == m[schema.OPS_DECODER_DENSE]
    if sparsity > 0:
        assert macs / tokens < m[schema.OPS_WEIGHT_SPARSE]


def test_state_carries_over_between_runs_and_from_the_model():
    model = _model(0.5, 0.1, seed=6)
    engine = EventDrivenEGRU.from_model(model)
    tokens = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(6))
    whole = engine.run(tokens)
    first = engine.run(tokens[:10])
    second = engine.run(tokens[10:], first.state)
    for l in range(2):
        torch.testing.assert_close(
            torch.cat((first.outputs[l], second.outputs[l])), whole.outputs[l]
        )
    # one token at a time through step(), and a hand-over from LanguageModel.forward
    state = first.state
    for i, token in enumerate(tokens[10:14].tolist()):
        step = engine.step(token, state)
        torch.testing.assert_close(step.outputs[0][0], whole.outputs[0][10 + i])
        state = step.state
    _, model_state, _ = _reference(model, tokens[:10])
    handed = engine.run(tokens[10:], engine.state_from_model(model_state))
    torch.testing.assert_close(handed.outputs[1], second.outputs[1], rtol=0, atol=1e-10)
    logits, _, _ = _reference(model, tokens[10:], first.state.to_model_state())
    torch.testing.assert_close(second.logits, logits[:, 0], rtol=0, atol=1e-10)
    # run() does not modify the state it is given
    again = engine.run(tokens[10:], first.state)
    torch.testing.assert_close(again.outputs[0], second.outputs[0], rtol=0, atol=0)
    dense_step = engine.dense_step(int(tokens[10]), first.state)
    torch.testing.assert_close(dense_step.logits[0], second.logits[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_traversal_against_a_dense_product(backend):
    gen = torch.Generator().manual_seed(7)
    matrix = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    matrix[torch.rand(9, 12, generator=gen) < 0.6] = 0
    matrix[:, 0] = 0  # an empty first column
    matrix[:, 5] = 0
    matrix[:, -1] = torch.randn(9, generator=gen, dtype=torch.float64)  # a full last column
    csc = CompressedColumns(matrix, backend)
    assert csc.nnz == int((matrix != 0).sum())
    vectors = [
        torch.zeros(12, dtype=torch.float64),
        torch.randn(12, generator=gen, dtype=torch.float64),
    ]
    sparse = torch.randn(12, generator=gen, dtype=torch.float64)
    sparse[[1, 2, 3, 6, 8]] = 0
    vectors += [
        sparse,
        torch.eye(12, dtype=torch.float64)[0],
        torch.eye(12, dtype=torch.float64)[-1],
    ]
    for v in vectors:
        out = np.full(9, 0.5)
        macs = csc.accumulate(out, v.numpy().copy())
        np.testing.assert_allclose(out, 0.5 + (matrix @ v).numpy(), rtol=0, atol=1e-12)
        assert macs == int((matrix[:, v != 0] != 0).sum())
    full = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    assert isinstance(column_traversal(full, backend), DenseColumns)
    assert isinstance(column_traversal(matrix, backend), CompressedColumns)
    out = np.zeros(4)
    assert column_traversal(full, backend).accumulate(out, sparse[:6].numpy().copy()) == 4 * 3
    np.testing.assert_allclose(out, (full @ sparse[:6]).numpy(), rtol=0, atol=1e-12)


def test_scipy_kernel_skips_the_gap_columns():
    """The scipy kernel gets the active columns as columns 0, 2, 4, ... of a pointer array
    whose odd ("gap") columns have end <= start; were they traversed, the NaN inputs put
    there would reach the output. So the work is the active columns' non-zeros only."""
    gen = torch.Generator().manual_seed(8)
    matrix = torch.randn(30, 40, generator=gen, dtype=torch.float64)
    matrix[torch.rand(30, 40, generator=gen) < 0.7] = 0
    csc = CompressedColumns(matrix, "scipy")
    csc._inputs[1::2] = np.nan
    v = torch.randn(40, generator=gen, dtype=torch.float64)
    v[torch.rand(40, generator=gen) < 0.6] = 0
    out = np.zeros(30)
    csc.accumulate(out, v.numpy().copy())
    np.testing.assert_allclose(out, (matrix @ v).numpy(), rtol=0, atol=1e-12)
    assert EventDrivenEGRU.from_model(_model(0.5, 0.0)).backend == "scipy"  # the default


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_refuses_lstm_and_gru(arch):
    cfg = load_config(
        None, [f"model.arch={arch}", "model.embedding_size=8", "model.hidden_size=8"]
    ).model
    with pytest.raises(EventDrivenError, match="needs an EGRU model.*no events to skip"):
        EventDrivenEGRU.from_model(LanguageModel(cfg, VOCAB))


def test_refuses_a_decoder_that_reads_the_states():
    cfg = load_config(
        None, ["model.arch=egru", "model.embedding_size=8", "model.hidden_size=8",
               "model.readout=state"],
    ).model  # fmt: skip
    with pytest.raises(EventDrivenError, match="model.readout: state.*no events to skip"):
        EventDrivenEGRU.from_model(LanguageModel(cfg, VOCAB))


def test_refuses_batches_and_bad_arguments():
    model = _model(0.0, 0.0)
    engine = EventDrivenEGRU.from_model(model)
    with pytest.raises(EventDrivenError, match="batch size 1.*shape \\(5, 3\\)"):
        engine.run(torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(EventDrivenError, match="batch size 1"):
        engine.state_from_model(model.initial_state(2))
    with pytest.raises(EventDrivenError, match="shape"):
        engine.run(torch.zeros(2, 1, 1, dtype=torch.long))
    with pytest.raises(EventDrivenError, match="backend"):
        EventDrivenEGRU.from_model(model, backend="cuda")
    assert engine.run(torch.zeros(4, 1, dtype=torch.long)).outputs[0].shape == (
        4,
        16,
    )  # (T, 1) is fine
