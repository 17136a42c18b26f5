"""The models: the EGRU against a literal transcription of docs/design.md section 3, the
pseudo-derivative, fused kernels, state carry-over and activity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from duosparse import data
from duosparse.config import ConfigError, load_config
from duosparse.model import HeavisideTriangle, LanguageModel, RecurrentLayer, detach_state
from duosparse.train import evaluate


def _model_cfg(*overrides: str):
    return load_config(None, list(overrides)).model


def reference_egru(x, y0, c0, W, R, b_ih, b_hh, theta, height, width):
    """docs/design.md section 3, one line per equation, with separate gate matrices (cuDNN order
    r, u, z in the stacked weights)."""
    H = theta.numel()
    W_r, W_u, W_z = W[:H], W[H : 2 * H], W[2 * H :]
    R_r, R_u, R_z = R[:H], R[H : 2 * H], R[2 * H :]
    b_r = b_ih[:H] + b_hh[:H]
    b_u = b_ih[H : 2 * H] + b_hh[H : 2 * H]
    b_z, b_rz = b_ih[2 * H :], b_hh[2 * H :]
    y, c_prime, ys = y0, c0, []
    for x_t in x:
        u = torch.sigmoid(x_t @ W_u.T + y @ R_u.T + b_u)
        r = torch.sigmoid(x_t @ W_r.T + y @ R_r.T + b_r)
        z = torch.tanh(x_t @ W_z.T + r * (y @ R_z.T + b_rz) + b_z)
        c = u * c_prime + (1 - u) * z
        o = HeavisideTriangle.apply(c - theta, height, width)
        y = o * c
        c_prime = c - o * theta
        ys.append(y)
    return torch.stack(ys), y, c_prime


def test_egru_layer_equals_transcription_of_the_equations():
    torch.manual_seed(0)
    cfg = _model_cfg("model.arch=egru", "model.threshold=0.1")
    layer = RecurrentLayer("egru", 7, 11, cfg).double()
    with torch.no_grad():
        layer.threshold.uniform_(0.0, 0.3)  # per-unit thresholds
    x = torch.randn(9, 4, 7, dtype=torch.float64)
    y0 = torch.randn(4, 11, dtype=torch.float64).clamp(min=0)
    c0 = torch.randn(4, 11, dtype=torch.float64) * 0.5
    out, (y, c), events = layer(x, (y0, c0))
    ref_out, ref_y, ref_c = reference_egru(
        x,
        y0,
        c0,
        layer.weight_ih,
        layer.weight_hh,
        layer.bias_ih,
        layer.bias_hh,
        layer.threshold,
        layer.height,
        layer.width,
    )
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(c, ref_c, rtol=0, atol=1e-12)
    assert torch.equal(events, (out != 0).double())
    assert 0 < float(events.detach().mean()) < 1  # the test exercises both silent and active units
    # gradients agree too (through the pseudo-derivative, the reset and the recurrence)
    g = torch.autograd.grad(out.sum() + c.sum(), [layer.weight_hh, layer.threshold])
    layer.zero_grad()
    g_ref = torch.autograd.grad(ref_out.sum() + ref_c.sum(), [layer.weight_hh, layer.threshold])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_pseudo_derivative_is_the_triangle_in_double_precision():
    """Backward through H equals d/dv of the surrogate S(v) = integral of
    height * max(0, 1 - width * |s|), checked against central differences in float64."""
    height, width = 3.6, 2.5

    def surrogate(v):  # closed-form antiderivative of the triangle, S(0) = height / (2 width)
        a = torch.clamp(width * v.abs(), max=1.0)
        part = height * (a - a * a / 2) / width
        return torch.sign(v) * part + height / (2 * width)

    v = torch.linspace(-0.6, 0.6, 241, dtype=torch.float64)
    v = v[(v.abs() - 1 / width).abs() > 1e-3]  # keep away from the kinks at |v| = 1/width
    v = v[v.abs() > 1e-3]
    v.requires_grad_(True)
    out = HeavisideTriangle.apply(v, height, width)
    (grad,) = torch.autograd.grad(out.sum(), v)
    eps = 1e-6
    numeric = (surrogate(v.detach() + eps) - surrogate(v.detach() - eps)) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-7, atol=1e-8)
    assert torch.equal(out, (v > 0).double())
    assert HeavisideTriangle.apply(torch.zeros(1), height, width).item() == 0.0  # H(0) = 0
    # (torch's gradcheck cannot be aimed at H itself: its forward is a step, whose numerical
    # derivative is zero; the central differences of S above are the check)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_fused_layers_equal_torch_modules(arch):
    torch.manual_seed(1)
    layer = RecurrentLayer(arch, 5, 6, _model_cfg(f"model.arch={arch}"))
    ref = (torch.nn.LSTM if arch == "lstm" else torch.nn.GRU)(5, 6)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(layer.weight_ih)
        ref.weight_hh_l0.copy_(layer.weight_hh)
        ref.bias_ih_l0.copy_(layer.bias_ih)
        ref.bias_hh_l0.copy_(layer.bias_hh)
    x = torch.randn(8, 3, 5)
    state = layer.initial_state(3)
    out, _, _ = layer(x, state)
    ref_out, _ = ref(x)
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_a_stacked_model_trains_exactly_as_the_torch_nn_stack(arch):
    """Three layers, Adam with clipping, state carried across chunks: every step's loss equals
    the same model built from torch.nn.LSTM/GRU (num_layers=3), so a slow start of a deep
    model is the configuration's, not duosparse's (docs/results/reproductions.md, section 1)."""
    torch.manual_seed(4)
    corpus = data.synthetic_corpus(seed=5, train_tokens=3000, valid_tokens=300, test_tokens=300)
    cfg = _model_cfg(
        f"model.arch={arch}",
        "model.num_layers=3",
        "model.hidden_size=12",
        "model.embedding_size=8",
        "model.tie_weights=false",
    )
    ours = LanguageModel(cfg, corpus.vocab_size).double()
    rnn = (torch.nn.LSTM if arch == "lstm" else torch.nn.GRU)(8, 12, num_layers=3).double()
    embedding = torch.nn.Embedding(corpus.vocab_size, 8).double()
    decoder = torch.nn.Linear(12, corpus.vocab_size).double()
    with torch.no_grad():
        embedding.weight.copy_(ours.encoder.weight)
        decoder.weight.copy_(ours.decoder.weight)
        decoder.bias.copy_(ours.decoder.bias)
        for i, layer in enumerate(ours.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{name}_l{i}").copy_(getattr(layer, name))
    theirs = torch.nn.ModuleList([embedding, rnn, decoder])
    optimisers = [torch.optim.Adam(m.parameters(), lr=3e-3) for m in (ours, theirs)]
    stream = data.batchify(corpus.train, 4)
    state, hidden = ours.initial_state(4), None
    for step in range(12):
        x, y = stream[step * 10 : step * 10 + 10], stream[step * 10 + 1 : step * 10 + 11]
        state = detach_state(state)
        hidden = (
            None
            if hidden is None
            else tuple(h.detach() for h in hidden)
            if arch == "lstm"
            else hidden.detach()
        )
        logits, state, _ = ours(x, state)
        out, hidden = rnn(embedding(x), hidden)
        losses = [F.cross_entropy(z.flatten(0, 1), y.flatten()) for z in (logits, decoder(out))]
        for loss, model, optimiser in zip(losses, (ours, theirs), optimisers):
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimiser.step()
        assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-12), step


@pytest.mark.parametrize("arch", ["lstm", "gru", "egru"])
def test_one_long_chunk_equals_many_short_chunks(arch):
    """c' and y (or h, c) carry across chunks: evaluation does not depend on BPTT length."""
    torch.manual_seed(2)
    corpus = data.synthetic_corpus(seed=3, train_tokens=2000, valid_tokens=600, test_tokens=600)
    cfg = _model_cfg(
        f"model.arch={arch}",
        "model.hidden_size=24",
        "model.embedding_size=16",
        "model.threshold=0.05",
    ).model_copy()
    model = LanguageModel(cfg, corpus.vocab_size).double()
    stream = data.batchify(corpus.valid, 4)
    long = evaluate(model, stream, bptt=stream.size(0))
    short = evaluate(model, stream, bptt=7)
    assert long.loss == pytest.approx(short.loss, rel=1e-10)
    for key in ("sparsity/activity", "ops/effective_macs_per_token"):
        assert long.accounting[key] == pytest.approx(short.accounting[key], rel=1e-10)


