"""What the benchmark modules share: the row of the result table, robust timing and the
machine description.

Every figure is a ratio of a candidate to a baseline measured in the same process, in
interleaved rounds (baseline, candidate, candidate, baseline, ...), so that a machine whose
load changes while the benchmark runs shifts both alike; the figure is the median of the
per-round ratios. In-process figures run single-threaded and are timed in process CPU time
(`time.process_time`): on a shared machine, time spent descheduled is not the code's cost,
and for one busy thread CPU time is what the wall clock shows on an idle machine. The wall
clock ratio is kept beside it in bench.json (`details.wall_ratio`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    section: str  # training | inference | overheads
    figure: str
    measured: float  # the candidate's figure, in `unit`
    baseline: float  # the baseline's figure, in `unit`
    unit: str
    ratio: float  # see `higher_is_better`
    target: float | None  # None: reported for information, no target
    higher_is_better: bool = True  # False: the ratio must stay at or below the target
    note: str = ""
    details: dict = field(default_factory=dict)  # further figures, written to bench.json

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g}"

    def to_json(self) -> dict:
        out = asdict(self)
        out["met"] = self.met
        out["target_text"] = self.target_text
        return out


@dataclass
class Samples:
    """One candidate's measurements: per call the work done (`units`, e.g. tokens) and the
    time it took, as process CPU time and as wall time."""

    units: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    def seconds_per_unit(self, clock: str = "cpu") -> list[float]:
        return [t / u for t, u in zip(getattr(self, clock), self.units)]

    def units_per_second(self, clock: str = "cpu") -> list[float]:
        return [u / t for t, u in zip(getattr(self, clock), self.units)]


def measure(fn: Callable[[], float], samples: Samples) -> None:
    """Call fn (which returns the units of work it did) and record its times."""
    cpu, wall = time.process_time(), time.perf_counter()
    units = fn()
    samples.cpu.append(time.process_time() - cpu)
    samples.wall.append(time.perf_counter() - wall)
    samples.units.append(float(units))


def interleaved(candidates: dict[str, Callable[[], float]], rounds: int) -> dict[str, Samples]:
    """Measure each candidate `rounds` times, alternating the order every round (ABBA...)."""
    names = list(candidates)
    results = {name: Samples() for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            measure(candidates[name], results[name])
    return results


def clock() -> str:
    """The clock of the in-process figures: CPU time when single-threaded, else wall time."""
    return "cpu" if torch.get_num_threads() == 1 else "wall"


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the per-round ratios (each round's pair measured back to back)."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load,
    }
