"""LSTM, GRU and EGRU language models in one shell.

embedding -> N recurrent layers -> decoder (tied to the embedding when sizes allow), with
AWD-LSTM regularisation (embedding dropout, locked dropout, DropConnect on recurrent
weights). Every recurrent layer stores its matrices under the same names (`weight_ih`:
G*H x I, `weight_hh`: G*H x H, biases `bias_ih`, `bias_hh`; gate order as cuDNN), so
pruning (`torch.nn.utils.prune`) and operation counting treat the three alike.

The EGRU (Subramoney et al., ICLR 2023) is `egru_cell` below, the equations of docs/design.md
section 3 line by line.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .egru_kernel import egru_sequence

State = tuple[Tensor, ...]  # per layer: LSTM (h, c), GRU (h,), EGRU (y, c'); [0] is the output

GATES = {"lstm": 4, "gru": 3, "egru": 3}


# --- the EGRU -------------------------------------------------------------------------


class HeavisideTriangle(torch.autograd.Function):
    """Forward: H(v) = 1 if v > 0 else 0. Backward: height * max(0, 1 - width * |v|)."""

    @staticmethod
    def forward(ctx, v: Tensor, height: float, width: float) -> Tensor:
        ctx.save_for_backward(v)
        ctx.height, ctx.width = height, width
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (v,) = ctx.saved_tensors
        return grad * ctx.height * torch.clamp(1.0 - ctx.width * v.abs(), min=0.0), None, None


def egru_cell(
    x_proj: Tensor,
    y_prev: Tensor,
    c_prev: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    theta: Tensor,
    height: float,
    width: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One EGRU step. x_proj = W x + b_ih (precomputed for the whole sequence).

    Returns the sparse output y_t, the internal state after reset c'_t and the events o_t.
    """
    h_proj = F.linear(y_prev, w_hh, b_hh)  # R y_{t-1} + b_h for the three gates
    x_r, x_u, x_z = x_proj.chunk(3, dim=-1)
    h_r, h_u, h_z = h_proj.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)  # reset gate
    u = torch.sigmoid(x_u + h_u)  # update gate
    z = torch.tanh(x_z + r * h_z)  # candidate
    c = u * c_prev + (1 - u) * z  # internal state
    o = HeavisideTriangle.apply(c - theta, height, width)  # event
    y = o * c  # sparse output
    c_next = c - o * theta  # reset by subtraction
    return y, c_next, o


# --- recurrent layers ---------------------------------------------------------------


