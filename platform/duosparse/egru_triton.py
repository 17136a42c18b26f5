"""The EGRU on an NVIDIA GPU: `egru_kernel`'s whole-sequence forward and BPTT with each time
step's element-wise work fused into one Triton kernel.

Per time step the forward is one cuBLAS product (R y_{t-1} + b_hh) and one kernel that does
everything else (gates, state, event, reset; the equations of `model.egru_cell`); the
backward is one kernel and one product (dL/dh_t R). The weight gradient of all steps is one
product, as on CPU. A plain per-step PyTorch loop launches about 20 kernels per step forward
and 40 backward, each too small to fill the GPU; here it is 2 and 2.

On CUDA (`CUDA_GRAPHS`, on by default) each sequence loop is captured once per shape as a
CUDA graph and replayed, which removes the per-launch CPU cost (without graphs the GPU waits
on Python's launches); graphs of the same sizes and different lengths share their buffers.

The kernels also run on CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before
this module is imported): that is how tests/test_egru_triton.py checks them on machines
without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 512  # elements of the (batch x hidden) step per program
ENABLED = True  # False: CUDA runs egru_kernel's PyTorch loop instead (for comparisons)
CUDA_GRAPHS = True  # capture each sequence loop as a CUDA graph (CUDA only)


@triton.jit
def _tanh(a):
    return 2.0 * tl.sigmoid(2.0 * a) - 1.0  # libdevice's tanh has no interpreter version


@triton.jit
def _forward_step(
    x_ptr,
    h_ptr,
    c_prev_ptr,
    theta_ptr,  # inputs: W x_t + b_ih, R y_{t-1} + b_hh, c'_{t-1}, theta
    y_ptr,
    c_ptr,
    c_next_ptr,
    gates_ptr,  # outputs: y_t, c_t, c'_t, (r, u, z, h_z)
    n,
    hidden,
    height,
    width,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    b, j = i // hidden, i % hidden
    row3, row4 = b * 3 * hidden + j, b * 4 * hidden + j  # [r | u | z] and [r | u | z | h_z] rows
    x_r = tl.load(x_ptr + row3, mask=mask)
    x_u = tl.load(x_ptr + row3 + hidden, mask=mask)
    x_z = tl.load(x_ptr + row3 + 2 * hidden, mask=mask)
    h_r = tl.load(h_ptr + row3, mask=mask)
    h_u = tl.load(h_ptr + row3 + hidden, mask=mask)
    h_z = tl.load(h_ptr + row3 + 2 * hidden, mask=mask)
    c_prev = tl.load(c_prev_ptr + i, mask=mask)
    theta = tl.load(theta_ptr + j, mask=mask)

    r = tl.sigmoid(x_r + h_r)
    u = tl.sigmoid(x_u + h_u)
    z = _tanh(x_z + r * h_z)
    c = u * c_prev + (1 - u) * z
    o = c - theta > 0
    y = tl.where(o, c, 0.0)
    c_next = tl.where(o, c - theta, c)

    tl.store(y_ptr + i, y, mask=mask)
    tl.store(c_ptr + i, c, mask=mask)
    tl.store(c_next_ptr + i, c_next, mask=mask)
    tl.store(gates_ptr + row4, r, mask=mask)
    tl.store(gates_ptr + row4 + hidden, u, mask=mask)
    tl.store(gates_ptr + row4 + 2 * hidden, z, mask=mask)
    tl.store(gates_ptr + row4 + 3 * hidden, h_z, mask=mask)


@triton.jit
def _backward_step(
    d_y_out_ptr,
    d_y_rec_ptr,
    d_event_ptr,  # dL/dy_t from above, through R, dL/do_t
    d_c_next_ptr,
    d_theta_ptr,  # dL/dc'_t (in: from step t+1, out: for step t-1); sum of dL/dtheta
    gates_ptr,
    c_ptr,
    c_prev_ptr,
    theta_ptr,  # saved: (r, u, z, h_z), c_t, c'_{t-1}
    d_x_ptr,
    d_h_ptr,  # outputs: dL/d(W x_t + b_ih), dL/d(R y_{t-1} + b_hh)
    n,
    hidden,
    height,
    width,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    b, j = i // hidden, i % hidden
    row3, row4 = b * 3 * hidden + j, b * 4 * hidden + j
    r = tl.load(gates_ptr + row4, mask=mask)
    u = tl.load(gates_ptr + row4 + hidden, mask=mask)
    z = tl.load(gates_ptr + row4 + 2 * hidden, mask=mask)
    h_z = tl.load(gates_ptr + row4 + 3 * hidden, mask=mask)
    c = tl.load(c_ptr + i, mask=mask)
    c_prev = tl.load(c_prev_ptr + i, mask=mask)
    theta = tl.load(theta_ptr + j, mask=mask)
    d_y = tl.load(d_y_out_ptr + i, mask=mask) + tl.load(d_y_rec_ptr + i, mask=mask)
    d_c_next = tl.load(d_c_next_ptr + i, mask=mask)

    # y = o * c ; c' = c - o * theta ; o = H(c - theta), pseudo-derivative a triangle
    v = c - theta
    o = tl.where(v > 0, 1.0, 0.0)
    d_o = d_y * c - d_c_next * theta + tl.load(d_event_ptr + i, mask=mask)
    d_v = d_o * height * tl.maximum(1 - width * tl.abs(v), 0.0)
    d_c = d_y * o + d_c_next + d_v
    d_theta = tl.load(d_theta_ptr + i, mask=mask) - (d_c_next * o + d_v)
    # c = u * c'_{t-1} + (1 - u) * z ; z = tanh(x_z + r * h_z) ; u, r = s(x + h)
    d_az = d_c * (1 - u) * (1 - z * z)
    d_au = d_c * (c_prev - z) * u * (1 - u)
    d_ar = d_az * h_z * r * (1 - r)

    tl.store(d_c_next_ptr + i, d_c * u, mask=mask)
    tl.store(d_theta_ptr + i, d_theta, mask=mask)
    tl.store(d_x_ptr + row3, d_ar, mask=mask)
    tl.store(d_x_ptr + row3 + hidden, d_au, mask=mask)
    tl.store(d_x_ptr + row3 + 2 * hidden, d_az, mask=mask)
    tl.store(d_h_ptr + row3, d_ar, mask=mask)
    tl.store(d_h_ptr + row3 + hidden, d_au, mask=mask)
    tl.store(d_h_ptr + row3 + 2 * hidden, d_az * r, mask=mask)


def _forward_loop(
    x_proj: Tensor,
    y0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    theta: Tensor,
    height: float,
    width: float,
    out: dict[str, Tensor],
) -> None:
    """Fill out["ys"], out["cs"] (c_t), out["c_resets"] (c'_{-1} = c0, c'_0, ...), out["gates"]."""
    steps, batch, hidden = out["ys"].shape
    n = batch * hidden
    grid = (triton.cdiv(n, BLOCK),)
    h, c_resets = out["h"], out["c_resets"]
    c_resets[0].copy_(c0)
    y_prev = y0
    for t in range(steps):
        torch.addmm(b_hh, y_prev, w_hh.t(), out=h)
        _forward_step[grid](
            x_proj[t],
            h,
            c_resets[t],
            theta,
            out["ys"][t],
            out["cs"][t],
            c_resets[t + 1],
            out["gates"][t],
            n,
            hidden,
            height,
            width,
            BLOCK=BLOCK,
        )
        y_prev = out["ys"][t]


def _backward_loop(
    d_ys: Tensor,
    d_c_last: Tensor,
    d_events: Tensor,
    gates: Tensor,
    cs: Tensor,
    c_resets: Tensor,
    w_hh: Tensor,
    theta: Tensor,
    height: float,
    width: float,
    out: dict[str, Tensor],
) -> None:
    """Fill out["d_x"] and out["d_h"] (per step), out["d_y"] (dL/dy0), out["d_c"] (dL/dc0) and
    out["d_theta"] (per batch row)."""
    steps, batch, hidden = d_ys.shape
    n = batch * hidden
    grid = (triton.cdiv(n, BLOCK),)
    d_y_rec, d_c, d_theta = out["d_y"], out["d_c"], out["d_theta"]
    d_y_rec.zero_()
    d_c.copy_(d_c_last)
    d_theta.zero_()
    for t in range(steps - 1, -1, -1):
        _backward_step[grid](
            d_ys[t],
            d_y_rec,
            d_events[t],
            d_c,
            d_theta,
            gates[t],
            cs[t],
            c_resets[t],
            theta,
            out["d_x"][t],
            out["d_h"][t],
            n,
            hidden,
            height,
            width,
            BLOCK=BLOCK,
        )
        torch.mm(out["d_h"][t], w_hh, out=d_y_rec)


# Tensors whose first dimension is the time step (c_resets has one entry more).
_PER_STEP = {"x_proj", "ys", "cs", "c_resets", "gates", "d_ys", "d_events", "d_x", "d_h"}


def _cuda_graph(run: Callable[[], None]) -> Callable[[], None]:
    """Capture `run` as a CUDA graph; returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # once before capture: compiles the kernels, sets up cuBLAS
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # nothing is allocated inside: its private pool stays empty
        run()
    return graph.replay


