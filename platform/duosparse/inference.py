"""Event-driven batch-1 inference for EGRU language models: work only where events happen.

An EGRU unit that stays silent outputs exactly zero, and a pruned weight is exactly zero, so
the product of a layer's matrices with [x_t; y_{t-1}] needs only the non-zero entries of the
columns whose input is non-zero. `EventDrivenEGRU` keeps every layer's masked matrices
(`model.current_weight`) in compressed-column (CSC) form and, token by token, traverses only
the columns of the non-zero inputs and the non-zero previous outputs: the multiply-
accumulates it performs are exactly the effective MACs of docs/design.md section 4 (counted as it
runs, `InferenceResult.macs`; equal to `accounting.Accountant`'s figure for the same tokens). The gate
non-linearities are computed for all units (O(H) per step, no MACs).

Per layer the two matrices are stacked into one CSC matrix of 4H rows and I + H columns, so
one traversal yields every pre-activation the EGRU needs (gate order r, u, z as in
`model.egru_cell`):

    [ W_r  R_r ]   [ x_t     ]     r, u:  s(W x + R y + b_ih + b_hh)
    [ W_u  R_u ] . [ y_{t-1} ]     z:     tanh(W_z x + b_iz + r * (R_z y + b_hz))
    [ W_z   0  ]
    [  0   R_z ]

Two kernels traverse the active columns (`backend`):

- "scipy" (default): the compiled column loop of `scipy.sparse`'s CSC mat-vec
  (`_sparsetools.csc_matvec`, the routine behind `csc_matrix @ vector`), handed only the
  active columns, without copying anything. The columns are stored last-first, so for
  active columns j_0 < j_1 < ... the interleaved pointer list (start_0, end_0, start_1,
  end_1, ...) is a valid CSC pointer array of 2n - 1 columns in which every odd ("gap")
  column has end <= start, which the loop skips: the work is exactly the active columns'
  non-zeros, one multiply-add each.
- "torch": pure PyTorch, vectorised: the active columns' segments are expanded with
  `repeat_interleave`, gathered, multiplied and summed into the rows with `index_add_`.
  Several passes over the gathered entries instead of one, so several times slower; same
  results. For where the scipy routine is missing.

The decoder is traversed event-driven as well (its input is the last layer's sparse output):
in CSC form when it has zeros (`prune.include_embedding`), otherwise, as an unpruned decoder is
dense, by gathering the active columns (rows of its transpose) and summing them weighted, in
one fused `embedding_bag` call; either way one multiply-add per effective MAC.

`run(..., dense=True)` (`dense_step` for one token) is the dense batch-1 reference: the same
gate code with the full masked matrices in plain BLAS mat-vecs (`torch.addmv`), which is what
a batch-1 forward pass costs without events.

Scope: EGRU only (LSTM and GRU outputs are dense, so there are no events to skip: their only
saving would be the pruned weights; `from_model` refuses them); batch size 1; CPU; float32 or
float64. The results equal `LanguageModel.forward` with batch 1 in eval mode up to the order
of floating-point summation (float64: 1e-10). Rebuild the engine after the weights change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import LanguageModel, current_weight

try:  # the compiled CSC mat-vec loop of scipy.sparse (a private module, there for years)
    from scipy.sparse._sparsetools import csc_matvec as _csc_matvec
except ImportError:  # pragma: no cover - depends on the scipy build
    _csc_matvec = None

BACKENDS = ("scipy", "torch")


class EventDrivenError(ValueError):
    """A model or an input the event-driven path does not support; the message says why."""


# --- matrices that are traversed by active columns -------------------------------------------


class CompressedColumns:
    """A matrix in CSC form, columns stored last-first (see the module docstring): column j's
    non-zeros are values[start[j]:start[j] + column_nnz[j]], in rows rows[...] (ascending).
    Only exact non-zeros are stored."""

    def __init__(self, matrix: Tensor, backend: str):
        matrix = matrix.detach().cpu()
        n_rows, n_cols = matrix.shape
        self.shape, self.backend = (n_rows, n_cols), backend
        reversed_t = matrix.t().flip(0)  # row k of this is column n_cols - 1 - k
        cols_rev, rows = (reversed_t != 0).nonzero(as_tuple=True)  # sorted by column, then row
        values = reversed_t[cols_rev, rows].contiguous()
        nnz = rows.numel()
        column_nnz = torch.bincount(cols_rev, minlength=n_cols).flip(0)  # back to column order
        end = torch.full((n_cols,), nnz, dtype=torch.int64) - (column_nnz.cumsum(0) - column_nnz)
        start = end - column_nnz  # start[j] = non-zeros of the columns after j
        index = np.int32 if max(nnz, n_rows) < 2**31 - 1 else np.int64
        self.rows = rows.numpy().astype(index)
        self.values = values.numpy()
        self.column_nnz = column_nnz.numpy().astype(np.int64)
        # (start, end) per column, side by side; with int32 indices a pair is read as one
        # int64, so gathering the pairs of the active columns is a 1-d take
        bounds = np.ascontiguousarray(np.stack((start.numpy(), end.numpy()), 1).astype(index))
        self._pairs = bounds.view(np.int64).ravel() if index == np.int32 else None
        self._bounds = bounds
        self._inputs = np.zeros(2 * n_cols, dtype=self.values.dtype)  # odd entries stay unused
        # tensors for the torch kernel (the same memory)
        self._start_t, self._nnz_t = start, column_nnz
        self._rows_t = torch.from_numpy(rows.numpy().astype(np.int64))
        self._values_t = values

    @property
    def nnz(self) -> int:
        return int(self.column_nnz.sum())

    def accumulate(self, out: np.ndarray, vector: np.ndarray) -> int:
        """out += M @ vector, traversing only the columns where vector != 0; returns the
        number of multiply-accumulates performed (the non-zeros of those columns)."""
        if self.backend == "scipy":
            return self._accumulate_scipy(out, vector)
        return self._accumulate_torch(out, vector)

    def _accumulate_scipy(self, out: np.ndarray, vector: np.ndarray) -> int:
        active = (vector != 0).nonzero()[0]  # ascending: their stored starts descend
        n = active.size
        if n == 0:
            return 0
        if self._pairs is not None:
            pointers = np.take(self._pairs, active).view(self._bounds.dtype)
        else:
            pointers = self._bounds[active].ravel()
        inputs = self._inputs[: 2 * n - 1]
        inputs[::2] = vector[active]  # column 2k: active column k; 2k + 1: a gap, never read
        _csc_matvec(self.shape[0], 2 * n - 1, pointers, self.rows, self.values, inputs, out)
        return int(np.take(self.column_nnz, active).sum())

    def _accumulate_torch(self, out: np.ndarray, vector: np.ndarray) -> int:
        v = torch.from_numpy(vector)
        active = v.nonzero().squeeze(1)
        counts = self._nnz_t.index_select(0, active)
        total = int(counts.sum())
        if total == 0:
            return 0
        # position of each gathered entry: its column's start + its offset within the column
        first = counts.cumsum(0) - counts  # where each column's run begins in the gathered list
        positions = torch.repeat_interleave(
            self._start_t.index_select(0, active) - first, counts, output_size=total
        )
        positions += torch.arange(total)
        scale = torch.repeat_interleave(v.index_select(0, active), counts, output_size=total)
        products = self._values_t.index_select(0, positions) * scale
        torch.from_numpy(out).index_add_(0, self._rows_t.index_select(0, positions), products)
        return total


class DenseColumns:
    """A matrix without zeros, traversed by active columns: the weighted sum of the active
    columns (rows of the stored transpose) in one fused `embedding_bag` call."""

    def __init__(self, matrix: Tensor):
        matrix = matrix.detach().cpu()
        self.shape = tuple(matrix.shape)
        self._transpose = matrix.t().contiguous()
        self._offsets = torch.zeros(1, dtype=torch.int64)

    @property
    def nnz(self) -> int:
        return self._transpose.numel()

    def accumulate(self, out: np.ndarray, vector: np.ndarray) -> int:
        v = torch.from_numpy(vector)
        active = v.nonzero().squeeze(1)
        if active.numel() == 0:
            return 0
        summed = F.embedding_bag(
            active,
            self._transpose,
            self._offsets,
            mode="sum",
            per_sample_weights=v.index_select(0, active),
        )
        torch.from_numpy(out).add_(summed[0])
        return active.numel() * self.shape[0]


def column_traversal(matrix: Tensor, backend: str) -> CompressedColumns | DenseColumns:
    """The cheaper way to traverse `matrix` by columns with one multiply-add per non-zero."""
    if bool((matrix != 0).all()):
        return DenseColumns(matrix)
    return CompressedColumns(matrix, backend)


# --- the engine --------------------------------------------------------------------------------


@dataclass
class _Layer:
    input_size: int
    hidden_size: int
    stacked: CompressedColumns  # (4H, I + H), see the module docstring
    bias: np.ndarray  # (4H,): b_ih + b_hh for r and u; b_iz; b_hz
    theta: np.ndarray  # (H,)
    w_ih: Tensor  # the dense masked matrices and biases, for the dense reference path
    w_hh: Tensor
    b_ih: Tensor
    b_hh: Tensor


@dataclass
class InferenceState:
    """Per layer the sparse output y and the internal state after reset c' (each (H,))."""

    y: list[np.ndarray]
    c: list[np.ndarray]

    def copy(self) -> InferenceState:
        return InferenceState([a.copy() for a in self.y], [a.copy() for a in self.c])

    def to_model_state(self) -> list[tuple[Tensor, Tensor]]:
        """The `LanguageModel` state format, batch 1: per layer (y (1, H), c' (1, H))."""
        return [
            (torch.from_numpy(y.copy())[None], torch.from_numpy(c.copy())[None])
            for y, c in zip(self.y, self.c)
        ]


