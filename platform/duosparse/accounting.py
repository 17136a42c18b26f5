"""Activity sparsity, weight sparsity and MACs per token: the counting rules of docs/design.md
section 4, in one place.

For recurrent layer l with input x_t (size I), previous output y_{t-1} (size H), G gates and
masked matrices W (G*H x I), R (G*H x H):

    dense             G*H*(I + H)
    weight-sparse     nnz(W) + nnz(R)
    effective         sum_{j: x_t[j] != 0} nnz(W[:, j]) + sum_{k: y_{t-1}[k] != 0} nnz(R[:, k])
    multiplicative    dense * (1 - s_w) * (1 - s_a)

The decoder is counted the same way (its input is what it reads: the last layer's output, or
its state under model.readout: state), reported apart and included in the totals. Embedding
lookups cost nothing.

`Accountant` is fed the `Trace` of each evaluated chunk, so the figures come out of the
evaluation pass itself, not a second pass over the data. Because the effective count is a
sum over tokens of per-column non-zero counts, it equals (number of tokens in which input j
is non-zero) . nnz(W[:, j]) summed over j: one reduction and one dot product per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import schema
from .model import GATES, LanguageModel, Trace, current_weight


@dataclass
class _Matrix:
    column_nnz: Tensor  # (in_features,) float64: non-zeros per input column
    nnz: int
    numel: int


def _matrix(weight: Tensor) -> _Matrix:
    nonzero = weight.detach() != 0
    # on the CPU, with the activity counts of `Accountant.update`, whatever the model's device
    return _Matrix(nonzero.sum(0).double().cpu(), int(nonzero.sum()), weight.numel())


def weight_sparsity(model: LanguageModel, include_embedding: bool = False) -> float:
    """Fraction of exactly-zero entries over the prunable tensors."""
    zeros = total = 0
    for module, name in model.prunable(include_embedding):
        w = current_weight(module, name).detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


class Accountant:
    """Accumulates activity and MAC counts over the chunks of one evaluation."""

    def __init__(self, model: LanguageModel, include_embedding: bool = False):
        self.gates = GATES[model.cfg.arch]
        self.sizes = [(layer.input_size, layer.hidden_size) for layer in model.layers]
        self.w = [_matrix(current_weight(layer, "weight_ih")) for layer in model.layers]
        self.r = [_matrix(current_weight(layer, "weight_hh")) for layer in model.layers]
        self.decoder = _matrix(model.decoder_weight())
        self.weight_sparsity = weight_sparsity(model, include_embedding)
        n = len(model.layers)
        self.tokens = 0
        self.effective = [0.0] * n
        self.decoder_effective = 0.0
        self.nonzero_per_unit = [torch.zeros(h, dtype=torch.float64) for _, h in self.sizes]

    @torch.no_grad()
    def update(self, trace: Trace) -> None:
        steps, batch = trace.outputs[0].shape[:2]
        self.tokens += steps * batch
        for l, (x, y, y0) in enumerate(zip(trace.inputs, trace.outputs, trace.initial_outputs)):
            active_in = (x != 0).sum((0, 1)).double().cpu()
            # y_{t-1} for t = 0..T-1: the carried output, then this chunk's outputs but the last
            active_out = (y != 0).sum((0, 1)).double().cpu()
            active_prev = (
                active_out - (y[-1] != 0).sum(0).double().cpu() + (y0 != 0).sum(0).double().cpu()
            )
            self.nonzero_per_unit[l] += active_out
            self.effective[l] += float(
                active_in @ self.w[l].column_nnz + active_prev @ self.r[l].column_nnz
            )
        # the decoder's input: the last layer's output, or its state (model.readout: state)
        active_read = (trace.decoder_input != 0).sum((0, 1)).double().cpu()
        self.decoder_effective += float(active_read @ self.decoder.column_nnz)

    def unit_event_rates(self) -> list[list[float]]:
        """Per layer, per unit: the fraction of tokens on which the unit's output is non-zero."""
        return [(nz / max(self.tokens, 1)).tolist() for nz in self.nonzero_per_unit]

    def metrics(self) -> dict[str, float]:
        tokens = max(self.tokens, 1)
        units = [h for _, h in self.sizes]
        layer_activity = [
            1.0 - float(nz.sum()) / (tokens * h) for nz, h in zip(self.nonzero_per_unit, units)
        ]
        activity = 1.0 - float(sum(nz.sum() for nz in self.nonzero_per_unit)) / (
            tokens * sum(units)
        )
        silent = [int((nz == 0).sum()) for nz in self.nonzero_per_unit]
        dense = float(sum(self.gates * h * (i + h) for i, h in self.sizes))
        weight_sparse = float(sum(w.nnz + r.nnz for w, r in zip(self.w, self.r)))
        effective = sum(self.effective) / tokens
        decoder_dense = float(self.decoder.numel)
        decoder_sparse = float(self.decoder.nnz)
        decoder_effective = self.decoder_effective / tokens
        out = {
            schema.SPARSITY_WEIGHT: self.weight_sparsity,
            schema.SPARSITY_ACTIVITY: activity,
            schema.SPARSITY_SILENT_UNITS: sum(silent) / sum(units),
            schema.OPS_DENSE: dense,
            schema.OPS_WEIGHT_SPARSE: weight_sparse,
            schema.OPS_EFFECTIVE: effective,
            # s_w of the recurrent matrices alone (the embedding may be pruned too): nnz / dense
            schema.OPS_MULTIPLICATIVE: dense * (weight_sparse / dense) * (1 - activity),
            schema.OPS_DECODER_DENSE: decoder_dense,
            schema.OPS_DECODER_WEIGHT_SPARSE: decoder_sparse,
            schema.OPS_DECODER_EFFECTIVE: decoder_effective,
            schema.OPS_TOTAL_DENSE: dense + decoder_dense,
            schema.OPS_TOTAL_WEIGHT_SPARSE: weight_sparse + decoder_sparse,
            schema.OPS_TOTAL_EFFECTIVE: effective + decoder_effective,
            schema.OPS_COMPUTE_REDUCTION: dense / effective if effective > 0 else float("inf"),
            schema.OPS_TOTAL_COMPUTE_REDUCTION: (dense + decoder_dense)
            / (effective + decoder_effective)
            if effective + decoder_effective > 0
            else float("inf"),
        }
        for l, value in enumerate(layer_activity):
            out[schema.layer_activity(l)] = value
            out[schema.layer_silent_units(l)] = silent[l] / units[l]
        return out
