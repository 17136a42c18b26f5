"""The network to deploy: each layer's (and the decoder's) non-zero masks with the event rate
of every unit, from a trained model, from a RunConfig's shapes, or from sizes alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from duosparse.model import GATES

from .errors import SimulationError

# Default event rate for --config (no trained model): EGRU units emit on a fraction of tokens,
# LSTM / GRU outputs are (almost) never exactly zero.
DEFAULT_EVENT_RATE = {"egru": 0.2, "gru": 1.0, "lstm": 1.0}
CORPUS_VOCAB = {"ptb": 10_000, "wikitext-2": 33_278, "synthetic": 64}


@dataclass
class Block:
    """A group of units placed together: one recurrent layer, or the decoder.

    Rows of `w` (and `r`) are ordered gate-major as in cuDNN: row g * units + u belongs to
    unit u, so `w.reshape(gates, units, -1)[:, u]` are unit u's rows.
    """

    name: str
    kind: str  # "recurrent" | "decoder"
    gates: int
    w: np.ndarray  # bool (gates * units, inputs): non-zero mask of the input matrix
    r: np.ndarray | None  # bool (gates * units, units): recurrent matrix; None for the decoder
    in_rates: np.ndarray  # (inputs,) events per token on each input column
    rec_rates: np.ndarray | None  # (units,) events per token on each recurrent column
    out_rates: np.ndarray  # (units,) events per token each unit emits (0 for the decoder)

    def __post_init__(self) -> None:
        self.units = self.w.shape[0] // self.gates
        self.inputs = self.w.shape[1]
        per_unit = self.w.reshape(self.gates, self.units, self.inputs)
        # Per unit: stored non-zeros, and non-zeros walked per token on average (event-driven).
        self.unit_nnz = per_unit.sum((0, 2)).astype(np.int64)
        self.unit_traversal = (
            (per_unit.astype(np.float32) @ self.in_rates.astype(np.float32))
            .sum(0)
            .astype(np.float64)
        )
        if self.r is not None:
            rec = self.r.reshape(self.gates, self.units, self.units)
            self.unit_nnz += rec.sum((0, 2)).astype(np.int64)
            self.unit_traversal += (rec.astype(np.float32) @ self.rec_rates.astype(np.float32)).sum(
                0
            )

    @property
    def recurrent_inputs(self) -> int:
        return 0 if self.r is None else self.units

    @property
    def events_in(self) -> float:
        """Packets per token every PE of this block receives."""
        rec = 0.0 if self.rec_rates is None else float(self.rec_rates.sum())
        return float(self.in_rates.sum()) + rec

    @property
    def nnz(self) -> int:
        return int(self.unit_nnz.sum())

    @property
    def dense(self) -> int:
        return self.gates * self.units * (self.inputs + self.recurrent_inputs)


@dataclass
class Network:
    arch: str
    blocks: list[Block]  # recurrent layers, then the decoder if it is part of the network
    vocab_size: int
    source: str  # where it came from, for reports

    @property
    def layers(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "recurrent"]

    @property
    def decoder(self) -> Block | None:
        return next((b for b in self.blocks if b.kind == "decoder"), None)

    def without_decoder(self) -> Network:
        return Network(self.arch, self.layers, self.vocab_size, self.source)


def _rates(values: Sequence[float] | np.ndarray, size: int, what: str) -> np.ndarray:
    rates = np.asarray(values, dtype=np.float64).reshape(-1)
    if rates.size != size:
        raise SimulationError(
            f"{what}: {rates.size} event rates for {size} units; the activity does not match "
            "the model."
        )
    if np.any(rates < 0) or np.any(rates > 1) or not np.all(np.isfinite(rates)):
        raise SimulationError(f"{what}: event rates must lie in [0, 1].")
    return rates


def build_network(
    arch: str,
    w_masks: Sequence[np.ndarray],
    r_masks: Sequence[np.ndarray],
    unit_rates: Sequence[np.ndarray],
    decoder_mask: np.ndarray | None,
    vocab_size: int,
    source: str,
    input_rate: float = 1.0,
) -> Network:
    """The network from its masks and per-unit event rates.

    Layer 0 receives the embedding, dense: every input value is one packet per token
    (`input_rate` 1). Layer l > 0 receives layer l-1's events; every layer receives its own
    previous output (recurrent); the decoder receives the last layer's events.
    """
    if arch not in GATES:
        raise SimulationError(f"model.arch '{arch}' is not one of {', '.join(GATES)}.")
    gates = GATES[arch]
    blocks: list[Block] = []
    prev_rates: np.ndarray | None = None
    for i, (w, r, rates) in enumerate(zip(w_masks, r_masks, unit_rates, strict=True)):
        units = w.shape[0] // gates
        out = _rates(rates, units, f"layer {i}")
        inputs = np.full(w.shape[1], float(input_rate)) if prev_rates is None else prev_rates
        blocks.append(
            Block(
                f"layer_{i}",
                "recurrent",
                gates,
                np.asarray(w, bool),
                np.asarray(r, bool),
                inputs,
                out,
                out,
            )
        )
        prev_rates = out
    if decoder_mask is not None and prev_rates is not None:
        d = np.asarray(decoder_mask, bool)
        blocks.append(
            Block("decoder", "decoder", 1, d, None, prev_rates, None, np.zeros(d.shape[0]))
        )
    return Network(arch, blocks, vocab_size, source)


def network_from_model(model: Any, activity: dict[str, Any], source: str = "model") -> Network:
    """A trained duosparse LanguageModel with its activity.json (test-split event rates)."""
    from duosparse.model import current_weight

    if getattr(model.cfg, "readout", "events") != "events":
        raise SimulationError(
            f"{source}: the decoder of this EGRU reads every unit's state at every step "
            "(model.readout: state), not its events; the SpiNNaker2 model simulates event-driven "
            "traffic only. Simulate a model with model.readout: events."
        )
    rates = activity.get("unit_event_rates")
    if not isinstance(rates, list) or len(rates) != len(model.layers):
        raise SimulationError(
            f"{source}: activity.json must hold 'unit_event_rates' with one list per layer "
            f"({len(model.layers)} layers); re-run the training to write it."
        )
    w = [(current_weight(layer, "weight_ih").detach() != 0).cpu().numpy() for layer in model.layers]
    r = [(current_weight(layer, "weight_hh").detach() != 0).cpu().numpy() for layer in model.layers]
    decoder = (model.decoder_weight().detach() != 0).cpu().numpy()
    return build_network(model.cfg.arch, w, r, rates, decoder, model.vocab_size, source)


def random_mask(shape: tuple[int, int], sparsity: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(sparsity * numel) zeros at random places.

    The zeros are the smallest of one draw of scores, so for one seed a sparser mask is a
    subset of a denser one's zeros' complement (masks are nested: more sparsity, fewer non-zeros).
    """
    numel = shape[0] * shape[1]
    zeros = int(round(sparsity * numel))
    scores = rng.random(numel, dtype=np.float32)
    mask = np.ones(numel, dtype=bool)
    if zeros:
        mask[np.argpartition(scores, zeros - 1)[:zeros]] = False
    return mask.reshape(shape)