@dataclass
class InferenceResult:
    outputs: list[Tensor]  # per layer (T, H): the sparse outputs y_t
    logits: Tensor | None  # (T, V), or None when not asked for
    state: InferenceState  # after the last token
    macs: list[int]  # per layer: multiply-accumulates performed in the recurrent layers
    decoder_macs: int  # multiply-accumulates performed in the decoder
    tokens: int

    @property
    def macs_per_token(self) -> float:
        """Recurrent layers, per token: comparable to `ops/effective_macs_per_token`."""
        return sum(self.macs) / max(self.tokens, 1)


class EventDrivenEGRU:
    """Batch-1, token-by-token inference of an EGRU `LanguageModel`, event-driven or dense.

    Holds CPU copies of the weights: the compressed matrices, and the dense masked ones for
    the dense reference path. One engine serves one caller at a time (it reuses buffers)."""

    def __init__(
        self,
        layers: list[_Layer],
        embedding: Tensor,
        decoder: CompressedColumns | DenseColumns,
        decoder_weight: Tensor,
        decoder_bias: np.ndarray,
        backend: str,
    ):
        self.layers, self.embedding, self.decoder = layers, embedding, decoder
        self.decoder_weight, self.decoder_bias = decoder_weight, decoder_bias
        self.backend = backend
        self.dtype = embedding.dtype

    @classmethod
    def from_model(cls, model: LanguageModel, backend: str = "auto") -> EventDrivenEGRU:
        """Compress a (possibly pruned) EGRU language model; `backend`: "auto" (scipy when
        available), "scipy" or "torch"."""
        arch = model.cfg.arch
        if arch != "egru":
            raise EventDrivenError(
                f"event-driven inference needs an EGRU model, this one is model.arch={arch!r}: "
                "LSTM and GRU outputs are dense, there are no events to skip. Run it with "
                "LanguageModel.forward."
            )
        if model.cfg.readout != "events":
            raise EventDrivenError(
                "event-driven inference traverses the decoder on the top layer's events, but this "
                "model's decoder reads every unit's state (model.readout: state): there are no "
                "events to skip there. Run it with LanguageModel.forward."
            )
        if backend == "auto":
            backend = "scipy" if _csc_matvec is not None else "torch"
        if backend not in BACKENDS:
            raise EventDrivenError(f"backend must be 'auto', 'scipy' or 'torch', got {backend!r}")
        if backend == "scipy" and _csc_matvec is None:
            raise EventDrivenError(
                "backend 'scipy' needs scipy.sparse._sparsetools; use backend='torch'"
            )
        dtype = model.encoder.weight.dtype
        if dtype not in (torch.float32, torch.float64):
            raise EventDrivenError(
                f"event-driven inference runs in float32 or float64, not {dtype}"
            )
        layers = []
        with torch.no_grad():
            for layer in model.layers:
                w = current_weight(layer, "weight_ih").detach().cpu()
                r = current_weight(layer, "weight_hh").detach().cpu()
                h, i = layer.hidden_size, layer.input_size
                stacked = w.new_zeros(4 * h, i + h)
                stacked[: 3 * h, :i] = w  # W_r, W_u, W_z
                stacked[: 2 * h, i:] = r[: 2 * h]  # R_r, R_u
                stacked[3 * h :, i:] = r[2 * h :]  # R_z apart: it is scaled by r
                b_ih, b_hh = layer.bias_ih.detach().cpu(), layer.bias_hh.detach().cpu()
                bias = torch.cat((b_ih[: 2 * h] + b_hh[: 2 * h], b_ih[2 * h :], b_hh[2 * h :]))
                layers.append(
                    _Layer(
                        i,
                        h,
                        CompressedColumns(stacked, backend),
                        bias.numpy().copy(),
                        layer.threshold.detach().cpu().numpy().copy(),
                        w.contiguous().clone(),
                        r.contiguous().clone(),
                        b_ih.clone(),
                        b_hh.clone(),
                    )
                )
            embedding = model.embedding_weight().detach().cpu().clone()
            decoder_weight = model.decoder_weight().detach().cpu().contiguous().clone()
            decoder_bias = model.decoder.bias.detach().cpu().numpy().copy()
        return cls(
            layers,
            embedding,
            column_traversal(decoder_weight, backend),
            decoder_weight,
            decoder_bias,
            backend,
        )

    # --- state ----------------------------------------------------------------------------

    @property
    def _np_dtype(self) -> type:
        return np.float64 if self.dtype == torch.float64 else np.float32

    def initial_state(self) -> InferenceState:
        dt = self._np_dtype
        return InferenceState(
            [np.zeros(l.hidden_size, dt) for l in self.layers],
            [np.zeros(l.hidden_size, dt) for l in self.layers],
        )

    def state_from_model(self, state: list[tuple[Tensor, ...]]) -> InferenceState:
        """Take over a `LanguageModel` state of batch 1 (per layer (y, c'), each (1, H))."""
        ys, cs = [], []
        for y, c in state:
            if y.dim() != 2 or y.size(0) != 1:
                raise EventDrivenError(
                    f"event-driven inference runs batch size 1; got a state of shape {tuple(y.shape)}"
                )
            ys.append(y[0].detach().cpu().to(self.dtype).numpy().copy())
            cs.append(c[0].detach().cpu().to(self.dtype).numpy().copy())
        return InferenceState(ys, cs)

    # --- running --------------------------------------------------------------------------

    def step(
        self, token: int, state: InferenceState | None = None, logits: bool = True
    ) -> InferenceResult:
        """One token, event-driven."""
        return self.run(torch.tensor([int(token)]), state, logits)

    def dense_step(
        self, token: int, state: InferenceState | None = None, logits: bool = True
    ) -> InferenceResult:
        """One token through the dense batch-1 reference (plain mat-vecs over all columns)."""
        return self.run(torch.tensor([int(token)]), state, logits, dense=True)

    def run(
        self,
        tokens: Tensor,
        state: InferenceState | None = None,
        logits: bool = True,
        dense: bool = False,
    ) -> InferenceResult:
        """Tokens (T,) or (T, 1), one by one from `state` (default: zeros), which is not
        modified; `dense=True` runs the dense reference instead of the event-driven path."""
        tokens = self._check_tokens(tokens)
        state = (state or self.initial_state()).copy()
        steps, dt = tokens.numel(), self._np_dtype
        outputs = [np.empty((steps, l.hidden_size), dt) for l in self.layers]
        out_logits = np.empty((steps, self.decoder.shape[0]), dt) if logits else None
        macs, decoder_macs = [0] * len(self.layers), 0
        embedded = self.embedding.index_select(0, tokens).numpy()  # lookups cost no MACs
        # per layer the vector [x_t; y_{t-1}] its stacked matrix multiplies
        vectors = [np.zeros(l.input_size + l.hidden_size, dt) for l in self.layers]
        for vec, y, layer in zip(vectors, state.y, self.layers):
            vec[layer.input_size :] = y
        pre = [np.empty(4 * l.hidden_size, dt) for l in self.layers]
        for t in range(steps):
            x = embedded[t]
            for l, layer in enumerate(self.layers):
                vec, i, a = vectors[l], layer.input_size, pre[l]
                vec[:i] = x
                if dense:
                    _dense_preactivations(layer, vec, a)
                else:
                    a[:] = layer.bias
                    macs[l] += layer.stacked.accumulate(a, vec)
                y = outputs[l][t]
                state.c[l] = _egru_gates(a, layer.hidden_size, state.c[l], layer.theta, y)
                vec[i:] = y  # y_{t-1} of the next step
                x = y
            if logits:
                row = out_logits[t]
                if dense:
                    torch.addmv(
                        torch.from_numpy(self.decoder_bias),
                        self.decoder_weight,
                        torch.from_numpy(x),
                        out=torch.from_numpy(row),
                    )
                else:
                    row[:] = self.decoder_bias
                    decoder_macs += self.decoder.accumulate(row, x)
        if dense:  # every column, every step
            macs = [steps * (l.w_ih.numel() + l.w_hh.numel()) for l in self.layers]
            decoder_macs = steps * self.decoder_weight.numel() if logits else 0
        if steps:
            state.y = [o[-1].copy() for o in outputs]
        return InferenceResult(
            outputs=[torch.from_numpy(o) for o in outputs],
            logits=torch.from_numpy(out_logits) if logits else None,
            state=state,
            macs=macs,
            decoder_macs=decoder_macs,
            tokens=steps,
        )

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        tokens = torch.as_tensor(tokens).cpu()
        if tokens.dim() == 2:
            if tokens.size(1) != 1:
                raise EventDrivenError(
                    f"event-driven inference runs batch size 1, got tokens of shape "
                    f"{tuple(tokens.shape)} (T, B); run one sequence at a time, or use "
                    "LanguageModel.forward for batches"
                )
            tokens = tokens[:, 0]
        if tokens.dim() != 1:
            raise EventDrivenError(
                f"tokens must have shape (T,) or (T, 1), got {tuple(tokens.shape)}"
            )
        return tokens.long()


