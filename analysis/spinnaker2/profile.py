"""Hardware profiles: every constant of the deployment model, typed, with where it comes from.

A profile file (analysis/profiles/*.yaml) groups its constants in sections; each constant is
a mapping with `value`, `unit`, and either `source` or `assumed: true` with a `note`:

    constants:
      pe:
        usable_sram_bytes: {value: 98304, unit: B, source: "..."}

load_profile splits every constant into its value and its provenance, then validates the
values against the typed sections below: the model reads `profile.pe.usable_sram_bytes` (an
int), the reports read `profile.provenance["pe.usable_sram_bytes"]`. A constant's name is its
dotted path inside `constants:` (or `calibration:`), as on the command line
(`--set host.latency_s=0`) and in docs/spinnaker2.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from duosparse.config import read_yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import ProfileError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
DEFAULT_PROFILE = PROFILE_DIR / "spinnaker2.yaml"
DEFAULT_GPU_PROFILE = PROFILE_DIR / "gpu_a100.yaml"

# Used as a real number, but kept as the file wrote it (int or float): the sensitivity table
# scales an int constant to an int.
Number = int | float

P = TypeVar("P", bound="Profile")


class Provenance(BaseModel):
    """Where a constant's value comes from: a source, or an assumption with the reason."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    section: str  # the file's section holding it: constants | calibration
    unit: str
    source: str | None = None
    assumed: bool = False
    note: str = ""

    @model_validator(mode="after")
    def _sourced_or_explained(self) -> Provenance:
        if not (self.source and self.source.strip()) and not (self.assumed and self.note.strip()):
            raise ValueError(
                "needs a `source`, or `assumed: true` with a `note` saying why this value"
            )
        return self


@dataclass(frozen=True)
class Constant:
    """One constant as the reports list it: its value with its provenance."""

    name: str  # dotted, e.g. "levels.high.voltage_v"
    value: Any
    unit: str
    source: str | None
    assumed: bool
    note: str


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the SpiNNaker2 profile's sections (analysis/profiles/spinnaker2.yaml) ------------------


class Chip(_Section):
    pes: int
    reserved_pes: int  # not available to the application
    chips_per_board: int
    links: int
    dram_bytes: int
    power_pes_off_w: float
    power_all_busy_w: float
    all_busy_level: str  # the performance level power_all_busy_w was measured at


class Pe(_Section):
    sram_bytes: int
    usable_sram_bytes: int
    idle_power_fraction: float
    mac_array_macs_per_cycle: int
    mac_array_matvec_macs_per_cycle: Number
    mac_array_energy_per_mac_j: float


class VoltageFrequency(_Section):
    voltage_v: float
    frequency_hz: float