def test_lstm_is_dense_and_a_high_threshold_egru_is_mostly_silent():
    torch.manual_seed(4)
    corpus = data.synthetic_corpus(seed=0)
    stream = data.batchify(corpus.valid, 8)
    lstm = LanguageModel(_model_cfg("model.arch=lstm"), corpus.vocab_size)
    egru = LanguageModel(_model_cfg("model.arch=egru", "model.threshold=0.5"), corpus.vocab_size)
    low = LanguageModel(_model_cfg("model.arch=egru", "model.threshold=0.0"), corpus.vocab_size)
    a_lstm = evaluate(lstm, stream, 35, max_batches=10).accounting["sparsity/activity"]
    a_egru = evaluate(egru, stream, 35, max_batches=10).accounting["sparsity/activity"]
    a_low = evaluate(low, stream, 35, max_batches=10).accounting["sparsity/activity"]
    assert a_lstm < 0.01
    assert a_egru > 0.9
    assert a_low < a_egru


def test_thresholds_stay_non_negative_and_train():
    torch.manual_seed(5)
    corpus = data.synthetic_corpus(seed=0)
    model = LanguageModel(_model_cfg("model.arch=egru", "model.threshold=0.01"), corpus.vocab_size)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    x, y = next(data.bptt_batches(data.batchify(corpus.train, 8), 20))
    for _ in range(5):
        logits, _, _ = model(x, model.initial_state(8))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        assert model.layers[0].threshold.grad is not None
        assert model.layers[0].threshold.grad.abs().sum() > 0  # thresholds are learned
        opt.step()
        model.clamp_thresholds()
    for layer in model.layers:
        assert (layer.threshold >= 0).all()