class RecurrentLayer(nn.Module):
    """One recurrent layer over a whole sequence (T, B, I) -> (T, B, H)."""

    def __init__(self, arch: str, input_size: int, hidden_size: int, cfg: ModelConfig):
        super().__init__()
        self.arch, self.input_size, self.hidden_size = arch, input_size, hidden_size
        gates = GATES[arch]
        self.weight_ih = nn.Parameter(torch.empty(gates * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(gates * hidden_size))
        self.weight_dropout = cfg.dropout.weight
        self.weight_init, self.bias_init = cfg.weight_init, cfg.bias_init
        self.carry_gate_bias = cfg.carry_gate_bias
        if arch == "egru":
            # clamped from the start, as EvNN clamps before every use
            self.threshold = nn.Parameter(
                initial_thresholds(cfg, hidden_size).clamp(0.0, cfg.threshold_max)
            )
            self.threshold_max = cfg.threshold_max
            self.height = cfg.pseudo_derivative.height
            self.width = cfg.pseudo_derivative.width
            self.fast = True  # False: step through egru_cell with autograd (the reference)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # as torch.nn.LSTM/GRU
        if self.weight_init == "uniform":
            nn.init.uniform_(self.weight_ih, -bound, bound)
            nn.init.uniform_(self.weight_hh, -bound, bound)
        else:  # xavier_normal_ over the stacked gates, as EvNN does over its (I, 3H) kernel
            nn.init.xavier_normal_(self.weight_ih)
            nn.init.xavier_normal_(self.weight_hh)
            if self.weight_init == "orthogonal":
                for block in self.weight_hh.data.chunk(GATES[self.arch]):
                    nn.init.orthogonal_(block)
        for bias in (self.bias_ih, self.bias_hh):
            if self.bias_init == "zeros":
                nn.init.zeros_(bias)
            else:
                nn.init.uniform_(bias, -bound, bound)
        if self.carry_gate_bias:
            # the second gate block keeps the state in all three: LSTM (i, f, g, o), torch GRU
            # (r, z, n) with h = (1 - z) n + z h, EGRU (r, u, z) with c = u c' + (1 - u) z
            with torch.no_grad():
                self.bias_ih.chunk(GATES[self.arch])[1].add_(self.carry_gate_bias)

    def initial_state(self, batch_size: int) -> State:
        zeros = self.bias_hh.new_zeros(batch_size, self.hidden_size)  # same device and dtype
        return (zeros, zeros.clone()) if self.arch in ("lstm", "egru") else (zeros,)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State, Tensor | None]:
        """Returns outputs (T, B, H), the final state, and the EGRU events (T, B, H) or None."""
        w_hh = self._recurrent_weight()
        if self.arch == "egru":
            return self._egru(x, state, w_hh)[:3]
        # Fused kernels: the same calls torch.nn.LSTM / torch.nn.GRU make.
        weights = [self.weight_ih, w_hh, self.bias_ih, self.bias_hh]
        # one layer per call; DropConnect above is the only dropout inside a layer
        flags = dict(
            has_biases=True,
            num_layers=1,
            dropout=0.0,
            train=self.training,
            bidirectional=False,
            batch_first=False,
        )
        if self.arch == "lstm":
            h0, c0 = state
            out, h, c = torch.lstm(x, (h0[None], c0[None]), weights, **flags)
            return out, (h[0], c[0]), None
        out, h = torch.gru(x, state[0][None], weights, **flags)
        return out, (h[0],), None

    def forward_with_states(self, x: Tensor, state: State) -> tuple[Tensor, State, Tensor, Tensor]:
        """EGRU only: `forward`'s outputs, events and final state, and the states c_t before
        their reset (T, B, H), which a decoder reads under model.readout: state."""
        return self._egru(x, state, self._recurrent_weight(), with_states=True)

    def _recurrent_weight(self) -> Tensor:
        if self.training and self.weight_dropout > 0:
            return F.dropout(self.weight_hh, self.weight_dropout)  # DropConnect (AWD-LSTM)
        return self.weight_hh

    def _egru(
        self, x: Tensor, state: State, w_hh: Tensor, with_states: bool = False
    ) -> tuple[Tensor, State, Tensor, Tensor | None]:
        y, c = state
        x_proj = F.linear(x, self.weight_ih, self.bias_ih)  # all time steps in one matmul
        args = (w_hh, self.bias_hh, self.threshold, self.height, self.width)
        if self.fast:  # the same equations, one autograd node for the sequence
            # fused Triton kernels on a GPU; they do not return the states, so a readout of the
            # states runs egru_kernel's PyTorch loop there too
            kernels = _egru_triton() if x_proj.is_cuda and not with_states else None
            if kernels and kernels.supported(x_proj, w_hh):
                out, y, c, events = kernels.egru_sequence(x_proj, y, c, *args)
                return out, (y, c), events, None
            out, y, c, events, states = egru_sequence(x_proj, y, c, *args)
            return out, (y, c), events, states if with_states else None
        outputs, events, states = [], [], []
        for x_t in x_proj:
            y, c, o = egru_cell(x_t, y, c, *args)
            outputs.append(y)
            events.append(o)
            if with_states:
                states.append(c + o * self.threshold)  # c before its reset (to rounding)
        out, events = torch.stack(outputs), torch.stack(events)
        return out, (y, c), events, torch.stack(states) if with_states else None

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        if self.arch == "egru":
            self.threshold.clamp_(min=0.0, max=self.threshold_max)  # thresholds are kept >= 0


def initial_thresholds(cfg: ModelConfig, hidden_size: int) -> Tensor:
    """One threshold per unit: all equal to cfg.threshold, or Beta draws with that mean (EvNN)."""
    if cfg.threshold_init == "beta":
        beta = cfg.threshold_beta
        alpha = beta * cfg.threshold / (1 - cfg.threshold)  # mean alpha / (alpha + beta)
        return torch.distributions.Beta(torch.tensor(alpha), torch.tensor(beta)).sample(
            (hidden_size,)
        )
    return torch.full((hidden_size,), float(cfg.threshold))


@functools.cache
def _egru_triton() -> ModuleType | None:
    """duosparse.egru_triton, or None where Triton is not installed (CUDA then runs the
    PyTorch loop). Imported on first use on a GPU: Triton is a GPU dependency."""
    try:
        from . import egru_triton
    except ImportError:
        return None
    return egru_triton


# --- AWD-LSTM regularisation ---------------------------------------------------------


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """One dropout mask per sequence, shared over time steps (variational dropout)."""
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedded_dropout(weight: Tensor, tokens: Tensor, p: float, training: bool) -> Tensor:
    """Drops whole words: rows of the embedding matrix, the same row for every occurrence."""
    if training and p > 0:
        weight = weight * weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
    return F.embedding(tokens, weight)