class Levels(_Section):
    """Performance levels (DVFS) by name, `levels.high.voltage_v`, and the default one."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, VoltageFrequency]  # the levels themselves: low, high, ...

    default: str

    def names(self) -> list[str]:
        return sorted(self.model_extra or {})

    def get(self, name: str) -> VoltageFrequency | None:
        return (self.model_extra or {}).get(name)


class Layout(_Section):
    value_bytes_fp32: int
    value_bytes_int8: int
    index_bytes: int
    pointer_bytes: int
    state_bytes_per_unit: int
    state_bytes_per_gate: int
    buffer_bytes: int


class Cycles(_Section):
    per_event: Number
    per_nnz_fp32: Number
    per_unit: Number
    per_gate: Number
    per_logit: Number
    per_event_sent: Number
    per_step: Number
    per_mac_invocation: Number


class Communication(_Section):
    noc_energy_per_delivery_j: float
    noc_latency_s: float
    link_energy_per_packet_j: float
    link_latency_s: float
    link_packets_per_s: float
    sync_per_step_s: float


class Host(_Section):
    latency_s: float
    packets_per_s: float
    energy_per_packet_j: float


class CalibrationCase(_Section):
    """The published deployment (Nazeer et al. 2024) as the model runs it."""

    embedding_size: int
    hidden_sizes: list[int]
    vocab_size: int
    weight_sparsity: float
    event_rate: float
    tokens_per_inference: Number
    pes: int
    level: str
    decoder: str
    precision: str


class Published(_Section):
    """Its published figures, per inference."""

    power_w: float
    latency_s: float
    energy_j: float
    weight_bytes_per_pe: Number
    gpu_power_w: float
    gpu_latency_s: float
    gpu_energy_j: float
    test_perplexity: float


class Calibration(_Section):
    case: CalibrationCase
    published: Published
    tolerance: float  # relative; model / published must lie within 1 +- tolerance


# --- profiles ---------------------------------------------------------------------------------


class Profile(BaseModel):
    """A hardware profile: its constants in typed sections, as in the file, and the provenance
    of each by dotted name (in file order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Sections of constants besides `constants:`, whose sections are the profile's own fields.
    extra_sections: ClassVar[tuple[str, ...]] = ()

    name: str
    path: Path
    description: str = ""
    provenance: dict[str, Provenance]

    @classmethod
    def from_tree(cls: type[P], tree: Any, path: Path) -> P:
        """Validate a profile file's parsed YAML."""
        sections = ("constants", *cls.extra_sections)
        if not isinstance(tree, dict) or not isinstance(tree.get("constants"), dict):
            raise ProfileError(
                f"Hardware profile '{path}' must be a mapping with a `constants` section."
            )
        unknown = sorted(set(tree) - {"profile", "description", *sections})
        if unknown:
            raise ProfileError(
                f"Hardware profile '{path}' has unknown top-level keys ({', '.join(unknown)}); "
                f"a profile has {', '.join(['profile', 'description', *sections])}."
            )
        provenance: dict[str, Provenance] = {}
        values = {s: _split(tree[s], s, "", path, provenance) for s in sections if s in tree}
        fields = {
            "name": str(tree.get("profile", path.stem)),
            "path": path,
            "description": str(tree.get("description", "")),
            "provenance": provenance,
            **values.pop("constants"),
            **values,
        }
        return cls._validated(fields, lambda problems: _file_error(path, problems))

    @classmethod
    def _validated(cls: type[P], fields: dict[str, Any], message: Callable[[str], str]) -> P:
        try:
            return cls.model_validate(fields)
        except ValidationError as e:
            raise ProfileError(message(_problems(e, cls._place))) from None

    @classmethod
    def _place(cls, loc: list[str]) -> str:
        """Where a field is in the file: the sections of `constants:` are the profile's own."""
        return ".".join(loc if not loc or loc[0] in cls.extra_sections else ["constants", *loc])

    def _attribute_path(self, name: str) -> list[str]:
        """`pe.usable_sram_bytes` -> profile.pe.usable_sram_bytes; `case.pes` ->
        profile.calibration.case.pes."""
        section = self.provenance[name].section
        parts = name.split(".")
        return parts if section == "constants" else [section, *parts]

    def value(self, name: str) -> Any:
        """A constant's value by dotted name."""
        node: Any = self
        for part in self._attribute_path(name):
            node = getattr(node, part)
        return node

    def constants(self) -> dict[str, Constant]:
        """Every constant by dotted name, in file order, with its provenance (for reports)."""
        return {
            name: Constant(name, self.value(name), p.unit, p.source, p.assumed, p.note)
            for name, p in self.provenance.items()
        }

    def assumed(self) -> list[Constant]:
        return [c for c in self.constants().values() if c.assumed]

    def with_overrides(self: P, values: Mapping[str, Any]) -> P:
        """A copy with some constants changed, by dotted name (`{"host.latency_s": 0}`); the
        new values are validated as the file's are."""
        tree = self.model_dump()
        for name, value in values.items():
            if name not in self.provenance:
                raise ProfileError(f"'{name}' is not a constant of profile '{self.name}'.")
            *parents, leaf = self._attribute_path(name)
            node = tree
            for part in parents:
                node = node[part]
            node[leaf] = value
        changes = ", ".join(f"{k}={v!r}" for k, v in values.items())
        return self._validated(
            tree, lambda problems: f"Profile '{self.name}' with {changes} set: {problems}."
        )


class SpiNNaker2Profile(Profile):
    extra_sections: ClassVar[tuple[str, ...]] = ("calibration",)

    chip: Chip
    pe: Pe
    levels: Levels
    layout: Layout
    cycles: Cycles
    communication: Communication
    host: Host
    calibration: Calibration | None = None  # only calibrate() needs it

    @model_validator(mode="after")
    def _levels_exist(self) -> SpiNNaker2Profile:
        names = self.levels.names()
        for key, level in (
            ("levels.default", self.levels.default),
            ("chip.all_busy_level", self.chip.all_busy_level),
        ):
            if level not in names:
                raise ValueError(
                    f"`constants.{key}` is '{level}', not one of the levels ({', '.join(names)})"
                )
        return self


class GpuProfile(Profile):
    """The GPU baseline (analysis/profiles/gpu_a100.yaml): one flat section."""

    peak_fp32_flops: float
    hbm_bytes_per_s: float
    l2_bytes: int
    l2_bytes_per_s: float
    tdp_w: float
    active_idle_power_w: float
    kernel_launch_s: float
    kernels_per_layer_step_egru: int
    kernels_per_layer_step_gru: int
    kernels_per_layer_step_lstm: int
    kernels_per_token: int
    kernels_decoder: int
    hbm_energy_per_byte_j: float
    l2_energy_per_byte_j: float
    energy_per_flop_j: float

    def kernels_per_layer_step(self, arch: str) -> int:
        return int(getattr(self, f"kernels_per_layer_step_{arch}"))


def _problems(error: ValidationError, place: Callable[[list[str]], str]) -> str:
    """pydantic's errors as one line, each naming the key by its place in the file."""
    out = []
    for e in error.errors():
        where = place([str(part) for part in e["loc"]])
        at = f"`{where}` " if where else ""
        if e["type"] == "missing":
            out.append(f"{at}is missing")
        elif e["type"] == "extra_forbidden":
            out.append(f"{at}is not a key the model knows")
        elif e["type"] == "value_error":
            out.append(f"{at}{e['msg'].removeprefix('Value error, ')}")
        else:
            msg = f"{e['msg'][0].lower()}{e['msg'][1:]} (got {e['input']!r})"
            out.append(f"`{where}`: {msg}" if where else msg)
    more = f"; and {len(out) - 3} more problems" if len(out) > 3 else ""
    return "; ".join(out[:3]) + more


def _file_error(path: Path, problems: str) -> str:
    return (
        f"Hardware profile '{path}': {problems}. Compare it with {DEFAULT_PROFILE.name} / "
        f"{DEFAULT_GPU_PROFILE.name} in {PROFILE_DIR}."
    )


def _split(
    tree: Any, section: str, prefix: str, path: Path, provenance: dict[str, Provenance]
) -> Any:
    """The values of a section of constants, with each constant's provenance put into
    `provenance` by dotted name. A constant is a mapping with a `value`; any other mapping
    groups constants."""
    where = f"{section}.{prefix}" if prefix else section
    if not isinstance(tree, dict):
        raise ProfileError(
            _file_error(
                path,
                f"`{where}` must be a mapping: a group of constants, or a constant with "
                "`value`, `unit` and `source` (or `assumed: true` and a `note`)",
            )
        )
    if prefix and "value" in tree:
        try:
            meta = {k: v for k, v in tree.items() if k != "value"}
            provenance[prefix] = Provenance.model_validate({**meta, "section": section})
        except ValidationError as e:
            problems = _problems(e, lambda loc: ".".join([where, *loc]))
            raise ProfileError(_file_error(path, problems)) from None
        return tree["value"]
    return {
        key: _split(sub, section, f"{prefix}.{key}" if prefix else str(key), path, provenance)
        for key, sub in tree.items()
    }


def load_profile(path: str | Path | None = None, gpu: bool = False) -> Profile:
    """Read and validate a hardware profile (default: the SpiNNaker2 one, or the A100 one with
    gpu=True)."""
    path = Path(path) if path is not None else (DEFAULT_GPU_PROFILE if gpu else DEFAULT_PROFILE)
    if not path.is_file():
        raise ProfileError(
            f"Hardware profile '{path}' does not exist; the defaults are in {PROFILE_DIR}."
        )
    tree = read_yaml(path, "Hardware profile", f"a profile such as {DEFAULT_PROFILE}", ProfileError)
    return (GpuProfile if gpu else SpiNNaker2Profile).from_tree(tree, path)
