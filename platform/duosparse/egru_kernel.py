"""The EGRU over a whole sequence, as one autograd Function with a hand-written backward.

`model.egru_cell` is the readable definition (DESIGN.md section 3); this module computes the
same thing faster: the forward loop runs without building an autograd graph, the backward
is the BPTT of those equations written out once, and the weight gradients of all time steps
are one matrix product each. Tests check it against the cell, value for value and gradient
for gradient.

Per step (cuDNN gate order r, u, z; x_proj = W x + b_ih precomputed outside):
    h = R y_{t-1} + b_hh
    r = s(x_r + h_r)   u = s(x_u + h_u)   z = tanh(x_z + r * h_z)
    c = u * c'_{t-1} + (1 - u) * z        o = H(c - theta)
    y_t = o * c                           c'_t = c - o * theta
"""

from __future__ import annotations

import torch
from torch import Tensor


class EGRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_proj: Tensor, y0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Tensor,
                theta: Tensor, height: float, width: float):
        steps = x_proj.size(0)
        hidden = y0.size(-1)
        ys = x_proj.new_empty(steps, *y0.shape)
        cs = torch.empty_like(ys)  # c before the reset (the pseudo-derivative needs c - theta)
        gates = x_proj.new_empty(steps, y0.size(0), 4 * hidden)  # r, u, z, h_z per step
        y, c_prev = y0, c0
        for t in range(steps):
            h = torch.addmm(b_hh, y, w_hh.t())
            x_r, x_u, x_z = x_proj[t].split(hidden, -1)
            h_r, h_u, h_z = h.split(hidden, -1)
            r = torch.sigmoid(x_r + h_r)
            u = torch.sigmoid(x_u + h_u)
            z = torch.tanh(x_z + r * h_z)
            c = u * c_prev + (1 - u) * z  # the same operations as egru_cell: equal bits
            o = (c - theta > 0).to(c.dtype)
            y = o * c
            c_prev = c - o * theta
            ys[t], cs[t] = y, c
            torch.cat((r, u, z, h_z), -1, out=gates[t])
        events = (cs - theta > 0).to(ys.dtype)
        ctx.save_for_backward(ys, cs, gates, y0, c0, w_hh, theta)
        ctx.height, ctx.width = height, width
        return ys, c_prev, events

    @staticmethod
    def backward(ctx, d_ys: Tensor, d_c_last: Tensor, d_events: Tensor):
        ys, cs, gates, y0, c0, w_hh, theta = ctx.saved_tensors
        steps, _, hidden = ys.shape
        d_h_all = torch.empty_like(gates[..., : 3 * hidden])  # dL/d(R y_{t-1} + b_hh), per step
        d_x_all = torch.empty_like(d_h_all)  # dL/d(x_proj)
        d_theta = torch.zeros_like(cs[0])
        d_y = torch.zeros_like(ys[0])  # from the next step, through R
        d_c_next = torch.zeros_like(cs[0]) if d_c_last is None else d_c_last.clone()
        for t in range(steps - 1, -1, -1):
            r, u, z, h_z = gates[t].split(hidden, -1)
            c = cs[t]
            v = c - theta
            o = (v > 0).to(c.dtype)
            c_prev = _reset(cs[t - 1], theta) if t > 0 else c0
            if d_ys is not None:
                d_y = d_y + d_ys[t]
            # y = o * c ; c' = c - o * theta ; o = H(c - theta)
            d_o = d_y * c - d_c_next * theta
            if d_events is not None:
                d_o = d_o + d_events[t]
            d_v = d_o * ctx.height * torch.clamp(1 - ctx.width * v.abs(), min=0)
            d_c = d_y * o + d_c_next + d_v
            d_theta -= d_c_next * o + d_v
            # c = u * c'_{t-1} + (1 - u) * z
            d_u = d_c * (c_prev - z)
            d_z = d_c * (1 - u)
            d_c_next = d_c * u
            # z = tanh(x_z + r * h_z), u = s(x_u + h_u), r = s(x_r + h_r)
            d_az = d_z * (1 - z * z)
            d_au = d_u * u * (1 - u)
            d_ar = d_az * h_z * r * (1 - r)
            d_x_all[t] = torch.cat((d_ar, d_au, d_az), -1)
            d_h_all[t] = torch.cat((d_ar, d_au, d_az * r), -1)
            d_y = d_h_all[t] @ w_hh
        y_prev = torch.cat((y0[None], ys[:-1]))
        d_w_hh = d_h_all.flatten(0, 1).t() @ y_prev.flatten(0, 1)  # all steps in one product
        d_b_hh = d_h_all.sum((0, 1))
        return d_x_all, d_y, d_c_next, d_w_hh, d_b_hh, d_theta.sum(0), None, None


def _reset(c: Tensor, theta: Tensor) -> Tensor:
    """c' = c - o * theta from the saved pre-reset c (recomputed instead of stored)."""
    return c - (c - theta > 0).to(c.dtype) * theta


def egru_sequence(x_proj: Tensor, y0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Tensor,
                  theta: Tensor, height: float, width: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(outputs (T,B,H), y_T, c'_T, events (T,B,H)) for a whole sequence."""
    ys, c_last, events = EGRUSequence.apply(x_proj, y0, c0, w_hh, b_hh, theta, height, width)
    return ys, ys[-1], c_last, events