def _dense_preactivations(layer: _Layer, vec: np.ndarray, a: np.ndarray) -> None:
    """a = the stacked pre-activations, from the full matrices: W x + b_ih and R y + b_hh."""
    i, h = layer.input_size, layer.hidden_size
    v = torch.from_numpy(vec)
    x_proj = torch.addmv(layer.b_ih, layer.w_ih, v[:i]).numpy()
    h_proj = torch.addmv(layer.b_hh, layer.w_hh, v[i:]).numpy()
    np.add(x_proj[: 2 * h], h_proj[: 2 * h], out=a[: 2 * h])
    a[2 * h : 3 * h] = x_proj[2 * h :]
    a[3 * h :] = h_proj[2 * h :]


def _egru_gates(
    a: np.ndarray, h: int, c_prev: np.ndarray, theta: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """One EGRU step from the stacked pre-activations a (overwritten) = [r, u with both
    biases; W_z x + b_iz; R_z y + b_hz]: writes y_t into `y`, returns c'_t.
    docs/design.md section 3, as model.egru_cell."""
    ru = a[: 2 * h]
    np.multiply(ru, 0.5, out=ru)  # sigmoid(v) = (1 + tanh(v / 2)) / 2, without overflow
    np.tanh(ru, out=ru)
    ru += 1
    ru *= 0.5
    r, u = ru[:h], ru[h:]
    z = a[3 * h :]
    z *= r
    z += a[2 * h : 3 * h]
    np.tanh(z, out=z)  # candidate tanh(W_z x + b_iz + r * (R_z y + b_hz))
    c = u * c_prev
    c += (1 - u) * z  # internal state
    fired = c > theta  # o = H(c - theta)
    np.multiply(c, fired, out=y)  # sparse output o * c
    c -= theta * fired  # reset by subtraction
    return c
