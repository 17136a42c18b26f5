"""The EGRU over a whole sequence, as one autograd Function with a hand-written backward.

`model.egru_cell` is the readable definition (docs/design.md section 3); this module computes the
same thing faster: the forward loop runs without building an autograd graph, the backward
is the BPTT of those equations written out once, and the weight gradients of all time steps
are one matrix product each. Tests check it against the cell, value for value and gradient
for gradient.

Per step (cuDNN gate order r, u, z; x_proj = W x + b_ih precomputed outside):
    h = R y_{t-1} + b_hh
    r = s(x_r + h_r)   u = s(x_u + h_u)   z = tanh(x_z + r * h_z)
    c = u * c'_{t-1} + (1 - u) * z        o = H(c - theta)
    y_t = o * c                           c'_t = c - o * theta

At these sizes (a batch of 20 x a few hundred units) each torch call costs more in Python
and dispatch (~1.5-3 us) than in arithmetic, so both loops are written for few calls per step.

Forward: the same floating-point operations as `egru_cell` on the same values, hence the
same bits (tests check it in float32), in 13 calls per step instead of about 27: results are
written (out= / in place) into preallocated buffers, for the whole sequence where the
backward needs them and reused from step to step where not; no temporaries, no torch.cat.
Where two of egru_cell's calls became one, the result is provably unchanged: one add and one
sigmoid for r and u together, o = (c > theta) for (c - theta > 0), and c - o * theta as one
addcmul (o * theta is exact). Besides the operations, two things decide the bits and are kept
as egru_cell has them: how sigmoid's input splits into vector body and scalar tail, and the
16-byte alignment of y_t as a gemm operand (see `forward` and `_aligned_steps`). Constants are
0-dim tensors (a Python scalar is wrapped into a tensor on every call) and o is compared
straight into a float tensor (bool tensors take slower kernels).

Backward (the BPTT, equal to autograd through the cell up to rounding): the only recurrence
is the pair (dL/dy_t, dL/dc_t); with a_t = dL/dy_t (from the loss and through R) it is
    d_c_t = a_t * A_t + d_c_{t+1} * U_t + E_t
    d_h_t = d_c_t * K_t          (K_t: the three gates' local derivatives, (B, 3, H))
    a_{t-1} = dL/dy_{t-1} (loss) + d_h_t R
(E_t: the gradients that reach c_t from outside the recurrence: through the events, and
directly where a decoder reads the states c, model.readout: state, the fourth output)
where A, U, E, K depend only on forward values, so they are computed for all steps at once
before the loop (see `backward`), and the loop is one matmul and three element-wise calls
per step. dL/dx_proj, dL/dtheta and the weight gradients follow from the stored d_c and d_h
after the loop, again for all steps at once. The backward's temporaries are views into a
buffer kept between calls (`_scratch`): fresh, their pages would be faulted in every call.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Gap between the r and u blocks of the gate buffer, see EGRUSequence.forward.
_PAD = 16
# at::internal::GRAIN_SIZE: element-wise calls on fewer elements run on one thread.
_GRAIN_SIZE = 32768


class EGRUSequence(torch.autograd.Function):
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
        steps, (batch, hidden) = x_proj.size(0), y0.shape
        n = batch * hidden
        new = x_proj.new_empty
        # Kept for the backward: r, u, r * h_z, z, c (and the outputs y, o). Everything else
        # lives in per-step buffers that are overwritten: fewer fresh megabytes per call.

        # r and u of a step as two (B, H) blocks, computed by one add and one sigmoid. The gap
        # keeps TensorIterator from merging the blocks into one 2BH range: sigmoid's vector
        # and scalar (tail) code round differently, so each block must be split into vector
        # body and tail exactly as egru_cell's separate contiguous (B, H) sigmoids are.
        # Above torch's grain size one call is split over threads at other points than two
        # calls would be (and so again into other bodies and tails): there r and u get a call each.
        ru = new(steps, 2, n + _PAD)[:, :, :n].unflatten(-1, (batch, hidden))  # (T, 2, B, H)
        one_sigmoid = 2 * n < _GRAIN_SIZE
        rh_z, z_all, cs = (new(steps, batch, hidden) for _ in range(3))
        ys = _aligned_steps(x_proj, steps, batch, hidden)  # y_t is the next step's matmul operand
        h = new(batch, 3 * hidden)  # R y_{t-1} + b_hh of the current step
        h_ru, h_z = (
            h[:, : 2 * hidden].unflatten(-1, (2, hidden)).transpose(0, 1),
            h[:, 2 * hidden :],
        )
        c_last, pair = new(batch, hidden), (new(batch, hidden), new(batch, hidden))
        c_resets = [pair[t % 2] for t in range(steps - 1)] + [
            c_last
        ]  # c'_t, alternating; c'_T returned
        one, one_minus_u_z, o = x_proj.new_ones(()), new(batch, hidden), new(batch, hidden)

        # per-step views, made once (indexing inside the loop would cost a call each)
        views = (
            x_proj[..., : 2 * hidden].unflatten(-1, (2, hidden)).transpose(1, 2),
            x_proj[..., 2 * hidden :],
            ru,
            *ru.unbind(1),
            rh_z,
            z_all,
            cs,
            ys,
        )
        w_hh_t, y, c_prev = w_hh.t(), y0, c0
        for x_ru, x_z, ru_t, r, u, rh_z_t, z, c, y_t, c_next in zip(
            *(v.unbind(0) for v in views), c_resets
        ):
            torch.addmm(b_hh, y, w_hh_t, out=h)  # as F.linear(y, w_hh, b_hh)
            torch.add(x_ru, h_ru, out=ru_t)  # r, u = s(x + h)
            if one_sigmoid:
                ru_t.sigmoid_()
            else:
                r.sigmoid_()
                u.sigmoid_()
            torch.add(x_z, torch.mul(r, h_z, out=rh_z_t), out=z).tanh_()  # z = tanh(x_z + r * h_z)
            torch.mul(u, c_prev, out=c)  # c = u * c' + (1 - u) * z
            c.add_(torch.sub(one, u, out=one_minus_u_z).mul_(z))
            # o = H(c - theta) as 0./1.: c - theta > 0 exactly when c > theta (IEEE subtraction
            # of unequal numbers is never 0, unless flush-to-zero is switched on), so the
            # subtraction is skipped
            torch.gt(c, theta, out=o)
            y = torch.mul(o, c, out=y_t)
            # c' = c - o * theta in one call: o * theta is exact (o is 0 or 1), so fused or
            # not, c - o * theta is rounded once, as egru_cell's mul and sub do
            c_prev = torch.addcmul(c, o, theta, value=-1, out=c_next)
        events = torch.gt(cs, theta, out=torch.empty_like(cs))
        ctx.save_for_backward(ru, rh_z, z_all, cs, events, ys, y0, c0, w_hh, theta)
        ctx.height, ctx.width = height, width
        ctx.set_materialize_grads(False)  # outputs the loss does not use get None: work skipped
        return ys, c_last, events, cs  # cs: the states c before their reset (model.readout)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):
        d_ys, d_c_last, d_events, d_cs = grads  # outputs: ys, c'_T, events, states c
        ru, rh_z, z, c, o, ys, y0, c0, w_hh, theta = ctx.saved_tensors
        steps, batch, hidden = ys.shape
        r, u = ru.unbind(1)
        if d_ys is None:
            d_ys = torch.zeros_like(ys)
        seq, seq3 = (steps, batch, hidden), (steps, batch, 3, hidden)
        one_minus_u, p, coef_a, coef_u, d_az, a, d_c, d_c_reset, tmp, e, c_prev, k = _scratch(
            c, *[seq] * 11, seq3
        )
        c_prev[0] = c0  # c'_{t-1}, recomputed: c' = c - o theta
        torch.addcmul(c[:-1], o[:-1], theta, value=-1, out=c_prev[1:])
        d_h3 = c.new_empty(seq3)  # becomes dL/dx_proj, returned: not scratch

        # Local derivatives of all steps at once. Per step, with a = dL/dy_t and d_c' = dL/dc'_t:
        #   y = o c, c' = c - o theta, o = H(v), v = c - theta, H'(v) := P = height max(0, 1 - width |v|)
        #   d_o = a c - d_c' theta + dL/do_t          d_c = a o + d_c' + d_o P
        #       = a (o + c P) + d_c' (1 - theta P) + (dL/do_t) P = a A + d_c' B + E
        # and d_c' (from step t+1) = d_c_{t+1} u_{t+1}, so U_t = u_{t+1} B_t (B_T-1 meets d_c'_T).
        torch.sub(c, theta, out=p).abs_().mul_(-ctx.width).add_(1).clamp_(min=0).mul_(ctx.height)
        torch.mul(c, p, out=coef_a).add_(o)
        torch.mul(p, theta, out=coef_u).neg_().add_(1)
        coef_u[:-1].mul_(u[1:])
        direct = _gradient_from_outside(d_events, d_cs, p, out=e)  # E_t, when there is one
        # d_h = dL/d(R y_{t-1} + b_hh) = d_c * K:   d_c/d(pre-activation) for r, u and, through
        # r * h_z, for h_z:   K_z = (1 - u)(1 - z^2) r,  K_u = (c' - z) u (1 - u),  K_r = d_az r h_z (1 - r)
        k_r, k_u, k_z = k.unbind(2)
        torch.neg(u, out=one_minus_u).add_(1)
        torch.mul(z, z, out=d_az).neg_().add_(1).mul_(one_minus_u)  # d_c -> x_z + r h_z
        torch.mul(d_az, r, out=k_z)
        torch.sub(c_prev, z, out=k_u).mul_(u).mul_(one_minus_u)
        torch.neg(r, out=k_r).add_(1).mul_(rh_z).mul_(d_az)

        # the recurrence, backwards in time: one matmul and three element-wise calls per step
        d_h = d_h3.flatten(-2)  # (T, B, 3H)
        d_c3 = d_c.unsqueeze(2)  # (T, B, 1, H), broadcast over the three gates
        a[-1] = d_ys[-1]
        e_steps = e.unbind(0) if direct else [None] * steps
        d_c_next, d_h_next = d_c_last, None  # d_c_last None: c'_T is not used
        for a_t, d_ys_t, e_t, coef_a_t, coef_u_t, k_t, d_c_t, d_c3_t, d_h3_t, d_h_t in reversed(
            list(
                zip(
                    *(v.unbind(0) for v in (a, d_ys)),
                    e_steps,
                    *(v.unbind(0) for v in (coef_a, coef_u, k, d_c, d_c3, d_h3, d_h)),
                )
            )
        ):
            if d_h_next is not None:
                torch.addmm(d_ys_t, d_h_next, w_hh, out=a_t)  # dL/dy_t: loss + through R
            if e_t is None:
                torch.mul(a_t, coef_a_t, out=d_c_t)
            else:
                torch.addcmul(e_t, a_t, coef_a_t, out=d_c_t)
            if d_c_next is not None:
                d_c_t.addcmul_(d_c_next, coef_u_t)
            torch.mul(d_c3_t, k_t, out=d_h3_t)
            d_c_next, d_h_next = d_c_t, d_h_t
        d_y0 = d_h[0] @ w_hh
        d_c0 = d_c[0] * u[0]
        # weight gradients of all steps in one product; y_{t-1} is y0, then ys[:-1]
        d_w_hh = torch.addmm(d_h[0].t() @ y0, d_h[1:].flatten(0, 1).t(), ys[:-1].flatten(0, 1))
        d_b_hh = d_h.sum((0, 1))
        # dL/dx_proj: d_h, except that the z pre-activation does not pass through r (in place)
        d_x = d_h
        torch.mul(d_c, d_az, out=d_x[..., 2 * hidden :])
        # dL/dtheta = -sum (d_c' o + d_o P), with d_c' of each step and d_o as above
        torch.mul(d_c[1:], u[1:], out=d_c_reset[:-1])
        if d_c_last is None:
            d_c_reset[-1] = 0
        else:
            d_c_reset[-1] = d_c_last
        d_o = torch.mul(a, c, out=tmp).sub_(
            torch.mul(d_c_reset, theta, out=coef_a)
        )  # coef_a is free
        if d_events is not None:
            d_o += d_events
        d_theta = d_o.mul_(p).addcmul_(d_c_reset, o).sum((0, 1)).neg_()
        return d_x, d_y0, d_c0, d_w_hh, d_b_hh, d_theta, None, None


def _gradient_from_outside(
    d_events: Tensor | None, d_cs: Tensor | None, p: Tensor, out: Tensor
) -> bool:
    """E_t = (dL/do_t) P_t + dL/dc_t into `out`: what reaches c_t from outside the recurrence,
    through the events and, where a decoder reads the states (model.readout: state),
    directly. False, and `out` untouched, when nothing does."""
    if d_events is None and d_cs is None:
        return False
    if d_events is None:
        out.copy_(d_cs)
    else:
        torch.mul(d_events, p, out=out)
        if d_cs is not None:
            out.add_(d_cs)
    return True


_scratch_buffers = threading.local()


def _scratch(like: Tensor, *shapes: tuple[int, ...]) -> list[Tensor]:
    """Empty tensors for the backward's temporaries, views into one buffer that is kept (per
    thread, dtype and device) and reused by the next call. Freshly allocated, these megabytes
    often come as new pages from the OS (glibc hands freed memory at the top of the heap
    back), and faulting them in cost up to a tenth of a forward + backward pass. Holds the
    largest request seen: 11 (T, B, H) and one (T, B, 3H), 16 MB for T 35, B 20, H 400 in float32."""
    per_line = max(1, 64 // like.element_size())  # each view 64-byte aligned
    sizes = [-(-math.prod(shape) // per_line) * per_line for shape in shapes]
    buffers = _scratch_buffers.__dict__.setdefault("by_kind", {})
    buffer = buffers.get((like.dtype, like.device))
    if buffer is None or buffer.numel() < sum(sizes):
        buffer = buffers[like.dtype, like.device] = like.new_empty(sum(sizes))
    views, offset = [], 0
    for shape, size in zip(shapes, sizes):
        views.append(buffer[offset : offset + math.prod(shape)].view(shape))
        offset += size
    return views


def _aligned_steps(like: Tensor, steps: int, batch: int, width: int) -> Tensor:
    """An empty (steps, batch, width) buffer in which every step starts on a 64-byte boundary,
    as a freshly allocated tensor does: MKL's gemm rounds differently for operands that are
    not 16-byte aligned, so y_t must be as aligned as egru_cell's to give the same bits.
    Contiguous when batch * width elements fill whole 64-byte lines."""
    n, per_line = batch * width, max(1, 64 // like.element_size())
    stride = -(-n // per_line) * per_line
    return like.new_empty(steps, stride)[:, :n].unflatten(-1, (batch, width))


def egru_sequence(
    x_proj: Tensor,
    y0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    theta: Tensor,
    height: float,
    width: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(outputs (T,B,H), y_T, c'_T, events (T,B,H), states c before reset (T,B,H)) for a
    whole sequence."""
    ys, c_last, events, cs = EGRUSequence.apply(x_proj, y0, c0, w_hh, b_hh, theta, height, width)
    return ys, ys[-1], c_last, events, cs