def test_dropouts_change_training_not_evaluation():
    torch.manual_seed(6)
    cfg = _model_cfg(
        "model.arch=egru",
        "model.dropout.embedding=0.2",
        "model.dropout.input=0.3",
        "model.dropout.hidden=0.3",
        "model.dropout.output=0.3",
        "model.dropout.weight=0.4",
    )
    model = LanguageModel(cfg, 50)
    x = torch.randint(0, 50, (10, 3))
    model.train()
    a, _, _ = model(x, model.initial_state(3))
    b, _, _ = model(x, model.initial_state(3))
    assert not torch.allclose(a, b)
    model.eval()
    c, _, _ = model(x, model.initial_state(3))
    d, _, _ = model(x, model.initial_state(3))
    assert torch.equal(c, d)


def test_tied_decoder_shares_the_embedding_and_last_layer_has_its_width():
    model = LanguageModel(
        _model_cfg("model.embedding_size=12", "model.hidden_size=20", "model.num_layers=3"), 30
    )
    assert [layer.hidden_size for layer in model.layers] == [20, 20, 12]
    assert model.decoder_weight() is model.encoder.weight
    untied = LanguageModel(_model_cfg("model.tie_weights=false", "model.num_layers=1"), 30)
    assert untied.layers[-1].hidden_size == 256
    assert untied.decoder_weight() is untied.decoder.weight


