"""The GPU kernels of the EGRU (duosparse.egru_triton), run on CPU by Triton's interpreter,
against autograd through the step-by-step reference cell (model.egru_cell): outputs, final
state, events and every gradient. On a GPU, benchmarks/gpu_check.py runs the same
comparison with the compiled kernels."""

from __future__ import annotations

import os

import pytest
import torch
from duosparse.config import load_config
from duosparse.model import RecurrentLayer

pytest.importorskip("triton")


@pytest.fixture
def interpreted():
    """duosparse.egru_triton with its kernels run by Triton's CPU interpreter (conftest.py sets
    TRITON_INTERPRET before Triton is imported)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET=1"
    from duosparse import egru_triton

    return egru_triton


def _layer(inputs: int, hidden: int, seed: int) -> RecurrentLayer:
    torch.manual_seed(seed)
    layer = RecurrentLayer("egru", inputs, hidden, load_config(None, ["model.arch=egru"]).model)
    with torch.no_grad():
        layer.threshold.uniform_(0.0, 0.3)  # per-unit thresholds, some units silent
    return layer


def _outputs_and_gradients(layer: RecurrentLayer, x, y0, c0, weights, sequence=None):
    """Run the layer (through `sequence` in place of its own path when given) and take the
    gradients of a loss that uses every output: the sequence, the final state and the events."""
    if sequence is None:
        layer.fast = False  # egru_cell, step by step, with autograd: the reference
        out, (y, c), events = layer(x, (y0, c0))
    else:
        x_proj = torch.nn.functional.linear(x, layer.weight_ih, layer.bias_ih)
        out, c, events = sequence(
            x_proj,
            y0,
            c0,
            layer.weight_hh,
            layer.bias_hh,
            layer.threshold,
            layer.height,
            layer.width,
        )
        y = out[-1]
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
    return (out.detach(), c.detach(), events.detach()), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("steps,batch,inputs,hidden", [(7, 3, 5, 9), (4, 5, 6, 130)])
def test_triton_kernels_equal_the_reference_cell(interpreted, steps, batch, inputs, hidden):
    """float32 kernels against the float64 reference on the same values: equal to float32
    rounding, and the same events. (4, 5, 6, 130) spans two programs of BLOCK elements, the
    second partly masked."""
    assert batch * hidden > interpreted.BLOCK or steps == 7
    layer = _layer(inputs, hidden, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(steps, batch, inputs, generator=gen)
    y0 = torch.randn(batch, hidden, generator=gen).clamp(min=0)
    c0 = torch.randn(batch, hidden, generator=gen) * 0.5
    weights = torch.rand(steps, batch, hidden, generator=gen)

    def leaves(dtype):
        return [t.to(dtype).requires_grad_() for t in (x, y0, c0)]

    triton_run = _outputs_and_gradients(
        layer, *leaves(torch.float32), weights, sequence=interpreted.EGRUSequenceTriton.apply
    )
    reference = _outputs_and_gradients(layer.double(), *leaves(torch.float64), weights.double())

    (out, c, events), grads = triton_run
    (ref_out, ref_c, ref_events), ref_grads = reference
    assert torch.equal(events.double(), ref_events)  # no unit sits within rounding of its threshold
    assert 0.05 < float(ref_events.mean()) < 0.95  # both silent and active units
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.double(), ref_c, rtol=1e-5, atol=1e-6)
    names = ["x", "y0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "threshold"]
    for name, g, ref in zip(names, grads, ref_grads):
        assert ref.abs().max() > 0, name  # every gradient is exercised
        torch.testing.assert_close(
            g.double(), ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_only_float32_takes_the_kernels(interpreted):
    x, w = torch.zeros(2, 1, 6), torch.zeros(6, 2)
    assert interpreted.supported(x, w)
    assert not interpreted.supported(x.double(), w.double())
    assert not interpreted.supported(x.half(), w)


def test_graph_family_replays_each_length_from_shared_buffers(interpreted):
    """The CUDA-graph bookkeeping with capture replaced by plain re-running (`capture=lambda
    run: run`): sequences of varying length (a variable BPTT) through one family give what the
    loops give called directly, and the buffers are allocated for the longest length, not per
    length."""
    batch, hidden = 3, 10
    gen = torch.Generator().manual_seed(5)

    def forward_tensors(steps):
        inputs = {
            "x_proj": torch.randn(steps, batch, 3 * hidden, generator=gen),
            "y0": torch.randn(batch, hidden, generator=gen).clamp(min=0),
            "c0": torch.randn(batch, hidden, generator=gen),
            "w_hh": torch.randn(3 * hidden, hidden, generator=gen) * 0.3,
            "b_hh": torch.randn(3 * hidden, generator=gen),
            "theta": torch.rand(hidden, generator=gen) * 0.3,
        }
        outputs = {
            "ys": torch.empty(steps, batch, hidden),
            "cs": torch.empty(steps, batch, hidden),
            "c_resets": torch.empty(steps + 1, batch, hidden),
            "gates": torch.empty(steps, batch, 4 * hidden),
            "h": torch.empty(batch, 3 * hidden),
        }
        return inputs, outputs

    family = interpreted._GraphFamily(
        interpreted._forward_loop, {"height": 1.0, "width": 1.0}, capture=lambda run: run
    )
    capacities = []
    for steps in (5, 3, 8, 3, 8, 6):
        inputs, outputs = forward_tensors(steps)
        got = family(steps, inputs, {k: tuple(v.shape) for k, v in outputs.items()})
        interpreted._forward_loop(**inputs, height=1.0, width=1.0, out=outputs)
        for name in ("ys", "cs", "c_resets", "gates"):
            assert got[name].shape == outputs[name].shape, name
            assert torch.equal(got[name], outputs[name]), (steps, name)
        capacities.append((family.capacity, family.buffers["x_proj"].data_ptr()))
    assert [c for c, _ in capacities] == [5, 5, 8, 8, 8, 8]  # grown once, to the longest length
    assert len({ptr for _, ptr in capacities[2:]}) == 1  # shorter lengths reuse the buffers
    assert sorted(family.graphs) == [3, 6, 8]  # one graph per length since the last growth