def network_from_shapes(
    embedding_size: int,
    hidden_sizes: Sequence[int],
    arch: str = "egru",
    weight_sparsity: float = 0.0,
    event_rate: float | Sequence[float] = 0.2,
    vocab_size: int = 10_000,
    decoder: bool = False,
    decoder_sparsity: float = 0.0,
    seed: int = 0,
    source: str = "shapes",
) -> Network:
    """A network of given sizes with random masks (fixed seed) and uniform event rates.

    `event_rate` is one rate for all layers or one per layer. With `decoder`, the decoder
    (vocab x last layer width) is included with `decoder_sparsity`.
    """
    if not 0 <= weight_sparsity < 1 or not 0 <= decoder_sparsity < 1:
        raise SimulationError("weight sparsity must lie in [0, 1).")
    gates = GATES.get(arch)
    if gates is None:
        raise SimulationError(f"model.arch '{arch}' is not one of {', '.join(GATES)}.")
    layer_rates = [event_rate] * len(hidden_sizes) if np.isscalar(event_rate) else list(event_rate)
    rng = np.random.default_rng(seed)
    w, r, rates = [], [], []
    inputs = embedding_size
    for h, rate in zip(hidden_sizes, layer_rates, strict=True):
        w.append(random_mask((gates * h, inputs), weight_sparsity, rng))
        r.append(random_mask((gates * h, h), weight_sparsity, rng))
        rates.append(np.full(h, float(rate)))
        inputs = h
    dec = random_mask((vocab_size, inputs), decoder_sparsity, rng) if decoder else None
    return build_network(arch, w, r, rates, dec, vocab_size, source)


def network_from_config(
    config: Any,
    event_rate: float | None = None,
    vocab_size: int | None = None,
    decoder: bool = True,
    seed: int = 0,
) -> Network:
    """Shapes from a RunConfig (no trained model): weight sparsity = prune.target_sparsity with
    random masks (fixed seed), one event rate for every unit (default per architecture)."""
    m = config.model
    sizes = [m.hidden_size] * m.num_layers
    if m.tie_weights:
        sizes[-1] = m.embedding_size  # as LanguageModel.layer_sizes
    rate = DEFAULT_EVENT_RATE[m.arch] if event_rate is None else float(event_rate)
    if not 0 <= rate <= 1:
        raise SimulationError(f"--event-rate must lie in [0, 1] (got {rate}).")
    vocab = vocab_size or CORPUS_VOCAB.get(config.data.corpus)
    if vocab is None:
        raise SimulationError(
            f"unknown vocabulary size for corpus '{config.data.corpus}'; pass --vocab-size."
        )
    s = config.prune.target_sparsity
    return network_from_shapes(
        m.embedding_size,
        sizes,
        m.arch,
        s,
        rate,
        vocab,
        decoder,
        s if config.prune.include_embedding else 0.0,
        seed,
        source="config",
    )