# --- the language model --------------------------------------------------------------


@dataclass
class Trace:
    """What a forward pass saw in each layer; accounting and the activity regulariser use it."""

    inputs: list[Tensor] = field(default_factory=list)  # x_t of each layer (T, B, I)
    outputs: list[Tensor] = field(default_factory=list)  # y_t of each layer (T, B, H)
    initial_outputs: list[Tensor] = field(default_factory=list)  # y_{-1} of each layer (B, H)
    events: list[Tensor] = field(default_factory=list)  # EGRU o_t of each layer (T, B, H)
    decoder_input: Tensor | None = None  # what the decoder reads (model.readout), dropped out


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.encoder = nn.Embedding(vocab_size, cfg.embedding_size)
        sizes = self.layer_sizes(cfg)
        inputs = [cfg.embedding_size] + sizes[:-1]
        self.layers = nn.ModuleList(
            RecurrentLayer(cfg.arch, i, h, cfg) for i, h in zip(inputs, sizes)
        )
        self.decoder = nn.Linear(sizes[-1], vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        if cfg.bias_init == "zeros":
            nn.init.zeros_(self.decoder.bias)
        if cfg.tie_weights:
            self.decoder.weight = self.encoder.weight

    def start_at_unigram(self, log_probs: Tensor) -> None:
        """Decoder bias := log p(word) (model.unigram_decoder_bias; data.unigram_log_probs)."""
        with torch.no_grad():
            self.decoder.bias.copy_(log_probs)

    @staticmethod
    def layer_sizes(cfg: ModelConfig) -> list[int]:
        """Hidden width of each layer; with tying the last layer's width is embedding_size."""
        sizes = [cfg.hidden_size] * cfg.num_layers
        if cfg.tie_weights:
            sizes[-1] = cfg.embedding_size
        return sizes

    def initial_state(self, batch_size: int) -> list[State]:
        return [layer.initial_state(batch_size) for layer in self.layers]

    def forward(self, tokens: Tensor, state: list[State]) -> tuple[Tensor, list[State], Trace]:
        """tokens (T, B) -> logits (T, B, V), the state after the last step, and the trace."""
        d = self.cfg.dropout
        x = embedded_dropout(self.embedding_weight(), tokens, d.embedding, self.training)
        x = locked_dropout(x, d.input, self.training)
        trace, new_state = Trace(), []
        for i, layer in enumerate(self.layers):
            trace.inputs.append(x)
            trace.initial_outputs.append(state[i][0])
            last = i == len(self.layers) - 1
            if last and self.cfg.readout == "state":
                y, s, events, read = layer.forward_with_states(x, state[i])
            else:
                y, s, events = layer(x, state[i])
                read = y
            trace.outputs.append(y)
            if events is not None:
                trace.events.append(events)
            new_state.append(s)
            x = locked_dropout(read, d.output if last else d.hidden, self.training)
        trace.decoder_input = x
        return F.linear(x, self.decoder_weight(), self.decoder.bias), new_state, trace

    # Read weights through these two, never as attributes: pruning replaces a weight by
    # orig * mask, and the tied decoder must see the embedding's mask too.
    def embedding_weight(self) -> Tensor:
        return current_weight(self.encoder, "weight")

    def decoder_weight(self) -> Tensor:
        return (
            self.embedding_weight()
            if self.cfg.tie_weights
            else current_weight(self.decoder, "weight")
        )

    def clamp_thresholds(self) -> None:
        for layer in self.layers:
            layer.clamp_threshold()

    def prunable(self, include_embedding: bool = False) -> list[tuple[nn.Module, str]]:
        """The tensors weight sparsity is measured over and pruning acts on (DESIGN section 4)."""
        tensors: list[tuple[nn.Module, str]] = []
        for layer in self.layers:
            tensors += [(layer, "weight_ih"), (layer, "weight_hh")]
        if include_embedding:
            tensors.append((self.encoder, "weight"))
            if not self.cfg.tie_weights:
                tensors.append((self.decoder, "weight"))
        return tensors


def detach_state(state: list[State]) -> list[State]:
    """Cut the graph between truncated-BPTT chunks; the values (c' and y) carry over."""
    return [tuple(t.detach() for t in s) for s in state]


def current_weight(module: nn.Module, name: str) -> Tensor:
    """The weight as the next forward pass will use it: orig * mask when pruned."""
    if hasattr(module, name + "_orig"):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name)
