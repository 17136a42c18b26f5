"""What the deployment model refuses, as one-paragraph messages (the CLI prints them as is)."""

from __future__ import annotations


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
