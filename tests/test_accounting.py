"""MAC and activity accounting against brute-force counts (docs/design.md section 4)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from duosparse import schema
from duosparse.accounting import Accountant, weight_sparsity
from duosparse.config import load_config
from duosparse.model import LanguageModel, Trace, current_weight


def _random_masked(rows: int, cols: int, density: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=gen)
    return w * (torch.rand(rows, cols, generator=gen) < density)


def _sparse_activity(shape: tuple[int, ...], rate: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (torch.rand(shape, generator=gen) < rate)


def brute_force(model: LanguageModel, trace: Trace) -> dict[str, float]:
    """Token by token, column by column: the definitions, with no vectorisation."""
    T, B = trace.outputs[0].shape[:2]
    effective = decoder = 0
    for l, layer in enumerate(model.layers):
        W = current_weight(layer, "weight_ih")
        R = current_weight(layer, "weight_hh")
        x, y, y0 = trace.inputs[l], trace.outputs[l], trace.initial_outputs[l]
        for b in range(B):
            for t in range(T):
                prev = y0[b] if t == 0 else y[t - 1, b]
                for j in range(W.shape[1]):
                    if x[t, b, j] != 0:
                        effective += int((W[:, j] != 0).sum())
                for k in range(R.shape[1]):
                    if prev[k] != 0:
                        effective += int((R[:, k] != 0).sum())
    D = model.decoder_weight()
    last = trace.decoder_input  # the last layer's output, or its state (model.readout: state)
    for b in range(B):
        for t in range(T):
            for j in range(D.shape[1]):
                if last[t, b, j] != 0:
                    decoder += int((D[:, j] != 0).sum())
    return {"effective": effective / (T * B), "decoder": decoder / (T * B)}


@pytest.mark.parametrize("arch, readout", [("egru", "events"), ("egru", "state"), ("lstm", None)])
def test_effective_macs_equal_brute_force_on_random_masks_and_activity(arch, readout):
    gen = torch.Generator().manual_seed(7)
    cfg = load_config(
        None,
        [
            f"model.arch={arch}",
            "model.embedding_size=6",
            "model.hidden_size=9",
            "model.num_layers=2",
        ],
    ).model
    model = LanguageModel(cfg, vocab_size=13)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight_ih.copy_(_random_masked(*layer.weight_ih.shape, 0.3, gen))
            layer.weight_hh.copy_(_random_masked(*layer.weight_hh.shape, 0.2, gen))
        model.encoder.weight.copy_(_random_masked(13, 6, 0.5, gen))
    T, B = 5, 3
    trace = Trace()
    sizes = [(layer.input_size, layer.hidden_size) for layer in model.layers]
    chunks = []
    for _ in range(2):  # two chunks: y_{-1} of the second is the carried output
        trace = Trace()
        for l, (i, h) in enumerate(sizes):
            x = _sparse_activity((T, B, i), 0.7, gen) if l == 0 else trace.outputs[-1]
            trace.inputs.append(x)
            trace.initial_outputs.append(_sparse_activity((B, h), 0.4, gen))
            trace.outputs.append(_sparse_activity((T, B, h), 0.25, gen))
        # the decoder reads the last layer's output, or (readout: state) a denser tensor
        states = _sparse_activity((T, B, sizes[-1][1]), 0.9, gen)
        trace.decoder_input = states if readout == "state" else trace.outputs[-1]
        chunks.append(trace)
    acc = Accountant(model)
    expected_eff = expected_dec = 0.0
    for trace in chunks:
        acc.update(trace)
        bf = brute_force(model, trace)
        expected_eff += bf["effective"] / len(chunks)
        expected_dec += bf["decoder"] / len(chunks)
    m = acc.metrics()
    assert m[schema.OPS_EFFECTIVE] == pytest.approx(expected_eff, rel=1e-12)
    assert m[schema.OPS_DECODER_EFFECTIVE] == pytest.approx(expected_dec, rel=1e-12)
    if readout == "state":  # the decoder is counted on what it reads, not on the events
        from_events = [replace(t, decoder_input=t.outputs[-1]) for t in chunks]
        events_dec = sum(brute_force(model, t)["decoder"] for t in from_events) / len(chunks)
        assert expected_dec > 2 * events_dec
    assert m[schema.OPS_TOTAL_EFFECTIVE] == pytest.approx(expected_eff + expected_dec, rel=1e-12)
    gates = 3 if arch == "egru" else 4
    dense = sum(gates * h * (i + h) for i, h in sizes)
    assert m[schema.OPS_DENSE] == dense
    nnz = sum(
        int((layer.weight_ih != 0).sum() + (layer.weight_hh != 0).sum()) for layer in model.layers
    )
    assert m[schema.OPS_WEIGHT_SPARSE] == nnz
    assert m[schema.SPARSITY_WEIGHT] == pytest.approx(
        1 - nnz / sum(gates * h * (i + h) for i, h in sizes)
    )
    zeros = sum(int((t.outputs[l] == 0).sum()) for t in chunks for l in range(2))
    total = sum(t.outputs[l].numel() for t in chunks for l in range(2))
    assert m[schema.SPARSITY_ACTIVITY] == pytest.approx(zeros / total)
    for l in range(2):
        z = sum(int((t.outputs[l] == 0).sum()) for t in chunks)
        assert m[schema.layer_activity(l)] == pytest.approx(
            z / sum(t.outputs[l].numel() for t in chunks)
        )
    s_w, s_a = m[schema.SPARSITY_WEIGHT], m[schema.SPARSITY_ACTIVITY]
    assert m[schema.OPS_MULTIPLICATIVE] == pytest.approx(dense * (1 - s_w) * (1 - s_a))
    assert m[schema.OPS_COMPUTE_REDUCTION] == pytest.approx(dense / expected_eff)
    assert m[schema.OPS_DECODER_DENSE] == 13 * 6
    rates = acc.unit_event_rates()
    assert len(rates) == 2 and len(rates[1]) == sizes[1][1]


def test_silent_units_are_the_units_that_emit_on_no_token():
    cfg = load_config(
        None,
        ["model.arch=egru", "model.embedding_size=4", "model.hidden_size=6", "model.num_layers=2"],
    ).model
    model = LanguageModel(cfg, vocab_size=7)
    gen = torch.Generator().manual_seed(3)
    acc = Accountant(model)
    chunks = []
    for _ in range(2):
        y0 = _sparse_activity((3, 2, 6), 0.5, gen)
        y0[:, :, [1, 4]] = 0  # layer 0: units 1 and 4 never emit
        y1 = _sparse_activity((3, 2, 4), 0.5, gen)
        y1[:, :, 2] = 0  # layer 1: unit 2 never emits
        chunks.append((y0, y1))
    chunks[1][0][0, 1, 4] = 0.7  # ... but unit 4 emits once, in the second chunk
    for y0, y1 in chunks:
        acc.update(
            Trace(
                inputs=[torch.ones(3, 2, 4), y0],
                outputs=[y0, y1],
                initial_outputs=[torch.zeros(2, 6), torch.zeros(2, 4)],
                decoder_input=y1,
            )
        )
    # brute force: a unit is silent when its output is zero at every step of every chunk
    silent = [
        [k for k in range(y.shape[-1]) if all(bool((c[l][..., k] == 0).all()) for c in chunks)]
        for l, y in enumerate(chunks[0])
    ]
    assert silent == [[1], [2]]
    m = acc.metrics()
    assert m[schema.layer_silent_units(0)] == pytest.approx(1 / 6)
    assert m[schema.layer_silent_units(1)] == pytest.approx(1 / 4)
    assert m[schema.SPARSITY_SILENT_UNITS] == pytest.approx(2 / 10)


def test_dense_model_costs_its_dense_macs():
    cfg = load_config(
        None, ["model.arch=gru", "model.embedding_size=4", "model.hidden_size=5"]
    ).model
    model = LanguageModel(cfg, vocab_size=7)
    acc = Accountant(model)
    trace = Trace(
        inputs=[torch.ones(3, 2, 4), torch.ones(3, 2, 5)],
        outputs=[torch.ones(3, 2, 5), torch.ones(3, 2, 4)],
        initial_outputs=[torch.ones(2, 5), torch.ones(2, 4)],
        decoder_input=torch.ones(3, 2, 4),
    )
    acc.update(trace)
    m = acc.metrics()
    assert m[schema.OPS_EFFECTIVE] == m[schema.OPS_DENSE] == 3 * 5 * (4 + 5) + 3 * 4 * (5 + 4)
    assert m[schema.OPS_COMPUTE_REDUCTION] == 1.0
    assert m[schema.SPARSITY_ACTIVITY] == 0.0
    assert m[schema.SPARSITY_SILENT_UNITS] == 0.0
    assert weight_sparsity(model) == 0.0