def test_detached_state_keeps_values():
    model = LanguageModel(_model_cfg("model.arch=egru"), 30)
    state = [tuple(t + 1.0 for t in s) for s in model.initial_state(2)]
    for s, d in zip(state, detach_state(state)):
        for a, b in zip(s, d):
            assert torch.equal(a, b) and not b.requires_grad


def _float64_egru(seed: int):
    """An EGRU layer (7 -> 11 units, thresholds up to 0.3) and a sequence of 9 steps x batch 4
    with a random start, all in float64 and all requiring gradients."""
    torch.manual_seed(seed)
    layer = RecurrentLayer("egru", 7, 11, _model_cfg("model.arch=egru")).double()
    with torch.no_grad():
        layer.threshold.uniform_(0.0, 0.3)
    x = torch.randn(9, 4, 7, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(4, 11, dtype=torch.float64).clamp(min=0).requires_grad_()
    c0 = (torch.randn(4, 11, dtype=torch.float64) * 0.5).requires_grad_()
    return layer, x, y0, c0


def test_fast_egru_sequence_equals_the_step_by_step_cell():
    """egru_kernel's hand-written BPTT against autograd through egru_cell, float64."""
    layer, x, y0, c0 = _float64_egru(8)
    weights = torch.rand(9, 4, 11, dtype=torch.float64)
    results = {}
    for fast in (False, True):
        layer.fast = fast
        out, (y, c), events = layer(x, (y0, c0))
        # every output carries gradient: sequence, final state, events (activity regulariser)
        loss = (out * weights).sum() + (0.3 * c).sum() + (0.2 * y).sum() + (0.7 * events).sum()
        params = [
            x,
            y0,
            c0,
            layer.weight_ih,
            layer.weight_hh,
            layer.bias_ih,
            layer.bias_hh,
            layer.threshold,
        ]
        results[fast] = (
            out.detach(),
            c.detach(),
            events.detach(),
            torch.autograd.grad(loss, params),
        )
    (out_a, c_a, ev_a, g_a), (out_b, c_b, ev_b, g_b) = results[False], results[True]
    assert torch.equal(out_a, out_b) and torch.equal(c_a, c_b) and torch.equal(ev_a, ev_b)
    assert 0 < float(ev_a.mean()) < 1
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_states_a_readout_reads_are_c_before_reset_with_their_gradient():
    """forward_with_states (model.readout: state): the fast loop against autograd through
    egru_cell, float64, with a loss on the states as well as on everything else; the states
    are c before its reset (y where a unit emits, c' where it is silent)."""
    layer, x, y0, c0 = _float64_egru(18)
    w_out, w_states = (torch.rand(9, 4, 11, dtype=torch.float64) for _ in range(2))
    params = [x, y0, c0, layer.weight_ih, layer.weight_hh, layer.bias_hh, layer.threshold]
    results = {}
    for fast in (False, True):
        layer.fast = fast
        out, (y, c), events, states = layer.forward_with_states(x, (y0, c0))
        loss = (out * w_out).sum() + (states * w_states).sum() + (0.3 * c).sum() + events.sum()
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        results[fast] = (out.detach(), c.detach(), events.detach(), states.detach()), grads
        # a loss on the states alone reaches every parameter too
        assert all(g.abs().sum() > 0 for g in torch.autograd.grad(states.sum(), params))
    (values_a, g_a), (values_b, g_b) = results[False], results[True]
    for a, b in zip(values_a[:3], values_b[:3], strict=True):
        assert torch.equal(a, b)
    # the reference adds the reset back (c' + o theta), the fast loop keeps c: equal to rounding
    torch.testing.assert_close(values_a[3], values_b[3], rtol=1e-15, atol=1e-15)
    out, _, events, states = values_b
    assert 0 < float(events.mean()) < 1
    assert torch.equal(out, events * states)  # y = o * c
    assert (states[events == 0] != 0).all()  # silent units have a state all the same
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and the states' gradient is not a no-op: without it, the gradients differ
    layer.fast = True
    out, (y, c), events, states = layer.forward_with_states(x, (y0, c0))
    loss = (out * w_out).sum() + (0.3 * c).sum() + events.sum()
    without = torch.autograd.grad(loss, params)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(g_b, without, strict=True))


