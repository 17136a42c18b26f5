"""Cost model: latency and energy per token of a mapped network, event-driven cycles per PE,
packets, sync and host I/O, static + dynamic energy at a DVFS level; and the GPU baseline
(the same network, dense kernels at batch size 1)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import DoesNotFit, SimulationError
from .mapping import Placement, UnitMapping, map_network
from .network import Network
from .profile import GpuProfile, SpiNNaker2Profile, load_profile

DECODER_PLACES = ("chip", "host")


@dataclass
class Level:
    name: str
    voltage_v: float
    frequency_hz: float
    energy_per_cycle_j: float  # busy PE
    idle_power_w: float  # powered PE waiting


def performance_level(profile: SpiNNaker2Profile, name: str | None = None) -> Level:
    """A DVFS level. Busy energy per cycle scales with V^2 from the all-busy chip power."""
    name = name or str(profile.levels.default)
    point = profile.levels.get(name)
    if point is None:
        raise SimulationError(
            f"--level must be one of {', '.join(profile.levels.names())} (got '{name}')."
        )
    ref = profile.levels.get(str(profile.chip.all_busy_level))
    assert ref is not None  # the profile checks that all_busy_level names a level
    ref_v, ref_f = float(ref.voltage_v), float(ref.frequency_hz)
    chip = profile.chip
    per_pe_busy = (float(chip.power_all_busy_w) - float(chip.power_pes_off_w)) / int(chip.pes)
    v, f = float(point.voltage_v), float(point.frequency_hz)
    e_cycle = per_pe_busy / ref_f * (v / ref_v) ** 2
    return Level(name, v, f, e_cycle, float(profile.pe.idle_power_fraction) * e_cycle * f)


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
    profile: SpiNNaker2Profile | None = None,
    gpu_profile: GpuProfile | None = None,
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
    placed = _placed(net, decoder)
    lvl = performance_level(profile, level)
    mapping = map_network(placed, profile, precision, chips, pes, reuse=mapping)
    by_block = {b.name: mapping.of(b.name) for b in placed.blocks}
    traffic = _traffic(placed, by_block, decoder)
    timing = _step_time(by_block, mapping.chips, traffic, profile, lvl.frequency_hz, pipelined)
    work = sum(p.traversal for p in mapping.placements)
    energy = _step_energy(mapping, traffic, profile, lvl, precision, timing.latency_s, work)
    return SimulationResult(
        mapping=mapping,
        level=lvl,
        precision=precision,
        decoder=decoder,
        pipelined=pipelined,
        latency_s=timing.latency_s,
        compute_s=timing.compute_s,
        comm_s=timing.comm_s,
        sync_s=timing.sync_s,
        host_s=timing.host_s,
        energy_j=energy.static_j + energy.dynamic_j + energy.comm_j,
        static_j=energy.static_j,
        dynamic_j=energy.dynamic_j,
        comm_j=energy.comm_j,
        macs_per_token=work,
        events_per_token=traffic.events,
        packets={
            "deliveries": traffic.deliveries,
            "cross_chip": traffic.cross_chip,
            "host": traffic.host,
        },
        gpu=gpu_baseline(placed, gpu_profile),
        fits=mapping.chips_needed <= (chips or 1),
        source=net.source,
    )


def _placed(net: Network, decoder: str) -> Network:
    """The blocks that go onto the chip: the decoder only with decoder 'chip'."""
    if decoder not in DECODER_PLACES:
        raise SimulationError(
            f"--decoder must be one of {', '.join(DECODER_PLACES)} (got '{decoder}')."
        )
    if decoder == "chip" and net.decoder is None:
        raise SimulationError("--decoder chip needs the decoder matrix, but this network has none.")
    return net if decoder == "chip" else net.without_decoder()


@dataclass
class _Traffic:
    """Packets per token: deliveries to PEs, chip-to-chip crossings, host values."""

    deliveries: float
    cross_chip: float
    host: float
    events: float  # events the units emit
    out_per_chip: dict[int, float]  # crossings leaving each chip


def _traffic(placed: Network, by_block: dict[str, list[Placement]], decoder: str) -> _Traffic:
    """An event is one multicast packet to every PE of its own layer (recurrent input) and of
    the next block; the embedding comes from the host."""
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
    return _Traffic(deliveries, cross, blocks[0].inputs + host_out, events, out_per_chip)


@dataclass
class _StepTime:
    latency_s: float
    compute_s: float
    comm_s: float
    sync_s: float
    host_s: float


def _step_time(
    by_block: dict[str, list[Placement]],
    chips: int,
    traffic: _Traffic,
    profile: SpiNNaker2Profile,
    f: float,
    pipelined: bool,
) -> _StepTime:
    """Pipelined, a step costs the slowest block; otherwise the blocks run one after another."""
    comm, link_latency = profile.communication, float(profile.communication.link_latency_s)
    block_s = {name: max(p.cycles for p in ps) / f for name, ps in by_block.items()}
    hops = _chip_hops(chips)
    link_rate = float(comm.link_packets_per_s) * int(profile.chip.links)
    serial = max(traffic.out_per_chip.values(), default=0.0) / link_rate if chips > 1 else 0.0
    comm_one = float(comm.noc_latency_s) + hops * link_latency
    sync_s = float(comm.sync_per_step_s) + hops * link_latency
    host_s = float(profile.host.latency_s) + traffic.host / float(profile.host.packets_per_s)
    if pipelined:
        compute_s, comm_s = max(block_s.values()), comm_one + serial
    else:
        compute_s, comm_s = sum(block_s.values()), len(block_s) * comm_one + serial
    latency = compute_s + comm_s + sync_s + host_s
    return _StepTime(latency, compute_s, comm_s, sync_s, host_s)


@dataclass
class _StepEnergy:
    static_j: float
    dynamic_j: float
    comm_j: float


def _step_energy(
    mapping: UnitMapping,
    traffic: _Traffic,
    profile: SpiNNaker2Profile,
    lvl: Level,
    precision: str,
    latency_s: float,
    work: float,
) -> _StepEnergy:
    """Powered PEs idle the whole step, busy cycles cost the difference; chips pay their base
    power; packets pay the network."""
    f = lvl.frequency_hz
    cycles = sum(p.cycles for p in mapping.placements)
    static_w = mapping.chips * float(profile.chip.power_pes_off_w) + mapping.pes * lvl.idle_power_w
    static_j = static_w * latency_s
    dynamic_j = cycles * (lvl.energy_per_cycle_j - lvl.idle_power_w / f)
    if precision == "int8":
        dynamic_j += work * float(profile.pe.mac_array_energy_per_mac_j)
    comm = profile.communication
    comm_j = (
        traffic.deliveries * float(comm.noc_energy_per_delivery_j)
        + traffic.cross_chip * float(comm.link_energy_per_packet_j)
        + traffic.host * float(profile.host.energy_per_packet_j)
    )
    return _StepEnergy(static_j, dynamic_j, comm_j)


def gpu_baseline(net: Network, gpu_profile: GpuProfile | None = None) -> dict[str, float]:
    """The same network on the GPU at batch size 1, dense fp32 kernels, one token at a time.

    A step is launch-bound or memory-bound, whichever is slower: time = max(kernels x launch
    overhead, weight bytes / bandwidth + FLOPs / peak). Weights stay in L2 when they fit.
    Energy = active idle power x time + bytes x energy per byte + FLOPs x energy per FLOP.
    """
    g = gpu_profile or load_profile(gpu=True)
    macs = float(sum(b.dense for b in net.blocks))
    weight_bytes = 4.0 * macs
    in_l2 = weight_bytes <= float(g.l2_bytes)
    bandwidth = float(g.l2_bytes_per_s if in_l2 else g.hbm_bytes_per_s)
    per_byte = float(g.l2_energy_per_byte_j if in_l2 else g.hbm_energy_per_byte_j)
    kernels = len(net.layers) * g.kernels_per_layer_step(net.arch) + int(g.kernels_per_token)
    if net.decoder is not None:
        kernels += int(g.kernels_decoder)
    flops = 2.0 * macs
    latency = max(
        kernels * float(g.kernel_launch_s),
        weight_bytes / bandwidth + flops / float(g.peak_fp32_flops),
    )
    energy = (
        float(g.active_idle_power_w) * latency
        + weight_bytes * per_byte
        + flops * float(g.energy_per_flop_j)
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


def result_json(result: SimulationResult) -> str:
    return json.dumps(result.to_dict(), indent=2, default=float)
