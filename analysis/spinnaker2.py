"""A simulated SpiNNaker2 deployment: mapping onto processing elements, memory, and
latency / energy per token from a run's measured sparsity. docs/spinnaker2.md has the model,
its constants with their sources, the calibration and the sensitivity to each assumption.

Pipeline, read top to bottom:

    profiles (YAML)   every constant with a source or marked as assumed      load_profile
    Network           masked matrices of each layer (and the decoder) with   network_from_model
                      per-unit event rates                                    network_from_config
                                                                              network_from_shapes
    UnitMapping       each layer's units split into contiguous blocks, one    map_network
                      block per PE, compressed columns within the SRAM budget
    cost per token    event-driven cycles per PE, packets, sync, host I/O,    simulate
                      static + dynamic energy at a DVFS level
    GPU baseline      the same network, dense kernels at batch size 1         gpu_baseline
    calibration       Nazeer et al. 2024's deployment, model vs published     calibrate, sensitivity

Why units are the unit of placement: an EGRU (or GRU / LSTM) unit needs all of its gate
pre-activations to update its state and decide whether it emits, so all gate rows of a unit
live on the same PE and the unit's event leaves from there. Every PE of a layer receives
every event addressed to that layer (multicast) and walks its own slice of the event's
compressed column, so a silent unit costs nothing downstream, while a PE still pays the
per-packet cost for events its slice has no non-zeros for.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from duosparse import schema
from duosparse.config import read_yaml
from duosparse.model import GATES

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = PROFILE_DIR / "spinnaker2.yaml"
DEFAULT_GPU_PROFILE = PROFILE_DIR / "gpu_a100.yaml"

PRECISIONS = ("fp32", "int8")
DECODER_PLACES = ("chip", "host")
# Default event rate for --config (no trained model): EGRU units emit on a fraction of tokens,
# LSTM / GRU outputs are (almost) never exactly zero.
DEFAULT_EVENT_RATE = {"egru": 0.2, "gru": 1.0, "lstm": 1.0}
CORPUS_VOCAB = {"ptb": 10_000, "wikitext-2": 33_278, "synthetic": 64}

FIGURES = schema.SPINNAKER2_FIGURES  # logged on a run as hw/spinnaker2/<figure>
ARTIFACT = schema.ARTIFACT_SPINNAKER2


class SimulationError(ValueError):
    """Input the deployment model cannot use; the message says why and what to do."""


class ProfileError(SimulationError):
    """A hardware profile file that is missing, malformed or lacks a constant."""


class MappingError(SimulationError):
    """The network cannot be placed onto processing elements."""


class DoesNotFit(MappingError):
    """The network needs more chips than it was given."""

    def __init__(self, message: str, chips_needed: int, pes_needed: int, chips_given: int):
        super().__init__(message)
        self.chips_needed, self.pes_needed, self.chips_given = chips_needed, pes_needed, chips_given


# --- profiles -------------------------------------------------------------------------


@dataclass(frozen=True)
class Constant:
    name: str  # dotted, e.g. "levels.high.voltage_v"
    value: Any
    unit: str
    source: str | None
    assumed: bool
    note: str


@dataclass
class Profile:
    name: str
    path: Path
    description: str
    constants: dict[str, Constant]
    calibration: dict[str, Constant] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        try:
            return self.constants[key].value
        except KeyError:
            raise ProfileError(
                f"The profile '{self.path}' has no constant '{key}'; compare it with "
                f"{DEFAULT_PROFILE.name} / {DEFAULT_GPU_PROFILE.name} in {PROFILE_DIR}."
            ) from None

    def case(self, key: str) -> Any:
        return self.calibration[f"case.{key}"].value

    def published(self, key: str) -> float:
        return float(self.calibration[f"published.{key}"].value)

    def assumed(self) -> list[Constant]:
        return [c for c in [*self.constants.values(), *self.calibration.values()] if c.assumed]

    def replace(self, **values: Any) -> Profile:
        """A copy with some values changed; keys are dotted names (use a dict for dots)."""
        constants, calibration = dict(self.constants), dict(self.calibration)
        for key, value in values.items():
            table = constants if key in constants else calibration if key in calibration else None
            if table is None:
                raise ProfileError(f"'{key}' is not a constant of profile '{self.name}'.")
            old = table[key]
            table[key] = Constant(old.name, value, old.unit, old.source, old.assumed, old.note)
        return Profile(self.name, self.path, self.description, constants, calibration)


def _flatten_constants(tree: Any, prefix: str, path: Path) -> dict[str, Constant]:
    if not isinstance(tree, dict):
        raise ProfileError(f"{path}: '{prefix or 'constants'}' must be a mapping.")
    if "value" in tree:
        name = prefix
        source, assumed, note = (
            tree.get("source"),
            bool(tree.get("assumed", False)),
            tree.get("note", ""),
        )
        if not source and not (assumed and note):
            raise ProfileError(
                f"{path}: constant '{name}' needs a `source`, or `assumed: true` with a `note` "
                "saying why this value."
            )
        return {
            name: Constant(
                name, tree["value"], str(tree.get("unit", "")), source, assumed, str(note)
            )
        }
    out: dict[str, Constant] = {}
    for key, sub in tree.items():
        out.update(_flatten_constants(sub, f"{prefix}.{key}" if prefix else str(key), path))
    return out


def load_profile(path: str | Path | None = None, gpu: bool = False) -> Profile:
    """Read a hardware profile (default: the SpiNNaker2 one, or the A100 one with gpu=True)."""
    path = Path(path) if path is not None else (DEFAULT_GPU_PROFILE if gpu else DEFAULT_PROFILE)
    if not path.is_file():
        raise ProfileError(
            f"Hardware profile '{path}' does not exist; the defaults are in {PROFILE_DIR}."
        )
    tree = read_yaml(path, "Hardware profile", f"a profile such as {DEFAULT_PROFILE}", ProfileError)
    if not isinstance(tree, dict) or not isinstance(tree.get("constants"), dict):
        raise ProfileError(
            f"Hardware profile '{path}' must be a mapping with a `constants` section."
        )
    calibration = {}
    if "calibration" in tree:
        calibration = _flatten_constants(tree["calibration"], "", path)
    return Profile(
        name=str(tree.get("profile", path.stem)),
        path=path,
        description=str(tree.get("description", "")),
        constants=_flatten_constants(tree["constants"], "", path),
        calibration=calibration,
    )


# --- the network to deploy -------------------------------------------------------------


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


# --- mapping --------------------------------------------------------------------------


@dataclass
class Placement:
    """What one PE holds: units [unit_start, unit_stop) of one block, all their gate rows."""

    pe: int
    chip: int
    block: str
    unit_start: int
    unit_stop: int
    nnz: int
    weight_bytes: int  # stored values + row indices (fp32) or the dense int8 rows
    pointer_bytes: int  # column pointers (fp32) or the gathered input vector (int8)
    state_bytes: int
    buffer_bytes: int
    cycles: float = 0.0  # expected per token, filled by the cost model
    traversal: float = 0.0  # expected stored non-zeros walked (fp32) or MACs (int8) per token

    @property
    def units(self) -> int:
        return self.unit_stop - self.unit_start

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.pointer_bytes + self.state_bytes + self.buffer_bytes


@dataclass
class UnitMapping:
    placements: list[Placement]
    chips: int
    chips_needed: int
    pes_needed: int  # fewest PEs the memory budget allows
    budget_bytes: int
    usable_pes_per_chip: int
    precision: str

    @property
    def pes(self) -> int:
        return len(self.placements)

    def of(self, block: str) -> list[Placement]:
        return [p for p in self.placements if p.block == block]

    @property
    def max_pe_bytes(self) -> int:
        return max(p.bytes for p in self.placements)

    def spans(self) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for p in self.placements:
            out.setdefault(p.block, []).append((p.unit_start, p.unit_stop))
        return out


@dataclass
class _Costs:
    """Per-unit and per-PE cost terms of one block (cycles per token and bytes)."""

    unit_cycles: np.ndarray
    unit_bytes: np.ndarray  # int64
    unit_work: np.ndarray  # non-zeros walked (fp32) or MACs (int8) per token
    pe_cycles: float  # paid by every PE of the block
    pe_bytes: int  # held by every PE of the block
    state_bytes: np.ndarray  # part of unit_bytes that is state


def _block_costs(block: Block, profile: Profile, precision: str) -> _Costs:
    c = lambda key: float(profile[f"cycles.{key}"])  # noqa: E731 - a short reader
    gates = block.gates
    if block.kind == "decoder":
        per_unit_fixed = c("per_logit")
        state = np.full(block.units, 4, dtype=np.int64)  # the bias
    else:
        per_unit_fixed = c("per_unit") + c("per_gate") * gates
        state = np.full(
            block.units,
            int(profile["layout.state_bytes_per_unit"])
            + gates * int(profile["layout.state_bytes_per_gate"]),
            dtype=np.int64,
        )
    send = c("per_event_sent") * block.out_rates
    pe_cycles = c("per_event") * block.events_in + c("per_step")
    if block.kind == "decoder":
        pe_cycles += c("per_event_sent") + c("per_event")  # send and merge one partial result
    columns = block.inputs + block.recurrent_inputs
    if precision == "fp32":
        # Compressed columns: every stored non-zero costs a value and a row index; the cost of
        # a token is the stored non-zeros of the columns whose source emitted.
        per_nnz = int(profile["layout.value_bytes_fp32"]) + int(profile["layout.index_bytes"])
        weights = block.unit_nnz * per_nnz
        work = block.unit_traversal
        unit_cycles = c("per_nnz_fp32") * work + per_unit_fixed + send
        n_pointers = block.inputs + 1 + (block.recurrent_inputs + 1 if block.r is not None else 0)
        pe_bytes = int(profile["layout.pointer_bytes"]) * n_pointers
    elif precision == "int8":
        # MAC array: each PE keeps its rows dense in int8 and multiplies the columns of the
        # inputs that emitted; zero weights are multiplied like any other.
        weights = np.full(
            block.units, gates * columns * int(profile["layout.value_bytes_int8"]), dtype=np.int64
        )
        work = np.full(block.units, gates * block.events_in)
        unit_cycles = (
            work / float(profile["pe.mac_array_matvec_macs_per_cycle"]) + per_unit_fixed + send
        )
        pe_bytes = columns * int(profile["layout.value_bytes_int8"])  # gathered input vector
        pe_cycles += c("per_mac_invocation")
    else:
        raise SimulationError(
            f"--precision must be one of {', '.join(PRECISIONS)} (got '{precision}')."
        )
    return _Costs(
        unit_cycles,
        weights + state,
        work,
        pe_cycles,
        pe_bytes + int(profile["layout.buffer_bytes"]),
        state,
    )


def _greedy(
    cycles_cum: np.ndarray,
    bytes_cum: np.ndarray,
    cycle_cap: float,
    byte_cap: int,
    limit: int | None = None,
) -> list[tuple[int, int]] | None:
    """Contiguous blocks, each as large as both caps allow (next fit). None if a single unit
    breaks a cap or more than `limit` blocks are needed. Next fit gives the fewest blocks
    for contiguous splits under additive caps."""
    n = len(cycles_cum) - 1
    out: list[tuple[int, int]] = []
    start = 0
    while start < n:
        by_cycles = (
            int(np.searchsorted(cycles_cum, cycles_cum[start] + cycle_cap, side="right")) - 1
        )
        by_bytes = int(np.searchsorted(bytes_cum, bytes_cum[start] + byte_cap, side="right")) - 1
        stop = min(by_cycles, by_bytes, n)
        if stop <= start or (limit is not None and len(out) >= limit):
            return None
        out.append((start, stop))
        start = stop
    return out


PE_POLICIES = ("compact", "spread")


def _fill(spans: list[list[tuple[int, int]]], target: int) -> None:
    """Split the PEs holding the most units until `target` PEs are used (or every PE holds
    one unit), so the PE count depends on the policy only, not on the event rates."""
    heap = [
        (-(stop - start), b, start, stop) for b, block in enumerate(spans) for start, stop in block
    ]
    heapq.heapify(heap)
    count = len(heap)
    while count < target and heap and -heap[0][0] > 1:
        _, b, start, stop = heapq.heappop(heap)
        mid = (start + stop) // 2
        spans[b].remove((start, stop))
        spans[b] += [(start, mid), (mid, stop)]
        heapq.heappush(heap, (-(mid - start), b, start, mid))
        heapq.heappush(heap, (-(stop - mid), b, mid, stop))
        count += 1
    for block in spans:
        block.sort()


def map_network(
    net: Network,
    profile: Profile,
    precision: str = "fp32",
    chips: int | None = None,
    pes: int | str = "compact",
    reuse: UnitMapping | None = None,
) -> UnitMapping:
    """Place every block's units onto PEs within the SRAM budget, balancing expected cycles.

    The fewest PEs the memory allows (next fit, units in order) set `pes_needed` and
    `chips_needed`. How many PEs the mapping then uses is `pes`:
      "compact"  the fewest the memory allows (unused PEs stay off; the default)
      "spread"   every application PE of the chips (`chips`, default `chips_needed`)
      N          exactly N PEs (e.g. the 150 of the published deployment)
    Within that count the units are split so that the slowest PE is as fast as it can be
    (binary search on a cycle cap with next-fit splits), then PEs are split further until
    the count is reached (this never raises the slowest PE: the cap was already the best
    achievable). Raises DoesNotFit (with the chips needed) when `chips` are too few and
    MappingError when a single unit is larger than one PE's budget.

    `reuse`: keep an earlier mapping's unit blocks (a deployed placement, e.g. to evaluate
    other event rates on it); only the costs and bytes are recomputed.
    """
    budget = int(profile["pe.usable_sram_bytes"])
    usable = int(profile["chip.pes"]) - int(profile["chip.reserved_pes"])
    costs = [_block_costs(b, profile, precision) for b in net.blocks]
    cums = []
    for block, cost in zip(net.blocks, costs, strict=True):
        cap = budget - cost.pe_bytes
        biggest = int(cost.unit_bytes.max()) if block.units else 0
        if biggest > cap:
            raise MappingError(
                f"{block.name}: one unit needs {biggest:,} B of weights and state, but a PE has "
                f"{cap:,} B left after {cost.pe_bytes:,} B of column pointers and buffers "
                f"(budget {budget:,} B). Units are never split across PEs; prune the layer "
                f"further or make it narrower (with --precision int8 weight sparsity does not "
                f"shrink the dense rows)."
            )
        cums.append(
            (
                np.concatenate([[0.0], np.cumsum(cost.unit_cycles)]),
                np.concatenate([[0], np.cumsum(cost.unit_bytes)]),
                cap,
            )
        )
    by_memory = [_greedy(cc, bc, math.inf, cap) for cc, bc, cap in cums]
    pes_needed = sum(len(s) for s in by_memory)  # type: ignore[arg-type]
    chips_needed = max(1, math.ceil(pes_needed / usable))

    def refuse(given: int) -> DoesNotFit:
        return DoesNotFit(
            f"The model does not fit {given} chip{'s' if given != 1 else ''}: its compressed "
            f"weights, state and buffers need at least {pes_needed:,} PEs of {budget:,} B "
            f"({usable} usable PEs per chip), that is {chips_needed} chips. Pass --chips "
            f"{chips_needed} or more, or prune / shrink the model.",
            chips_needed,
            pes_needed,
            given,
        )

    if chips is not None and chips_needed > chips:
        raise refuse(chips)
    if reuse is not None:
        best = _reused_spans(net, reuse)
        target = reuse.pes
    elif pes == "compact":
        target = pes_needed
    elif pes == "spread":
        target = (chips or chips_needed) * usable
    elif isinstance(pes, int) and not isinstance(pes, bool):
        if pes < pes_needed:
            raise DoesNotFit(
                f"{pes} PEs are fewer than the {pes_needed:,} the model's weights, state and "
                f"buffers need ({budget:,} B each).",
                chips_needed,
                pes_needed,
                math.ceil(pes / usable),
            )
        target = pes
        if chips is not None and target > chips * usable:
            raise SimulationError(
                f"{target} PEs do not fit on {chips} chips of {usable} usable PEs."
            )
    else:
        raise SimulationError(
            f"PEs must be one of {', '.join(PE_POLICIES)} or a number (got {pes!r})."
        )

    def split(cap: float, limit: int | None = None) -> list[list[tuple[int, int]]] | None:
        out = []
        left = limit
        for (cc, bc, bcap), cost in zip(cums, costs, strict=True):
            s = _greedy(cc, bc, cap - cost.pe_cycles, bcap, left)
            if s is None:
                return None
            out.append(s)
            left = None if left is None else left - len(s)
        return out

    if reuse is None:
        # Binary search on the slowest PE's cycles; `hi` (memory-only split) always works.
        hi = (
            max(
                cost.pe_cycles + float(cc[-1]) for (cc, _, _), cost in zip(cums, costs, strict=True)
            )
            + 1.0
        )
        lo = max(cost.pe_cycles + float(cost.unit_cycles.max(initial=0.0)) for cost in costs)
        found = split(hi, target)
        assert found is not None
        for _ in range(100):
            if hi - lo <= 1e-9 * hi:
                break
            mid = 0.5 * (lo + hi)
            attempt = split(mid, target)
            if attempt is None:
                lo = mid
            else:
                hi, found = mid, attempt
        best = found
        _fill(best, target)

    placements = []
    for block, cost, spans in zip(net.blocks, costs, best, strict=True):
        for start, stop in spans:
            index = len(placements)
            units = slice(start, stop)
            state = int(cost.state_bytes[units].sum())
            placements.append(
                Placement(
                    pe=index,
                    chip=index // usable,
                    block=block.name,
                    unit_start=start,
                    unit_stop=stop,
                    nnz=int(block.unit_nnz[units].sum()),
                    weight_bytes=int(cost.unit_bytes[units].sum()) - state,
                    pointer_bytes=cost.pe_bytes - int(profile["layout.buffer_bytes"]),
                    state_bytes=state,
                    buffer_bytes=int(profile["layout.buffer_bytes"]),
                    cycles=cost.pe_cycles + float(cost.unit_cycles[units].sum()),
                    traversal=float(cost.unit_work[units].sum()),
                )
            )
    if reuse is not None:
        over = [p for p in placements if p.bytes > budget]
        if over:
            raise MappingError(
                f"the reused placement no longer fits: PE {over[0].pe} ({over[0].block}) would "
                f"need {over[0].bytes:,} B of {budget:,} B; map this network afresh."
            )
    used_chips = max(p.chip for p in placements) + 1
    return UnitMapping(
        placements, max(used_chips, 1), chips_needed, pes_needed, budget, usable, precision
    )


def _reused_spans(net: Network, reuse: UnitMapping) -> list[list[tuple[int, int]]]:
    spans = reuse.spans()
    out = []
    for block in net.blocks:
        blocks = spans.get(block.name)
        if (
            not blocks
            or blocks[-1][1] != block.units
            or [a for a, _ in blocks[1:]] != [b for _, b in blocks[:-1]]
        ):
            raise MappingError(
                f"the reused placement does not cover {block.name} ({block.units} units)."
            )
        out.append(list(blocks))
    return out


def materialize(
    placement: Placement, block: Block, profile: Profile, precision: str = "fp32"
) -> dict[str, Any]:
    """The arrays one PE would hold, built from the masks (for checking the mapping).

    Returns the stored arrays (fp32: compressed columns of the PE's rows of W and R; int8:
    the dense rows) and the global (matrix, row, column) of every stored non-zero.
    """
    units = np.arange(placement.unit_start, placement.unit_stop)
    rows = (np.arange(block.gates)[:, None] * block.units + units[None, :]).reshape(-1)
    arrays: dict[str, np.ndarray] = {}
    coords = []
    for tag, matrix in (("w", block.w), ("r", block.r)):
        if matrix is None:
            continue
        local = matrix[rows]
        r_idx, c_idx = np.nonzero(local)
        coords.append(
            np.stack([np.full(r_idx.size, 0 if tag == "w" else 1), rows[r_idx], c_idx], 1)
        )
        if precision == "fp32":
            order = np.lexsort((r_idx, c_idx))  # column-major: one compressed column per input
            index_dtype = np.dtype(f"u{int(profile['layout.index_bytes'])}")
            pointer_dtype = np.dtype(f"u{int(profile['layout.pointer_bytes'])}")
            arrays[f"{tag}_values"] = np.zeros(r_idx.size, dtype=np.float32)
            arrays[f"{tag}_rows"] = r_idx[order].astype(index_dtype)
            counts = np.bincount(c_idx, minlength=matrix.shape[1])
            arrays[f"{tag}_pointers"] = np.concatenate([[0], np.cumsum(counts)]).astype(
                pointer_dtype
            )
        else:
            arrays[f"{tag}_dense"] = local.astype(np.int8)
    if precision == "int8":
        arrays["gathered_inputs"] = np.zeros(block.inputs + block.recurrent_inputs, dtype=np.int8)
    stored = sum(a.nbytes for a in arrays.values())
    return {
        "arrays": arrays,
        "coords": np.concatenate(coords) if coords else np.zeros((0, 3), dtype=np.int64),
        "bytes": stored + placement.state_bytes + placement.buffer_bytes,
    }


# --- cost model -----------------------------------------------------------------------


@dataclass
class Level:
    name: str
    voltage_v: float
    frequency_hz: float
    energy_per_cycle_j: float  # busy PE
    idle_power_w: float  # powered PE waiting


def performance_level(profile: Profile, name: str | None = None) -> Level:
    """A DVFS level. Busy energy per cycle scales with V^2 from the all-busy chip power."""
    name = name or str(profile["levels.default"])
    if f"levels.{name}.voltage_v" not in profile.constants:
        levels = sorted(
            {
                k.split(".")[1]
                for k in profile.constants
                if k.startswith("levels.") and k.count(".") == 2
            }
        )
        raise SimulationError(f"--level must be one of {', '.join(levels)} (got '{name}').")
    ref = str(profile["chip.all_busy_level"])
    ref_v, ref_f = (
        float(profile[f"levels.{ref}.voltage_v"]),
        float(profile[f"levels.{ref}.frequency_hz"]),
    )
    per_pe_busy = (
        float(profile["chip.power_all_busy_w"]) - float(profile["chip.power_pes_off_w"])
    ) / int(profile["chip.pes"])
    v, f = float(profile[f"levels.{name}.voltage_v"]), float(profile[f"levels.{name}.frequency_hz"])
    e_cycle = per_pe_busy / ref_f * (v / ref_v) ** 2
    return Level(name, v, f, e_cycle, float(profile["pe.idle_power_fraction"]) * e_cycle * f)


@dataclass
class SimulationResult:
    """Per-token figures of one deployment, with the GPU baseline."""

    mapping: UnitMapping
    level: Level
    precision: str
    decoder: str
    pipelined: bool
    latency_s: float
    compute_s: float
    comm_s: float
    sync_s: float
    host_s: float
    energy_j: float
    static_j: float
    dynamic_j: float
    comm_j: float
    macs_per_token: float
    events_per_token: float
    packets: dict[str, float]
    gpu: dict[str, float]
    fits: bool = True
    source: str = ""

    @property
    def power_w(self) -> float:
        return self.energy_j / self.latency_s

    def figures(self) -> dict[str, float]:
        """The hw/spinnaker2/<figure> values (see FIGURES)."""
        return {
            "energy_per_token_j": self.energy_j,
            "latency_per_token_s": self.latency_s,
            "compute_latency_per_token_s": self.compute_s,
            "power_w": self.power_w,
            "pes": float(self.mapping.pes),
            "chips": float(self.mapping.chips),
            "chips_needed": float(self.mapping.chips_needed),
            "fits": 1.0 if self.fits else 0.0,
            "max_pe_bytes": float(self.mapping.max_pe_bytes),
            "macs_per_token": self.macs_per_token,
            "events_per_token": self.events_per_token,
            "gpu_energy_per_token_j": self.gpu["energy_j"],
            "gpu_latency_per_token_s": self.gpu["latency_s"],
            "gpu_power_w": self.gpu["power_w"],
            "energy_gain_vs_gpu": self.gpu["energy_j"] / self.energy_j,
            "speedup_vs_gpu": self.gpu["latency_s"] / self.latency_s,
        }

    def to_dict(self) -> dict[str, Any]:
        m = self.mapping
        blocks: dict[str, dict[str, Any]] = {}
        for p in m.placements:
            b = blocks.setdefault(
                p.block, {"pes": 0, "units": 0, "nnz": 0, "max_bytes": 0, "max_cycles": 0.0}
            )
            b["pes"] += 1
            b["units"] += p.units
            b["nnz"] += p.nnz
            b["max_bytes"] = max(b["max_bytes"], p.bytes)
            b["max_cycles"] = max(b["max_cycles"], p.cycles)
        return {
            "source": self.source,
            "options": {
                "precision": self.precision,
                "decoder": self.decoder,
                "level": self.level.name,
                "voltage_v": self.level.voltage_v,
                "frequency_hz": self.level.frequency_hz,
                "pipelined": self.pipelined,
            },
            "figures": self.figures(),
            "latency_breakdown_s": {
                "compute": self.compute_s,
                "communication": self.comm_s,
                "sync": self.sync_s,
                "host": self.host_s,
            },
            "energy_breakdown_j": {
                "static": self.static_j,
                "dynamic": self.dynamic_j,
                "communication": self.comm_j,
            },
            "packets_per_token": self.packets,
            "mapping": {
                "pes": m.pes,
                "pes_needed": m.pes_needed,
                "chips": m.chips,
                "chips_needed": m.chips_needed,
                "budget_bytes": m.budget_bytes,
                "max_pe_bytes": m.max_pe_bytes,
                "mean_pe_bytes": sum(p.bytes for p in m.placements) / m.pes,
                "blocks": blocks,
            },
            "gpu": self.gpu,
        }


def _chip_hops(chips: int) -> int:
    """Longest route between chips, taken as the diameter of a square-ish mesh."""
    if chips <= 1:
        return 0
    side = math.ceil(math.sqrt(chips))
    return 2 * (side - 1) if side * (side - 1) < chips else 2 * side - 3


def simulate(
    net: Network,
    profile: Profile | None = None,
    gpu_profile: Profile | None = None,
    precision: str = "fp32",
    decoder: str = "host",
    chips: int | None = None,
    level: str | None = None,
    pipelined: bool = True,
    pes: int | str = "compact",
    mapping: UnitMapping | None = None,
) -> SimulationResult:
    """Map `net` and estimate latency and energy per token, with the GPU baseline.

    decoder 'host': the decoder is not placed; the last layer's events go to the host.
    'chip': it is placed like a layer (its input is the last layer's events).
    pipelined: every layer advances one token per time step (teacher-forced streaming, as
    in perplexity evaluation), so a step costs the slowest PE; otherwise (autoregressive
    generation) the layers of one token run one after another.
    pes: "compact" | "spread" | a number, see map_network.
    mapping: evaluate on this placement instead of mapping afresh (a fixed deployment).
    """
    profile = profile or load_profile()
    gpu_profile = gpu_profile or load_profile(gpu=True)
    if decoder not in DECODER_PLACES:
        raise SimulationError(
            f"--decoder must be one of {', '.join(DECODER_PLACES)} (got '{decoder}')."
        )
    if decoder == "chip" and net.decoder is None:
        raise SimulationError("--decoder chip needs the decoder matrix, but this network has none.")
    placed = net if decoder == "chip" else net.without_decoder()
    lvl = performance_level(profile, level)
    mapping = map_network(placed, profile, precision, chips, pes, reuse=mapping)
    f = lvl.frequency_hz

    # Packets per token and where they go. An event is one multicast packet to every PE of
    # its own layer (recurrent input) and of the next block; the embedding comes from the host.
    by_block = {b.name: mapping.of(b.name) for b in placed.blocks}
    chips_of = {name: {p.chip for p in ps} for name, ps in by_block.items()}
    blocks = placed.blocks
    deliveries = blocks[0].inputs * len(by_block[blocks[0].name])  # embedding values
    cross = blocks[0].inputs * len(chips_of[blocks[0].name] - {0})
    events = 0.0
    out_per_chip: dict[int, float] = {}
    for i, block in enumerate(blocks):
        if block.kind != "recurrent":
            continue
        following = blocks[i + 1].name if i + 1 < len(blocks) else None
        targets = len(by_block[block.name]) + (len(by_block[following]) if following else 0)
        dest_chips = chips_of[block.name] | (chips_of[following] if following else set())
        for p in by_block[block.name]:
            emitted = float(block.out_rates[p.unit_start : p.unit_stop].sum())
            events += emitted
            deliveries += emitted * targets
            crossing = emitted * len(dest_chips - {p.chip})
            cross += crossing
            out_per_chip[p.chip] = out_per_chip.get(p.chip, 0.0) + crossing
    last = placed.layers[-1]
    if decoder == "host":
        host_out = float(last.out_rates.sum())  # the last layer's events go to the host
    else:
        # Decoder PEs reduce their partial arg-max / log-sum-exp onto one PE, which reports.
        deliveries += len(by_block["decoder"])
        host_out = 1.0
    host_packets = blocks[0].inputs + host_out

    # Time per step.
    block_s = {name: max(p.cycles for p in ps) / f for name, ps in by_block.items()}
    hops = _chip_hops(mapping.chips)
    link_rate = float(profile["communication.link_packets_per_s"]) * int(profile["chip.links"])
    serial = max(out_per_chip.values(), default=0.0) / link_rate if mapping.chips > 1 else 0.0
    comm_one = float(profile["communication.noc_latency_s"]) + hops * float(
        profile["communication.link_latency_s"]
    )
    sync_s = float(profile["communication.sync_per_step_s"]) + hops * float(
        profile["communication.link_latency_s"]
    )
    host_s = float(profile["host.latency_s"]) + host_packets / float(profile["host.packets_per_s"])
    if pipelined:
        compute_s, comm_s = max(block_s.values()), comm_one + serial
    else:
        compute_s, comm_s = sum(block_s.values()), len(block_s) * comm_one + serial
    latency = compute_s + comm_s + sync_s + host_s

    # Energy per step: powered PEs idle the whole step, busy cycles cost the difference;
    # chips pay their base power; packets pay the network.
    cycles = sum(p.cycles for p in mapping.placements)
    static_w = (
        mapping.chips * float(profile["chip.power_pes_off_w"]) + mapping.pes * lvl.idle_power_w
    )
    static_j = static_w * latency
    dynamic_j = cycles * (lvl.energy_per_cycle_j - lvl.idle_power_w / f)
    work = sum(p.traversal for p in mapping.placements)
    if precision == "int8":
        dynamic_j += work * float(profile["pe.mac_array_energy_per_mac_j"])
    comm_j = (
        deliveries * float(profile["communication.noc_energy_per_delivery_j"])
        + cross * float(profile["communication.link_energy_per_packet_j"])
        + host_packets * float(profile["host.energy_per_packet_j"])
    )
    gpu = gpu_baseline(placed, gpu_profile)
    return SimulationResult(
        mapping=mapping,
        level=lvl,
        precision=precision,
        decoder=decoder,
        pipelined=pipelined,
        latency_s=latency,
        compute_s=compute_s,
        comm_s=comm_s,
        sync_s=sync_s,
        host_s=host_s,
        energy_j=static_j + dynamic_j + comm_j,
        static_j=static_j,
        dynamic_j=dynamic_j,
        comm_j=comm_j,
        macs_per_token=work,
        events_per_token=events,
        packets={"deliveries": deliveries, "cross_chip": cross, "host": host_packets},
        gpu=gpu,
        fits=mapping.chips_needed <= (chips or 1),
        source=net.source,
    )


def gpu_baseline(net: Network, gpu_profile: Profile | None = None) -> dict[str, float]:
    """The same network on the GPU at batch size 1, dense fp32 kernels, one token at a time.

    A step is launch-bound or memory-bound, whichever is slower: time = max(kernels x launch
    overhead, weight bytes / bandwidth + FLOPs / peak). Weights stay in L2 when they fit.
    Energy = active idle power x time + bytes x energy per byte + FLOPs x energy per FLOP.
    """
    g = gpu_profile or load_profile(gpu=True)
    macs = float(sum(b.dense for b in net.blocks))
    weight_bytes = 4.0 * macs
    in_l2 = weight_bytes <= float(g["l2_bytes"])
    bandwidth = float(g["l2_bytes_per_s"] if in_l2 else g["hbm_bytes_per_s"])
    per_byte = float(g["l2_energy_per_byte_j"] if in_l2 else g["hbm_energy_per_byte_j"])
    kernels = len(net.layers) * int(g[f"kernels_per_layer_step_{net.arch}"]) + int(
        g["kernels_per_token"]
    )
    if net.decoder is not None:
        kernels += int(g["kernels_decoder"])
    flops = 2.0 * macs
    latency = max(
        kernels * float(g["kernel_launch_s"]),
        weight_bytes / bandwidth + flops / float(g["peak_fp32_flops"]),
    )
    energy = (
        float(g["active_idle_power_w"]) * latency
        + weight_bytes * per_byte
        + flops * float(g["energy_per_flop_j"])
    )
    return {
        "latency_s": latency,
        "energy_j": energy,
        "power_w": energy / latency,
        "dense_macs_per_token": macs,
        "kernels_per_token": float(kernels),
        "weights_in_l2": float(in_l2),
    }


def simulate_or_refuse(net: Network, chips: int | None, **kwargs: Any) -> SimulationResult:
    """simulate(), but a model that needs more than `chips` chips is still simulated on the
    chips it needs and marked fits=False (for sweeps, where one run must not stop the rest)."""
    try:
        return simulate(net, chips=chips, **kwargs)
    except DoesNotFit:
        result = simulate(net, chips=None, **kwargs)
        result.fits = False
        return result


# --- calibration ----------------------------------------------------------------------


def calibration_network(profile: Profile) -> Network:
    return network_from_shapes(
        int(profile.case("embedding_size")),
        list(profile.case("hidden_sizes")),
        "egru",
        float(profile.case("weight_sparsity")),
        float(profile.case("event_rate")),
        int(profile.case("vocab_size")),
        decoder=False,
        seed=0,
        source="Nazeer et al. 2024 (modelled)",
    )


def calibrate(
    profile: Profile | None = None, gpu_profile: Profile | None = None, net: Network | None = None
) -> dict[str, Any]:
    """The published deployment modelled with the profile's constants, against the paper.

    Figures are per inference = tokens_per_inference tokens through the pipeline (the first
    token's output appears after one step per layer: pipeline depth - 1 extra steps).
    """
    profile = profile or load_profile()
    net = net or calibration_network(profile)
    result = simulate(
        net,
        profile,
        gpu_profile,
        precision=str(profile.case("precision")),
        decoder=str(profile.case("decoder")),
        level=str(profile.case("level")),
        pes=int(profile.case("pes")),
    )
    n = float(profile.case("tokens_per_inference"))
    steps = n + len(net.layers) - 1
    latency = steps * result.latency_s
    energy = steps * result.energy_j
    gpu_latency, gpu_energy = n * result.gpu["latency_s"], n * result.gpu["energy_j"]
    rows = {
        "power_w": (energy / latency, profile.published("power_w")),
        "latency_s": (latency, profile.published("latency_s")),
        "energy_j": (energy, profile.published("energy_j")),
        "gpu_power_w": (gpu_energy / gpu_latency, profile.published("gpu_power_w")),
        "gpu_latency_s": (gpu_latency, profile.published("gpu_latency_s")),
        "gpu_energy_j": (gpu_energy, profile.published("gpu_energy_j")),
    }
    tolerance = float(profile.calibration["tolerance"].value)
    weights_per_pe = [p.weight_bytes for p in result.mapping.placements]
    return {
        "rows": {
            k: {"model": m, "published": p, "ratio": m / p, "within": abs(m / p - 1) <= tolerance}
            for k, (m, p) in rows.items()
        },
        "tolerance": tolerance,
        "within_tolerance": all(abs(m / p - 1) <= tolerance for m, p in rows.values()),
        "info": {
            "pes": result.mapping.pes,
            "weight_bytes_per_pe_mean": float(np.mean(weights_per_pe)),
            "weight_bytes_per_pe_max": float(np.max(weights_per_pe)),
            "published_weight_bytes_per_pe": profile.published("weight_bytes_per_pe"),
            "latency_per_token_s": result.latency_s,
            "energy_per_token_j": result.energy_j,
            "gpu_latency_per_token_s": result.gpu["latency_s"],
            "macs_per_token": result.macs_per_token,
            "tokens_per_inference": n,
        },
        "result": result,
    }


def sensitivity(
    profile: Profile | None = None,
    gpu_profile: Profile | None = None,
    factors: Iterable[float] = (0.5, 2.0),
) -> list[dict[str, Any]]:
    """How the calibrated per-inference power, latency and energy move when each assumed
    numeric constant (SpiNNaker2 and GPU profiles, calibration case) is scaled."""
    profile = profile or load_profile()
    gpu_profile = gpu_profile or load_profile(gpu=True)
    net = calibration_network(profile)
    base = calibrate(profile, gpu_profile, net)["rows"]
    out = []
    for target, which in ((profile, "spinnaker2"), (gpu_profile, "gpu")):
        for const in target.assumed():
            if isinstance(const.value, bool) or not isinstance(const.value, (int, float)):
                continue
            if const.name == "tolerance":
                continue
            row: dict[str, Any] = {"profile": which, "constant": const.name, "value": const.value}
            for factor in factors:
                value = (
                    type(const.value)(const.value * factor)
                    if isinstance(const.value, int)
                    else const.value * factor
                )
                value = (
                    min(value, 1.0) if const.name.endswith(("fraction", "event_rate")) else value
                )
                changed = target.replace(**{const.name: value})
                p, g = (changed, gpu_profile) if which == "spinnaker2" else (profile, changed)
                case_net = calibration_network(p) if const.name == "case.event_rate" else net
                try:
                    rows = calibrate(p, g, case_net)["rows"]
                except DoesNotFit as e:  # memory constants: the case may stop fitting its PEs
                    row[f"x{factor:g}"] = (
                        f"does not fit {int(p.case('pes'))} PEs (needs {e.pes_needed})"
                    )
                    continue
                keys = (
                    ("power_w", "latency_s", "energy_j")
                    if which == "spinnaker2"
                    else ("gpu_power_w", "gpu_latency_s", "gpu_energy_j")
                )
                row[f"x{factor:g}"] = {k: rows[k]["model"] / base[k]["model"] - 1 for k in keys}
            out.append(row)
    return out


def markdown_report(profile: Profile | None = None, gpu_profile: Profile | None = None) -> str:
    """Calibration and sensitivity tables as in docs/spinnaker2.md (regenerate them with
    `python -m duosparse.analysis.spinnaker2`)."""
    profile = profile or load_profile()
    gpu_profile = gpu_profile or load_profile(gpu=True)
    cal = calibrate(profile, gpu_profile)
    lines = [
        "| figure (per inference) | model | published | model / published |",
        "|---|---:|---:|---:|",
    ]
    for key, row in cal["rows"].items():
        lines.append(
            f"| {key} | {row['model']:.4g} | {row['published']:.4g} | {row['ratio']:.2f} |"
        )
    i = cal["info"]
    lines += [
        "",
        f"PEs: {i['pes']}; weight bytes per PE: mean {i['weight_bytes_per_pe_mean']:,.0f}, "
        f"max {i['weight_bytes_per_pe_max']:,.0f} "
        f"(published about {i['published_weight_bytes_per_pe']:,.0f}); per token: "
        f"{i['latency_per_token_s'] * 1e3:.3f} ms, {i['energy_per_token_j'] * 1e6:.1f} uJ "
        f"(GPU {i['gpu_latency_per_token_s'] * 1e3:.3f} ms); "
        f"{i['macs_per_token']:,.0f} MACs per token.",
        "",
    ]
    lines += [
        "| constant | value | x0.5: power / latency / energy | x2: power / latency / energy |",
        "|---|---:|---|---|",
    ]
    for row in sensitivity(profile, gpu_profile):

        def fmt(changes: dict[str, float] | str) -> str:
            if isinstance(changes, str):
                return changes
            return " / ".join(f"{v:+.0%}" for v in changes.values())

        name = f"{row['profile']}: `{row['constant']}`"
        lines.append(f"| {name} | {row['value']:g} | {fmt(row['x0.5'])} | {fmt(row['x2'])} |")
    return "\n".join(lines)


def result_json(result: SimulationResult) -> str:
    return json.dumps(result.to_dict(), indent=2, default=float)


if __name__ == "__main__":
    print(markdown_report())