def test_a_state_readout_feeds_the_decoder_the_top_layers_states_and_nothing_else():
    cfg = _model_cfg(
        "model.arch=egru", "model.num_layers=2", "model.embedding_size=8", "model.hidden_size=12",
        "model.tie_weights=false", "model.threshold=0.05",
    )  # fmt: skip
    torch.manual_seed(3)
    events_model = LanguageModel(cfg, 20)
    state_model = LanguageModel(cfg.model_copy(update={"readout": "state"}), 20)
    state_model.load_state_dict(events_model.state_dict())
    tokens = torch.randint(0, 20, (10, 3), generator=torch.Generator().manual_seed(4))
    logits_e, state_e, trace_e = events_model(tokens, events_model.initial_state(3))
    logits_s, state_s, trace_s = state_model(tokens, state_model.initial_state(3))
    # the layers run alike: same outputs, events and final states
    for a, b in zip(trace_e.outputs + trace_e.events, trace_s.outputs + trace_s.events):
        assert torch.equal(a, b)
    for a, b in zip(state_e, state_s, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    # the decoder reads the top layer's states: y where a unit emits, its state where not
    top = state_model.layers[-1]
    with torch.no_grad():
        _, _, events, states = top.forward_with_states(
            trace_s.inputs[-1], state_model.initial_state(3)[-1]
        )
    assert torch.equal(trace_s.decoder_input, states)
    torch.testing.assert_close(logits_s, state_model.decoder(states), rtol=0, atol=1e-6)
    assert torch.equal(trace_e.decoder_input, trace_e.outputs[-1])
    assert (logits_s - logits_e).abs().max() > 1e-3
    assert float(events.mean()) < 1 and float((states != 0).float().mean()) > 0.99


def test_a_state_readout_is_for_the_egru_only():
    with pytest.raises(ConfigError, match="model.readout: state .* model.arch is lstm"):
        load_config(None, ["model.arch=lstm", "model.readout=state"])
    assert load_config(None, ["model.arch=egru", "model.readout=state"]).model.readout == "state"


@pytest.mark.parametrize("batch, hidden", [(4, 11), (3, 37), (20, 128)])
def test_fast_egru_forward_is_bit_identical_in_float32(batch, hidden):
    """float32, where any change in the order or grouping of operations shows. (3, 37): batch *
    hidden is no multiple of the vector width (sigmoid's vector code and scalar tail round
    differently) and y_t is not 16-byte aligned (MKL's gemm rounds by alignment). Only the
    outputs carry gradient here: the backward with no gradient for c'_T and the events."""
    torch.manual_seed(9)
    layer = RecurrentLayer("egru", 7, hidden, _model_cfg("model.arch=egru"))
    with torch.no_grad():
        layer.threshold.uniform_(0.0, 0.3)
    x = torch.randn(13, batch, 7)
    y0 = torch.randn(batch, hidden).clamp(min=0)
    c0 = torch.randn(batch, hidden) * 0.5
    results = {}
    for fast in (False, True):
        layer.fast = fast
        out, (y, c), events = layer(x, (y0, c0))
        params = [layer.weight_ih, layer.weight_hh, layer.bias_hh, layer.threshold]
        results[fast] = (
            out.detach(),
            y.detach(),
            c.detach(),
            events.detach(),
            torch.autograd.grad(out.sum(), params),
        )
    (*values_a, g_a), (*values_b, g_b) = results[False], results[True]
    for a, b in zip(values_a, values_b):
        assert torch.equal(a, b)
    assert 0 < float(values_a[3].mean()) < 1
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
