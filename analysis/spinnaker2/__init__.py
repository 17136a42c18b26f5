"""A simulated SpiNNaker2 deployment: mapping onto processing elements, memory, and
latency / energy per token from a run's measured sparsity. docs/spinnaker2.md has the model,
its constants with their sources, the calibration and the sensitivity to each assumption.

Pipeline, read top to bottom (one module each):

    profile.py      every constant, typed, with a source or marked as     load_profile
                    assumed (analysis/profiles/*.yaml)
    network.py      masked matrices of each layer (and the decoder) with  network_from_model
                    per-unit event rates                                   network_from_config
                                                                           network_from_shapes
    mapping.py      each layer's units split into contiguous blocks, one   map_network
                    block per PE, compressed columns within the SRAM budget
    cost.py         event-driven cycles per PE, packets, sync, host I/O,   simulate
                    static + dynamic energy at a DVFS level; the same
                    network on the GPU, dense kernels at batch size 1      gpu_baseline
    calibration.py  Nazeer et al. 2024's deployment, model vs published    calibrate, sensitivity

Why units are the unit of placement: an EGRU (or GRU / LSTM) unit needs all of its gate
pre-activations to update its state and decide whether it emits, so all gate rows of a unit
live on the same PE and the unit's event leaves from there. Every PE of a layer receives
every event addressed to that layer (multicast) and walks its own slice of the event's
compressed column, so a silent unit costs nothing downstream, while a PE still pays the
per-packet cost for events its slice has no non-zeros for.
"""

from duosparse import schema

from .calibration import calibrate, calibration_network, markdown_report, sensitivity
from .cost import (
    DECODER_PLACES,
    SimulationResult,
    gpu_baseline,
    performance_level,
    result_json,
    simulate,
    simulate_or_refuse,
)
from .errors import DoesNotFit, MappingError, ProfileError, SimulationError
from .mapping import PE_POLICIES, PRECISIONS, UnitMapping, map_network, materialize
from .network import Network, network_from_config, network_from_model, network_from_shapes
from .profile import GpuProfile, Profile, SpiNNaker2Profile, load_profile

FIGURES = schema.SPINNAKER2_FIGURES  # logged on a run as hw/spinnaker2/<figure>
ARTIFACT = schema.ARTIFACT_SPINNAKER2

__all__ = [
    "ARTIFACT",
    "DECODER_PLACES",
    "FIGURES",
    "PE_POLICIES",
    "PRECISIONS",
    "DoesNotFit",
    "GpuProfile",
    "MappingError",
    "Network",
    "Profile",
    "ProfileError",
    "SimulationError",
    "SimulationResult",
    "SpiNNaker2Profile",
    "UnitMapping",
    "calibrate",
    "calibration_network",
    "gpu_baseline",
    "load_profile",
    "map_network",
    "markdown_report",
    "materialize",
    "network_from_config",
    "network_from_model",
    "network_from_shapes",
    "performance_level",
    "result_json",
    "sensitivity",
    "simulate",
    "simulate_or_refuse",
]
