"""benchmarks/egru_gap_probe.py: its variants are what they say. The EGRU variant is
duosparse's EGRU; with threshold 0 the variant whose decoder and recurrence both read the
state is exactly a GRU of the same weights; the dense readout changes what the decoder sees
and nothing else; and a short training run of each variant gives a finite perplexity."""

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
    logits, (read, c_after), events = probe.forward(
        model, tokens, model.layers[0].initial_state(3), *probe.VARIANTS["egru"]
    )
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(read, y, rtol=0, atol=1e-6)
    torch.testing.assert_close(c_after, c, rtol=0, atol=1e-6)
    assert torch.equal(events, trace.events[0])
    assert 0 < events.mean() < 1  # some units silent, some not: the variants differ


def test_reading_the_state_in_both_places_at_threshold_0_is_a_gru(probe):
    egru = _model(probe, "model.threshold_init=constant", "model.threshold=0.0")
    gru = LanguageModel(load_config(None, [*probe.EGRU_2B, *SMALL, "model.arch=gru"]).model, 50)
    gru.load_state_dict({k: v for k, v in egru.state_dict().items() if not k.endswith("threshold")})
    tokens = _tokens()
    expected, [(h,)], _ = gru(tokens, gru.initial_state(3))
    logits, (read, _), _ = probe.forward(
        egru, tokens, egru.layers[0].initial_state(3), *probe.VARIANTS["dense_both"]
    )
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read, h, rtol=1e-5, atol=1e-5)
    # and the EGRU itself is not that GRU: its silent units pass nothing on
    egru_logits, _, _ = probe.forward(
        egru, tokens, egru.layers[0].initial_state(3), *probe.VARIANTS["egru"]
    )
    assert (egru_logits - expected).abs().max() > 1e-3


def test_the_dense_readout_changes_the_decoders_input_only(probe):
    model = _model(probe)
    tokens = _tokens()
    start = model.layers[0].initial_state(3)
    sparse, sparse_state, events = probe.forward(model, tokens, start, *probe.VARIANTS["egru"])
    dense, dense_state, same_events = probe.forward(
        model, tokens, start, *probe.VARIANTS["dense_readout"]
    )
    assert torch.equal(events, same_events)
    for a, b in zip(sparse_state, dense_state):
        assert torch.equal(a, b)
    assert (sparse - dense).abs().max() > 1e-3
    # where every unit emits, y = c and the two readouts agree
    emitting = events.all(dim=-1)
    if emitting.any():
        torch.testing.assert_close(sparse[emitting], dense[emitting], rtol=0, atol=1e-6)


def test_every_variant_trains_and_reports(probe):
    corpus = data.synthetic_corpus(vocab_size=50, train_tokens=4_000, valid_tokens=1_000)
    config = load_config(None, [*probe.EGRU_2B, *SMALL])
    for name, variant in probe.VARIANTS.items():
        result = probe.train_variant(config, corpus, variant, steps=5)
        assert math.isfinite(result["val_ppl"]) and 1 < result["val_ppl"] < 200, name
        assert 0 <= result["activity_sparsity"] < 1, name
