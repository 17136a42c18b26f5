"""Mapping: each block's units split into contiguous runs, one run per processing element
(PE), within the PE's SRAM budget and balancing the cycles each PE expects per token.

Why units are the unit of placement: see the package's docstring (all gate rows of a unit on
one PE, which sends the unit's event).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DoesNotFit, MappingError, SimulationError
from .network import Block, Network
from .profile import SpiNNaker2Profile

PRECISIONS = ("fp32", "int8")
PE_POLICIES = ("compact", "spread")

Spans = list[list[tuple[int, int]]]  # per block: the [start, stop) unit runs, one per PE


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


def _block_costs(block: Block, profile: SpiNNaker2Profile, precision: str) -> _Costs:
    cycles, layout = profile.cycles, profile.layout
    gates = block.gates
    if block.kind == "decoder":
        per_unit_fixed = float(cycles.per_logit)
        state = np.full(block.units, 4, dtype=np.int64)  # the bias
    else:
        per_unit_fixed = float(cycles.per_unit) + float(cycles.per_gate) * gates
        state = np.full(
            block.units,
            int(layout.state_bytes_per_unit) + gates * int(layout.state_bytes_per_gate),
            dtype=np.int64,
        )
    send = float(cycles.per_event_sent) * block.out_rates
    pe_cycles = float(cycles.per_event) * block.events_in + float(cycles.per_step)
    if block.kind == "decoder":
        # send and merge one partial result
        pe_cycles += float(cycles.per_event_sent) + float(cycles.per_event)
    columns = block.inputs + block.recurrent_inputs
    if precision == "fp32":
        # Compressed columns: every stored non-zero costs a value and a row index; the cost of
        # a token is the stored non-zeros of the columns whose source emitted.
        per_nnz = int(layout.value_bytes_fp32) + int(layout.index_bytes)
        weights = block.unit_nnz * per_nnz
        work = block.unit_traversal
        unit_cycles = float(cycles.per_nnz_fp32) * work + per_unit_fixed + send
        n_pointers = block.inputs + 1 + (block.recurrent_inputs + 1 if block.r is not None else 0)
        pe_bytes = int(layout.pointer_bytes) * n_pointers
    elif precision == "int8":
        # MAC array: each PE keeps its rows dense in int8 and multiplies the columns of the
        # inputs that emitted; zero weights are multiplied like any other.
        weights = np.full(
            block.units, gates * columns * int(layout.value_bytes_int8), dtype=np.int64
        )
        work = np.full(block.units, gates * block.events_in)
        unit_cycles = (
            work / float(profile.pe.mac_array_matvec_macs_per_cycle) + per_unit_fixed + send
        )
        pe_bytes = columns * int(layout.value_bytes_int8)  # gathered input vector
        pe_cycles += float(cycles.per_mac_invocation)
    else:
        raise SimulationError(
            f"--precision must be one of {', '.join(PRECISIONS)} (got '{precision}')."
        )
    return _Costs(
        unit_cycles,
        weights + state,
        work,
        pe_cycles,
        pe_bytes + int(layout.buffer_bytes),
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


def _fill(spans: Spans, target: int) -> None:
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
    profile: SpiNNaker2Profile,
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
    budget = int(profile.pe.usable_sram_bytes)
    usable = int(profile.chip.pes) - int(profile.chip.reserved_pes)
    costs = [_block_costs(b, profile, precision) for b in net.blocks]
    sums = _prefix_sums(net, costs, budget)
    need = _fewest_pes(sums, budget, usable)
    if chips is not None and need.chips > chips:
        raise _does_not_fit(chips, need)
    if reuse is not None:
        spans = _reused_spans(net, reuse)
    else:
        target = _target_pes(pes, chips, need)
        spans = _balanced_spans(sums, costs, target)
        _fill(spans, target)
    placements = _placements(net, costs, spans, usable, int(profile.layout.buffer_bytes))
    if reuse is not None:
        over = [p for p in placements if p.bytes > budget]
        if over:
            raise MappingError(
                f"the reused placement no longer fits: PE {over[0].pe} ({over[0].block}) would "
                f"need {over[0].bytes:,} B of {budget:,} B; map this network afresh."
            )
    used_chips = max(p.chip for p in placements) + 1
    return UnitMapping(
        placements, max(used_chips, 1), need.chips, need.pes, budget, usable, precision
    )


@dataclass(frozen=True)
class _PrefixSums:
    """One block's cumulative unit cycles and bytes (from 0), and the bytes a PE has left for
    units after its per-PE arrays."""

    cycles: np.ndarray
    bytes: np.ndarray
    byte_cap: int


def _prefix_sums(net: Network, costs: list[_Costs], budget: int) -> list[_PrefixSums]:
    """Per block; refuses a unit larger than a PE (units are never split)."""
    sums = []
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
        sums.append(
            _PrefixSums(
                np.concatenate([[0.0], np.cumsum(cost.unit_cycles)]),
                np.concatenate([[0], np.cumsum(cost.unit_bytes)]),
                cap,
            )
        )
    return sums


@dataclass(frozen=True)
class _Need:
    """The fewest PEs and chips the memory allows, and what a PE and a chip offer."""

    pes: int
    chips: int
    budget: int  # bytes per PE
    usable: int  # application PEs per chip


def _fewest_pes(sums: list[_PrefixSums], budget: int, usable: int) -> _Need:
    by_memory = [_greedy(s.cycles, s.bytes, math.inf, s.byte_cap) for s in sums]
    pes_needed = sum(len(s) for s in by_memory)  # type: ignore[arg-type]
    return _Need(pes_needed, max(1, math.ceil(pes_needed / usable)), budget, usable)


def _does_not_fit(given: int, need: _Need) -> DoesNotFit:
    return DoesNotFit(
        f"The model does not fit {given} chip{'s' if given != 1 else ''}: its compressed "
        f"weights, state and buffers need at least {need.pes:,} PEs of {need.budget:,} B "
        f"({need.usable} usable PEs per chip), that is {need.chips} chips. Pass --chips "
        f"{need.chips} or more, or prune / shrink the model.",
        need.chips,
        need.pes,
        given,
    )


def _target_pes(pes: int | str, chips: int | None, need: _Need) -> int:
    """How many PEs the policy `pes` asks for (see map_network)."""
    if pes == "compact":
        return need.pes
    if pes == "spread":
        return (chips or need.chips) * need.usable
    if isinstance(pes, int) and not isinstance(pes, bool):
        if pes < need.pes:
            raise DoesNotFit(
                f"{pes} PEs are fewer than the {need.pes:,} the model's weights, state and "
                f"buffers need ({need.budget:,} B each).",
                need.chips,
                need.pes,
                math.ceil(pes / need.usable),
            )
        if chips is not None and pes > chips * need.usable:
            raise SimulationError(
                f"{pes} PEs do not fit on {chips} chips of {need.usable} usable PEs."
            )
        return pes
    raise SimulationError(f"PEs must be one of {', '.join(PE_POLICIES)} or a number (got {pes!r}).")


def _split(
    sums: list[_PrefixSums], costs: list[_Costs], cycle_cap: float, limit: int | None = None
) -> Spans | None:
    """Next-fit splits of every block under one cap on a PE's cycles; None if more than
    `limit` PEs are needed in all."""
    out = []
    left = limit
    for s, cost in zip(sums, costs, strict=True):
        spans = _greedy(s.cycles, s.bytes, cycle_cap - cost.pe_cycles, s.byte_cap, left)
        if spans is None:
            return None
        out.append(spans)
        left = None if left is None else left - len(spans)
    return out


def _balanced_spans(sums: list[_PrefixSums], costs: list[_Costs], target: int) -> Spans:
    """The splits into at most `target` PEs whose slowest PE is fastest: binary search on the
    slowest PE's cycles; `hi` (the memory-only split) always works."""
    hi = (
        max(cost.pe_cycles + float(s.cycles[-1]) for s, cost in zip(sums, costs, strict=True)) + 1.0
    )
    lo = max(cost.pe_cycles + float(cost.unit_cycles.max(initial=0.0)) for cost in costs)
    found = _split(sums, costs, hi, target)
    assert found is not None
    for _ in range(100):
        if hi - lo <= 1e-9 * hi:
            break
        mid = 0.5 * (lo + hi)
        attempt = _split(sums, costs, mid, target)
        if attempt is None:
            lo = mid
        else:
            hi, found = mid, attempt
    return found


def _placements(
    net: Network, costs: list[_Costs], spans: Spans, usable: int, buffer_bytes: int
) -> list[Placement]:
    """The PEs in order, chip by chip, each with its units' bytes and expected cycles."""
    placements = []
    for block, cost, runs in zip(net.blocks, costs, spans, strict=True):
        for start, stop in runs:
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
                    pointer_bytes=cost.pe_bytes - buffer_bytes,
                    state_bytes=state,
                    buffer_bytes=buffer_bytes,
                    cycles=cost.pe_cycles + float(cost.unit_cycles[units].sum()),
                    traversal=float(cost.unit_work[units].sum()),
                )
            )
    return placements


def _reused_spans(net: Network, reuse: UnitMapping) -> Spans:
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
    placement: Placement, block: Block, profile: SpiNNaker2Profile, precision: str = "fp32"
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
            index_dtype = np.dtype(f"u{int(profile.layout.index_bytes)}")
            pointer_dtype = np.dtype(f"u{int(profile.layout.pointer_bytes)}")
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
