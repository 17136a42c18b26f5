"""benchmarks/egru_gap_probe.py: its variants are what they say. The EGRU variant is
duosparse's EGRU, at one layer and in a stack; with threshold 0 the variant that reads the
state everywhere is exactly a GRU (stack) of the same weights; the dense readout changes what
the decoder sees and nothing else, and the dense feedforward also what the layers above see;
and a short training run of each variant gives a finite perplexity."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from duosparse import data
from duosparse.config import load_config
from duosparse.model import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.embedding_size=16", "model.hidden_size=24"]


@pytest.fixture(scope="module")
def probe():
    name = "egru_gap_probe"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _model(probe, *overrides: str) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(load_config(None, [*probe.EGRU_2B, *SMALL, *overrides]).model, 50)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 50, (12, 3), generator=torch.Generator().manual_seed(1))


def test_the_egru_variant_is_duosparses_egru(probe):
    model = _model(probe)
    tokens = _tokens()
    expected, [(y, c)], trace = model(tokens, model.initial_state(3))
    logits, [(read, c_after)], events = probe.forward(
        model, tokens, model.initial_state(3), probe.VARIANTS["egru"]
    )
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(read, y, rtol=0, atol=1e-6)
    torch.testing.assert_close(c_after, c, rtol=0, atol=1e-6)
    assert torch.equal(events[0], trace.events[0])
    assert 0 < events.mean() < 1  # some units silent, some not: the variants differ


def test_the_egru_variant_is_duosparses_egru_stack(probe):
    model = _model(probe, "model.num_layers=3")
    tokens = _tokens()
    expected, state, trace = model(tokens, model.initial_state(3))
    logits, probe_state, events = probe.forward(
        model, tokens, model.initial_state(3), probe.VARIANTS["egru"]
    )
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    for (read, c_after), (y, c) in zip(probe_state, state, strict=True):
        torch.testing.assert_close(read, y, rtol=0, atol=1e-6)
        torch.testing.assert_close(c_after, c, rtol=0, atol=1e-6)
    assert torch.equal(events, torch.stack(trace.events))
    assert all(0 < layer.mean() < 1 for layer in events)


@pytest.mark.parametrize("layers", [1, 3])
def test_reading_the_state_everywhere_at_threshold_0_is_a_gru(probe, layers):
    depth = f"model.num_layers={layers}"
    egru = _model(probe, depth, "model.threshold_init=constant", "model.threshold=0.0")
    config = load_config(None, [*probe.EGRU_2B, *SMALL, depth, "model.arch=gru"])
    gru = LanguageModel(config.model, 50)
    gru.load_state_dict({k: v for k, v in egru.state_dict().items() if not k.endswith("threshold")})
    tokens = _tokens()
    expected, gru_state, _ = gru(tokens, gru.initial_state(3))
    logits, state, _ = probe.forward(
        egru, tokens, egru.initial_state(3), probe.VARIANTS["dense_both"]
    )
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for (read, _), (h,) in zip(state, gru_state, strict=True):
        torch.testing.assert_close(read, h, rtol=1e-5, atol=1e-5)
    # and the EGRU itself is not that GRU: its silent units pass nothing on
    egru_logits, _, _ = probe.forward(egru, tokens, egru.initial_state(3), probe.VARIANTS["egru"])
    assert (egru_logits - expected).abs().max() > 1e-3


def test_the_dense_readout_changes_the_decoders_input_only(probe):
    model = _model(probe)
    tokens = _tokens()
    start = model.initial_state(3)
    sparse, sparse_state, events = probe.forward(model, tokens, start, probe.VARIANTS["egru"])
    dense, dense_state, same_events = probe.forward(
        model, tokens, start, probe.VARIANTS["dense_readout"]
    )
    assert torch.equal(events, same_events)
    for a, b in zip(sparse_state[0], dense_state[0], strict=True):
        assert torch.equal(a, b)
    assert (sparse - dense).abs().max() > 1e-3
    # where every unit emits, y = c and the two readouts agree
    emitting = events[0].all(dim=-1)
    if emitting.any():
        torch.testing.assert_close(sparse[emitting], dense[emitting], rtol=0, atol=1e-6)
    # at one layer there is no layer above, so the dense feedforward is the dense readout
    same, _, _ = probe.forward(model, tokens, start, probe.VARIANTS["dense_feedforward"])
    assert torch.equal(same, dense)


def test_in_a_stack_the_dense_readout_leaves_the_lower_layers_alone(probe):
    model = _model(probe, "model.num_layers=3")
    tokens = _tokens()
    start = model.initial_state(3)
    _, sparse_state, events = probe.forward(model, tokens, start, probe.VARIANTS["egru"])
    _, readout_state, readout_events = probe.forward(
        model, tokens, start, probe.VARIANTS["dense_readout"]
    )
    _, feedforward_state, feedforward_events = probe.forward(
        model, tokens, start, probe.VARIANTS["dense_feedforward"]
    )
    # the dense readout changes only the decoder's input: every layer runs as in the EGRU
    assert torch.equal(events, readout_events)
    for a, b in zip(sparse_state, readout_state, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # the dense feedforward leaves layer 1 as it was and changes what layer 2 sees
    assert torch.equal(events[0], feedforward_events[0])
    assert not torch.equal(sparse_state[1][1], feedforward_state[1][1])


def test_every_variant_trains_and_reports(probe):
    corpus = data.synthetic_corpus(vocab_size=50, train_tokens=4_000, valid_tokens=1_000)
    for preset in ([], probe.DEPTH):
        config = load_config(None, [*probe.EGRU_2B, *SMALL, *preset])
        for name, variant in probe.VARIANTS.items():
            result = probe.train_variant(config, corpus, variant, steps=5)
            assert math.isfinite(result["val_ppl"]) and 1 < result["val_ppl"] < 200, name
            layers = result["activity_sparsity_per_layer"]
            assert len(layers) == config.model.num_layers, name
            assert all(0 <= a < 1 for a in layers), name


def test_the_dense_readout_is_duosparses_state_readout(probe):
    """model.readout: state is the probe's dense_readout, in a stack."""
    model = _model(probe, "model.num_layers=3")
    state_readout = LanguageModel(model.cfg.model_copy(update={"readout": "state"}), 50)
    state_readout.load_state_dict(model.state_dict())
    tokens = _tokens()
    expected, _, trace = state_readout(tokens, state_readout.initial_state(3))
    logits, _, events = probe.forward(
        model, tokens, model.initial_state(3), probe.VARIANTS["dense_readout"]
    )
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert torch.equal(events, torch.stack(trace.events))