class _GraphFamily:
    """Graphs of one loop for fixed batch and layer sizes: one graph per sequence length, all
    reading and writing one set of static buffers sized for the longest length seen, so a
    variable BPTT length (AWD-LSTM's) costs a graph per length but memory only once.
    `capture(run) -> replay` is CUDA graph capture (tests pass `lambda run: run`)."""

    def __init__(
        self, loop, scalars: dict, capture: Callable[[Callable[[], None]], Callable[[], None]]
    ):
        self.loop, self.scalars, self.capture = loop, scalars, capture
        self.capacity = 0  # time steps the buffers hold
        self.buffers: dict[str, Tensor] = {}
        self.graphs: dict[int, tuple[Callable[[], None], dict, dict]] = {}

    def __call__(
        self, steps: int, inputs: dict[str, Tensor], outputs: dict[str, tuple[int, ...]]
    ) -> dict[str, Tensor]:
        if steps > self.capacity:  # (re)allocate, with room to grow after the first time
            self.capacity = steps if not self.capacity else max(steps, self.capacity * 5 // 4)
            shapes = {**{k: v.shape for k, v in inputs.items()}, **outputs}
            like = next(iter(inputs.values()))
            self.buffers = {
                k: like.new_empty(self._shape(k, shape, steps)) for k, shape in shapes.items()
            }
            self.graphs.clear()  # they point at the old buffers
        if steps not in self.graphs:
            static_inputs = {k: self._view(k, steps) for k in inputs}
            static_outputs = {k: self._view(k, steps) for k in outputs}
            replay = self.capture(
                lambda: self.loop(**static_inputs, **self.scalars, out=static_outputs)
            )
            self.graphs[steps] = replay, static_inputs, static_outputs
        replay, static_inputs, static_outputs = self.graphs[steps]
        for k, v in inputs.items():
            static_inputs[k].copy_(v)
        replay()
        return {k: v.clone() for k, v in static_outputs.items()}  # the next replay overwrites them

    def _shape(self, name: str, shape: tuple[int, ...], steps: int) -> tuple[int, ...]:
        if name not in _PER_STEP:
            return tuple(shape)
        return (self.capacity + shape[0] - steps, *shape[1:])

    def _view(self, name: str, steps: int) -> Tensor:
        buffer = self.buffers[name]
        return buffer[: steps + buffer.size(0) - self.capacity] if name in _PER_STEP else buffer


_graphs: dict[tuple, _GraphFamily] = {}


def _run(
    loop, steps: int, inputs: dict[str, Tensor], outputs: dict[str, tuple[int, ...]], **scalars
) -> dict[str, Tensor]:
    """loop(**inputs, **scalars, out=) into new tensors of the `outputs` shapes, on CUDA (where
    enabled) through a graph captured once per shape; returns tensors the caller owns."""
    first = next(iter(inputs.values()))
    if not (CUDA_GRAPHS and first.is_cuda):
        out = {k: first.new_empty(shape) for k, shape in outputs.items()}
        loop(**inputs, **scalars, out=out)
        return out
    sizes = tuple(v.shape[1:] if k in _PER_STEP else v.shape for k, v in inputs.items())
    key = (
        loop.__name__,
        first.device,
        first.dtype,
        sizes,
        *scalars.values(),
        torch.backends.cuda.matmul.allow_tf32,
    )  # a graph keeps the math mode it was captured with
    if key not in _graphs:
        _graphs[key] = _GraphFamily(loop, scalars, _cuda_graph)
    return _graphs[key](steps, inputs, outputs)


class EGRUSequenceTriton(torch.autograd.Function):
    """`egru_kernel.EGRUSequence` with fused steps: the same inputs, outputs and gradients."""

    @staticmethod
    def forward(
        ctx,
        x_proj: Tensor,
        y0: Tensor,
        c0: Tensor,
        w_hh: Tensor,
        b_hh: Tensor,
        theta: Tensor,
        height: float,
        width: float,
    ):
        steps, batch, hidden = x_proj.size(0), x_proj.size(1), x_proj.size(2) // 3
        out = _run(
            _forward_loop,
            steps,
            {
                "x_proj": x_proj.contiguous(),
                "y0": y0.contiguous(),
                "c0": c0.contiguous(),
                "w_hh": w_hh.contiguous(),
                "b_hh": b_hh.contiguous(),
                "theta": theta.contiguous(),
            },
            {
                "ys": (steps, batch, hidden),
                "cs": (steps, batch, hidden),
                "c_resets": (steps + 1, batch, hidden),
                "gates": (steps, batch, 4 * hidden),
                "h": (batch, 3 * hidden),
            },
            height=height,
            width=width,
        )
        ys, cs, c_resets = out["ys"], out["cs"], out["c_resets"]
        events = (cs > theta).to(ys.dtype)
        ctx.save_for_backward(ys, cs, c_resets, out["gates"], y0, w_hh, theta)
        ctx.height, ctx.width = height, width
        return ys, c_resets[-1].clone(), events

    @staticmethod
    def backward(ctx, d_ys: Tensor, d_c_last: Tensor, d_events: Tensor):
        ys, cs, c_resets, gates, y0, w_hh, theta = ctx.saved_tensors
        steps, batch, hidden = ys.shape
        out = _run(
            _backward_loop,
            steps,
            {
                "d_ys": d_ys.contiguous(),
                "d_c_last": d_c_last.contiguous(),
                "d_events": d_events.contiguous(),
                "gates": gates,
                "cs": cs,
                "c_resets": c_resets,
                "w_hh": w_hh.contiguous(),
                "theta": theta.contiguous(),
            },
            {
                "d_x": (steps, batch, 3 * hidden),
                "d_h": (steps, batch, 3 * hidden),
                "d_y": (batch, hidden),
                "d_c": (batch, hidden),
                "d_theta": (batch, hidden),
            },
            height=ctx.height,
            width=ctx.width,
        )
        d_h = out["d_h"]
        y_prev = torch.cat((y0[None], ys[:-1]))
        d_w_hh = d_h.flatten(0, 1).t() @ y_prev.flatten(0, 1)  # all steps in one product
        return (
            out["d_x"],
            out["d_y"],
            out["d_c"],
            d_w_hh,
            d_h.sum((0, 1)),
            out["d_theta"].sum(0),
            None,
            None,
        )


def supported(x_proj: Tensor, w_hh: Tensor) -> bool:
    """Whether these kernels take the sequence: float32 throughout (other dtypes run the
    PyTorch loop of egru_kernel)."""
    return ENABLED and x_proj.dtype == w_hh.dtype == torch.float32


def egru_sequence(
    x_proj: Tensor,
    y0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    theta: Tensor,
    height: float,
    width: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(outputs (T,B,H), y_T, c'_T, events (T,B,H)), as egru_kernel.egru_sequence."""
    ys, c_last, events = EGRUSequenceTriton.apply(x_proj, y0, c0, w_hh, b_hh, theta, height, width)
    return ys, ys[-1], c_last, events
